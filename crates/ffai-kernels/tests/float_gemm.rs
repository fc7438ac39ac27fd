//! The float-weight prefill GEMM (`quant::dot_rows_multi` for F32, F16, BF16, and the
//! CPU backend's prefill that runs it) against the per-token `dot_row` (bit for bit, on
//! every implementation level this CPU has) and against an `f64` oracle.
//!
//! Oracle tolerance: `dot_row` adds rounded products in 16 lanes (`cols/16` terms each),
//! sums the lanes in order (15 adds) and adds the `< 64` elements past the last whole
//! 64-chunk one by one, so no result passes through more than
//! `k = cols/16 + 16 + cols % 64 + 1` roundings; the error is at most
//! `k · 2⁻²⁴ · Σ|w·x|` (first order; `k · 2⁻²⁴ ≪ 1` here). A wrong, missing or doubled
//! element is off by `|w·x|` of that element, far above it.

use std::sync::{Mutex, MutexGuard};

use ffai_kernels::backend::{Backend, HostBytes};
use ffai_kernels::cpu::CpuBackend;
use ffai_kernels::quant::q8::{force_q8_level, Q8Level};
use ffai_kernels::quant::{
    bf16_bits, bf16_dot_available, dequantize_row, dot_row, dot_rows_bf16, dot_rows_multi, force_bf16_dot,
    q8_backend_name, quantize_row, round_to_bf16, WeightType,
};

const FLOATS: [WeightType; 3] = [WeightType::F32, WeightType::F16, WeightType::BF16];

/// The implementation switch is global: every test here holds this lock.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on every level this CPU has (the fastest first, then AVX2, then portable),
/// skipping levels that fall back to one already run; restores the default afterwards.
fn every_level(mut f: impl FnMut(&'static str)) {
    let _g = lock();
    let mut seen = Vec::new();
    for level in [Q8Level::Best, Q8Level::Avx2, Q8Level::Portable] {
        force_q8_level(level);
        let name = q8_backend_name();
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        f(name);
    }
    force_q8_level(Q8Level::Best);
}

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

/// `rows × cols` stored weights of type `ty` from values of mixed magnitude (some rows
/// scaled up, so rounding in the sums is not trivially exact), with their `f32` values.
fn matrix(ty: WeightType, rows: usize, cols: usize, rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let rb = ty.row_bytes(cols).unwrap();
    let mut bytes = vec![0u8; rows * rb];
    let mut vals = vec![0.0f32; rows * cols];
    let mut src = vec![0.0f32; cols];
    for r in 0..rows {
        let scale = if r % 3 == 0 { 37.0 } else { 0.2 };
        src.iter_mut().for_each(|v| *v = rng.uniform(-1.0, 1.0) * scale);
        quantize_row(ty, &src, &mut bytes[r * rb..(r + 1) * rb]).unwrap();
        dequantize_row(ty, &bytes[r * rb..(r + 1) * rb], &mut vals[r * cols..(r + 1) * cols]);
    }
    (bytes, vals)
}

/// `(Σ w·x, Σ |w·x|)` in `f64`.
fn oracle(w: &[f32], x: &[f32]) -> (f64, f64) {
    w.iter().zip(x).fold((0.0, 0.0), |(s, m), (&a, &b)| {
        let p = f64::from(a) * f64::from(b);
        (s + p, m + p.abs())
    })
}

fn tolerance(cols: usize, mag: f64) -> f64 {
    let k = cols / 16 + 16 + cols % 64 + 1;
    k as f64 * 2f64.powi(-24) * mag
}

/// Every float type, token counts around the 6-token (AVX-512) and 3-token (AVX2)
/// register tiles, row counts off the 4- and 2-row tiles, columns with and without a
/// tail past the last 64-chunk: bit-identical to `dot_row` per (row, token), and
/// within the rounding bound of the `f64` oracle. Also a row range that starts
/// mid-matrix (as the backend's threads pass them).
#[test]
fn dot_rows_multi_equals_dot_row_bit_exactly() {
    every_level(|level| {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        for ty in FLOATS {
            for cols in [64, 576, 640, 1536, 100, 7] {
                for rows in [5, 19] {
                    let (w, wf) = matrix(ty, rows, cols, &mut rng);
                    let rb = ty.row_bytes(cols).unwrap();
                    for n in [1, 3, 17, 33, 40] {
                        let x: Vec<f32> = (0..n * cols).map(|_| rng.uniform(-2.0, 2.0)).collect();
                        for first in [0, 2] {
                            let nr = rows - first;
                            let mut out = vec![f32::NAN; nr * n];
                            dot_rows_multi(ty, &w[first * rb..], &x, cols, &mut out);
                            for r in 0..nr {
                                let row = first + r;
                                for t in 0..n {
                                    let xt = &x[t * cols..(t + 1) * cols];
                                    let got = out[r * n + t];
                                    let want = dot_row(ty, &w[row * rb..(row + 1) * rb], xt);
                                    assert_eq!(
                                        got.to_bits(),
                                        want.to_bits(),
                                        "{level} {ty} cols={cols} rows={rows} n={n} row {row} token {t}: {got} vs dot_row {want}"
                                    );
                                    let (exact, mag) = oracle(&wf[row * cols..(row + 1) * cols], xt);
                                    let tol = tolerance(cols, mag);
                                    assert!(
                                        (f64::from(got) - exact).abs() <= tol,
                                        "{level} {ty} cols={cols} row {row} token {t}: {got} vs f64 {exact} (tol {tol})"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Infinities and overflow: the kernel's special values are `dot_row`'s (same NaN
/// bits from `inf - inf` and `inf · 0`, same infinities).
#[test]
fn special_values_match_dot_row() {
    every_level(|level| {
        let mut rng = Rng(77);
        let (rows, cols, n) = (9, 192, 7);
        for ty in FLOATS {
            let mut src: Vec<f32> = (0..rows * cols).map(|_| rng.uniform(-1.0, 1.0)).collect();
            src[3] = f32::INFINITY;
            src[cols + 5] = f32::NEG_INFINITY;
            src[cols + 21] = f32::INFINITY;
            src[4 * cols + 100] = f32::INFINITY;
            src[6 * cols + 7] = 6e4;
            let rb = ty.row_bytes(cols).unwrap();
            let mut w = vec![0u8; rows * rb];
            for (s, d) in src.chunks_exact(cols).zip(w.chunks_exact_mut(rb)) {
                quantize_row(ty, s, d).unwrap();
            }
            let mut x: Vec<f32> = (0..n * cols).map(|_| rng.uniform(-1.0, 1.0)).collect();
            (x[5], x[21]) = (1.0, 1.0); // -inf + inf in row 1, token 0
            x[cols + 100] = 0.0; // inf · 0 in row 4, token 1
            x[2 * cols + 7] = 1e36; // overflow in row 6, token 2
            let mut out = vec![0.0f32; rows * n];
            dot_rows_multi(ty, &w, &x, cols, &mut out);
            for r in 0..rows {
                for t in 0..n {
                    let want = dot_row(ty, &w[r * rb..(r + 1) * rb], &x[t * cols..(t + 1) * cols]);
                    let got = out[r * n + t];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{level} {ty} row {r} token {t}: {got} vs {want}"
                    );
                }
            }
            assert!(out[n].is_nan() && out[4 * n + 1].is_nan() && out[6 * n + 2].is_infinite());
        }
    });
}

/// The CPU backend's prefill of float weights (token tiles, blocks of 16 rows, one or
/// three threads) gives every token exactly what decoding it alone gives.
#[test]
fn backend_prefill_equals_decode_bit_exactly() {
    every_level(|level| {
        let mut rng = Rng(5);
        for ty in FLOATS {
            for (rows, cols, n) in [(45, 576, 53), (7, 64, 3)] {
                let (w, _) = matrix(ty, rows, cols, &mut rng);
                let x: Vec<f32> = (0..n * cols).map(|_| rng.uniform(-2.0, 2.0)).collect();
                for b in [CpuBackend::new(1), CpuBackend::new(3)] {
                    let mat = b.matrix(ty, rows, cols, HostBytes::from_vec(w.clone()));
                    let mut all = b.alloc(n * rows);
                    b.matmul(&mat, &x, n, &mut all);
                    let mut one = b.alloc(rows);
                    for t in 0..n {
                        b.matmul(&mat, &x[t * cols..(t + 1) * cols].to_vec(), 1, &mut one);
                        for row in 0..rows {
                            assert_eq!(
                                all[t * rows + row].to_bits(),
                                one[row].to_bits(),
                                "{level} {ty} {rows}x{cols} token {t} row {row}: prefill {} vs decode {}",
                                all[t * rows + row],
                                one[row]
                            );
                        }
                    }
                }
            }
        }
    });
}

/// Quantized types keep their `dot_row` meaning through the same entry point.
#[test]
fn quantized_types_fall_back_to_dot_row() {
    let mut rng = Rng(9);
    let (rows, cols, n) = (3, 256, 4);
    for ty in [WeightType::Q4_0, WeightType::Q6K] {
        let (w, _) = matrix(ty, rows, cols, &mut rng);
        let rb = ty.row_bytes(cols).unwrap();
        let x: Vec<f32> = (0..n * cols).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut out = vec![0.0f32; rows * n];
        dot_rows_multi(ty, &w, &x, cols, &mut out);
        for r in 0..rows {
            for t in 0..n {
                let want = dot_row(ty, &w[r * rb..(r + 1) * rb], &x[t * cols..(t + 1) * cols]);
                assert_eq!(out[r * n + t].to_bits(), want.to_bits(), "{ty} row {r} token {t}");
            }
        }
    }
}

// ------------------------------------------------ bf16 activations (`vdpbf16ps`)

/// Runs `f` on every kernel level this CPU has for the bf16-activation kernels: AVX-512
/// with BF16 (when present), AVX-512 with the BF16 kernels switched off (a CPU without
/// them), AVX2, portable; levels that fall back to one already run are skipped.
fn every_bf16_level(mut f: impl FnMut(&str)) {
    let _g = lock();
    let mut seen = Vec::new();
    for (level, bf16) in [
        (Q8Level::Best, true),
        (Q8Level::Best, false),
        (Q8Level::Avx2, false),
        (Q8Level::Portable, false),
    ] {
        force_q8_level(level);
        force_bf16_dot(bf16);
        let name = if bf16_dot_available() {
            format!("{}+bf16", q8_backend_name())
        } else {
            q8_backend_name().to_string()
        };
        if seen.contains(&name) {
            continue;
        }
        seen.push(name.clone());
        f(&name);
    }
    force_q8_level(Q8Level::Best);
    force_bf16_dot(true);
    // A CPU with AVX-512 BF16 (and no lower cap in FFAI_CPU_LEVEL) must have run them.
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512bf16")
        && is_x86_feature_detected!("avx512bw")
        && ffai_kernels::quant::q8::env_level() == Ok(Q8Level::Best)
    {
        assert!(seen.iter().any(|s| s.ends_with("+bf16")), "levels run: {seen:?}");
    }
}

/// The naive oracle of one bf16 output, written from the instruction's definition: per
/// 32-element chunk (zero-padded), lane `i` adds the odd element's product, then the even
/// one's, each product exact and each sum rounded in `f32`; then the 16 lanes in order.
/// Subnormal bf16 inputs count as zero.
fn bf16_emulated(w: &[u16], x: &[u16]) -> f32 {
    let f = |h: u16| {
        if h & 0x7f80 == 0 {
            0.0f32.copysign(f32::from_bits(u32::from(h) << 16))
        } else {
            f32::from_bits(u32::from(h) << 16)
        }
    };
    let padded = w.len().div_ceil(32) * 32;
    let get = |v: &[u16], j: usize| if j < v.len() { f(v[j]) } else { 0.0 };
    let mut lanes = [0.0f32; 16];
    for c in (0..padded).step_by(32) {
        for (i, l) in lanes.iter_mut().enumerate() {
            let (e, o) = (c + 2 * i, c + 2 * i + 1);
            *l += get(w, o) * get(x, o);
            *l += get(w, e) * get(x, e);
        }
    }
    lanes.iter().sum()
}

/// The known roundings of `vcvtne2ps2bf16` (measured on Zen 4): ties to even, subnormals
/// to signed zero, NaNs quiet with their upper payload, overflow to infinity; and
/// `round_to_bf16` at every level gives `bf16_bits`' bits for random and special values
/// at every length around the 32-element vector.
#[test]
fn bf16_rounding_is_the_hardware_rounding() {
    let known: [(u32, u16); 12] = [
        (0x0001_16c2, 0x0000),
        (0x8001_16c2, 0x8000),
        (0x7f80_0001, 0x7fc0),
        (0xffc0_0001, 0xffc0),
        (0x7fff_ffff, 0x7fff),
        (0x7f80_0000, 0x7f80),
        (0x3f80_8000, 0x3f80),
        (0x3f81_8000, 0x3f82),
        (0x3f80_8001, 0x3f81),
        (0x7f7f_ffff, 0x7f80),
        (0x00ff_8000, 0x0100),
        (0x8000_0000, 0x8000),
    ];
    for (f, h) in known {
        assert_eq!(bf16_bits(f32::from_bits(f)), h, "{f:#010x}");
    }
    every_bf16_level(|level| {
        let mut rng = Rng(31);
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100] {
            let mut x: Vec<f32> = (0..len).map(|_| rng.uniform(-3.0, 3.0)).collect();
            for (i, &(f, _)) in known.iter().enumerate() {
                if i * 7 < len {
                    x[i * 7] = f32::from_bits(f);
                }
            }
            let mut got = vec![0xabcd_u16; len];
            round_to_bf16(&x, &mut got);
            for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
                assert_eq!(g, bf16_bits(v), "{level} len {len} element {i}: {:#010x}", v.to_bits());
            }
        }
    });
}

/// `dot_rows_bf16` on every level: bit-identical to the naive emulation for every
/// (row, token), and within the rounding bound of an `f64` sum of the same bf16 inputs.
/// Row counts off the 4-row tile (and a range starting mid-matrix), columns with and
/// without a tail past the last 32 (7 to 1000), 1..=33 tokens; each token also alone,
/// bit for bit (prefill = decode).
///
/// Bound: each lane takes two rounded additions per 32-element chunk, then 16 lane sums
/// (from `-0.0`, so 16 roundings), so `k = 2·⌈cols/32⌉ + 16` roundings at most:
/// `|err| ≤ k · 2⁻²⁴ · Σ|w·x|` to first order (products are exact).
#[test]
fn dot_rows_bf16_matches_the_oracle() {
    every_bf16_level(|level| {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for cols in [7, 31, 32, 33, 64, 100, 576, 1000] {
            for rows in [1, 6, 19] {
                let (w, _) = matrix(WeightType::BF16, rows, cols, &mut rng);
                let wh: Vec<u16> = w.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
                let ns: Vec<usize> = if cols == 576 || cols == 33 {
                    (1..=33).collect()
                } else {
                    vec![1, 2, 5, 17, 33]
                };
                for n in ns {
                    let xf: Vec<f32> = (0..n * cols).map(|_| rng.uniform(-2.0, 2.0)).collect();
                    let mut x = vec![0u16; n * cols];
                    round_to_bf16(&xf, &mut x);
                    for first in [0, rows / 2] {
                        let nr = rows - first;
                        let mut out = vec![f32::NAN; nr * n];
                        dot_rows_bf16(&w[first * 2 * cols..], &x, cols, &mut out);
                        let mut alone = [f32::NAN];
                        for r in 0..nr {
                            let row = first + r;
                            let wr = &wh[row * cols..(row + 1) * cols];
                            for t in 0..n {
                                let xt = &x[t * cols..(t + 1) * cols];
                                let got = out[r * n + t];
                                let want = bf16_emulated(wr, xt);
                                assert_eq!(
                                    got.to_bits(),
                                    want.to_bits(),
                                    "{level} cols={cols} rows={rows} n={n} row {row} token {t}: {got} vs emulated {want}"
                                );
                                let (exact, mag) = wr.iter().zip(xt).fold((0.0f64, 0.0f64), |(s, m), (&a, &b)| {
                                    let p = f64::from(f32::from_bits(u32::from(a) << 16))
                                        * f64::from(f32::from_bits(u32::from(b) << 16));
                                    (s + p, m + p.abs())
                                });
                                let tol = (2 * cols.div_ceil(32) + 16) as f64 * 2f64.powi(-24) * mag;
                                assert!(
                                    (f64::from(got) - exact).abs() <= tol,
                                    "{level} cols={cols} row {row} token {t}: {got} vs f64 {exact} (tol {tol})"
                                );
                                if r % 5 == 0 {
                                    dot_rows_bf16(&w[row * 2 * cols..(row + 1) * 2 * cols], xt, cols, &mut alone);
                                    assert_eq!(alone[0].to_bits(), got.to_bits(), "{level} alone: row {row} token {t}");
                                }
                            }
                        }
                    }
                }
            }
        }
    });
}

/// The CPU backend with BF16 weights: with bf16 activations requested and where the
/// bf16 kernels run, it rounds the activations and gives exactly `dot_rows_bf16`'s
/// results (prefill of 53 tokens on one or three threads, and each token decoded alone);
/// by default, with f32 activations requested too, or where they do not run, exactly
/// `dot_row`'s.
#[test]
fn backend_bf16_weights_take_the_bf16_kernels_where_available() {
    every_bf16_level(|level| {
        let mut rng = Rng(11);
        let (rows, cols, n) = (45, 600, 53);
        let ty = WeightType::BF16;
        let (w, _) = matrix(ty, rows, cols, &mut rng);
        let x: Vec<f32> = (0..n * cols).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let mut xb = vec![0u16; n * cols];
        round_to_bf16(&x, &mut xb);
        let mut bf = vec![0.0f32; rows * n];
        dot_rows_bf16(&w, &xb, cols, &mut bf);
        for (f32_acts, bf16_acts) in [(false, false), (false, true), (true, true)] {
            let uses_bf16 = bf16_dot_available() && bf16_acts && !f32_acts;
            for threads in [1, 3] {
                let b = CpuBackend::new(threads)
                    .with_f32_activations(f32_acts)
                    .with_bf16_activations(bf16_acts);
                let mat = b.matrix(ty, rows, cols, HostBytes::from_vec(w.clone()));
                let mut all = b.alloc(n * rows);
                b.matmul(&mat, &x, n, &mut all);
                let mut one = b.alloc(rows);
                for t in 0..n {
                    b.matmul(&mat, &x[t * cols..(t + 1) * cols].to_vec(), 1, &mut one);
                    for row in 0..rows {
                        let want = if uses_bf16 {
                            bf[row * n + t]
                        } else {
                            dot_row(
                                ty,
                                &w[row * 2 * cols..(row + 1) * 2 * cols],
                                &x[t * cols..(t + 1) * cols],
                            )
                        };
                        let what =
                            format!("{level} f32={f32_acts} bf16={bf16_acts} threads={threads} token {t} row {row}");
                        assert_eq!(all[t * rows + row].to_bits(), want.to_bits(), "{what}: prefill");
                        assert_eq!(one[row].to_bits(), want.to_bits(), "{what}: decode");
                    }
                }
            }
        }
    });
}
