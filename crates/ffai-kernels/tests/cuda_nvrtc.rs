//! Every CUDA kernel source compiles with NVRTC for Hopper (sm_90) and defines the kernels
//! it lists; no GPU needed, but NVRTC is (CI installs it: scripts/test.sh). A missing
//! NVRTC fails this test rather than skipping it. Whether a GPU is present is reported as
//! an error string, never a panic.

use ffai_kernels::cuda;

#[test]
fn every_kernel_compiles_for_sm90() {
    assert!(
        cuda::nvrtc_present(),
        "NVRTC not found: `python3 -m pip install nvidia-cuda-nvrtc==13.0.88` and add its nvidia/cu13/lib to LD_LIBRARY_PATH (scripts/test.sh does)"
    );
    for (name, src, kernels) in cuda::all_sources() {
        let ptx = cuda::compile(&name, &src, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        assert!(ptx.contains(".target sm_90"), "{name}: {}", &ptx[..ptx.len().min(400)]);
        for k in &kernels {
            assert!(
                ptx.contains(&format!(".entry {k}(")),
                "{name}: no kernel {k} in the PTX"
            );
        }
        // Every kernel waits for its predecessor at entry (prelude.cuh's PDL_ENTRY): the
        // backend launches them all with programmatic dependent launch, so one without
        // the wait could read a buffer the kernel before it is still writing.
        let entries: Vec<&str> = ptx.split(".visible .entry ").skip(1).collect();
        assert_eq!(entries.len(), kernels.len(), "{name}: entries in the PTX");
        for body in entries {
            let k = body.split('(').next().unwrap_or(body);
            assert!(
                body.contains("griddepcontrol.wait"),
                "{name}: kernel {k} does not start with PDL_ENTRY()"
            );
        }
        // And the list is complete: a kernel the source defines but does not list is
        // never loaded, and a launch of it fails only on a GPU ("no CUDA kernel named").
        for line in ptx.lines() {
            if let Some(rest) = line.trim_start().strip_prefix(".visible .entry ") {
                let k = rest.split('(').next().unwrap_or(rest).trim();
                assert!(kernels.iter().any(|x| x == k), "{name}: kernel {k} is not listed");
            }
        }
    }
}

#[test]
fn a_kernel_that_does_not_compile_is_an_error_with_the_log() {
    if !cuda::nvrtc_present() {
        panic!("NVRTC not found (see every_kernel_compiles_for_sm90)");
    }
    let e = cuda::compile(
        "broken.cu",
        "extern \"C\" __global__ void k() { undeclared(); }",
        "sm_90",
    )
    .unwrap_err();
    assert!(e.contains("broken.cu") && e.contains("undeclared"), "{e}");
}

#[test]
fn device_count_is_a_number_or_a_reason() {
    match cuda::device_count() {
        Ok(n) => assert!(n >= 1),
        Err(e) => {
            assert!(!e.is_empty());
            assert!(
                std::env::var_os("FFAI_REQUIRE_GPU").is_none(),
                "FFAI_REQUIRE_GPU is set but: {e}"
            );
        }
    }
}
