//! Tests of the integer-dot path (`quant::q8`): quantized activations and
//! `dot_row_q8` / `dot_row_q8_multi` / `dot_rows_q8` for every quantized weight type,
//! on every implementation this CPU has (portable, AVX2, AVX-VNNI, AVX-512 VNNI).
//!
//! Tolerances (all relative to a magnitude `mag`, the sum of the absolute values of
//! every product term the dot adds up, min terms counted separately):
//! * vs the f64 dot of the dequantized weights with the *dequantized* activations
//!   (`q · d`, decoded naively here): `1e-5 · mag`. The integer part is exact; only
//!   the per-block `f32` scale products and the `f32` accumulation round (a few ulps
//!   per block), so anything structural (a wrong nibble, scale or sum) fails it.
//! * vs the *unquantized* activations: additionally `Σ_i |w_i| · amax_b(i) / 254`,
//!   the worst case of the activation rounding (each `x_i` is off by at most half a
//!   step `d_b / 2 = amax_b / 254`, about 0.4 % of its block's largest magnitude).
//! * AVX2 / VNNI vs portable: identical activation bytes; dots within `1e-5 · mag`
//!   (they sum the same exact integers in a different `f32` order).
//! * VNNI vs AVX2: bit-identical (same integers in the same lanes, same `f32` code).
//! * multi-token vs single-token: bit-identical.

use std::sync::{Mutex, MutexGuard};

use ffai_kernels::quant::q8::{
    allow_gfni, avx2_allowed, dot_rows_q8_multi, dot_rows_q8_tile, env_level, force_q8_level, Q8Level, TokenTile,
};
use ffai_kernels::quant::{
    dequantize_row, dot_row, dot_row_q8, dot_row_q8_multi, dot_rows_q8, force_portable, has_q8_path, q8_backend_name,
    quantize_row, ActFormat, QuantizedActs, WeightType,
};
use half::f16;

const QUANTIZED: [WeightType; 14] = [
    WeightType::Q4_0,
    WeightType::Q4_1,
    WeightType::Q5_0,
    WeightType::Q5_1,
    WeightType::Q8_0,
    WeightType::Q4K,
    WeightType::Q5K,
    WeightType::Q6K,
    WeightType::Q2K,
    WeightType::Q3K,
    WeightType::Q8K,
    WeightType::IQ4NL,
    WeightType::IQ4XS,
    WeightType::MXFP4,
];

// ------------------------------------------------------------------ harness

/// The implementation switch is global: every test here holds this lock.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The cap `FFAI_CPU_LEVEL` puts on every level (CI runs this file under `portable` and
/// `avx2` too); a bad value fails the test instead of running unnoticed.
fn env_cap() -> Q8Level {
    env_level().unwrap_or_else(|e| panic!("{e}"))
}

/// True when the AVX2 kernels can run on this machine (and `FFAI_CPU_LEVEL` allows them).
fn avx2_here() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        env_cap() >= Q8Level::Avx2
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The backend name each forcing level must give on this CPU (under `FFAI_CPU_LEVEL`).
fn expected_name(level: Q8Level) -> &'static str {
    let level = level.min(env_cap());
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        let avxvnni = is_x86_feature_detected!("avxvnni");
        if level >= Q8Level::Avx512Vnni && avx2_here() && avx512 {
            return "avx512vnni";
        }
        if level >= Q8Level::AvxVnni && avx2_here() && avxvnni {
            return "avxvnni";
        }
        if level >= Q8Level::Avx2 && avx2_here() {
            return "avx2";
        }
    }
    let _ = level;
    "portable"
}

/// Every distinct implementation this CPU runs, as (forcing level, name), lowest first.
fn paths_here() -> Vec<(Q8Level, &'static str)> {
    let mut v: Vec<(Q8Level, &'static str)> = Vec::new();
    for level in [Q8Level::Portable, Q8Level::Avx2, Q8Level::AvxVnni, Q8Level::Avx512Vnni] {
        let name = expected_name(level);
        if v.last().is_none_or(|&(_, n)| n != name) {
            v.push((level, name));
        }
    }
    v
}

/// Runs `f` with the default (fastest) implementation, then every other one this CPU
/// has, checking which one is active.
fn every_path(mut f: impl FnMut(&'static str)) {
    let _g = lock();
    let mut levels = vec![(Q8Level::Best, expected_name(Q8Level::Best))];
    levels.extend(paths_here().into_iter().rev().skip(1));
    for (level, want) in levels {
        force_q8_level(level);
        let name = q8_backend_name();
        assert_eq!(name, want, "force_q8_level({level:?})");
        f(name);
    }
    force_portable(false);
}

// --------------------------------------------------------------------- data

/// SplitMix64.
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
    fn normal(&mut self) -> f32 {
        (0..12).map(|_| self.unit()).sum::<f32>() - 6.0
    }
}

/// Offsets of the f16 fields of one block.
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

/// Sets the scale fields that are not f16 to sane values: Q8_K's `f32` scale to
/// `d`, MXFP4's exponent to `e`.
fn set_other_scales(ty: WeightType, block: &mut [u8], d: f32, e: u8) {
    match ty {
        WeightType::Q8K => block[0..4].copy_from_slice(&d.to_le_bytes()),
        WeightType::MXFP4 => block[0] = e,
        _ => {}
    }
}

/// A random weight row of `cols` elements: either `quantize_row` of random data, or
/// (for every type, and the only way to get arbitrary K-quant scale bytes) random
/// bytes with sane f16 fields, as tests/quant.rs does.
fn random_row(rng: &mut Rng, ty: WeightType, cols: usize) -> Vec<u8> {
    let mut row = vec![0u8; ty.row_bytes(cols).unwrap()];
    if rng.below(2) == 0 {
        let amp = 10f32.powf(rng.uniform(-2.0, 1.0));
        let vals: Vec<f32> = (0..cols).map(|_| rng.normal() * amp).collect();
        quantize_row(ty, &vals, &mut row).unwrap();
    } else {
        row.iter_mut().for_each(|b| *b = rng.byte());
        for block in row.chunks_exact_mut(ty.block_bytes()) {
            for &at in f16_fields(ty) {
                let v = match rng.below(16) {
                    0 => f16::ZERO,
                    1 => f16::from_bits(1 + rng.below(0x3FF) as u16),
                    _ => f16::from_f32(rng.uniform(-0.05, 0.05)),
                };
                block[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
            }
            let e = 110 + rng.below(20) as u8;
            set_other_scales(ty, block, rng.uniform(-0.05, 0.05), e);
        }
    }
    row
}

/// Random activations: row-wide normal, per-32 varying amplitudes, or sparse.
fn random_acts(rng: &mut Rng, len: usize) -> Vec<f32> {
    match rng.below(3) {
        0 => {
            let amp = 10f32.powf(rng.uniform(-3.0, 2.0));
            (0..len).map(|_| rng.normal() * amp).collect()
        }
        1 => {
            let mut v = Vec::with_capacity(len);
            while v.len() < len {
                let a = 10f32.powf(rng.uniform(-4.0, 2.0));
                v.extend((0..32).map(|_| a * rng.uniform(-1.0, 1.0)));
            }
            v.truncate(len);
            v
        }
        _ => (0..len)
            .map(|_| if rng.below(8) == 0 { rng.normal() } else { 0.0 })
            .collect(),
    }
}

// ------------------------------------------------------------ naive oracles

/// Token `t` of `acts` decoded naively: `q · d` per block, after checking the
/// per-block side data (`s = d·Σq`, sums of 16) against the quants.
fn dequant_acts(acts: &QuantizedActs, t: usize) -> Vec<f64> {
    let q = acts.token_quants(t);
    let d = acts.token_scales(t);
    let bl = acts.format().block_len();
    assert_eq!(q.len(), acts.cols());
    assert_eq!(d.len(), acts.cols() / bl);
    for (b, qb) in q.chunks(bl).enumerate() {
        assert!(qb.iter().all(|&v| v != -128), "quant -128 in block {b}");
    }
    if matches!(acts.format(), ActFormat::Q8_0 | ActFormat::Q8_1) {
        for (b, &qs) in acts.token_block_qsums(t).iter().enumerate() {
            let want: i32 = q[b * 32..(b + 1) * 32].iter().map(|&v| v as i32).sum();
            assert_eq!(qs, want, "Σq of block {b}");
        }
        assert_eq!(acts.token_block_qsums(t).len(), d.len());
    }
    match acts.format() {
        ActFormat::Q8_1 => {
            for (b, (&s, &db)) in acts.token_block_sums(t).iter().zip(d).enumerate() {
                let sum: i32 = q[b * 32..(b + 1) * 32].iter().map(|&v| v as i32).sum();
                assert!(
                    s.to_bits() == (db * sum as f32).to_bits() || (s.is_nan() && db.is_nan()),
                    "s of block {b}: {s} vs d {db} · {sum}"
                );
            }
        }
        ActFormat::Q8K => {
            let sums = acts.token_sums16(t);
            assert_eq!(sums.len(), q.len() / 16);
            for (k, &s) in sums.iter().enumerate() {
                let want: i32 = q[16 * k..16 * (k + 1)].iter().map(|&v| v as i32).sum();
                assert_eq!(s as i32, want, "sum of 16 number {k}");
            }
        }
        _ => {}
    }
    q.iter()
        .enumerate()
        .map(|(i, &v)| v as f64 * d[i / bl] as f64)
        .collect()
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Q4_K/Q5_K 6-bit min of sub-block `s` (bits straight from the layout).
fn kq_min(block: &[u8], s: usize) -> u32 {
    let sc = &block[4..16];
    if s < 4 {
        (sc[s + 4] & 63) as u32
    } else {
        ((sc[s + 4] >> 4) | ((sc[s] >> 6) << 4)) as u32
    }
}

/// The magnitude of the dot's terms: `Σ_i (|w_i + m_i| + |m_i|) · |x_i|` where `m_i`
/// is the weight's min term (what is subtracted after scaling; 0 for symmetric types).
fn magnitude(ty: WeightType, row: &[u8], w: &[f32], x: &[f64]) -> f64 {
    let (bl, bb) = (ty.block_len(), ty.block_bytes());
    let min_of = |i: usize| -> f64 {
        let b = &row[(i / bl) * bb..][..bb];
        match ty {
            WeightType::Q4_1 | WeightType::Q5_1 => -(f16_at(b, 2) as f64),
            WeightType::Q4K | WeightType::Q5K => f16_at(b, 2) as f64 * kq_min(b, (i % bl) / 32) as f64,
            WeightType::Q2K => f16_at(b, 82) as f64 * (b[(i % bl) / 16] >> 4) as f64,
            _ => 0.0,
        }
    };
    (0..w.len())
        .map(|i| {
            let m = min_of(i);
            ((w[i] as f64 + m).abs() + m.abs()) * x[i].abs()
        })
        .sum()
}

fn dot_f64(w: &[f32], x: &[f64]) -> f64 {
    w.iter().zip(x).map(|(&a, &b)| a as f64 * b).sum()
}

/// Per-element bound on the activation rounding: `amax` of the element's block / 254.
fn act_rounding_bound(w: &[f32], x: &[f32], bl: usize) -> f64 {
    let mut tol = 0.0;
    for (wb, xb) in w.chunks(bl).zip(x.chunks(bl)) {
        let amax = xb.iter().fold(0.0f64, |a, &v| a.max((v as f64).abs()));
        tol += wb.iter().map(|&v| (v as f64).abs()).sum::<f64>() * amax / 254.0;
    }
    tol
}

/// Checks one (row, token) pair against both oracles; returns the dot.
fn check_dot(ty: WeightType, row: &[u8], acts: &QuantizedActs, x: &[f32], t: usize, what: &str) -> f32 {
    check_dot_with(ty, row, acts, x, t, what, true)
}

/// As [`check_dot`]; `vs_f32 = false` skips the comparison with the unquantized
/// activations (for blocks whose scale `amax / 127` is subnormal and so has lost
/// precision, where the stated activation bound does not hold).
fn check_dot_with(
    ty: WeightType,
    row: &[u8],
    acts: &QuantizedActs,
    x: &[f32],
    t: usize,
    what: &str,
    vs_f32: bool,
) -> f32 {
    let cols = acts.cols();
    let mut w = vec![0.0f32; cols];
    dequantize_row(ty, row, &mut w);
    let xq = dequant_acts(acts, t);
    let got = dot_row_q8(ty, row, acts, t);
    let mag = magnitude(ty, row, &w, &xq);
    let want = dot_f64(&w, &xq);
    let tol = 1e-5 * mag + 1e-30;
    assert!(
        (got as f64 - want).abs() <= tol,
        "{what}: {ty} cols={cols} t={t}: q8 dot {got:e} vs dequantized-activation dot {want:e} (tol {tol:e})"
    );
    if !vs_f32 {
        return got;
    }
    // Against the unquantized activations.
    let xs = &x[t * cols..(t + 1) * cols];
    let xf: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
    let exact = dot_f64(&w, &xf);
    let tol2 = act_rounding_bound(&w, xs, acts.format().block_len()) * (1.0 + 1e-6) + 1e-5 * mag + 1e-30;
    assert!(
        (got as f64 - exact).abs() <= tol2,
        "{what}: {ty} cols={cols} t={t}: q8 dot {got:e} vs f32-activation dot {exact:e} (tol {tol2:e})"
    );
    got
}

fn blocks_for(ty: WeightType) -> &'static [usize] {
    if ty.block_len() == 32 {
        &[1, 2, 3, 5, 7, 18, 48]
    } else {
        &[1, 2, 3, 5, 8]
    }
}

// -------------------------------------------------------------------- tests

#[test]
fn backend_is_the_fastest_this_cpu_has_unless_forced() {
    let _g = lock();
    force_portable(false);
    let name = q8_backend_name();
    println!("q8 backend: {name}; paths here: {:?}", paths_here());
    assert_eq!(name, expected_name(Q8Level::Best));
    assert_eq!(avx2_allowed(), avx2_here());
    force_portable(true);
    assert_eq!(q8_backend_name(), "portable");
    assert!(!avx2_allowed());
    force_q8_level(Q8Level::Avx2);
    assert_eq!(q8_backend_name(), if avx2_here() { "avx2" } else { "portable" });
    assert_eq!(avx2_allowed(), avx2_here());
    for level in [Q8Level::AvxVnni, Q8Level::Avx512Vnni, Q8Level::Best] {
        force_q8_level(level);
        assert_eq!(q8_backend_name(), expected_name(level), "{level:?}");
        assert_eq!(avx2_allowed(), avx2_here());
    }
    force_q8_level(Q8Level::Portable);
    assert_eq!(q8_backend_name(), "portable");
    force_portable(false);
    assert_eq!(q8_backend_name(), name);
    // The default is the fastest path this CPU has (detected above independently of the
    // library), whatever the CPU: nothing here assumes VNNI or even AVX2.
}

#[test]
fn has_q8_path_for_quantized_types_only() {
    for ty in WeightType::ALL {
        assert_eq!(has_q8_path(ty), ty.is_quantized(), "{ty}");
        assert_eq!(ActFormat::for_weight(ty) == ActFormat::F32, !ty.is_quantized(), "{ty}");
    }
}

/// dot_row_q8 vs the f64 dot with the dequantized activations (tight) and with the
/// original activations (activation-rounding bound), every type, both paths.
#[test]
fn dot_matches_oracles() {
    every_path(|path| {
        let mut rng = Rng(11);
        for ty in QUANTIZED {
            for &nb in blocks_for(ty) {
                let cols = nb * ty.block_len();
                for rep in 0..6 {
                    let n = 1 + rng.below(3);
                    let row = random_row(&mut rng, ty, cols);
                    let x = random_acts(&mut rng, n * cols);
                    let mut acts = QuantizedActs::new();
                    acts.quantize(ty, &x, n, cols);
                    assert_eq!(acts.format(), ActFormat::for_weight(ty));
                    for t in 0..n {
                        check_dot(ty, &row, &acts, &x, t, &format!("{path} rep {rep}"));
                    }
                }
            }
        }
    });
}

/// The oracle check is sharp enough to notice a one-level error in one weight.
#[test]
fn oracle_tolerance_catches_a_single_level_error() {
    let _g = lock();
    let mut rng = Rng(12);
    let cols = 256;
    let vals: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
    let x: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
    for ty in QUANTIZED {
        let mut row = vec![0u8; ty.row_bytes(cols).unwrap()];
        quantize_row(ty, &vals, &mut row).unwrap();
        let mut acts = QuantizedActs::new();
        acts.quantize(ty, &x, 1, cols);
        let mut w = vec![0.0f32; cols];
        dequantize_row(ty, &row, &mut w);
        let xq = dequant_acts(&acts, 0);
        let mag = magnitude(ty, &row, &w, &xq);
        // The smallest change a wrong level would make: one step of the weight's
        // scale times an activation of typical size.
        let mut w2 = w.clone();
        let k = (0..cols).max_by(|&a, &b| xq[a].abs().total_cmp(&xq[b].abs())).unwrap();
        let step = (w.iter().map(|v| v.abs()).fold(0.0, f32::max) / 64.0) as f64;
        w2[k] += step as f32;
        let shift = (dot_f64(&w2, &xq) - dot_f64(&w, &xq)).abs();
        assert!(
            shift > 1e-5 * mag * 10.0,
            "{ty}: a one-level error ({shift:e}) would hide inside the tolerance {:e}",
            1e-5 * mag
        );
    }
}

/// Every implementation quantizes to identical bytes; each agrees with the portable
/// dots within the tolerance, and the VNNI ones are bit-identical to AVX2 (single,
/// multi-token and multi-row forms).
#[test]
fn all_paths_agree() {
    let _g = lock();
    let paths = paths_here();
    println!("paths: {paths:?}");
    let mut rng = Rng(13);
    for ty in QUANTIZED {
        for &nb in blocks_for(ty) {
            let cols = nb * ty.block_len();
            for _ in 0..4 {
                let n = 11;
                let x = random_acts(&mut rng, n * cols);
                let nrows = 4;
                let rows: Vec<Vec<u8>> = (0..nrows).map(|_| random_row(&mut rng, ty, cols)).collect();
                let flat: Vec<u8> = rows.concat();
                // Per path: activations, single dots, multi dots, dot_rows (all [row][token]).
                let mut res = Vec::new();
                for &(level, name) in &paths {
                    force_q8_level(level);
                    assert_eq!(q8_backend_name(), name);
                    let mut acts = QuantizedActs::new();
                    acts.quantize(ty, &x, n, cols);
                    let single: Vec<f32> = rows
                        .iter()
                        .flat_map(|r| (0..n).map(|t| dot_row_q8(ty, r, &acts, t)).collect::<Vec<_>>())
                        .collect();
                    let mut multi = vec![0.0f32; nrows * n];
                    for (r, row) in rows.iter().enumerate() {
                        dot_row_q8_multi(ty, row, &acts, 0..n, &mut multi[r * n..(r + 1) * n]);
                    }
                    let mut by_rows = vec![0.0f32; nrows * n];
                    for t in 0..n {
                        let mut o = vec![0.0f32; nrows];
                        dot_rows_q8(ty, &flat, &acts, t, &mut o);
                        for r in 0..nrows {
                            by_rows[r * n + t] = o[r];
                        }
                    }
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&single), bits(&multi), "{name} {ty}: multi vs single");
                    assert_eq!(bits(&single), bits(&by_rows), "{name} {ty}: rows vs single");
                    res.push((name, acts, single));
                }
                force_portable(false);
                let (pname, a, dp) = &res[0];
                assert_eq!(*pname, "portable");
                for (name, b, db) in &res[1..] {
                    for t in 0..n {
                        assert_eq!(a.token_quants(t), b.token_quants(t), "{name} {ty} quants differ");
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(a.token_scales(t)),
                            bits(b.token_scales(t)),
                            "{name} {ty} scales differ"
                        );
                        assert_eq!(
                            bits(a.token_block_sums(t)),
                            bits(b.token_block_sums(t)),
                            "{name} {ty} block sums differ"
                        );
                        assert_eq!(a.token_sums16(t), b.token_sums16(t), "{name} {ty} sums of 16 differ");
                        assert_eq!(a.token_block_qsums(t), b.token_block_qsums(t), "{name} {ty} Σq differ");
                    }
                    for (r, row) in rows.iter().enumerate() {
                        let mut w = vec![0.0f32; cols];
                        dequantize_row(ty, row, &mut w);
                        for t in 0..n {
                            let mag = magnitude(ty, row, &w, &dequant_acts(a, t));
                            let (x1, x2) = (db[r * n + t] as f64, dp[r * n + t] as f64);
                            assert!(
                                (x1 - x2).abs() <= 1e-5 * mag + 1e-30,
                                "{ty} cols={cols} row {r} t {t}: {name} {x1:e} vs portable {x2:e} (mag {mag:e})"
                            );
                        }
                    }
                }
                // The VNNI paths against AVX2: bit-identical.
                if let Some((_, _, d2)) = res.iter().find(|(n, _, _)| *n == "avx2") {
                    for (name, _, dv) in res.iter().filter(|(n, _, _)| n.contains("vnni")) {
                        for (k, (p, q)) in d2.iter().zip(dv).enumerate() {
                            assert_eq!(
                                p.to_bits(),
                                q.to_bits(),
                                "{ty} cols={cols} row {} t {}: avx2 {p:e} vs {name} {q:e}",
                                k / n,
                                k % n
                            );
                        }
                    }
                }
            }
        }
    }
}

/// dot_row_q8_multi is bit-identical to dot_row_q8 token by token, for token
/// ranges of every length 1..=17 (tiles of 8 plus every remainder) at several
/// offsets, odd block counts, both paths.
#[test]
fn multi_equals_single_bit_exactly() {
    every_path(|path| {
        let mut rng = Rng(14);
        for ty in WeightType::ALL {
            let nbs: &[usize] = if ty.block_len() == 1 {
                &[32, 33, 96]
            } else if ty.block_len() == 32 {
                &[1, 3, 5, 9, 18]
            } else {
                &[1, 3, 5]
            };
            for &nb in nbs {
                let cols = nb * ty.block_len();
                let n = 20;
                let row = if ty.is_quantized() {
                    random_row(&mut rng, ty, cols)
                } else {
                    let v: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
                    let mut r = vec![0u8; ty.row_bytes(cols).unwrap()];
                    quantize_row(ty, &v, &mut r).unwrap();
                    r
                };
                let x = random_acts(&mut rng, n * cols);
                let mut acts = QuantizedActs::new();
                acts.quantize(ty, &x, n, cols);
                let single: Vec<f32> = (0..n).map(|t| dot_row_q8(ty, &row, &acts, t)).collect();
                for len in 1..=17 {
                    for start in [0, 1, 2, 3, n - len] {
                        let mut out = vec![f32::NAN; len];
                        dot_row_q8_multi(ty, &row, &acts, start..start + len, &mut out);
                        for (j, &o) in out.iter().enumerate() {
                            assert_eq!(
                                o.to_bits(),
                                single[start + j].to_bits(),
                                "{path} {ty} cols={cols} tokens {start}..{}: token {} multi {o:e} single {:e}",
                                start + len,
                                start + j,
                                single[start + j]
                            );
                        }
                    }
                }
                let mut all = vec![0.0; n];
                dot_row_q8_multi(ty, &row, &acts, 0..n, &mut all);
                assert_eq!(all, single);
                let mut none: [f32; 0] = [];
                dot_row_q8_multi(ty, &row, &acts, 5..5, &mut none);
            }
        }
    });
}

/// dot_rows_q8 over a block of rows is bit-identical to dot_row_q8 row by row.
#[test]
fn rows_equal_single_rows_bit_exactly() {
    every_path(|path| {
        let mut rng = Rng(20);
        for ty in WeightType::ALL {
            let cols = if ty.is_quantized() { 3 * ty.block_len() } else { 45 };
            let rb = ty.row_bytes(cols).unwrap();
            let nrows = 7;
            let mut w = Vec::new();
            for _ in 0..nrows {
                if ty.is_quantized() {
                    w.extend(random_row(&mut rng, ty, cols));
                } else {
                    let v: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
                    let mut r = vec![0u8; rb];
                    quantize_row(ty, &v, &mut r).unwrap();
                    w.extend(r);
                }
            }
            let x = random_acts(&mut rng, 3 * cols);
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &x, 3, cols);
            for t in 0..3 {
                let mut out = vec![f32::NAN; nrows];
                dot_rows_q8(ty, &w, &acts, t, &mut out);
                for (r, &o) in out.iter().enumerate() {
                    let one = dot_row_q8(ty, &w[r * rb..(r + 1) * rb], &acts, t);
                    assert_eq!(o.to_bits(), one.to_bits(), "{path} {ty} row {r} token {t}");
                }
                let mut sub = vec![0.0; 2];
                dot_rows_q8(ty, &w[3 * rb..5 * rb], &acts, t, &mut sub);
                assert_eq!(sub, out[3..5]);
                dot_rows_q8(ty, &[], &acts, t, &mut []);
            }
        }
    });
}

/// dot_rows_q8_multi over R rows × n tokens is bit-identical to dot_row_q8_multi row
/// by row (and so to dot_row_q8), for row counts around the 4-row blocks, token counts
/// around the 8-token tiles, odd block counts (every 8-block chunk remainder) and
/// token offsets, on every path.
#[test]
fn rows_multi_equals_row_multi_bit_exactly() {
    every_path(|path| {
        let mut rng = Rng(31);
        for ty in WeightType::ALL {
            let nbs: &[usize] = if ty.block_len() == 1 {
                &[32, 33]
            } else if ty.block_len() == 32 {
                &[1, 3, 8, 9, 20, 23]
            } else {
                &[1, 3]
            };
            for &nb in nbs {
                let cols = nb * ty.block_len();
                let rb = ty.row_bytes(cols).unwrap();
                let nrows = 19;
                let mut w = Vec::new();
                for i in 0..nrows {
                    if ty.is_quantized() && i == 1 {
                        // Every level at its largest (all bits set), sane f16 fields:
                        // the largest integer sums the kernels can meet.
                        let mut row = vec![0xFFu8; rb];
                        for block in row.chunks_exact_mut(ty.block_bytes()) {
                            for &at in f16_fields(ty) {
                                block[at..at + 2].copy_from_slice(&f16::from_f32(0.01).to_bits().to_le_bytes());
                            }
                        }
                        w.extend(row);
                    } else if ty.is_quantized() {
                        w.extend(random_row(&mut rng, ty, cols));
                    } else {
                        let v: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
                        let mut r = vec![0u8; rb];
                        quantize_row(ty, &v, &mut r).unwrap();
                        w.extend(r);
                    }
                }
                let n = 21;
                let mut x = random_acts(&mut rng, n * cols);
                // Tokens 0 and 1: every quant +127 / alternating ±127 blocks.
                x[..cols].fill(1.0);
                for (i, v) in x[cols..2 * cols].iter_mut().enumerate() {
                    *v = if (i / 32) % 2 == 0 { -1.0 } else { 1.0 };
                }
                let mut acts = QuantizedActs::new();
                acts.quantize(ty, &x, n, cols);
                for nr in [1, 2, 3, 5, 9, 15, 16, 17, 19] {
                    for (start, len) in [(0, 1), (0, 8), (1, 7), (2, 9), (0, 16), (3, 17), (0, 21), (20, 1)] {
                        let r0 = if nr == 1 { 1 } else { nrows - nr };
                        let rows = &w[r0 * rb..(r0 + nr) * rb];
                        let mut out = vec![f32::NAN; nr * len];
                        dot_rows_q8_multi(ty, rows, &acts, start..start + len, &mut out);
                        // The prepared-tile entry point computes exactly the same.
                        let mut tile = TokenTile::new();
                        tile.prepare(ty, &acts, start..start + len);
                        let mut via_tile = vec![f32::NAN; nr * len];
                        dot_rows_q8_tile(ty, rows, &acts, &tile, &mut via_tile);
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&via_tile),
                            bits(&out),
                            "{path} {ty} tile rows={nr} tokens {start}+{len}"
                        );
                        for r in 0..nr {
                            let mut one = vec![f32::NAN; len];
                            dot_row_q8_multi(ty, &rows[r * rb..(r + 1) * rb], &acts, start..start + len, &mut one);
                            for j in 0..len {
                                assert_eq!(
                                    out[r * len + j].to_bits(),
                                    one[j].to_bits(),
                                    "{path} {ty} cols={cols} rows={nr} tokens {start}..{}: row {r} token {} rows_multi {:e} row_multi {:e}",
                                    start + len,
                                    start + j,
                                    out[r * len + j],
                                    one[j]
                                );
                            }
                            if len == 1 || r == 0 {
                                let single = dot_row_q8(ty, &rows[r * rb..(r + 1) * rb], &acts, start);
                                assert_eq!(out[r * len].to_bits(), single.to_bits(), "{path} {ty} vs dot_row_q8");
                            }
                        }
                    }
                }
                dot_rows_q8_multi(ty, &w[..2 * rb], &acts, 4..4, &mut []);
                dot_rows_q8_multi(ty, &[], &acts, 0..3, &mut []);
            }
        }
    });
}

/// Float weight types go through dot_row on the stored f32 copy, bit-exactly.
#[test]
fn float_types_use_dot_row() {
    every_path(|_| {
        let mut rng = Rng(15);
        for ty in [WeightType::F32, WeightType::F16, WeightType::BF16] {
            let cols = 77;
            let v: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
            let mut row = vec![0u8; ty.row_bytes(cols).unwrap()];
            quantize_row(ty, &v, &mut row).unwrap();
            let x = random_acts(&mut rng, 2 * cols);
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &x, 2, cols);
            assert_eq!(acts.format(), ActFormat::F32);
            for t in 0..2 {
                assert_eq!(
                    dot_row_q8(ty, &row, &acts, t).to_bits(),
                    dot_row(ty, &row, &x[t * cols..(t + 1) * cols]).to_bits()
                );
            }
        }
    });
}

/// quantize_rows over disjoint ranges (in any order), and a writer shared by
/// threads, give exactly what quantize gives.
#[test]
fn quantize_rows_and_writer_match_quantize() {
    every_path(|path| {
        let mut rng = Rng(16);
        for ty in [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q6K, WeightType::F16] {
            let cols = 2 * ty.block_len().max(32);
            let n = 11;
            let x = random_acts(&mut rng, n * cols);
            let mut whole = QuantizedActs::new();
            whole.quantize(ty, &x, n, cols);

            let mut parts = QuantizedActs::new();
            parts.prepare(ty, n, cols);
            for r in [7..11, 0..3, 3..3, 3..7] {
                parts.quantize_rows(&x, r);
            }

            let mut threaded = QuantizedActs::new();
            threaded.prepare(ty, n, cols);
            {
                let w = threaded.writer();
                std::thread::scope(|s| {
                    for r in [0..4, 4..5, 5..11] {
                        let (w, x) = (&w, &x);
                        s.spawn(move || w.quantize_rows(x, r));
                    }
                });
            }
            for other in [&parts, &threaded] {
                for t in 0..n {
                    assert_eq!(whole.token_quants(t), other.token_quants(t), "{path} {ty} t {t}");
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(whole.token_scales(t)), bits(other.token_scales(t)));
                    assert_eq!(bits(whole.token_block_sums(t)), bits(other.token_block_sums(t)));
                    assert_eq!(whole.token_sums16(t), other.token_sums16(t));
                    assert_eq!(whole.token_block_qsums(t), other.token_block_qsums(t));
                    assert_eq!(bits(whole.token_f32(t)), bits(other.token_f32(t)));
                }
            }
        }
    });
}

#[test]
#[should_panic(expected = "quantized twice")]
fn writer_rejects_overlapping_rows() {
    let x = vec![1.0f32; 4 * 32];
    let mut acts = QuantizedActs::new();
    acts.prepare(WeightType::Q8_0, 4, 32);
    let w = acts.writer();
    w.quantize_rows(&x, 0..2);
    w.quantize_rows(&x, 1..3);
}

#[test]
#[should_panic(expected = "activations")]
fn dot_rejects_mismatched_format() {
    let mut acts = QuantizedActs::new();
    acts.quantize(WeightType::Q4_0, &[0.5; 256], 1, 256);
    let row = vec![0u8; WeightType::Q4K.row_bytes(256).unwrap()];
    dot_row_q8(WeightType::Q4K, &row, &acts, 0);
}

/// No allocation after the first use at a given size: same buffers (address and
/// capacity) for repeated and smaller uses, across formats already seen.
#[test]
fn buffers_are_reused() {
    let _g = lock();
    let mut rng = Rng(17);
    let (n, cols) = (6, 1024);
    let x = random_acts(&mut rng, n * cols);
    let mut acts = QuantizedActs::new();
    // First use of every format at the largest size.
    for ty in [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q4K, WeightType::F32] {
        acts.quantize(ty, &x, n, cols);
    }
    let fp = acts.buffer_fingerprint();
    for rep in 0..3 {
        for ty in QUANTIZED.iter().chain(&[WeightType::F16]) {
            acts.quantize(*ty, &x, n, cols);
            assert_eq!(acts.buffer_fingerprint(), fp, "{ty} rep {rep} reallocated");
            acts.quantize(*ty, &x, 2, 512);
            assert_eq!(acts.buffer_fingerprint(), fp, "{ty} smaller rep {rep} reallocated");
            acts.prepare(*ty, n, cols);
            acts.quantize_rows(&x, 1..4);
            assert_eq!(acts.buffer_fingerprint(), fp, "{ty} prepare rep {rep} reallocated");
        }
    }
    // The quants start on a 32-byte boundary.
    acts.quantize(WeightType::Q8_0, &x, n, cols);
    assert_eq!(acts.token_quants(0).as_ptr() as usize % 32, 0);
}

/// All-zero activations: scale 0, dot exactly 0 (never NaN), both paths.
#[test]
fn zero_activations_give_zero() {
    every_path(|path| {
        let mut rng = Rng(18);
        for ty in QUANTIZED {
            let cols = 3 * ty.block_len();
            let row = random_row(&mut rng, ty, cols);
            // Token 0 all zero; token 1 has one zero block between non-zero ones.
            let mut x = vec![0.0f32; 2 * cols];
            for (i, v) in x[cols..].iter_mut().enumerate() {
                if i / ty.block_len() != 1 {
                    *v = rng.normal();
                }
            }
            x[cols + ty.block_len() + 3] = -0.0;
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &x, 2, cols);
            assert!(acts.token_scales(0).iter().all(|&d| d == 0.0));
            assert!(acts.token_quants(0).iter().all(|&q| q == 0));
            assert_eq!(acts.token_scales(1)[1], 0.0);
            let z = dot_row_q8(ty, &row, &acts, 0);
            assert_eq!(z, 0.0, "{path} {ty}: zero activations gave {z}");
            check_dot(ty, &row, &acts, &x, 1, path);
        }
    });
}

/// Huge and tiny (down to subnormal) activation magnitudes keep the stated accuracy;
/// non-finite activations give NaN on both paths.
#[test]
fn extreme_magnitudes() {
    every_path(|path| {
        let mut rng = Rng(19);
        for ty in QUANTIZED {
            let cols = 4 * ty.block_len();
            let row = random_row(&mut rng, ty, cols);
            for scale in [1e30f32, 1e20, 1e-20, 1e-34, 1e-38, 1e-41, 1e-44] {
                let x: Vec<f32> = (0..cols).map(|_| rng.normal() * scale).collect();
                let mut acts = QuantizedActs::new();
                acts.quantize(ty, &x, 1, cols);
                // Scales stay normal floats down to amax ≈ 1.5e-36.
                let normal_scale = scale >= 1e-34;
                let what = format!("{path} scale {scale:e}");
                let got = check_dot_with(ty, &row, &acts, &x, 0, &what, normal_scale);
                assert!(got.is_finite(), "{what}: {got}");
                // The quants still use the full range (the 2^100 prescale keeps tiny
                // blocks exact).
                let qmax = acts.token_quants(0).iter().map(|&q| (q as i32).abs()).max().unwrap();
                assert_eq!(qmax, 127, "{path} {ty} scale {scale:e}");
            }
            // Mixed magnitudes in one row: 1e30 in one block, 1e-30 in another.
            let x: Vec<f32> = (0..cols)
                .map(|i| rng.normal() * if (i / ty.block_len()) % 2 == 0 { 1e25 } else { 1e-25 })
                .collect();
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &x, 1, cols);
            check_dot(ty, &row, &acts, &x, 0, &format!("{path} mixed"));
            // Non-finite activations poison the dot (like the f32 path).
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
                x[rng.below(cols)] = bad;
                acts.quantize(ty, &x, 1, cols);
                let got = dot_row_q8(ty, &row, &acts, 0);
                assert!(got.is_nan(), "{path} {ty}: {bad} activation gave {got}");
            }
        }
    });
}

/// Weight rows at the extremes of their levels (every nibble 0 or 15, Q8_0 at ±127
/// and -128) with activations at ±127: the largest integer partial sums, where an
/// `i16` saturation in the SIMD code would show.
#[test]
fn saturating_extremes_are_exact() {
    every_path(|path| {
        for ty in QUANTIZED {
            let cols = 2 * ty.block_len();
            for fill in [0x00u8, 0xFF, 0x80, 0x7F] {
                let mut row = vec![fill; ty.row_bytes(cols).unwrap()];
                for block in row.chunks_exact_mut(ty.block_bytes()) {
                    for &at in f16_fields(ty) {
                        block[at..at + 2].copy_from_slice(&f16::from_f32(0.01).to_bits().to_le_bytes());
                    }
                    if matches!(ty, WeightType::Q4K | WeightType::Q5K) {
                        block[4..16].fill(0xFF); // every scale and min 63
                    }
                    set_other_scales(ty, block, 0.01, 120);
                }
                for sign in [1.0f32, -1.0] {
                    let x: Vec<f32> = (0..cols).map(|i| sign * if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
                    let mut acts = QuantizedActs::new();
                    acts.quantize(ty, &x, 1, cols);
                    check_dot(ty, &row, &acts, &x, 0, &format!("{path} fill {fill:#x}"));
                }
            }
        }
    });
}

/// Hand-computed quants: with `amax = 127` the step is exactly 1, so every value
/// is its own rounding problem; halves must round to even (as `vcvtps2dq` in the
/// default mode does), on both paths, for both block sizes.
#[test]
fn quantization_rounds_half_to_even() {
    let vals = [
        127.0f32, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.49, -3.51, 0.0, -0.0, 64.0,
    ];
    let want = [127i8, 0, 2, 2, 0, -2, -2, 126, -126, 3, -4, 0, 0, 64];
    every_path(|path| {
        for ty in [WeightType::Q8_0, WeightType::Q4_1, WeightType::Q4K] {
            let cols = ty.block_len();
            let mut x = vec![0.0f32; cols];
            x[..vals.len()].copy_from_slice(&vals);
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &x, 1, cols);
            assert_eq!(acts.token_scales(0), &[1.0], "{path} {ty}");
            assert_eq!(&acts.token_quants(0)[..want.len()], &want, "{path} {ty}");
            assert!(acts.token_quants(0)[want.len()..].iter().all(|&q| q == 0));
        }
    });
}

/// Every dot form of every quantized type, as bit patterns: single dots, multi-token
/// dots, `dot_rows_q8` and `dot_rows_q8_multi`, all `[row][token]`.
fn all_forms(ty: WeightType, flat: &[u8], rb: usize, acts: &QuantizedActs) -> Vec<u32> {
    let (nrows, n) = (flat.len() / rb, acts.tokens());
    let mut v = Vec::new();
    for row in flat.chunks_exact(rb) {
        v.extend((0..n).map(|t| dot_row_q8(ty, row, acts, t).to_bits()));
        let mut o = vec![0.0f32; n];
        dot_row_q8_multi(ty, row, acts, 0..n, &mut o);
        v.extend(o.iter().map(|f| f.to_bits()));
    }
    for t in 0..n {
        let mut o = vec![0.0f32; nrows];
        dot_rows_q8(ty, flat, acts, t, &mut o);
        v.extend(o.iter().map(|f| f.to_bits()));
    }
    let mut o = vec![0.0f32; nrows * n];
    dot_rows_q8_multi(ty, flat, acts, 0..n, &mut o);
    v.extend(o.iter().map(|f| f.to_bits()));
    v
}

/// The AVX-512 level's GFNI build (nibbles split by `vgf2p8affineqb`) and its plain
/// build give the same bits for every type and dot form (where the CPU has both).
#[test]
fn gfni_and_plain_builds_agree() {
    let _g = lock();
    if expected_name(Q8Level::Avx512Vnni) != "avx512vnni" {
        println!("no AVX-512 VNNI level here: nothing to compare");
        return;
    }
    force_q8_level(Q8Level::Avx512Vnni);
    let mut rng = Rng(41);
    for ty in QUANTIZED {
        for &nb in blocks_for(ty) {
            let cols = nb * ty.block_len();
            let rb = ty.row_bytes(cols).unwrap();
            let flat: Vec<u8> = (0..5).flat_map(|_| random_row(&mut rng, ty, cols)).collect();
            let n = 11;
            let x = random_acts(&mut rng, n * cols);
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &x, n, cols);
            allow_gfni(false);
            let plain = all_forms(ty, &flat, rb, &acts);
            allow_gfni(true);
            let gfni = all_forms(ty, &flat, rb, &acts);
            assert_eq!(plain, gfni, "{ty} cols={cols}: GFNI build differs from the plain one");
        }
    }
    force_portable(false);
}

/// MXFP4 blocks with every E8M0 exponent, the subnormal scales 2^-128 and 2^-127 and the
/// largest included: the x86 levels agree bit for bit (their scales are built as bit
/// patterns in SIMD) and with the portable level within its tolerance where finite.
#[test]
fn mxfp4_every_exponent() {
    let _g = lock();
    let ty = WeightType::MXFP4;
    let paths = paths_here();
    let mut rng = Rng(43);
    // 9 blocks per row: a whole chunk of 8 and a remainder of 1.
    let cols = 9 * 32;
    let rb = ty.row_bytes(cols).unwrap();
    for e0 in (0..=255u8).step_by(9) {
        let mut flat = Vec::new();
        for r in 0..4 {
            let mut row = random_row(&mut rng, ty, cols);
            for (b, block) in row.chunks_exact_mut(ty.block_bytes()).enumerate() {
                block[0] = e0.wrapping_add((b + r) as u8);
            }
            flat.extend(row);
        }
        let n = 3;
        // Small activations keep the largest scales finite.
        let x: Vec<f32> = random_acts(&mut rng, n * cols).iter().map(|v| v * 1e-30).collect();
        let mut res: Vec<(&str, Vec<u32>)> = Vec::new();
        for &(level, name) in &paths {
            force_q8_level(level);
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &x, n, cols);
            res.push((name, all_forms(ty, &flat, rb, &acts)));
        }
        force_portable(false);
        let x86: Vec<_> = res.iter().filter(|(name, _)| *name != "portable").collect();
        for w in x86.windows(2) {
            assert_eq!(w[0].1, w[1].1, "exponents from {e0}: {} vs {}", w[0].0, w[1].0);
        }
        let mut acts = QuantizedActs::new();
        acts.quantize(ty, &x, n, cols);
        let (_, p) = &res[0];
        for (name, d) in &x86 {
            for (r, row) in flat.chunks_exact(rb).enumerate() {
                let mut w = vec![0.0f32; cols];
                dequantize_row(ty, row, &mut w);
                for t in 0..n {
                    let mag = magnitude(ty, row, &w, &dequant_acts(&acts, t));
                    let (a, b) = (f32::from_bits(d[r * 2 * n + t]), f32::from_bits(p[r * 2 * n + t]));
                    if !mag.is_finite() || !b.is_finite() {
                        continue;
                    }
                    assert!(
                        ((a as f64) - (b as f64)).abs() <= 1e-5 * mag + 1e-30,
                        "exponents from {e0} row {r} t {t}: {name} {a:e} vs portable {b:e} (mag {mag:e})"
                    );
                }
            }
        }
    }
}
