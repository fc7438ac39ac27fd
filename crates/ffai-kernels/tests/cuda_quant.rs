//! The quantized-weight CUDA kernels (`cuda/quant.cu`).
//!
//! * `quant_kernels_compile_for_sm90` compiles the source with NVRTC (no GPU needed, but a
//!   missing NVRTC fails it, as in `cuda_nvrtc.rs`) and checks that the PTX defines every
//!   kernel of `kernel_names()` and no other.
//! * `mxfp4_code_lookup_of_the_q8x_products_matches_the_cpu` checks q8x.cu's E2M1 code
//!   lookup (emulated on the host) against the CPU's MXFP4 decoding.
//! * The GPU tests run every kernel of every weight type (the 17 GGUF types and all 18
//!   affine formats) on random rows against the CPU reference `quant::dequantize_row`:
//!   matvec within an f32-accumulation tolerance and bit-identical whatever the batch size
//!   `n`, dequant_bf16 and embed exactly. Outputs are poisoned (NaN) before each launch so
//!   an element the kernel does not write fails. Without a GPU they print why and pass;
//!   with `FFAI_REQUIRE_GPU=1` a missing GPU is a failure.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, PushKernelArg};
use ffai_kernels::cuda::{self, quant as cq};
use ffai_kernels::quant::{dequantize_row, quantize_row, WeightType};
use half::{bf16, f16};

// ------------------------------------------------------------------ no GPU needed

#[test]
fn quant_kernels_compile_for_sm90() {
    assert!(
        cuda::nvrtc_present(),
        "NVRTC not found: `python3 -m pip install nvidia-cuda-nvrtc==13.0.88` and add its nvidia/cu13/lib to LD_LIBRARY_PATH (scripts/test.sh does)"
    );
    let ptx = cuda::compile("quant.cu", cq::QUANT_SOURCE, "sm_90").unwrap_or_else(|e| panic!("{e}"));
    assert!(ptx.contains(".target sm_90"), "{}", &ptx[..ptx.len().min(400)]);
    let names = cq::kernel_names();
    assert_eq!(
        names.len(),
        5 * (17 + 18 + cq::SPLIT_TYPES.len()),
        "five kernels per type and per split layout"
    );
    for k in &names {
        assert!(ptx.contains(&format!(".entry {k}(")), "no kernel {k} in the PTX");
    }
    assert_eq!(
        ptx.matches(".entry ").count(),
        names.len(),
        "the PTX defines kernels kernel_names() does not list"
    );
}

#[test]
fn kernel_tags_and_launch_shapes() {
    assert_eq!(cq::kernel_tag(WeightType::Q4K), "q4_k");
    assert_eq!(cq::kernel_tag(WeightType::IQ4NL), "iq4_nl");
    assert_eq!(cq::kernel_tag(WeightType::BF16), "bf16");
    assert_eq!(cq::kernel_tag(WeightType::affine(4, 64).unwrap()), "affine_b4_g64");
    let names = cq::kernel_names();
    for tag in ["f32", "q8_0", "mxfp4", "affine_b3_g128", "affine_b8_g32"] {
        for kind in ["matvec", "matvec4", "moe_matvec", "dequant_bf16", "embed"] {
            assert!(names.contains(&format!("{kind}_{tag}")), "{kind}_{tag}");
        }
    }
    assert_eq!(cq::matvec_grid(1), (1, 1, 1));
    assert_eq!(cq::matvec_grid(7), (2, 1, 1));
    assert_eq!(cq::matvec_grid(300), (75, 1, 1));
    // 2 rows of 33 columns are 2 runs each: 4 threads, one block.
    assert_eq!(cq::dequant_bf16_grid(2, 33), (1, 1, 1));
    // A 500M-element matrix: 64-bit run counts, still one launch.
    assert_eq!(cq::dequant_bf16_grid(262_144, 2048), (262_144 * 64 / 256, 1, 1));
    assert_eq!(cq::embed_grid(4096, 5), (1, 5, 1));
    assert_eq!(cq::embed_grid(4097, 3), (2, 3, 1));
    assert_eq!(cq::MATVEC_MAX_N, 8);
}

// ------------------------------------------------------------------ test data

/// SplitMix64: tiny, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn byte(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Roughly normal (sum of uniforms), mean 0, sd 1.
    fn normal(&mut self) -> f32 {
        (0..12).map(|_| self.unit()).sum::<f32>() - 6.0
    }
}

/// Byte offsets of the f16 scale / min fields in one block of a GGUF quant type.
fn f16_fields(ty: WeightType) -> &'static [usize] {
    match ty {
        WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => &[0],
        WeightType::Q4_1 | WeightType::Q5_1 | WeightType::Q4K | WeightType::Q5K => &[0, 2],
        WeightType::Q6K => &[208],
        WeightType::Q2K => &[80, 82],
        WeightType::Q3K => &[108],
        WeightType::IQ4NL | WeightType::IQ4XS => &[0],
        _ => &[],
    }
}

/// A sane finite scale: mostly uniform in ±0.05, sometimes zero or an f16 subnormal.
fn random_field(rng: &mut Rng) -> f16 {
    match rng.below(16) {
        0 => f16::ZERO,
        1 => f16::from_bits(1 + rng.below(0x3FF) as u16),
        _ => f16::from_f32(rng.uniform(-0.05, 0.05)),
    }
}

/// A random well-formed quantized row: every bit pattern of the levels is valid, so the
/// bytes are random except the scale fields, which get sane finite values (as the CPU
/// tests in tests/quant.rs build them). Reaches level / scale combinations the quantizer
/// never writes (negative sub-scales, every MXFP4 exponent range, ...).
fn random_quant_row(rng: &mut Rng, ty: WeightType, cols: usize) -> Vec<u8> {
    let mut row: Vec<u8> = (0..ty.row_bytes(cols).unwrap()).map(|_| rng.byte()).collect();
    if let WeightType::Affine { group, .. } = ty {
        // f32 scales, then f32 biases, one per group (affine.rs's row layout).
        let nb = cols / group as usize;
        for k in 0..2 * nb {
            let v = rng.uniform(-0.05, 0.05);
            row[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
        }
        return row;
    }
    for block in row.chunks_exact_mut(ty.block_bytes()) {
        for &at in f16_fields(ty) {
            block[at..at + 2].copy_from_slice(&random_field(rng).to_bits().to_le_bytes());
        }
        match ty {
            WeightType::Q8K => block[0..4].copy_from_slice(&random_field(rng).to_f32().to_le_bytes()),
            // Scales 2^-28 ..= 2^8, sometimes the two subnormal ones.
            WeightType::MXFP4 => {
                block[0] = if rng.below(16) == 0 {
                    rng.below(2) as u8
                } else {
                    100 + rng.below(36) as u8
                }
            }
            _ => {}
        }
    }
    row
}

/// `rows` stored rows of `cols` elements. Float types: random values over six decades.
/// Quantized types: even rows are `quantize_row` of random normal values, odd rows random
/// well-formed blocks.
fn random_matrix(rng: &mut Rng, ty: WeightType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = ty.row_bytes(cols).unwrap();
    let mut w = vec![0u8; rows * rb];
    for (r, row) in w.chunks_exact_mut(rb).enumerate() {
        if !ty.is_quantized() {
            let vals: Vec<f32> = (0..cols)
                .map(|_| rng.normal() * 10f32.powf(rng.uniform(-3.0, 3.0)))
                .collect();
            quantize_row(ty, &vals, row).unwrap();
        } else if r % 2 == 0 {
            let vals: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
            quantize_row(ty, &vals, row).unwrap_or_else(|e| panic!("{e}"));
        } else {
            row.copy_from_slice(&random_quant_row(rng, ty, cols));
        }
    }
    w
}

/// The CPU reference: every row dequantized.
fn dequantize(ty: WeightType, w: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let rb = ty.row_bytes(cols).unwrap();
    let mut out = vec![0.0f32; rows * cols];
    for (row, o) in w.chunks_exact(rb).zip(out.chunks_exact_mut(cols.max(1))) {
        dequantize_row(ty, row, o);
    }
    out
}

/// The split row layout: each row's levels in block order, then its scales in block
/// order, the same bytes rearranged; the threaded split equals the one-thread split; no
/// split for other types or widths that are not whole 256-element runs.
#[test]
fn split_rows_rearranges_each_row() {
    let mut rng = Rng(0x5B11_7000);
    for ty in cq::SPLIT_TYPES {
        let levels = cq::split_levels(ty, 512).expect("512 columns split");
        let block = ty.row_bytes(32).unwrap();
        assert_eq!(block, levels + 2);
        for (rows, cols) in [(1, 256), (3, 512), (2500, 1280)] {
            let w = random_matrix(&mut rng, ty, rows, cols);
            let out = cq::split_rows(ty, cols, &w, 1).unwrap();
            assert_eq!(out.len(), w.len());
            let (rb, nb) = (ty.row_bytes(cols).unwrap(), cols / 32);
            assert_eq!(rb % 16, 0, "{ty} {cols}: rows stay 16-byte multiples");
            for r in 0..rows {
                let (src, dst) = (&w[r * rb..(r + 1) * rb], &out[r * rb..(r + 1) * rb]);
                for b in 0..nb {
                    let blk = &src[b * block..(b + 1) * block];
                    assert_eq!(
                        &dst[b * levels..(b + 1) * levels],
                        &blk[2..],
                        "{ty} row {r} block {b} levels"
                    );
                    assert_eq!(
                        &dst[nb * levels + 2 * b..nb * levels + 2 * b + 2],
                        &blk[..2],
                        "{ty} row {r} block {b} scale"
                    );
                }
            }
            assert_eq!(
                cq::split_rows(ty, cols, &w, 7).unwrap(),
                out,
                "{ty} {rows}x{cols}: threads"
            );
        }
        assert!(cq::split_levels(ty, 96).is_none() && cq::split_levels(ty, 0).is_none());
        assert!(cq::split_rows(ty, 96, &random_matrix(&mut rng, ty, 2, 96), 1).is_none());
    }
    assert!(cq::split_levels(WeightType::Q4K, 256).is_none() && cq::split_levels(WeightType::Q4_1, 256).is_none());
}

/// q8x.cu's `e2m1x4` (the MXFP4 decode products' code lookup: four E2M1 codes to four
/// signed bytes, twice their values) emulated on the host, byte permutes included
/// (`__byte_perm(x, y, s)`: byte n of the result is byte `(s >> 4n) & 7` of y:x), for
/// every four codes against the CPU's decoding of a block whose scale is 1 (e = 128).
/// The sources are checked to hold the emulated steps and tables, so the two cannot
/// drift apart.
#[test]
fn mxfp4_code_lookup_of_the_q8x_products_matches_the_cpu() {
    let src = cuda::SOURCES.iter().find(|(n, _, _)| *n == "q8x.cu").expect("q8x.cu").1;
    for step in [
        "const u32 pairs = c | (c >> 4);",
        "const u32 sel = __byte_perm(pairs, 0u, 0x0020u) & 0x7777u;",
        "const u32 pos = __byte_perm(E2M1X2_POS_LO, E2M1X2_POS_HI, sel);",
        "const u32 neg = __byte_perm(E2M1X2_NEG_LO, E2M1X2_NEG_HI, sel);",
        "const u32 sign = ((c >> 3) & 0x01010101u) * 0xFFu;",
        "return (int)((pos & ~sign) | (neg & sign));",
    ] {
        assert!(src.contains(step), "q8x.cu's e2m1x4 no longer has `{step}`");
    }
    // The tables (prelude.cuh, shared with quant.cu's `mxfp4_value`) as emulated below.
    for def in [
        "#define E2M1X2_POS_LO 0x03020100u",
        "#define E2M1X2_POS_HI 0x0C080604u",
        "#define E2M1X2_NEG_LO 0xFDFEFF00u",
        "#define E2M1X2_NEG_HI 0xF4F8FAFCu",
    ] {
        assert!(cuda::PRELUDE.contains(def), "prelude.cuh no longer has `{def}`");
    }
    let perm = |x: u32, y: u32, s: u32| -> u32 {
        let bytes = ((y as u64) << 32) | x as u64;
        (0..4).fold(0u32, |r, n| {
            let i = (s >> (4 * n)) & 7;
            r | ((((bytes >> (8 * i)) & 0xFF) as u32) << (8 * n))
        })
    };
    let e2m1x4 = |c: u32| -> u32 {
        let pairs = c | (c >> 4);
        let sel = perm(pairs, 0, 0x0020) & 0x7777;
        let pos = perm(0x0302_0100, 0x0C08_0604, sel);
        let neg = perm(0xFDFE_FF00, 0xF4F8_FAFC, sel);
        let sign = ((c >> 3) & 0x0101_0101).wrapping_mul(0xFF);
        (pos & !sign) | (neg & sign)
    };
    let mut block = [0u8; 17];
    block[0] = 128;
    let mut vals = [0f32; 32];
    for codes in 0..1u32 << 16 {
        // Codes of elements 0..3 (low nibbles of bytes 0..3) and, reversed, 16..19.
        let (lo, hi) = (codes & 0xFFFF, codes.reverse_bits() >> 16);
        for j in 0..4 {
            block[1 + j] = (((lo >> (4 * j)) & 15) | (((hi >> (4 * j)) & 15) << 4)) as u8;
        }
        dequantize_row(WeightType::MXFP4, &block, &mut vals);
        // As the kernels split a loaded word of code bytes.
        let word = u32::from_le_bytes(block[1..5].try_into().unwrap());
        let (wl, wh) = (word & 0x0F0F_0F0F, (word >> 4) & 0x0F0F_0F0F);
        for (j, (l, h)) in e2m1x4(wl)
            .to_le_bytes()
            .into_iter()
            .zip(e2m1x4(wh).to_le_bytes())
            .enumerate()
        {
            assert_eq!(l as i8 as f32, vals[j], "codes {codes:04x}: element {j}");
            assert_eq!(h as i8 as f32, vals[16 + j], "codes {codes:04x}: element {}", 16 + j);
        }
    }
}

// ------------------------------------------------------------------ GPU

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

/// quant.cu compiled for the context's device.
fn module(ctx: &Arc<CudaContext>) -> Arc<CudaModule> {
    let (major, minor) = ctx.compute_capability().expect("compute capability");
    let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
    let ptx = cuda::compile("quant.cu", cq::QUANT_SOURCE, arch).unwrap_or_else(|e| panic!("{e}"));
    ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx))
        .expect("load the module")
}

fn function(m: &Arc<CudaModule>, name: &str) -> CudaFunction {
    m.load_function(name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// (rows, cols) shapes for a type: quantized types take whole 256-element super-blocks
/// (a multiple of every block length, group 128 included); float types also odd widths.
fn shapes(ty: WeightType) -> Vec<(usize, usize)> {
    let mut cols = vec![256, 512, 1280];
    if !ty.is_quantized() {
        cols.extend([33, 100]);
    }
    let mut out = Vec::new();
    for &c in &cols {
        for r in [1, 7, 64, 300] {
            out.push((r, c));
        }
    }
    out
}

/// Byte offset of the weights inside their device buffer for shape number `i`: odd
/// offsets check that the kernels assume no alignment of `w`.
fn weight_offset(i: usize) -> usize {
    [0, 3, 1, 2][i % 4]
}

/// Bitwise equality, any NaN matching any NaN.
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Launches `matvec_<tag>` on `n` activation rows starting at row `first` of `dx`, into a
/// fresh NaN-filled output; returns `n * rows` values.
#[allow(clippy::too_many_arguments)]
fn run_matvec(
    s: &Arc<CudaStream>,
    f: &CudaFunction,
    dw: &cudarc::driver::CudaView<'_, u8>,
    rb: usize,
    dx: &cudarc::driver::CudaSlice<f32>,
    first: usize,
    rows: usize,
    cols: usize,
    n: usize,
) -> Vec<f32> {
    let x = dx.slice(first * cols..(first + n) * cols);
    let mut dy = s.clone_htod(&vec![f32::NAN; n * rows]).expect("upload");
    let (rb, r32, c32, n32) = (rb as u64, rows as u32, cols as u32, n as u32);
    let mut b = s.launch_builder(f);
    b.arg(dw).arg(&rb).arg(&x).arg(&mut dy).arg(&r32).arg(&c32).arg(&n32);
    // SAFETY: the signature is (const u8*, u64, const float*, float*, u32, u32, u32); `dw`
    // holds `rows` rows of `rb` bytes, `x` n rows of `cols` floats, `dy` n * rows floats,
    // n <= MATVEC_MAX_N, and the grid is the one the kernel's contract names.
    unsafe { b.launch(cq::matvec_config(r32)) }.expect("launch matvec");
    s.clone_dtoh(&dy).expect("download")
}

#[test]
fn quant_kernels_match_the_cpu_reference() {
    let Some(ctx) = gpu() else { return };
    let m = module(&ctx);
    let s = ctx.default_stream();
    let mut rng = Rng(0x5EED_CAFE);
    let nmax = cq::MATVEC_MAX_N;
    // Every type as stored, then the split row layouts of the device copies (the same
    // values expected, from the stored rows).
    let variants = cq::kernel_types()
        .into_iter()
        .map(|ty| (ty, false))
        .chain(cq::SPLIT_TYPES.iter().map(|&ty| (ty, true)));
    for (ty, split) in variants {
        let tag = if split { cq::split_tag(ty) } else { cq::kernel_tag(ty) };
        let f_mv = function(&m, &format!("matvec_{tag}"));
        let f_dq = function(&m, &format!("dequant_bf16_{tag}"));
        let f_em = function(&m, &format!("embed_{tag}"));
        for (si, (rows, cols)) in shapes(ty).into_iter().enumerate() {
            let ctxs = format!("{tag} {rows}x{cols}");
            let rb = ty.row_bytes(cols).unwrap();
            let w = random_matrix(&mut rng, ty, rows, cols);
            let want = dequantize(ty, &w, rows, cols);
            // The split layout's rows are 16-byte aligned (its 16-byte loads need it).
            let off = if split { 0 } else { weight_offset(si) };
            let mut padded = vec![0xA5u8; off];
            if split {
                padded.extend(cq::split_rows(ty, cols, &w, 2).expect("a split layout for this width"));
            } else {
                padded.extend_from_slice(&w);
            }
            let dw_buf = s.clone_htod(&padded).expect("upload");
            let dw = dw_buf.slice(off..);
            let (r32, c32, rb64) = (rows as u32, cols as u32, rb as u64);

            // ---- matvec: n = 1 on each activation row alone, then n = 3 and n = 8.
            let x: Vec<f32> = (0..nmax * cols).map(|_| rng.normal()).collect();
            let dx = s.clone_htod(&x).expect("upload");
            let single: Vec<Vec<f32>> = (0..nmax)
                .map(|t| run_matvec(&s, &f_mv, &dw, rb, &dx, t, rows, cols, 1))
                .collect();
            for (t, got) in single.iter().enumerate() {
                let xt = &x[t * cols..(t + 1) * cols];
                let xn = xt.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                for (r, &g) in got.iter().enumerate() {
                    let wr = &want[r * cols..(r + 1) * cols];
                    let exact: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let wn = wr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                    // f32 accumulation: the error is a few ulps of the sum of |w·x|, at
                    // most ||w||·||x||; 1e-5 of that is generous for every width here.
                    let tol = 1e-5 * wn * xn + 1e-30;
                    assert!(
                        g.is_finite() && (g as f64 - exact).abs() <= tol,
                        "{ctxs} matvec token {t} row {r}: {g} vs {exact} (tolerance {tol})"
                    );
                }
            }
            for n in [3usize, 8] {
                let got = run_matvec(&s, &f_mv, &dw, rb, &dx, 0, rows, cols, n);
                for t in 0..n {
                    for r in 0..rows {
                        let (a, b) = (got[t * rows + r], single[t][r]);
                        assert!(
                            a.to_bits() == b.to_bits(),
                            "{ctxs} matvec n={n} token {t} row {r}: {a} but {b} alone (batch variance)"
                        );
                    }
                }
            }

            // ---- dequant_bf16: exactly the CPU values rounded to bf16.
            let mut dout = s.clone_htod(&vec![0xFFFFu16; rows * cols]).expect("upload");
            let mut b = s.launch_builder(&f_dq);
            b.arg(&dw).arg(&rb64).arg(&mut dout).arg(&r32).arg(&c32);
            // SAFETY: (const u8*, u64, u16*, u32, u32); `dw` holds `rows` rows of `rb`
            // bytes, `dout` rows * cols u16s, grid from the kernel's contract.
            unsafe { b.launch(cq::dequant_bf16_config(r32, c32)) }.expect("launch dequant_bf16");
            let got = s.clone_dtoh(&dout).expect("download");
            for (i, (&g, &v)) in got.iter().zip(&want).enumerate() {
                let e = bf16::from_f32(v).to_bits();
                assert!(
                    g == e,
                    "{ctxs} dequant_bf16 element {i}: {g:#06x}, want {e:#06x} (from {v})"
                );
            }

            // ---- embed: some rows, repeats included, bit-exact.
            let ids: Vec<u32> = (0..5)
                .map(|_| rng.below(rows) as u32)
                .chain([0, rows as u32 - 1])
                .collect();
            let n = ids.len();
            let dids = s.clone_htod(&ids).expect("upload");
            let mut dout = s.clone_htod(&vec![f32::NAN; n * cols]).expect("upload");
            let n32 = n as u32;
            let mut b = s.launch_builder(&f_em);
            b.arg(&dw).arg(&rb64).arg(&dids).arg(&mut dout).arg(&n32).arg(&c32);
            // SAFETY: (const u8*, u64, const u32*, float*, u32, u32); every id < rows,
            // `dout` holds n * cols floats, grid from the kernel's contract.
            unsafe { b.launch(cq::embed_config(c32, n32)) }.expect("launch embed");
            let got = s.clone_dtoh(&dout).expect("download");
            for (t, &id) in ids.iter().enumerate() {
                let id = id as usize;
                for c in 0..cols {
                    let (g, e) = (got[t * cols + c], want[id * cols + c]);
                    assert!(same(g, e), "{ctxs} embed token {t} (row {id}) column {c}: {g} vs {e}");
                }
            }
        }
    }
}

/// Hand-built values that the random data rarely reaches: bf16 rounding ties, values that
/// round up into the next binade or to infinity, NaN and infinities, through the BF16,
/// F16 and F32 kernels (dequant_bf16 bit-exact against `half`).
#[test]
fn dequant_bf16_rounding_edge_cases() {
    let Some(ctx) = gpu() else { return };
    let m = module(&ctx);
    let s = ctx.default_stream();
    let mut vals: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        f32::from_bits(0x3F80_8000), // tie, even: down
        f32::from_bits(0x3F81_8000), // tie, odd: up
        f32::from_bits(0x3F80_8001), // above the tie: up
        f32::from_bits(0x3FFF_FFFF), // rounds up into the next binade
        f32::MAX,                    // rounds to infinity
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7F80_0001), // signalling NaN: stays NaN
        f32::from_bits(0x0000_8000), // subnormal tie
        f32::from_bits(0x8001_8000),
    ];
    while vals.len() < 64 {
        vals.push(vals.len() as f32 * 0.3);
    }
    let cols = vals.len();
    let ty = WeightType::F32;
    let mut w = vec![0u8; ty.row_bytes(cols).unwrap()];
    quantize_row(ty, &vals, &mut w).unwrap();
    let dw = s.clone_htod(&w).expect("upload");
    let mut dout = s.clone_htod(&vec![0u16; cols]).expect("upload");
    let f = function(&m, "dequant_bf16_f32");
    let (r32, c32, rb64) = (1u32, cols as u32, w.len() as u64);
    let mut b = s.launch_builder(&f);
    b.arg(&dw).arg(&rb64).arg(&mut dout).arg(&r32).arg(&c32);
    // SAFETY: (const u8*, u64, u16*, u32, u32); one row of `cols` f32s, `cols` outputs.
    unsafe { b.launch(cq::dequant_bf16_config(r32, c32)) }.expect("launch dequant_bf16");
    let got = s.clone_dtoh(&dout).expect("download");
    for (&g, &v) in got.iter().zip(&vals) {
        let e = bf16::from_f32(v).to_bits();
        assert_eq!(g, e, "bf16({v:e} = {:#010x}): {g:#06x}, want {e:#06x}", v.to_bits());
    }
}
