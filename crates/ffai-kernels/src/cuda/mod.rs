//! The CUDA backend ([`backend::CudaBackend`]) and its foundations: the kernel sources,
//! compiled at run time by NVRTC for the device's architecture (PTX cached on disk), and
//! the checks that turn a missing driver, NVRTC, cuBLAS or GPU into an error instead of a
//! panic.
//!
//! `cudarc` loads libcuda and libnvrtc at run time (`dynamic-loading`), so the crate builds
//! anywhere. CI has no GPU but compiles every kernel with NVRTC (the
//! `nvidia-cuda-nvrtc==13.0.88` wheel, whose `nvidia/cu13/lib` `scripts/test.sh` puts on
//! `LD_LIBRARY_PATH`), so a kernel that does not compile fails CI.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

pub mod backend;
pub mod quant;

/// The hand-listed kernel sources: (file name, source, the `extern "C"` kernels it
/// defines). The quantized-weight kernels (`quant.cu`, one set per weight type) list
/// theirs in [`quant::kernel_names`]; [`all_sources`] has every source.
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "elementwise.cu",
        include_str!("elementwise.cu"),
        &[
            "silu_mul",
            "swiglu_clamped",
            "gelu_mul",
            "gelu",
            "add_inplace",
            "add_scaled",
            "add_bias",
            "scale",
            "softcap",
            "to_bf16",
            "to_f16",
            "rms_norm",
            "layer_norm",
            "argmax_rows",
            "copy_rows",
        ],
    ),
    (
        "q8x.cu",
        include_str!("q8x.cu"),
        &[
            "quantize_q8x32",
            "quantize_q8x256",
            "norm_q8",
            "norm_q8_cl",
            "glu_q8",
            "mv_q8x_q4_0",
            "mv_q8x_q4_0_n1",
            "mv_q8x_q4_1",
            "mv_q8x_q4_1_n1",
            "mv_q8x_q5_0",
            "mv_q8x_q5_0_n1",
            "mv_q8x_q5_1",
            "mv_q8x_q5_1_n1",
            "mv_q8x_q8_0",
            "mv_q8x_q8_0_n1",
            "mv_q8x_mxfp4",
            "mv_q8x_mxfp4_n1",
            "mv_q8x_q4_0s",
            "mv_q8x_q4_0s_n1",
            "mv_q8x_q8_0s",
            "mv_q8x_q8_0s_n1",
            "mv_q8x_q4_k",
            "mv_q8x_q4_k_n1",
            "mv_q8x_q6_k",
            "mv_q8x_q6_k_n1",
            "mv_half_f16",
            "mv_half_f16_n1",
            "mv_half_bf16",
            "mv_half_bf16_n1",
            "mmq_q4_0",
            "mmq_q4_1",
            "mmq_q5_0",
            "mmq_q5_1",
            "mmq_q8_0",
            "mmq_mxfp4",
            "mmq_q4_k",
            "mmq_q4_0s",
            "mmq_q8_0s",
            "mmqs_q4_0s",
            "mmqs_q8_0s",
            "mmqs_q4_k",
            "mmq_moe_q4_0",
            "mmq_moe_q4_1",
            "mmq_moe_q5_0",
            "mmq_moe_q5_1",
            "mmq_moe_q8_0",
            "mmq_moe_mxfp4",
            "mmq_moe_q4_k",
            "mmq_moe_q4_0s",
            "mmq_moe_q8_0s",
            "mmqs_moe_q4_0s",
            "mmqs_moe_q8_0s",
            "mmqs_moe_q4_k",
            "moe_q8x_q4_0",
            "moe_q8x_q4_1",
            "moe_q8x_q5_0",
            "moe_q8x_q5_1",
            "moe_q8x_q8_0",
            "moe_q8x_mxfp4",
            "moe_q8x_q4_0s",
            "moe_q8x_q8_0s",
            "moe_q8x_q4_k",
            "moe_q8x_q6_k",
            "moe_half_f16",
            "moe_half_bf16",
        ],
    ),
    ("sample.cu", include_str!("sample.cu"), &["top_candidates_rows"]),
    (
        "moe.cu",
        include_str!("moe.cu"),
        &["clamp_inplace", "moe_route", "moe_add_bias", "moe_combine", "moe_group"],
    ),
    (
        "attention.cu",
        include_str!("attention.cu"),
        &[
            "rope_step",
            "kv_write_step",
            "rope_kv_write_step",
            "attn_spans",
            "attn_spans64",
            "attn_dec_h128",
            "attn_dec_h64",
            "attn_prefill_h128",
            "attn_prefill_h64",
            "attn_combine",
            "attn_mla",
        ],
    ),
    (
        "ssm.cu",
        include_str!("ssm.cu"),
        &[
            "mul_inplace",
            "relu_sq",
            "conv_step",
            "ssm_scan",
            "rms_norm_gated",
            "sigmoid_mul",
            "gdn_step",
            "copy_floats",
        ],
    ),
];

/// Prepended to every kernel source when it is compiled (the programmatic-dependent-launch
/// entry every kernel starts with; see the file).
pub const PRELUDE: &str = include_str!("prelude.cuh");

/// Every kernel source with the kernels it defines.
pub fn all_sources() -> Vec<(String, String, Vec<String>)> {
    let mut v: Vec<(String, String, Vec<String>)> = SOURCES
        .iter()
        .map(|(n, s, k)| (n.to_string(), s.to_string(), k.iter().map(|k| k.to_string()).collect()))
        .collect();
    v.push(("quant.cu".into(), quant::QUANT_SOURCE.into(), quant::kernel_names()));
    v
}

/// NVRTC's version, e.g. "13.0".
pub fn nvrtc_version() -> Result<String, String> {
    if !nvrtc_present() {
        return Err("NVRTC (libnvrtc.so.13) was not found".into());
    }
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: NVRTC is present (checked above); the call writes two ints we own.
    let r = catch_unwind(AssertUnwindSafe(|| unsafe {
        cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor)
    }))
    .map_err(|_| "NVRTC failed (panic in the binding)".to_string())?;
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {r:?}"));
    }
    Ok(format!("{major}.{minor}"))
}

/// 64-bit FNV-1a: a stable hash of a kernel source for the PTX cache's file names
/// (std's hasher is not promised stable across Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Where compiled PTX is kept: `$FFAI_CUDA_CACHE`, else `~/.cache/ffai/cuda`.
fn ptx_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FFAI_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ffai/cuda"))
}

/// The PTX of a kernel source for compute capability `major.minor`: from the disk cache
/// (keyed by the source's hash, the architecture and NVRTC's version) or compiled now and
/// cached. A cache that cannot be read or written only costs the compile.
pub fn load_ptx(name: &str, src: &str, major: i32, minor: i32) -> Result<String, String> {
    let arch: &'static str = match (major, minor) {
        (9, 0) => "sm_90",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        (m, n) => Box::leak(format!("sm_{m}{n}").into_boxed_str()),
    };
    let version = nvrtc_version()?;
    let file = ptx_cache_dir().map(|d| {
        d.join(format!(
            "{}-{:016x}-{arch}-nvrtc{version}.ptx",
            name.trim_end_matches(".cu"),
            fnv1a(PRELUDE.as_bytes()) ^ fnv1a(src.as_bytes()).rotate_left(1)
        ))
    });
    if let Some(f) = &file {
        if let Ok(ptx) = std::fs::read_to_string(f) {
            if ptx.contains(".version") {
                return Ok(ptx);
            }
        }
    }
    let ptx = compile(name, src, arch)?;
    if let Some(f) = &file {
        // Written whole then renamed, so a concurrent reader never sees half a file.
        if let Some(dir) = f.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, f);
        }
    }
    Ok(ptx)
}

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

/// Compiles one kernel source (after [`PRELUDE`]) to PTX for `arch` (e.g. `"sm_90"`).
/// Errors: NVRTC missing, or the compiler's log.
pub fn compile(name: &str, src: &str, arch: &'static str) -> Result<String, String> {
    // `#line` keeps the compiler's messages at the source file's own line numbers.
    let src = format!("{PRELUDE}\n#line 1 \"{name}\"\n{src}");
    if !nvrtc_present() {
        return Err("NVRTC (libnvrtc.so.13) was not found: install the CUDA toolkit or the nvidia-cuda-nvrtc wheel and put its library folder on LD_LIBRARY_PATH".into());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(name.to_string()),
        ..Default::default()
    };
    // cudarc panics on some failures (a library it cannot resolve a symbol in): contain it.
    match catch_unwind(AssertUnwindSafe(|| cudarc::nvrtc::compile_ptx_with_opts(&src, opts))) {
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
