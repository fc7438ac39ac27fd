//! The CUDA backend's foundations (issue 13, in progress): the kernel sources, compiled at
//! run time by NVRTC for the device's architecture, and the checks that turn a missing
//! driver, NVRTC or GPU into an error instead of a panic. No `Backend` implementation
//! uses them yet.
//!
//! `cudarc` loads libcuda and libnvrtc at run time (`dynamic-loading`), so the crate builds
//! anywhere. CI has no GPU but compiles every kernel with NVRTC (the
//! `nvidia-cuda-nvrtc==13.0.88` wheel, whose `nvidia/cu13/lib` `scripts/test.sh` puts on
//! `LD_LIBRARY_PATH`), so a kernel that does not compile fails CI.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Every kernel source: (file name, source, the `extern "C"` kernels it defines).
pub const SOURCES: &[(&str, &str, &[&str])] = &[(
    "elementwise.cu",
    include_str!("elementwise.cu"),
    &["silu_mul", "add_inplace", "scale", "rms_norm"],
)];

/// Whether libnvrtc can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library by its candidate names; nothing from it is
    // called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: as for `nvrtc_present`.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Compiles one kernel source to PTX for `arch` (e.g. `"sm_90"`). Errors: NVRTC missing,
/// or the compiler's log.
pub fn compile(name: &str, src: &str, arch: &'static str) -> Result<String, String> {
    if !nvrtc_present() {
        return Err("NVRTC (libnvrtc.so.13) was not found: install the CUDA toolkit or the nvidia-cuda-nvrtc wheel and put its library folder on LD_LIBRARY_PATH".into());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(name.to_string()),
        ..Default::default()
    };
    // cudarc panics on some failures (a library it cannot resolve a symbol in): contain it.
    match catch_unwind(AssertUnwindSafe(|| cudarc::nvrtc::compile_ptx_with_opts(src, opts))) {
        Ok(Ok(ptx)) => Ok(ptx.to_src()),
        Ok(Err(e)) => Err(format!("{name}: {e}")),
        Err(_) => Err(format!("{name}: NVRTC failed (panic in the binding)")),
    }
}

/// CUDA devices on this machine; an error that says why when there is no usable one.
pub fn device_count() -> Result<usize, String> {
    if !driver_present() {
        return Err("no CUDA driver (libcuda.so) on this machine".into());
    }
    let count = catch_unwind(|| {
        cudarc::driver::result::init().map_err(|e| format!("the CUDA driver failed to start: {e}"))?;
        cudarc::driver::result::device::get_count().map_err(|e| format!("cannot count CUDA devices: {e}"))
    })
    .map_err(|_| "the CUDA driver failed to start (panic in the binding)".to_string())??;
    match usize::try_from(count) {
        Ok(0) | Err(_) => Err("the CUDA driver found no GPU".into()),
        Ok(n) => Ok(n),
    }
}
