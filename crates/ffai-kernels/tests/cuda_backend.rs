//! `CudaBackend` against `CpuBackend`, op by op, on random inputs (fresh per check): the
//! element-wise ops and norms, products for every weight type on both paths (the
//! matrix-vector kernel and the cuBLAS GEMM), embedding lookups, argmax, and the paged
//! step ops (RoPE, K/V writes, the per-head q/k norms fused into the RoPE launch,
//! attention over several sequences with GQA, windows and soft-capping: `attn_dec` and
//! the prompts' tensor-core kernel), plus batch invariance of the attention and of the
//! product's matrix-vector path, and the 8-bit sets a MoE layer's experts read. Without a GPU each test says why and passes; with
//! `FFAI_REQUIRE_GPU=1` (the GPU machine) a missing GPU is a failure.
//!
//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4, Q4_K and Q6_K decode products (q8x.cu) quantize the activations to 8 bits
//! as the CPU's q8 path does, so their oracle is the CPU's `dot_row_q8` (same activation
//! bytes, same integer dots; only the f32 sums' order differs).
//!
//! Tolerances (relative L2 error against the CPU): f32 arithmetic in another order 1e-5;
//! attention over the same f16 K/V 1e-4 (the tensor-core kernel too: q and the
//! probabilities enter its f16 products as two f16 parts each); a GEMM with bf16 operands (each rounded to 8
//! significant bits) 1e-2.

use std::sync::OnceLock;

use ffai_kernels::backend::{AttnShape, Backend, GroupLayout, HeadNorms, HostBytes, RopeParams, SeqRows, StepLayout};
use ffai_kernels::cpu::CpuBackend;
use ffai_kernels::cuda::backend::{CudaBackend, GEMM_MIN_ROWS, MMQ_DEFAULT_MAX_ROWS};
use ffai_kernels::cuda::device_count;
use ffai_kernels::quant::{dequantize_row, dot_row_q8, quantize_row, QuantizedActs, WeightType};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

fn gpu() -> Option<&'static CudaBackend> {
    static B: OnceLock<Option<CudaBackend>> = OnceLock::new();
    B.get_or_init(|| match device_count() {
        Ok(_) => Some(CudaBackend::new(0).unwrap_or_else(|e| panic!("CUDA backend: {e}"))),
        Err(e) => {
            assert!(
                std::env::var_os("FFAI_REQUIRE_GPU").is_none(),
                "FFAI_REQUIRE_GPU is set but: {e}"
            );
            println!("skipped: {e}");
            None
        }
    })
    .as_ref()
}

fn cpu() -> CpuBackend {
    CpuBackend::new(2)
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("non-finite output at {i}: {}", got[i]);
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn down(g: &CudaBackend, b: &<CudaBackend as Backend>::Buf, len: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; len];
    g.download(b, 0..len, &mut out);
    g.check().expect("GPU ops");
    out
}

#[test]
fn elementwise_ops_and_norms_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    // 4096: a width the norms' cluster form takes with FFAI_CUDA_NORM=cl (four slices;
    // scripts/gpu-run.sh's kernel stages run it so too), else one block a row.
    for &(rows, width) in &[(1usize, 7usize), (3, 576), (5, 2049), (2, 4096)] {
        let len = rows * width;
        let (x, y) = (rng.vec(len, 4.0), rng.vec(len, 2.0));
        let w = rng.vec(width, 1.5);
        let bias = rng.vec(width, 1.0);
        // Each op on both backends from the same inputs.
        let run = |name: &str| -> (Vec<f32>, Vec<f32>) {
            let mut cx = x.clone();
            let (cy, cw, cb) = (y.clone(), w.clone(), bias.clone());
            let mut gx = g.upload(&x);
            let (gy, gw, gb) = (g.upload(&y), g.upload(&w), g.upload(&bias));
            let mut cout = vec![0f32; len];
            let mut gout = g.alloc(len);
            match name {
                "silu_mul" => {
                    c.silu_mul(&mut cx, &cy, len);
                    g.silu_mul(&mut gx, &gy, len);
                }
                "gelu_mul" => {
                    c.gelu_mul(&mut cx, &cy, len);
                    g.gelu_mul(&mut gx, &gy, len);
                }
                "swiglu_clamped" => {
                    // x up to ±4 (clamps at 2.5 bite both ways).
                    c.swiglu_clamped(&mut cx, &cy, 1.702, 2.5, len);
                    g.swiglu_clamped(&mut gx, &gy, 1.702, 2.5, len);
                }
                "gelu" => {
                    c.gelu(&mut cx, len);
                    g.gelu(&mut gx, len);
                }
                "add" => {
                    c.add(&mut cx, &cy, len);
                    g.add(&mut gx, &gy, len);
                }
                "add_scaled" => {
                    c.add_scaled(&mut cx, &cy, 0.37, len);
                    g.add_scaled(&mut gx, &gy, 0.37, len);
                }
                "scale" => {
                    c.scale(&mut cx, -1.7, len);
                    g.scale(&mut gx, -1.7, len);
                }
                "softcap" => {
                    c.softcap(&mut cx, 3.0, len);
                    g.softcap(&mut gx, 3.0, len);
                }
                "add_bias" => {
                    c.add_bias(&mut cx, &cb, rows);
                    g.add_bias(&mut gx, &gb, rows);
                }
                "rms_norm" => {
                    c.rms_norm(&cx, &cw, 1e-6, rows, &mut cout);
                    g.rms_norm(&gx, &gw, 1e-6, rows, &mut gout);
                    return (cout, down(g, &gout, len));
                }
                "add_rms_norm" => {
                    // The fused residual add and norm (its own kernel unless
                    // FFAI_CUDA_OLDER_KERNELS=1): both results equal the CPU's, and the GPU's
                    // equal its own add then rms_norm bit for bit.
                    let mut gx2 = g.upload(&down(g, &gx, len));
                    let mut gout2 = g.alloc(len);
                    g.add(&mut gx2, &gy, len);
                    g.rms_norm(&gx2, &gw, 1e-6, rows, &mut gout2);
                    c.add_rms_norm(&mut cx, &cy, &cw, 1e-6, rows, &mut cout);
                    g.add_rms_norm(&mut gx, &gy, &gw, 1e-6, rows, &mut gout);
                    let (sum, sum2) = (down(g, &gx, len), down(g, &gx2, len));
                    let (norm, norm2) = (down(g, &gout, len), down(g, &gout2, len));
                    assert!(
                        sum.iter()
                            .zip(&sum2)
                            .chain(norm.iter().zip(&norm2))
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "add_rms_norm differs from add + rms_norm on the GPU"
                    );
                    let e = rel_err(&sum, &cx);
                    assert!(e < 1e-6, "add_rms_norm's sum: relative error {e}");
                    return (cout, norm);
                }
                "layer_norm" => {
                    c.layer_norm(&cx, &cw, &cb, 1e-5, rows, &mut cout);
                    g.layer_norm(&gx, &gw, &gb, 1e-5, rows, &mut gout);
                    return (cout, down(g, &gout, len));
                }
                _ => unreachable!(),
            }
            (cx, down(g, &gx, len))
        };
        for name in [
            "silu_mul",
            "swiglu_clamped",
            "gelu_mul",
            "gelu",
            "add",
            "add_scaled",
            "scale",
            "softcap",
            "add_bias",
            "rms_norm",
            "add_rms_norm",
            "layer_norm",
        ] {
            let (want, got) = run(name);
            let e = rel_err(&got, &want);
            assert!(e < 1e-5, "{name} {rows}x{width}: relative error {e}");
        }
    }
}

#[test]
fn argmax_matches_the_cpu_with_ties_and_nan() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(77);
    for &len in &[1usize, 5, 1000, 49_152, 262_144] {
        let mut x = rng.vec(len, 10.0);
        if len > 10 {
            // A tie (the lower index wins) and a NaN (never wins).
            let top = x.iter().cloned().fold(f32::MIN, f32::max) + 1.0;
            x[len / 2] = top;
            x[len - 1] = top;
            x[3] = f32::NAN;
        }
        let want = ffai_kernels::ops::argmax(&x).0 as u32;
        let b = g.upload(&x);
        assert_eq!(g.argmax(&b, 0..len), want, "len {len}");
        if len > 10 {
            // Relative to the range's start, as on the CPU.
            assert_eq!(g.argmax(&b, 2..len), want - 2, "len {len}, offset range");
        }
        g.check().unwrap();
    }
    // Several rows at once (the greedy step's one launch): each row's own argmax.
    let (n, width) = (7usize, 3001usize);
    let mut x = rng.vec(n * width, 10.0);
    x[2 * width + 10] = 1e9;
    x[2 * width + 20] = 1e9; // a tie within row 2: the lower index wins
    x[4 * width + 5] = f32::NAN;
    let b = g.upload(&x);
    let mut got = vec![u32::MAX; n];
    g.argmax_rows(&b, n, width, &mut got);
    for (r, &id) in got.iter().enumerate() {
        let want = ffai_kernels::ops::argmax(&x[r * width..(r + 1) * width]).0 as u32;
        assert_eq!(id, want, "argmax_rows row {r}");
    }
    assert_eq!(got[2], 10);
    g.check().unwrap();
}

/// `top_candidates_rows` of `x` (`n` rows of `width`) uploaded to `b`: ids, values, tails.
fn candidates<B: Backend>(
    b: &B,
    x: &[f32],
    n: usize,
    width: usize,
    k: usize,
    inv_t: &[f32],
) -> (Vec<u32>, Vec<f32>, Vec<f64>) {
    masked_candidates(b, x, n, width, k, inv_t, None)
}

/// [`candidates`] with the rows' allowed-token masks (`width.div_ceil(32)` words a row).
fn masked_candidates<B: Backend>(
    b: &B,
    x: &[f32],
    n: usize,
    width: usize,
    k: usize,
    inv_t: &[f32],
    mask: Option<&[u32]>,
) -> (Vec<u32>, Vec<f32>, Vec<f64>) {
    let buf = b.upload(x);
    let (mut ids, mut vals, mut tail) = (vec![0u32; n * k], vec![0.0f32; n * k], vec![0.0f64; n]);
    b.top_candidates_rows(&buf, n, width, k, inv_t, mask, &mut ids, &mut vals, &mut tail);
    (ids, vals, tail)
}

/// Ids and value bits equal, tails within the GPU's `expf`: a tail is a sum of positive
/// terms each within CUDA's 2-ulp expf (2.4e-7) of the host's exp, and 1e-6 relative still
/// catches one term missed or counted twice in a 128k row (about 1/128k = 7.8e-6 of an
/// average row's tail).
fn assert_same_candidates(got: &(Vec<u32>, Vec<f32>, Vec<f64>), want: &(Vec<u32>, Vec<f32>, Vec<f64>), what: &str) {
    assert_eq!(got.0, want.0, "ids, {what}");
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got.1), bits(&want.1), "values, {what}");
    assert_eq!(got.2.len(), want.2.len(), "tails, {what}");
    for (r, (&a, &b)) in got.2.iter().zip(&want.2).enumerate() {
        let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-6 * b.abs();
        assert!(ok, "tail of row {r}, {what}: GPU {a}, CPU {b}");
    }
}

/// The sampler's candidates (`top_candidates_rows`) against the CPU's: ids and values bit
/// for bit (the same scaled f32 values, the same total order), the tail mass (an f64 sum
/// of f32 exps: the GPU's `expf` may differ from the host's by an ulp or two and adds in
/// another order) within 1e-6 relative. Rows with ties across the radix digits, NaN,
/// ±inf and ±0, rows with fewer non-NaN values than k, k from 1 to the maximum, and a
/// Llama-3-sized vocabulary.
#[test]
fn top_candidates_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng(91);
    let max_k = ffai_kernels::ops::MAX_CANDIDATES;
    for &(n, width, k) in &[
        (3usize, 1usize, 1usize),
        (4, 7, 16),
        (5, 3001, 1),
        (5, 3001, 2),
        (7, 3001, 40),
        (3, 5000, max_k),
        (2, 128_256, 50),
        (2, 128_256, max_k),
    ] {
        let mut x = rng.vec(n * width, 8.0);
        for r in 0..n {
            let row = &mut x[r * width..(r + 1) * width];
            match r % 5 {
                // Few distinct values: long runs of ties at the k-th place.
                1 => row.iter_mut().for_each(|v| *v = (*v * 2.0).round()),
                // NaN, infinities and both zeros.
                2 => {
                    for (i, v) in row.iter_mut().enumerate() {
                        *v = match i % 7 {
                            0 => f32::NAN,
                            1 => f32::NEG_INFINITY,
                            2 => 0.0,
                            3 => -0.0,
                            _ => *v,
                        };
                    }
                    if width > 20 {
                        row[width / 2] = f32::INFINITY;
                    }
                }
                // Mostly NaN: fewer non-NaN values than k.
                3 => row.iter_mut().skip(3).for_each(|v| *v = f32::NAN),
                _ => {}
            }
        }
        // A scale per row, one large (T = 3.3e-5: values near the top spread far apart).
        let inv_t: Vec<f32> = (0..n).map(|r| [1.0f32, 1.0 / 0.7, 1.0 / 1.3, 3.0e4][r % 4]).collect();
        let want = candidates(&c, &x, n, width, k, &inv_t);
        let got = candidates(g, &x, n, width, k, &inv_t);
        g.check().unwrap();
        assert_same_candidates(&got, &want, &format!("{n} rows of {width}, k {k}"));
    }
}

/// `top_candidates_rows` with allowed-token masks (a grammar's) against the CPU's: the
/// same bits and tails as `top_candidates_match_the_cpu` asks. Masks: every token, none,
/// exactly one (k above the allowed count), sparse (1 in 50), half, whole words on and
/// off, and the last word's bits past the row set (they must be ignored); rows with NaN
/// and ties as there; widths that are and are not multiples of 32, up to Llama 3's
/// vocabulary. The same rows with every token allowed equal the unmasked call.
#[test]
fn masked_top_candidates_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng(93);
    let max_k = ffai_kernels::ops::MAX_CANDIDATES;
    for &(n, width, k) in &[
        (7usize, 45usize, 3usize),
        (7, 3001, 1),
        (7, 3001, 2),
        (7, 4096, 40),
        (7, 5000, max_k),
        (7, 128_256, 2),
        (7, 128_256, max_k),
    ] {
        let wpr = width.div_ceil(32);
        let mut x = rng.vec(n * width, 8.0);
        let mut mask = vec![0u32; n * wpr];
        for r in 0..n {
            let row = &mut x[r * width..(r + 1) * width];
            if r % 3 == 1 {
                row.iter_mut().for_each(|v| *v = (*v * 2.0).round());
            }
            if r % 3 == 2 {
                row.iter_mut().step_by(5).for_each(|v| *v = f32::NAN);
            }
            let m = &mut mask[r * wpr..(r + 1) * wpr];
            match r {
                0 => m.fill(u32::MAX),
                1 => {}
                2 => {
                    let t = (rng.next() as usize) % width;
                    m[t / 32] |= 1 << (t % 32);
                }
                3 => {
                    for t in 0..width {
                        if rng.next().is_multiple_of(50) {
                            m[t / 32] |= 1 << (t % 32);
                        }
                    }
                }
                4 => m.iter_mut().for_each(|w| *w = rng.next() as u32),
                _ => m.iter_mut().enumerate().for_each(|(i, w)| {
                    *w = if i.is_multiple_of(3) { u32::MAX } else { 0 };
                }),
            }
            if !width.is_multiple_of(32) {
                m[wpr - 1] |= !0u32 << (width % 32);
            }
        }
        let inv_t: Vec<f32> = (0..n).map(|r| [1.0f32, 1.0 / 0.7, 1.0 / 1.3, 3.0e4][r % 4]).collect();
        let what = format!("{n} rows of {width}, k {k}, masked");
        let want = masked_candidates(&c, &x, n, width, k, &inv_t, Some(&mask));
        let got = masked_candidates(g, &x, n, width, k, &inv_t, Some(&mask));
        g.check().unwrap();
        assert_same_candidates(&got, &want, &what);
        // Every token allowed: the unmasked result, bit for bit on the GPU itself.
        let all = vec![u32::MAX; n * wpr];
        let a = masked_candidates(g, &x, n, width, k, &inv_t, Some(&all));
        let b = candidates(g, &x, n, width, k, &inv_t);
        g.check().unwrap();
        assert_eq!(a.0, b.0, "ids, {what}, all allowed vs no mask");
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.1), bits(&b.1), "values, {what}, all allowed vs no mask");
        assert!(
            a.2.iter().zip(&b.2).all(|(p, q)| p.to_bits() == q.to_bits()),
            "tails, {what}, all allowed vs no mask"
        );
        // A row that allows nothing has no candidates and no tail.
        assert!(want.0[k..2 * k].iter().all(|&i| i == u32::MAX) && want.2[1] == 0.0);
    }
}

/// A random matrix of `ty`, as stored bytes, from random f32 rows.
fn random_matrix(ty: WeightType, rows: usize, cols: usize, rng: &mut Rng) -> Option<Vec<u8>> {
    let rb = ty.row_bytes(cols)?;
    let mut bytes = vec![0u8; rows * rb];
    for r in 0..rows {
        let src = rng.vec(cols, 1.0);
        quantize_row(ty, &src, &mut bytes[r * rb..(r + 1) * rb]).ok()?;
    }
    Some(bytes)
}

fn types() -> Vec<WeightType> {
    let mut v: Vec<WeightType> = WeightType::ALL.to_vec();
    for bits in [2u8, 3, 4, 5, 6, 8] {
        for group in [32u16, 64, 128] {
            v.push(WeightType::affine(bits, group).unwrap());
        }
    }
    v
}

/// The types whose decode products quantize the activations (q8x.cu): Q4_0, and unless
/// `FFAI_CUDA_OLDER_KERNELS=1` the others that have such a kernel (`Fast::for_matrix`).
fn gpu_q8(ty: WeightType) -> bool {
    let older = std::env::var_os("FFAI_CUDA_OLDER_KERNELS").is_some_and(|v| v == "1");
    ty == WeightType::Q4_0
        || !older
            && matches!(
                ty,
                WeightType::Q4_1
                    | WeightType::Q5_0
                    | WeightType::Q5_1
                    | WeightType::Q8_0
                    | WeightType::MXFP4
                    | WeightType::Q4K
                    | WeightType::Q6K
            )
}

/// Whether a product of `n` (GEMM_MIN_ROWS or more) rows of `ty` runs on the int8 tensor
/// cores against 8-bit activations (q8x.cu `mmq_*`: up to MMQ_DEFAULT_MAX_ROWS rows or
/// FFAI_CUDA_MMQ_MAX; off with FFAI_CUDA_MMQ=0 or the older kernels), so the reference is
/// the CPU's q8 dot as for the decode kernels.
fn gpu_mmq(ty: WeightType, n: usize) -> bool {
    let off = |v: &str, on: &str| std::env::var_os(v).is_some_and(|x| x == on);
    let max = std::env::var("FFAI_CUDA_MMQ_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MMQ_DEFAULT_MAX_ROWS);
    n <= max
        && !off("FFAI_CUDA_OLDER_KERNELS", "1")
        && !off("FFAI_CUDA_MMQ", "0")
        && matches!(
            ty,
            WeightType::Q4_0
                | WeightType::Q4_1
                | WeightType::Q5_0
                | WeightType::Q5_1
                | WeightType::Q8_0
                | WeightType::MXFP4
                | WeightType::Q4K
        )
}

/// Random activations with the quantizer's edge cases in row 1: an all-zero block and a
/// block of subnormals (127 / amax overflows there).
fn activations(rng: &mut Rng, n: usize, cols: usize) -> Vec<f32> {
    let mut x = rng.vec(n * cols, 1.0);
    if n > 1 && cols >= 512 {
        x[cols..cols + 32].fill(0.0);
        for (i, v) in x[cols + 256..cols + 288].iter_mut().enumerate() {
            *v = f32::from_bits(1 + 37 * i as u32) * if i % 3 == 0 { -1.0 } else { 1.0 };
        }
    }
    x
}

#[test]
fn products_match_the_cpu_for_every_weight_type() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(0xDEAD_BEEF_1234);
    let mut tested = Vec::new();
    let mut failed = Vec::new();
    for ty in types() {
        // Every type at one shape; the decode kernels of q8x.cu also at a wider one whose
        // rows span several passes of a warp (11 K-quant super-blocks, 88 legacy blocks),
        // and at 480 columns (15 legacy blocks): Q4_0 / Q8_0 rows of whole 256-element
        // runs are uploaded in the split row layout, these stay as stored.
        let fast = gpu_q8(ty) || matches!(ty, WeightType::F16 | WeightType::BF16);
        let shapes: &[(usize, usize)] = if fast {
            &[(96, 512), (40, 2816), (24, 480)]
        } else {
            &[(96, 512)]
        };
        for &(rows, cols) in shapes {
            let Some(bytes) = random_matrix(ty, rows, cols, &mut rng) else {
                continue;
            };
            tested.push(format!("{}@{cols}", ty.name()));
            // Every type is checked and every failure reported, not only the first.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                check_products(g, ty, rows, cols, bytes, &mut rng)
            }));
            if r.is_err() {
                failed.push(format!("{}@{cols}", ty.name()));
            }
        }
    }
    println!("tested: {}", tested.join(" "));
    assert!(
        failed.is_empty(),
        "products differ from the CPU for {failed:?} (messages above)"
    );
    assert!(tested.len() >= 20, "too few types could be quantized: {tested:?}");
}

fn check_products(g: &CudaBackend, ty: WeightType, rows: usize, cols: usize, bytes: Vec<u8>, rng: &mut Rng) {
    // The reference: the CPU's dequantized weights, an f64 dot (or, for the types whose
    // decode quantizes the activations, the CPU's q8 dot).
    let rb = ty.row_bytes(cols).unwrap();
    let mut wf = vec![0f32; rows * cols];
    for r in 0..rows {
        dequantize_row(ty, &bytes[r * rb..(r + 1) * rb], &mut wf[r * cols..(r + 1) * cols]);
    }
    let gm = g.matrix(ty, rows, cols, HostBytes::from_vec(bytes.clone()));
    // 40 rows: the tensor-core products (a partial 64-token tile); 77: cuBLAS by default,
    // two tiles of the tensor-core products with FFAI_CUDA_MMQ_MAX=100 or more.
    for &n in &[1usize, 5, 8, 13, GEMM_MIN_ROWS + 7, 77] {
        let x = activations(rng, n, cols);
        let exact: Vec<f32> = (0..n * rows)
            .map(|i| {
                let (t, r) = (i / rows, i % rows);
                (0..cols)
                    .map(|k| wf[r * cols + k] as f64 * x[t * cols + k] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let q8 = if n < GEMM_MIN_ROWS { gpu_q8(ty) } else { gpu_mmq(ty, n) };
        let want = if q8 {
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &x, n, cols);
            (0..n * rows)
                .map(|i| {
                    let (t, r) = (i / rows, i % rows);
                    dot_row_q8(ty, &bytes[r * rb..(r + 1) * rb], &acts, t)
                })
                .collect()
        } else {
            exact.clone()
        };
        let gx = g.upload(&x);
        let mut gy = g.upload(&vec![f32::NAN; n * rows]);
        g.matmul(&gm, &gx, n, &mut gy);
        let got = down(g, &gy, n * rows);
        let e = rel_err(&got, &want);
        let tol = if q8 || n < GEMM_MIN_ROWS || ty == WeightType::F32 {
            1e-5
        } else {
            1e-2
        };
        assert!(
            e < tol,
            "{} {rows}x{cols} n={n}: relative error {e} (tolerance {tol})",
            ty.name()
        );
        if q8 {
            // And the 8-bit activations stay close to the exact product (each element
            // is off by at most 1/254 of its block's largest magnitude).
            let e = rel_err(&got, &exact);
            assert!(e < 2e-2, "{} n={n}: q8 product vs exact: {e}", ty.name());
        }
        if n < GEMM_MIN_ROWS {
            // Batch invariance of the matrix-vector path: each row alone, bit for bit.
            for t in [0, n - 1] {
                let gx1 = g.upload(&x[t * cols..(t + 1) * cols]);
                let mut gy1 = g.alloc(rows);
                g.matmul(&gm, &gx1, 1, &mut gy1);
                let alone = down(g, &gy1, rows);
                assert!(
                    alone
                        .iter()
                        .zip(&got[t * rows..(t + 1) * rows])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} n={n}: row {t} differs from the same row alone",
                    ty.name()
                );
            }
        }
    }
    // Several matrices over one input (q/k/v, gate/up: one launch on the decode path):
    // each output the same bits as its own product.
    let rows2 = rows / 2 + 3;
    let gm2 = g.matrix(
        ty,
        rows2,
        cols,
        HostBytes::from_vec(random_matrix(ty, rows2, cols, rng).unwrap()),
    );
    for &n in &[1usize, 5, GEMM_MIN_ROWS + 1] {
        let gx = g.upload(&rng.vec(n * cols, 1.0));
        let (mut a, mut b, mut c) = (g.alloc(n * rows), g.alloc(n * rows2), g.alloc(n * rows));
        g.matmuls(&[&gm, &gm2, &gm], &gx, n, &mut [&mut a, &mut b, &mut c]);
        for (m, out, r) in [(&gm, &a, rows), (&gm2, &b, rows2), (&gm, &c, rows)] {
            let mut alone = g.alloc(n * r);
            g.matmul(m, &gx, n, &mut alone);
            let (x, y) = (down(g, out, n * r), down(g, &alone, n * r));
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{} n={n}: matmuls differs from matmul",
                ty.name()
            );
        }
    }
    // Embedding rows: the CPU's dequantization exactly.
    let ids = [0u32, 5, (rows - 1) as u32, 5];
    let mut ge = g.alloc(ids.len() * cols);
    g.embed(&gm, &ids, &mut ge);
    let got = down(g, &ge, ids.len() * cols);
    for (t, &id) in ids.iter().enumerate() {
        let want = &wf[id as usize * cols..(id as usize + 1) * cols];
        assert!(
            got[t * cols..(t + 1) * cols]
                .iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}: embedding row {id} is not the CPU's dequantization",
            ty.name()
        );
    }
}

/// A step over `seqs` = (first position, rows, window-group table of blocks).
struct Seq {
    p0: usize,
    n: usize,
    table: Vec<u32>,
}

fn layout(seqs: &[&Seq], bs: usize, n_blocks: usize, window: usize) -> StepLayout {
    let mut l = StepLayout::default();
    let mut g = GroupLayout {
        block_size: bs as u32,
        n_blocks: n_blocks as u32,
        window: window as u32,
        ..Default::default()
    };
    let mut row = 0u32;
    for s in seqs {
        let start = g.block_tables.len() as u32;
        g.block_tables.extend_from_slice(&s.table);
        g.seqs.push(SeqRows {
            first_row: row,
            n_rows: s.n as u32,
            table_start: start,
            table_len: s.table.len() as u32,
        });
        for i in 0..s.n {
            let p = s.p0 + i;
            l.positions.push(p as u32);
            g.slots.push(s.table[p / bs] * bs as u32 + (p % bs) as u32);
        }
        row += s.n as u32;
    }
    l.groups.push(g);
    l
}

#[test]
fn paged_step_ops_match_the_cpu_and_are_batch_invariant() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng(0xC0FFEE);
    // The checks below up to the tensor-core part are of attn_dec (every step of it):
    // the prompts' tensor-core attention is turned on for its own checks at the end.
    g.set_attn_tc(false);
    for &(nh, kvh, hd, window, softcap) in &[
        (8usize, 2usize, 64usize, 0usize, 0f32),
        (4, 1, 256, 0, 0.0),
        (6, 3, 128, 100, 0.0),
        (9, 3, 64, 0, 30.0),
        // GQA groups of eight and of ten (the eight-head kernel, then two chunks).
        (16, 2, 64, 0, 0.0),
        (20, 2, 128, 0, 0.0),
    ] {
        let bs = 32;
        let n_blocks = 64;
        // Three sequences with disjoint, shuffled blocks: lengths past one attention part
        // (64 positions) and a block boundary.
        let lens = [300usize, 45, 600];
        let mut free: Vec<u32> = (0..n_blocks as u32).rev().collect();
        for i in (1..free.len()).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            free.swap(i, j);
        }
        let seqs: Vec<Seq> = lens
            .iter()
            .map(|&len| Seq {
                p0: 0,
                n: len,
                table: (0..len.div_ceil(bs)).map(|_| free.pop().unwrap()).collect(),
            })
            .collect();
        let shape = AttnShape {
            n_heads: nh,
            n_kv_heads: kvh,
            head_dim: hd,
            cap: 0,
            window,
            scale: 1.0 / (hd as f32).sqrt(),
            softcap,
        };
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32))
            .collect();
        let (c_inv, g_inv) = (inv.clone(), g.upload(&inv));
        let total: usize = lens.iter().sum();
        let (mut ck, mut cv) = (
            c.alloc_kv_pages(n_blocks, bs, kvh, hd),
            c.alloc_kv_pages(n_blocks, bs, kvh, hd),
        );
        let (mut gk, mut gv) = (
            g.alloc_kv_pages(n_blocks, bs, kvh, hd),
            g.alloc_kv_pages(n_blocks, bs, kvh, hd),
        );
        // One step with every sequence's whole prompt (prefill), then the step's outputs.
        let l = layout(&seqs.iter().collect::<Vec<_>>(), bs, n_blocks, window);
        let (mut cs, mut gs) = (c.new_step(total, 4, 64, 1), g.new_step(total, 4, 64, 1));
        c.write_step(&l, &mut cs).unwrap();
        g.write_step(&l, &mut gs).unwrap();
        let q = rng.vec(total * nh * hd, 1.0);
        let k = rng.vec(total * kvh * hd, 1.0);
        let v = rng.vec(total * kvh * hd, 1.0);
        let (mut cq, mut ckx, cvx) = (q.clone(), k.clone(), v.clone());
        let (mut gq, mut gkx, gvx) = (g.upload(&q), g.upload(&k), g.upload(&v));
        let (crope, grope) = (
            RopeParams::<CpuBackend> {
                inv_freq: &c_inv,
                neox: true,
            },
            RopeParams::<CudaBackend> {
                inv_freq: &g_inv,
                neox: true,
            },
        );
        c.rope_step(&mut cq, total, nh, hd, &cs, &crope);
        c.rope_step(&mut ckx, total, kvh, hd, &cs, &crope);
        g.rope_step(&mut gq, total, nh, hd, &gs, &grope);
        g.rope_step(&mut gkx, total, kvh, hd, &gs, &grope);
        let e = rel_err(&down(g, &gq, total * nh * hd), &cq);
        assert!(e < 1e-5, "rope_step: relative error {e}");
        c.kv_write_step(&mut ck, &ckx, total, &cs, 0, &shape);
        c.kv_write_step(&mut cv, &cvx, total, &cs, 0, &shape);
        g.kv_write_step(&mut gk, &gkx, total, &gs, 0, &shape);
        g.kv_write_step(&mut gv, &gvx, total, &gs, 0, &shape);
        let mut cout = vec![0f32; total * nh * hd];
        let mut gout = g.alloc(total * nh * hd);
        c.attention_step(&cq, &ck, &cv, total, &cs, 0, &shape, None, &mut cout);
        g.attention_step(&gq, &gk, &gv, total, &gs, 0, &shape, None, &mut gout);
        let batched = down(g, &gout, total * nh * hd);
        // The fused RoPE + K/V write (its own kernel unless FFAI_CUDA_OLDER_KERNELS=1,
        // which scripts/gpu-run.sh also runs): the same q and k bits, and pools the attention
        // reads to the same bits.
        {
            let (mut fq, mut fk, fv) = (g.upload(&q), g.upload(&k), g.upload(&v));
            let (mut fkp, mut fvp) = (
                g.alloc_kv_pages(n_blocks, bs, kvh, hd),
                g.alloc_kv_pages(n_blocks, bs, kvh, hd),
            );
            g.rope_kv_write_step(&mut fq, &mut fk, &fv, total, &gs, &grope, &mut fkp, &mut fvp, 0, &shape);
            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same(&down(g, &fq, total * nh * hd), &down(g, &gq, total * nh * hd))
                    && same(&down(g, &fk, total * kvh * hd), &down(g, &gkx, total * kvh * hd)),
                "rope_kv_write_step's q/k differ from rope_step's"
            );
            let mut fout = g.alloc(total * nh * hd);
            g.attention_step(&fq, &fkp, &fvp, total, &gs, 0, &shape, None, &mut fout);
            assert!(
                same(&down(g, &fout, total * nh * hd), &batched),
                "attention over rope_kv_write_step's pools differs"
            );
            // With per-head q/k norms first (Qwen3; fused into the same launch for heads up
            // to 128 wide): against rms_norm per head and then rope_kv_write_step, the
            // same bits in q, k and the pools (through the attention over them).
            let (qw, kw) = (rng.vec(hd, 1.0), rng.vec(hd, 1.0));
            let (gqw, gkw) = (g.upload(&qw), g.upload(&kw));
            let norms = HeadNorms {
                q: &gqw,
                k: &gkw,
                eps: 1e-6,
            };
            let (mut nq, mut nk) = (g.upload(&q), g.upload(&k));
            let (mut sq, mut sk) = (g.alloc(total * nh * hd), g.alloc(total * kvh * hd));
            let (mut nkp, mut nvp) = (
                g.alloc_kv_pages(n_blocks, bs, kvh, hd),
                g.alloc_kv_pages(n_blocks, bs, kvh, hd),
            );
            g.qk_norm_rope_kv_write_step(
                &mut nq,
                &mut nk,
                &fv,
                &norms,
                (&mut sq, &mut sk),
                total,
                &gs,
                &grope,
                &mut nkp,
                &mut nvp,
                0,
                &shape,
            );
            let (rq, rk) = (g.upload(&q), g.upload(&k));
            let (mut rqn, mut rkn) = (g.alloc(total * nh * hd), g.alloc(total * kvh * hd));
            g.rms_norm(&rq, &gqw, 1e-6, total * nh, &mut rqn);
            g.rms_norm(&rk, &gkw, 1e-6, total * kvh, &mut rkn);
            let (mut rkp, mut rvp) = (
                g.alloc_kv_pages(n_blocks, bs, kvh, hd),
                g.alloc_kv_pages(n_blocks, bs, kvh, hd),
            );
            g.rope_kv_write_step(
                &mut rqn, &mut rkn, &fv, total, &gs, &grope, &mut rkp, &mut rvp, 0, &shape,
            );
            assert!(
                same(&down(g, &nq, total * nh * hd), &down(g, &rqn, total * nh * hd))
                    && same(&down(g, &nk, total * kvh * hd), &down(g, &rkn, total * kvh * hd)),
                "{nh}/{kvh}x{hd}: the fused per-head norms + RoPE differ from the separate ops"
            );
            let (mut na, mut ra) = (g.alloc(total * nh * hd), g.alloc(total * nh * hd));
            g.attention_step(&nq, &nkp, &nvp, total, &gs, 0, &shape, None, &mut na);
            g.attention_step(&rqn, &rkp, &rvp, total, &gs, 0, &shape, None, &mut ra);
            assert!(
                same(&down(g, &na, total * nh * hd), &down(g, &ra, total * nh * hd)),
                "{nh}/{kvh}x{hd}: attention over the fused norms' pools differs"
            );
        }
        let e = rel_err(&batched, &cout);
        assert!(
            e < 1e-4,
            "attention {nh}/{kvh}x{hd} window {window} softcap {softcap}: relative error {e}"
        );
        // Attention sinks (GPT-OSS): one logit per head, from far below the scores to far
        // above them, in the combine's denominator.
        let sinks: Vec<f32> = (0..nh).map(|h| (h as f32 * 2.3).sin() * 5.0 + 1.0).collect();
        let gsinks = g.upload(&sinks);
        let mut csout = vec![0f32; total * nh * hd];
        let mut gsout = g.alloc(total * nh * hd);
        c.attention_step(&cq, &ck, &cv, total, &cs, 0, &shape, Some(&sinks), &mut csout);
        g.attention_step(&gq, &gk, &gv, total, &gs, 0, &shape, Some(&gsinks), &mut gsout);
        let e = rel_err(&down(g, &gsout, total * nh * hd), &csout);
        assert!(
            e < 1e-4,
            "attention with sinks {nh}/{kvh}x{hd} window {window}: relative error {e}"
        );
        // The last sequence's last 3 rows again, alone (a decode-like step over the cache
        // already written): bit-identical to the same rows in the batch.
        let s = &seqs[2];
        let tail = Seq {
            p0: s.n - 3,
            n: 3,
            table: s.table.clone(),
        };
        let l1 = layout(&[&tail], bs, n_blocks, window);
        let mut gs1 = g.new_step(3, 1, 64, 1);
        g.write_step(&l1, &mut gs1).unwrap();
        let row0 = total - 3;
        let w = nh * hd;
        let gq1 = g.upload(&down(g, &gq, total * w)[row0 * w..]);
        let mut gout1 = g.alloc(3 * w);
        g.attention_step(&gq1, &gk, &gv, 3, &gs1, 0, &shape, None, &mut gout1);
        let alone = down(g, &gout1, 3 * w);
        assert!(
            alone
                .iter()
                .zip(&batched[row0 * w..])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "attention of rows alone differs from the same rows in a batch"
        );
        // A decode product right after the attention (the o projection): where the
        // attention wrote its output's 8-bit sets (attn_dec, FFAI_CUDA_ATTN_Q8=1, which
        // scripts/gpu-run.sh's kernel stages also run) the product reads them; the same
        // product over an uploaded copy quantizes afresh. Both must give the same bits.
        // (Without the switch both quantize afresh: then this checks nothing new.)
        let om = g.matrix(
            WeightType::Q4_0,
            64,
            w,
            HostBytes::from_vec(random_matrix(WeightType::Q4_0, 64, w, &mut rng).unwrap()),
        );
        // (Allocations and uploads forget the sets: all made before the attention.)
        let (mut gout2, mut after, mut fresh) = (g.alloc(3 * w), g.alloc(3 * 64), g.alloc(3 * 64));
        g.attention_step(&gq1, &gk, &gv, 3, &gs1, 0, &shape, None, &mut gout2);
        g.matmul(&om, &gout2, 3, &mut after);
        let copy = g.upload(&down(g, &gout2, 3 * w));
        g.matmul(&om, &copy, 3, &mut fresh);
        assert!(
            down(g, &after, 3 * 64)
                .iter()
                .zip(&down(g, &fresh, 3 * 64))
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{nh}/{kvh}x{hd}: the product after attention differs from the product on a copy"
        );
        // The prompts' tensor-core attention (attn_prefill_*, head sizes 64 and 128),
        // which this step of 945 rows in sequences of 300, 45 and 600 takes when on:
        // against the CPU within the same bound as attn_dec (q and the probabilities
        // enter the f16 products as two f16 parts each, about 22 bits), with and without
        // sinks; and a row's bits do not depend on the rows beside it: the last sequence
        // alone in one step, and cut into steps of 200 and 400 rows (a cut inside a
        // block of 64), gives the batch's bits.
        if hd == 64 || hd == 128 {
            g.set_attn_tc(true);
            let mut tout = g.alloc(total * nh * hd);
            g.attention_step(&gq, &gk, &gv, total, &gs, 0, &shape, None, &mut tout);
            let tc = down(g, &tout, total * nh * hd);
            assert!(
                tc.iter().zip(&batched).any(|(a, b)| a.to_bits() != b.to_bits()),
                "{nh}/{kvh}x{hd}: the tensor-core attention gave attn_dec's bits exactly (did it run?)"
            );
            let e = rel_err(&tc, &cout);
            assert!(
                e < 1e-4,
                "tensor-core attention {nh}/{kvh}x{hd} window {window} softcap {softcap}: relative error {e}"
            );
            let mut tsout = g.alloc(total * nh * hd);
            g.attention_step(&gq, &gk, &gv, total, &gs, 0, &shape, Some(&gsinks), &mut tsout);
            let e = rel_err(&down(g, &tsout, total * nh * hd), &csout);
            assert!(
                e < 1e-4,
                "tensor-core attention with sinks {nh}/{kvh}x{hd} window {window}: relative error {e}"
            );
            let s = &seqs[2];
            let first = total - s.n;
            let all_q = down(g, &gq, total * w);
            for cut in [vec![s.n], vec![200, s.n - 200]] {
                let mut p0 = 0;
                for len in cut {
                    let part = Seq {
                        p0,
                        n: len,
                        table: s.table.clone(),
                    };
                    let lp = layout(&[&part], bs, n_blocks, window);
                    let mut sp = g.new_step(len, 1, 64, 1);
                    g.write_step(&lp, &mut sp).unwrap();
                    let r0 = first + p0;
                    let qp = g.upload(&all_q[r0 * w..(r0 + len) * w]);
                    let mut op = g.alloc(len * w);
                    g.attention_step(&qp, &gk, &gv, len, &sp, 0, &shape, None, &mut op);
                    assert!(
                        down(g, &op, len * w)
                            .iter()
                            .zip(&tc[r0 * w..])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{nh}/{kvh}x{hd} window {window}: tensor-core attention of rows {p0}..{} of a prompt in a step of their own differs from the batch's",
                        p0 + len
                    );
                    p0 += len;
                }
            }
            g.set_attn_tc(false);
        }
    }
    g.set_attn_tc(true);
}

#[test]
fn a_failed_allocation_is_an_error_not_a_panic() {
    let Some(_) = gpu() else { return };
    // A backend of its own: the error is sticky.
    let g = CudaBackend::new(0).unwrap();
    let huge = g.alloc(1usize << 42); // 16 TiB of f32
    assert_eq!(g.buf_len(&huge), 0);
    let e = g.check().unwrap_err();
    assert!(e.contains("could not allocate"), "{e}");
    // Later ops do nothing and the error stays.
    let mut x = g.alloc(4);
    g.scale(&mut x, 2.0, 0);
    assert!(g.check().is_err());
}

/// The norms and gated activations write their output's 8-bit forms beside it (q8x.cu's
/// `norm_q8` / `glu_q8`) and the next decode product uses them instead of quantizing
/// again: its result must be the bits of the same product on an uploaded copy of the
/// output (which quantizes separately), for 32- and 256-element blocks (Q4_0, Q4_K), for
/// every op that writes them and a few batch sizes; and an op in between (here a scale)
/// must make the product quantize afresh.
#[test]
fn products_after_fused_quantization_equal_separate_quantization() {
    let Some(g) = gpu() else { return };
    if std::env::var_os("FFAI_CUDA_OLDER_KERNELS").is_some_and(|v| v == "1") {
        println!("skipped: the older kernels do not fuse the quantization");
        return;
    }
    let mut rng = Rng(0x51_1CE);
    // 1024 columns: a width the norms' cluster form takes (two slices).
    let rows = 72usize;
    for (cols, ty) in [768usize, 1024]
        .into_iter()
        .flat_map(|c| [WeightType::Q4_0, WeightType::Q4K, WeightType::Q8_0, WeightType::Q6K].map(|t| (c, t)))
    {
        let m = g.matrix(
            ty,
            rows,
            cols,
            HostBytes::from_vec(random_matrix(ty, rows, cols, &mut rng).unwrap()),
        );
        for n in [1usize, 3, 8] {
            let len = n * cols;
            let w = g.upload(&rng.vec(cols, 1.0));
            for op in [
                "rms_norm",
                "add_rms_norm",
                "silu_mul",
                "gelu_mul",
                "rms_norm then scale",
            ] {
                let mut x = g.upload(&rng.vec(len, 2.0));
                let y = g.upload(&rng.vec(len, 2.0));
                let mut out = g.alloc(len);
                let input = match op {
                    "rms_norm" | "rms_norm then scale" => {
                        g.rms_norm(&x, &w, 1e-6, n, &mut out);
                        if op == "rms_norm then scale" {
                            g.scale(&mut out, 0.5, len);
                        }
                        &out
                    }
                    "add_rms_norm" => {
                        g.add_rms_norm(&mut x, &y, &w, 1e-6, n, &mut out);
                        &out
                    }
                    "silu_mul" => {
                        g.silu_mul(&mut x, &y, len);
                        &x
                    }
                    _ => {
                        g.gelu_mul(&mut x, &y, len);
                        &x
                    }
                };
                let mut fused = g.alloc(n * rows);
                g.matmul(&m, input, n, &mut fused);
                let copy = g.upload(&down(g, input, len));
                let mut apart = g.alloc(n * rows);
                g.matmul(&m, &copy, n, &mut apart);
                let (a, b) = (down(g, &fused, n * rows), down(g, &apart, n * rows));
                assert!(
                    a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{} n={n} after {op}: the product on the fused quantization differs",
                    ty.name()
                );
                assert!(
                    a.iter().all(|v| v.is_finite()),
                    "{} n={n} after {op}: non-finite",
                    ty.name()
                );
            }
        }
    }
}

// ------------------------------------------------------------------ mixture of experts

/// Router logits for `n` rows: random, or (with `ties`) on a coarse grid so many experts
/// share a logit exactly (the CPU and the GPU must break those ties alike: the lower index
/// first), with a row of all-equal logits.
fn router_logits(rng: &mut Rng, n: usize, ne: usize, ties: bool) -> Vec<f32> {
    let mut l = rng.vec(n * ne, 4.0);
    if ties {
        l.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0);
        if n > 1 {
            l[ne..2 * ne].fill(0.25);
        }
    }
    l
}

#[test]
fn moe_route_matches_the_cpu_for_every_rule() {
    let Some(g) = gpu() else { return };
    use ffai_kernels::ops::{moe_route_with, GroupScore, MoeRouting, MoeScoring};
    let mut rng = Rng(0x0005_EED0_FE0E);
    let mut cases = 0;
    for &(ne, k) in &[
        (8usize, 2usize),
        (60, 4),
        (128, 8),
        (256, 8),
        (1024, 64),
        (4, 4),
        (64, 1),
    ] {
        for scoring in [MoeScoring::Softmax, MoeScoring::Sigmoid] {
            for renormalize in [false, true] {
                for &(n_groups, topk_groups) in &[(1usize, 1usize), (4, 2), (8, 3), (ne, ne.min(8).max(k))] {
                    for group_score in [GroupScore::Max, GroupScore::TopTwoSum] {
                        for (with_bias, with_scale, scale) in [
                            (false, false, 1.0f32),
                            (true, false, 2.5),
                            (false, true, 1.0),
                            (true, true, 0.75),
                        ] {
                            let r = MoeRouting {
                                scoring,
                                renormalize,
                                scale,
                                n_groups,
                                topk_groups,
                                group_score,
                            };
                            if r.check(ne, k).is_err() || (n_groups == 1 && group_score == GroupScore::TopTwoSum) {
                                continue;
                            }
                            for ties in [false, true] {
                                let n = 5;
                                let logits = router_logits(&mut rng, n, ne, ties);
                                let bias: Vec<f32> = if ties {
                                    (0..ne).map(|e| (e % 3) as f32 * 0.125).collect()
                                } else {
                                    rng.vec(ne, 0.5)
                                };
                                let es: Vec<f32> = (0..ne).map(|_| 0.5 + rng.f().abs()).collect();
                                let (gb, gs) = (g.upload(&bias), g.upload(&es));
                                let gl = g.upload(&logits);
                                let mut gi = g.upload(&vec![f32::NAN; n * k]);
                                let mut gw = g.upload(&vec![f32::NAN; n * k]);
                                g.moe_route(
                                    &gl,
                                    n,
                                    ne,
                                    k,
                                    &r,
                                    with_bias.then_some(&gb),
                                    with_scale.then_some(&gs),
                                    &mut gi,
                                    &mut gw,
                                );
                                let (ids, w) = (down(g, &gi, n * k), down(g, &gw, n * k));
                                for t in 0..n {
                                    let (mut wi, mut ww) = (vec![0f32; k], vec![0f32; k]);
                                    moe_route_with(
                                        &logits[t * ne..(t + 1) * ne],
                                        with_bias.then_some(&bias[..]),
                                        with_scale.then_some(&es[..]),
                                        &r,
                                        &mut wi,
                                        &mut ww,
                                    );
                                    let what = format!("{r:?} {ne} experts top {k} bias {with_bias} scale {with_scale} ties {ties} row {t}");
                                    assert_eq!(&ids[t * k..(t + 1) * k], &wi[..], "ids: {what}");
                                    for (a, b) in w[t * k..(t + 1) * k].iter().zip(&ww) {
                                        assert!(
                                            (a - b).abs() <= 1e-6 * b.abs().max(1e-30),
                                            "weights {a} vs {b}: {what}"
                                        );
                                    }
                                }
                                cases += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    println!("{cases} routing cases");
    assert!(cases > 100);
    // A NaN logit: the CPU's loops keep the first candidate (nothing beats NaN).
    let r = MoeRouting::softmax(true);
    let mut l = rng.vec(16, 1.0);
    l[3] = f32::NAN;
    let gl = g.upload(&l);
    let (mut gi, mut gw) = (g.alloc(4), g.alloc(4));
    g.moe_route(&gl, 1, 16, 4, &r, None, None, &mut gi, &mut gw);
    let (mut wi, mut ww) = (vec![0f32; 4], vec![0f32; 4]);
    moe_route_with(&l, None, None, &r, &mut wi, &mut ww);
    assert_eq!(down(g, &gi, 4), wi, "ids with a NaN logit");
    let r = MoeRouting {
        scoring: MoeScoring::Sigmoid,
        ..MoeRouting::softmax(false)
    };
    g.moe_route(&gl, 1, 16, 4, &r, None, None, &mut gi, &mut gw);
    moe_route_with(&l, None, None, &r, &mut wi, &mut ww);
    assert_eq!(down(g, &gi, 4), wi, "sigmoid ids with a NaN logit");
}

/// The weight types with a gathered q8x.cu / half kernel, and two that take quant.cu's.
fn moe_types() -> Vec<WeightType> {
    let mut v = vec![
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q5_0,
        WeightType::Q5_1,
        WeightType::Q8_0,
        WeightType::MXFP4,
        WeightType::Q4K,
        WeightType::Q6K,
        WeightType::F16,
        WeightType::BF16,
    ];
    v.extend(
        WeightType::ALL
            .iter()
            .copied()
            .filter(|t| matches!(t.name(), "Q3_K" | "F32")),
    );
    v
}

#[test]
fn moe_matmuls_match_the_dense_products() {
    use ffai_kernels::cuda::backend::MOE_GATHER_MAX_ROWS;
    let Some(g) = gpu() else { return };
    let mut rng = Rng(0x0E0E_0E77);
    let (ne, cols) = (8usize, 512usize);
    let (rows_a, rows_b) = (40usize, 24usize);
    let mut tested = Vec::new();
    let mut failed = Vec::new();
    for ty in moe_types() {
        let Some(_) = random_matrix(ty, 1, cols, &mut rng) else {
            continue;
        };
        tested.push(ty.name().to_string());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Two matrices per expert (gate, up: one launch) of different heights.
            let bytes: Vec<[Vec<u8>; 2]> = (0..ne)
                .map(|_| {
                    [
                        random_matrix(ty, rows_a, cols, &mut rng).unwrap(),
                        random_matrix(ty, rows_b, cols, &mut rng).unwrap(),
                    ]
                })
                .collect();
            let ga: Vec<_> = bytes
                .iter()
                .map(|b| g.matrix(ty, rows_a, cols, HostBytes::from_vec(b[0].clone())))
                .collect();
            let gb: Vec<_> = bytes
                .iter()
                .map(|b| g.matrix(ty, rows_b, cols, HostBytes::from_vec(b[1].clone())))
                .collect();
            let rb = ty.row_bytes(cols).unwrap();
            for &n in &[1usize, 2, 5, MOE_GATHER_MAX_ROWS + 3] {
                for &k in &[1usize, 2, 8] {
                    for per_slot in [false, true] {
                        let slots = n * k;
                        let x_rows = if per_slot { slots } else { n };
                        let x = activations(&mut rng, x_rows, cols);
                        // Each token's k distinct experts, as a router picks them.
                        let mut ids = Vec::with_capacity(slots);
                        for _ in 0..n {
                            let mut pick: Vec<usize> = (0..ne).collect();
                            for j in 0..k {
                                let i = j + (rng.next() as usize) % (ne - j);
                                pick.swap(j, i);
                                ids.push(pick[j] as f32);
                            }
                        }
                        let (gx, gi) = (g.upload(&x), g.upload(&ids));
                        let mut ya = g.upload(&vec![f32::NAN; slots * rows_a]);
                        let mut yb = g.upload(&vec![f32::NAN; slots * rows_b]);
                        g.moe_matmuls(&[&ga, &gb], &gx, per_slot, &gi, n, k, &mut [&mut ya, &mut yb]);
                        let mut yd = g.upload(&vec![f32::NAN; slots * rows_b]);
                        g.moe_matmuls(&[&gb], &gx, per_slot, &gi, n, k, &mut [&mut yd]);
                        let (got_a, got_b, got_d) = (
                            down(g, &ya, slots * rows_a),
                            down(g, &yb, slots * rows_b),
                            down(g, &yd, slots * rows_b),
                        );
                        let what = format!("{} n={n} k={k} per_slot={per_slot}", ty.name());
                        assert!(
                            got_b.iter().zip(&got_d).all(|(p, q)| p.to_bits() == q.to_bits()),
                            "{what}: one part alone differs from two in a launch"
                        );
                        let q8 = gpu_q8(ty);
                        for (m, (got, rows)) in [(&got_a, rows_a), (&got_b, rows_b)].into_iter().enumerate() {
                            let mut want = vec![0f32; slots * rows];
                            for s in 0..slots {
                                let e = ids[s] as usize;
                                let xr = if per_slot { s } else { s / k };
                                let xrow = &x[xr * cols..(xr + 1) * cols];
                                let wb = &bytes[e][m];
                                if q8 {
                                    let mut acts = QuantizedActs::new();
                                    acts.quantize(ty, xrow, 1, cols);
                                    for r in 0..rows {
                                        want[s * rows + r] = dot_row_q8(ty, &wb[r * rb..(r + 1) * rb], &acts, 0);
                                    }
                                } else {
                                    let mut wf = vec![0f32; cols];
                                    for r in 0..rows {
                                        dequantize_row(ty, &wb[r * rb..(r + 1) * rb], &mut wf);
                                        want[s * rows + r] =
                                            wf.iter().zip(xrow).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32;
                                    }
                                }
                            }
                            // Prefill-sized steps of the types with a grouped tensor-core
                            // product take it (the CPU's q8 scheme); the others the host
                            // grouping, whose experts with GEMM_MIN_ROWS rows or more
                            // multiply on cuBLAS (bf16 operands).
                            let grouped = moe_grouped_on() && gpu_mmq(ty, GEMM_MIN_ROWS);
                            let tol = if n > MOE_GATHER_MAX_ROWS && !grouped && slots / ne >= GEMM_MIN_ROWS / 2 {
                                1e-2
                            } else {
                                1e-5
                            };
                            let e = rel_err(got, &want);
                            assert!(e < tol, "{what} part {m}: relative error {e} (tolerance {tol})");
                        }
                        if n <= MOE_GATHER_MAX_ROWS {
                            // The bits of the dense product of each slot's expert (decode path).
                            for s in [0, slots - 1] {
                                let e = ids[s] as usize;
                                let xr = if per_slot { s } else { s / k };
                                let gx1 = g.upload(&x[xr * cols..(xr + 1) * cols]);
                                let mut y1 = g.alloc(rows_a);
                                g.matmul(&ga[e], &gx1, 1, &mut y1);
                                let alone = down(g, &y1, rows_a);
                                assert!(
                                    alone
                                        .iter()
                                        .zip(&got_a[s * rows_a..(s + 1) * rows_a])
                                        .all(|(p, q)| p.to_bits() == q.to_bits()),
                                    "{what}: slot {s} differs from its expert's dense product"
                                );
                            }
                        }
                    }
                }
            }
        }));
        if r.is_err() {
            failed.push(ty.name().to_string());
        }
    }
    println!("tested: {}", tested.join(" "));
    assert!(
        failed.is_empty(),
        "gathered products differ for {failed:?} (messages above)"
    );
    assert!(tested.len() >= 9, "too few types: {tested:?}");
}

/// Whether prefill-sized MoE steps of the types with a grouped tensor-core product
/// (q8x.cu `mmq_moe_*`) take it: unless `FFAI_CUDA_MOE_GROUPED=0`, and the tensor-core
/// products are on (not `FFAI_CUDA_MMQ=0`, `FFAI_CUDA_MMQ_MAX=0` or the older kernels).
fn moe_grouped_on() -> bool {
    let is = |v: &str, on: &str| std::env::var_os(v).is_some_and(|x| x == on);
    !is("FFAI_CUDA_MOE_GROUPED", "0")
        && !is("FFAI_CUDA_MMQ", "0")
        && !is("FFAI_CUDA_MMQ_MAX", "0")
        && !is("FFAI_CUDA_OLDER_KERNELS", "1")
}

/// Expert ids of a prefill-sized step: every token's first slot names expert 0 (so it
/// gets n > 64 slots: several tiles, the last partial), the others a random expert of
/// 0..ne - 1 (repeats allowed: the kernels do not care), so expert ne - 1 gets none.
fn skewed_ids(rng: &mut Rng, n: usize, k: usize, ne: usize) -> Vec<f32> {
    (0..n * k)
        .map(|s| {
            if s % k == 0 {
                0.0
            } else {
                (rng.next() as usize % (ne - 1)) as f32
            }
        })
        .collect()
}

/// The CPU's q8 product of each slot's activation row and its expert's rows (`bytes[e]`:
/// `want[s * rows + r]`; NaN for a slot whose id is not an expert).
fn moe_q8_reference(
    ty: WeightType,
    bytes: &[Vec<u8>],
    cols: usize,
    x: &[f32],
    x_per_slot: bool,
    ids: &[f32],
    k: usize,
) -> Vec<f32> {
    let rb = ty.row_bytes(cols).unwrap();
    let rows = bytes[0].len() / rb;
    let x_rows = x.len() / cols;
    let mut acts = QuantizedActs::new();
    acts.quantize(ty, x, x_rows, cols);
    let mut want = vec![f32::NAN; ids.len() * rows];
    for (s, &id) in ids.iter().enumerate() {
        if !(id >= 0.0 && id < bytes.len() as f32) {
            continue;
        }
        let wb = &bytes[id as usize];
        let xr = if x_per_slot { s } else { s / k };
        for r in 0..rows {
            want[s * rows + r] = dot_row_q8(ty, &wb[r * rb..(r + 1) * rb], &acts, xr);
        }
    }
    want
}

#[test]
fn grouped_moe_products_match_the_cpu_and_the_host_grouping() {
    use ffai_kernels::backend::host_moe;
    let Some(g) = gpu() else { return };
    if !moe_grouped_on() {
        println!("skipped: the grouped MoE products are switched off");
        return;
    }
    let mut rng = Rng(0x6B0F_ED11);
    // Three matrices per expert (one launch each) of heights that leave the last 32- or
    // 64-row block partial. 512 columns: Q4_0 / Q8_0 go up in the split layout (the staged
    // `mmqs_moe_*s`; `mmq_moe_*s` with FFAI_CUDA_MMQ_STAGED=0); 480 (15 legacy blocks: the
    // k-split warps take unequal shares) keeps them stored.
    let heights = [40usize, 24, 72];
    let cases = [
        (WeightType::Q4_0, 512),
        (WeightType::Q4_0, 480),
        (WeightType::Q8_0, 512),
        (WeightType::Q8_0, 480),
        (WeightType::Q4_1, 512),
        (WeightType::Q5_0, 480),
        (WeightType::Q5_1, 512),
        (WeightType::Q4K, 512),
        // 17-byte blocks: rows and blocks at every byte alignment.
        (WeightType::MXFP4, 512),
        (WeightType::MXFP4, 480),
    ];
    let mut failed = Vec::new();
    for &(ty, cols) in &cases {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for ne in [4usize, 16] {
                // bytes[part][expert]
                let bytes: Vec<Vec<Vec<u8>>> = heights
                    .iter()
                    .map(|&rows| {
                        (0..ne)
                            .map(|_| random_matrix(ty, rows, cols, &mut rng).unwrap())
                            .collect()
                    })
                    .collect();
                let mats: Vec<Vec<_>> = bytes
                    .iter()
                    .zip(heights)
                    .map(|(b, rows)| {
                        b.iter()
                            .map(|e| g.matrix(ty, rows, cols, HostBytes::from_vec(e.clone())))
                            .collect()
                    })
                    .collect();
                let experts: Vec<&[_]> = mats.iter().map(|m| m.as_slice()).collect();
                for n in [65usize, 130, 300] {
                    for k in [2usize, 8] {
                        for per_slot in [false, true] {
                            let what =
                                format!("{} cols={cols} experts={ne} n={n} k={k} per_slot={per_slot}", ty.name());
                            let slots = n * k;
                            let x_rows = if per_slot { slots } else { n };
                            let x = activations(&mut rng, x_rows, cols);
                            let ids = skewed_ids(&mut rng, n, k, ne);
                            let (gx, gi) = (g.upload(&x), g.upload(&ids));
                            let run = |host: bool| -> Vec<Vec<f32>> {
                                let mut ys: Vec<_> =
                                    heights.iter().map(|&r| g.upload(&vec![f32::NAN; slots * r])).collect();
                                let mut outs: Vec<&mut _> = ys.iter_mut().collect();
                                if host {
                                    host_moe::moe_matmuls(g, &experts, &gx, per_slot, &gi, n, k, &mut outs);
                                } else {
                                    g.moe_matmuls(&experts, &gx, per_slot, &gi, n, k, &mut outs);
                                }
                                ys.iter().zip(heights).map(|(y, r)| down(g, y, slots * r)).collect()
                            };
                            let grouped = run(false);
                            let host = run(true);
                            let again = run(false);
                            let mut count = vec![0usize; ne];
                            ids.iter().for_each(|&e| count[e as usize] += 1);
                            assert!(count[0] > 64 && count[ne - 1] == 0, "{what}: ids {count:?}");
                            for (m, &rows) in heights.iter().enumerate() {
                                let want = moe_q8_reference(ty, &bytes[m], cols, &x, per_slot, &ids, k);
                                let got = &grouped[m];
                                // The tensor-core products' tolerance (`check_products`).
                                let e = rel_err(got, &want);
                                assert!(
                                    e < 1e-5,
                                    "{what} part {m}: relative error {e} against the CPU (tolerance 1e-5)"
                                );
                                // The same bits however the slots were placed in their tiles.
                                assert!(
                                    got.iter().zip(&again[m]).all(|(a, b)| a.to_bits() == b.to_bits()),
                                    "{what} part {m}: a second run differs"
                                );
                                // The host grouping, expert by expert: its decode and
                                // tensor-core products take the CPU's q8 scheme too, its
                                // cuBLAS GEMMs (an expert of more than FFAI_CUDA_MMQ_MAX slots)
                                // bf16 operands.
                                for (ex, &c) in count.iter().enumerate().filter(|(_, &c)| c > 0) {
                                    let sel: Vec<usize> = (0..slots).filter(|&s| ids[s] as usize == ex).collect();
                                    let pick = |v: &[f32]| -> Vec<f32> {
                                        sel.iter().flat_map(|&s| v[s * rows..(s + 1) * rows].to_vec()).collect()
                                    };
                                    let tol = if c < GEMM_MIN_ROWS || gpu_mmq(ty, c) {
                                        1e-5
                                    } else {
                                        1e-2
                                    };
                                    let e = rel_err(&pick(got), &pick(&host[m]));
                                    assert!(
                                        e < tol,
                                        "{what} part {m} expert {ex} ({c} slots): relative error {e} against the host grouping (tolerance {tol})"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }));
        if r.is_err() {
            failed.push(format!("{}@{cols}", ty.name()));
        }
    }
    assert!(
        failed.is_empty(),
        "grouped MoE products differ for {failed:?} (messages above)"
    );
}

#[test]
fn grouped_moe_products_give_bad_ids_nan_rows() {
    let Some(g) = gpu() else { return };
    if !moe_grouped_on() {
        println!("skipped: the grouped MoE products are switched off");
        return;
    }
    let mut rng = Rng(0xBAD1_D5E5);
    let (ty, ne, cols, rows, n, k) = (WeightType::Q4_0, 4usize, 512usize, 40usize, 70usize, 2usize);
    let bytes: Vec<Vec<u8>> = (0..ne)
        .map(|_| random_matrix(ty, rows, cols, &mut rng).unwrap())
        .collect();
    let mats: Vec<_> = bytes
        .iter()
        .map(|b| g.matrix(ty, rows, cols, HostBytes::from_vec(b.clone())))
        .collect();
    let slots = n * k;
    let mut ids = skewed_ids(&mut rng, n, k, ne);
    // Ids moe_route never writes: below 0, the expert count, past it, NaN; and 2.5, which
    // the gathered kernels read as expert 2.
    let bad = [(3usize, -1.0f32), (10, ne as f32), (11, 1e9), (57, f32::NAN)];
    for &(s, v) in &bad {
        ids[s] = v;
    }
    ids[20] = 2.5;
    let x = activations(&mut rng, n, cols);
    let (gx, gi) = (g.upload(&x), g.upload(&ids));
    let mut y = g.upload(&vec![0.0f32; slots * rows]);
    g.moe_matmuls(&[&mats], &gx, false, &gi, n, k, &mut [&mut y]);
    let got = down(g, &y, slots * rows);
    for &(s, v) in &bad {
        assert!(
            got[s * rows..(s + 1) * rows].iter().all(|o| o.is_nan()),
            "slot {s} (id {v}): its row is not NaN"
        );
    }
    let mut ids_ref = ids.clone();
    ids_ref[20] = 2.0;
    let want = moe_q8_reference(ty, &bytes, cols, &x, false, &ids_ref, k);
    let good: Vec<usize> = (0..slots).filter(|s| !bad.iter().any(|b| b.0 == *s)).collect();
    let pick = |v: &[f32]| -> Vec<f32> {
        good.iter()
            .flat_map(|&s| v[s * rows..(s + 1) * rows].to_vec())
            .collect()
    };
    let e = rel_err(&pick(&got), &pick(&want));
    assert!(
        e < 1e-5,
        "the other slots: relative error {e} against the CPU (tolerance 1e-5)"
    );
}

#[test]
fn moe_combine_add_bias_and_clamp_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(0x0C04_B14E);
    for &(n, k, d, ne) in &[(1usize, 1usize, 64usize, 4usize), (3, 2, 96, 8), (5, 8, 257, 16)] {
        let slots = n * k;
        let ys = rng.vec(slots * d, 2.0);
        let w = rng.vec(slots, 1.0);
        let (gy, gw) = (g.upload(&ys), g.upload(&w));
        let mut go = g.upload(&vec![f32::NAN; n * d]);
        g.moe_combine(&gy, &gw, n, k, d, &mut go);
        let got = down(g, &go, n * d);
        let mut want = vec![0f32; n * d];
        for t in 0..n {
            ffai_kernels::ops::moe_combine(
                &ys[t * k * d..(t + 1) * k * d],
                &w[t * k..(t + 1) * k],
                &mut want[t * d..(t + 1) * d],
            );
        }
        assert!(
            got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "moe_combine n={n} k={k} d={d}: not the CPU's bits"
        );

        let biases = rng.vec(ne * d, 1.0);
        let ids: Vec<f32> = (0..slots).map(|_| (rng.next() as usize % ne) as f32).collect();
        let (gb, gi) = (g.upload(&biases), g.upload(&ids));
        let mut gx = g.upload(&ys);
        g.moe_add_bias(&mut gx, &gb, &gi, slots, d);
        let got = down(g, &gx, slots * d);
        let mut want = ys.clone();
        ffai_kernels::ops::moe_add_bias(&mut want, &biases, &ids, d);
        assert!(
            got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "moe_add_bias slots={slots} d={d}: not the CPU's bits"
        );
    }
    let mut x = rng.vec(1000, 3.0);
    x[7] = f32::NAN;
    x[8] = f32::INFINITY;
    x[9] = f32::NEG_INFINITY;
    let mut gx = g.upload(&x);
    g.clamp(&mut gx, -1.5, 2.0, 999);
    let got = down(g, &gx, 1000);
    for (i, (a, b)) in got.iter().zip(&x).enumerate() {
        let want = if i < 999 { b.clamp(-1.5, 2.0) } else { *b };
        assert!(a.to_bits() == want.to_bits(), "clamp element {i}: {a} vs {want}");
    }
}

/// The 8-bit sets a norm writes beside its output outlive the MoE router between the
/// norm and the experts (the router's f32 product, its bias and the routing write only
/// their own outputs, so the experts read the norm's sets instead of quantizing again):
/// the experts then give the bits they give over a copy of the norm's output. And where
/// a router product or a bias is written over the norm's output itself, the sets must be
/// dropped: the experts over that buffer again equal the experts over a copy of it.
#[test]
fn moe_experts_after_the_router_read_the_right_sets() {
    use ffai_kernels::ops::MoeRouting;
    let Some(g) = gpu() else { return };
    let mut rng = Rng(0x5E75_0F0E);
    let (ne, k, cols, rows, n) = (16usize, 4usize, 512usize, 256usize, 2usize);
    let router = g.matrix(
        WeightType::F32,
        ne,
        cols,
        HostBytes::from_vec(random_matrix(WeightType::F32, ne, cols, &mut rng).unwrap()),
    );
    let rbias = g.upload(&rng.vec(ne, 0.5));
    let wide_bias = g.upload(&rng.vec(cols, 0.5));
    let (y, w) = (g.upload(&rng.vec(n * cols, 1.0)), g.upload(&rng.vec(cols, 1.5)));
    for ty in [WeightType::Q4K, WeightType::Q4_0, WeightType::Q8_0] {
        let experts: Vec<_> = (0..ne)
            .map(|_| {
                g.matrix(
                    ty,
                    rows,
                    cols,
                    HostBytes::from_vec(random_matrix(ty, rows, cols, &mut rng).unwrap()),
                )
            })
            .collect();
        let experts_over = |x: &<CudaBackend as Backend>::Buf, ids: &<CudaBackend as Backend>::Buf| {
            let mut out = g.alloc(n * k * rows);
            g.moe_matmuls(&[&experts], x, false, ids, n, k, &mut [&mut out]);
            down(g, &out, n * k * rows)
        };
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        // 0: the router between the norm and the experts; 1: a router product over the
        // norm's output; 2: a bias added to the norm's output.
        for case in 0..3 {
            let mut xs = g.upload(&rng.vec(n * cols, 2.0));
            let mut xn = g.alloc(n * cols);
            g.add_rms_norm(&mut xs, &y, &w, 1e-6, n, &mut xn);
            let mut logits = g.alloc(n * ne);
            g.matmul(&router, &xn, n, &mut logits);
            g.add_bias(&mut logits, &rbias, n);
            let (mut ids, mut wts) = (g.alloc(n * k), g.alloc(n * k));
            g.moe_route(
                &logits,
                n,
                ne,
                k,
                &MoeRouting::softmax(true),
                None,
                None,
                &mut ids,
                &mut wts,
            );
            match case {
                1 => {
                    let copy = g.upload(&down(g, &xs, n * cols));
                    g.matmul(&router, &copy, n, &mut xn);
                }
                2 => g.add_bias(&mut xn, &wide_bias, n),
                _ => {}
            }
            let got = experts_over(&xn, &ids);
            let fresh = experts_over(&g.upload(&down(g, &xn, n * cols)), &ids);
            assert!(
                same(&got, &fresh),
                "{}: case {case}: the experts after the router differ from the experts over a copy",
                ty.name()
            );
        }
    }
}
