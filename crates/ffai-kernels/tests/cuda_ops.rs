//! The CUDA kernels, run on a GPU, against the CPU ops on random inputs (fresh per check,
//! outputs poisoned first so an unwritten element fails). Without a GPU the test says why
//! and passes; with `FFAI_REQUIRE_GPU=1` (the GPU machine) a missing GPU is a failure.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use ffai_kernels::{cuda, ops};

struct Rng(u64);

impl Rng {
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }
}

/// A context on GPU 0, or None (printed) when there is none and none is required.
fn gpu() -> Option<Arc<CudaContext>> {
    match cuda::device_count() {
        Ok(_) => Some(CudaContext::new(0).expect("a CUDA context on GPU 0")),
        Err(e) => {
            assert!(
                std::env::var_os("FFAI_REQUIRE_GPU").is_none(),
                "FFAI_REQUIRE_GPU is set but: {e}"
            );
            println!("skipped: {e}");
            None
        }
    }
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output (unwritten?)");
    (num / den.max(1e-30)).sqrt()
}

fn upload(s: &Arc<CudaStream>, v: &[f32]) -> CudaSlice<f32> {
    s.clone_htod(v).expect("upload")
}

#[test]
fn elementwise_kernels_match_the_cpu_ops() {
    let Some(ctx) = gpu() else { return };
    let (major, minor) = ctx.compute_capability().expect("compute capability");
    let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
    let (name, src, _) = cuda::SOURCES[0];
    let ptx = cuda::compile(name, src, arch).unwrap_or_else(|e| panic!("{e}"));
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
        .expect("load the module");
    let s = ctx.default_stream();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for &len in &[1usize, 1000, 65_537] {
        let cfg = LaunchConfig::for_num_elems(len as u32);
        let (g, u) = (rng.vec(len, 6.0), rng.vec(len, 2.0));
        // silu_mul
        let mut dg = upload(&s, &g);
        let du = upload(&s, &u);
        let f = module.load_function("silu_mul").expect("silu_mul");
        let n = len as u32;
        let mut b = s.launch_builder(&f);
        b.arg(&mut dg).arg(&du).arg(&n);
        // SAFETY: the kernel's signature is (float*, const float*, unsigned), both buffers
        // hold `len` floats and the grid covers `len` threads with a bounds check.
        unsafe { b.launch(cfg) }.expect("launch silu_mul");
        let got = s.clone_dtoh(&dg).expect("download");
        let mut want = g.clone();
        ops::silu_mul(&mut want, &u);
        let e = rel_err(&got, &want);
        assert!(e < 1e-6, "silu_mul len {len}: relative error {e}");
        // add_inplace and scale
        let mut dx = upload(&s, &g);
        let f = module.load_function("add_inplace").expect("add_inplace");
        let mut b = s.launch_builder(&f);
        b.arg(&mut dx).arg(&du).arg(&n);
        // SAFETY: (float*, const float*, unsigned) over `len` floats each, as above.
        unsafe { b.launch(cfg) }.expect("launch add_inplace");
        let f = module.load_function("scale").expect("scale");
        let k = 0.37f32;
        let mut b = s.launch_builder(&f);
        b.arg(&mut dx).arg(&k).arg(&n);
        // SAFETY: (float*, float, unsigned) over `len` floats.
        unsafe { b.launch(cfg) }.expect("launch scale");
        let got = s.clone_dtoh(&dx).expect("download");
        let want: Vec<f32> = g.iter().zip(&u).map(|(a, b)| (a + b) * k).collect();
        assert_eq!(got, want, "add_inplace then scale, len {len}: exact in f32");
    }
    // rms_norm: rows of several widths, one block of 256 threads a row.
    for &(rows, width) in &[(1usize, 64usize), (7, 576), (3, 5000)] {
        let x = rng.vec(rows * width, 3.0);
        let w = rng.vec(width, 1.5);
        let dx = upload(&s, &x);
        let dw = upload(&s, &w);
        let mut dout = upload(&s, &vec![f32::NAN; rows * width]);
        let f = module.load_function("rms_norm").expect("rms_norm");
        let (eps, wd) = (1e-6f32, width as u32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = s.launch_builder(&f);
        b.arg(&dx).arg(&dw).arg(&eps).arg(&wd).arg(&mut dout);
        // SAFETY: (const float*, const float*, float, unsigned, float*); `rows` blocks of
        // 256 threads (a power of two, within the kernel's 1024-entry shared array), each
        // row `width` floats inside the buffers.
        unsafe { b.launch(cfg) }.expect("launch rms_norm");
        let got = s.clone_dtoh(&dout).expect("download");
        let mut want = vec![0.0f32; rows * width];
        for r in 0..rows {
            ops::rms_norm(
                &x[r * width..(r + 1) * width],
                &w,
                eps,
                &mut want[r * width..(r + 1) * width],
            );
        }
        let e = rel_err(&got, &want);
        assert!(e < 1e-6, "rms_norm {rows}x{width}: relative error {e}");
    }
}
