//! Affine (MLX) weights: repacking the MLX triple, `dequantize_row`, `dot_row` and the
//! integer dots, for every bits × group, on every implementation this CPU has.
//!
//! The oracle decodes the MLX triple itself (word and shift per element, straight
//! from the format's definition) and computes `scale · q + bias` in `f32`; dots are
//! compared with `f64` sums of those values. Tolerances follow `tests/q8.rs`: the
//! integer part is exact, so the `f32` rounding of the per-chunk terms is bounded by
//! `1e-5 · mag`, `mag = Σ_i (|scale| · 2^bits + |bias|) · |x_i|` (every `f32` term the
//! kernels add is at most that in size).

use std::sync::{Mutex, MutexGuard};

use ffai_kernels::backend::{Backend, HostBytes};
use ffai_kernels::cpu::CpuBackend;
use ffai_kernels::quant::affine::{repack_mlx, MlxTriple, ScaleType, BITS, GROUPS};
use ffai_kernels::quant::q8::{dot_rows_q8_multi, dot_rows_q8_tile, force_q8_level, Q8Level, TokenTile};
use ffai_kernels::quant::{
    dequantize_row, dot_row, dot_row_q8, dot_row_q8_multi, dot_rows_q8, q8_backend_name, quantize_row, ActFormat,
    QuantizedActs, WeightType,
};
use half::{bf16, f16};

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on every implementation this CPU has (portable, AVX2, AVX-VNNI, AVX-512 VNNI).
fn every_path(mut f: impl FnMut(&'static str)) {
    let _g = lock();
    let mut seen = Vec::new();
    for level in [
        Q8Level::Portable,
        Q8Level::Avx2,
        Q8Level::AvxVnni,
        Q8Level::Avx512Vnni,
        Q8Level::Best,
    ] {
        force_q8_level(level);
        let name = q8_backend_name();
        if !seen.contains(&name) {
            seen.push(name);
            f(name);
        }
    }
    force_q8_level(Q8Level::Best);
    #[cfg(target_arch = "x86_64")]
    if ffai_kernels::quant::q8::env_level().is_ok_and(|cap| cap >= Q8Level::Avx2)
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        assert!(seen.contains(&"avx2"), "AVX2 path not exercised: {seen:?}");
    }
}

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
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
}

/// An MLX quantized matrix: packed words, scales and biases (as stored), and the
/// oracle's dequantized values.
struct Mlx {
    words: Vec<u32>,
    scales: Vec<u8>,
    biases: Vec<u8>,
    st: ScaleType,
    deq: Vec<f32>,
}

fn store(st: ScaleType, v: f32, out: &mut Vec<u8>) -> f32 {
    match st {
        ScaleType::F16 => {
            let h = f16::from_f32(v);
            out.extend_from_slice(&h.to_le_bytes());
            h.to_f32()
        }
        ScaleType::BF16 => {
            let h = bf16::from_f32(v);
            out.extend_from_slice(&h.to_le_bytes());
            h.to_f32()
        }
        ScaleType::F32 => {
            out.extend_from_slice(&v.to_le_bytes());
            v
        }
    }
}

/// Level `j` of a row of MLX words: `bits` bits from bit `j · bits` of the row's
/// little-endian bit stream (for 2, 4 and 8 bits, element `j % (32/bits)` of word
/// `j / (32/bits)`, low bits first).
fn mlx_level(words: &[u32], bits: usize, j: usize) -> u32 {
    let (w, s) = (j * bits / 32, j * bits % 32);
    let mask = (1u64 << bits) - 1;
    let lo = u64::from(words[w]);
    let hi = if s + bits > 32 {
        u64::from(words[w + 1]) << 32
    } else {
        0
    };
    (((lo | hi) >> s) & mask) as u32
}

fn make_mlx(rng: &mut Rng, bits: u8, group: u16, rows: usize, cols: usize, st: ScaleType) -> Mlx {
    let wpr = cols * bits as usize / 32;
    let words: Vec<u32> = (0..rows * wpr).map(|_| rng.next_u64() as u32).collect();
    let g = group as usize;
    let (mut scales, mut biases) = (Vec::new(), Vec::new());
    let mut deq = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for gi in 0..cols / g {
            // Mostly ordinary magnitudes; every 7th group a scale below f16's normal
            // range (exact in bf16 and f32, so the repack must not go through f16).
            let mag = if (r + gi) % 7 == 3 && st != ScaleType::F16 {
                1e-7
            } else {
                0.02
            };
            let s = store(st, rng.uniform(0.1, 1.0) * mag, &mut scales);
            let b = store(st, rng.uniform(-1.0, 1.0) * mag * 8.0, &mut biases);
            for i in 0..g {
                let c = gi * g + i;
                let q = mlx_level(&words[r * wpr..(r + 1) * wpr], bits as usize, c) as f32;
                deq[r * cols + c] = s * q + b;
            }
        }
    }
    Mlx {
        words,
        scales,
        biases,
        st,
        deq,
    }
}

fn words_bytes(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn repack(m: &Mlx, bits: u8, group: u16, rows: usize, cols: usize) -> Vec<u8> {
    let weight = words_bytes(&m.words);
    let t = MlxTriple {
        weight: &weight,
        scales: &m.scales,
        biases: &m.biases,
        scale_type: m.st,
    };
    repack_mlx(bits, group, rows, cols, &t).unwrap()
}

fn all_formats() -> impl Iterator<Item = (u8, u16)> {
    BITS.into_iter().flat_map(|b| GROUPS.into_iter().map(move |g| (b, g)))
}

#[test]
fn type_properties() {
    for (bits, group) in all_formats() {
        let ty = WeightType::affine(bits, group).unwrap();
        assert_eq!(ty.block_len(), group as usize);
        assert_eq!(ty.block_bytes(), 8 + group as usize * bits as usize / 8);
        assert_eq!(ty.name(), format!("AFFINE{bits}_G{group}"));
        assert!(ty.is_quantized() && !ty.is_ggml());
        assert_eq!(ActFormat::for_weight(ty), ActFormat::Q8_1);
        assert_eq!(ty.row_bytes(group as usize * 3), Some(3 * ty.block_bytes()));
        assert_eq!(ty.row_bytes(group as usize / 2), None);
    }
    for (bits, group) in [(1, 64), (7, 64), (4, 16), (4, 256), (16, 64)] {
        assert_eq!(WeightType::affine(bits, group), None, "{bits}/{group}");
    }
}

/// Repacked rows dequantize to exactly the oracle's values, for every format and
/// every scale type (bf16 scales too small for f16 included).
#[test]
fn dequantize_matches_mlx_oracle() {
    let mut rng = Rng(1);
    for (bits, group) in all_formats() {
        for st in [ScaleType::F16, ScaleType::BF16, ScaleType::F32] {
            let (rows, cols) = (3, 2 * 128 + group as usize);
            let m = make_mlx(&mut rng, bits, group, rows, cols, st);
            let ty = WeightType::affine(bits, group).unwrap();
            let w = repack(&m, bits, group, rows, cols);
            let rb = ty.row_bytes(cols).unwrap();
            assert_eq!(w.len(), rows * rb);
            let mut out = vec![0.0f32; cols];
            for r in 0..rows {
                dequantize_row(ty, &w[r * rb..(r + 1) * rb], &mut out);
                for (c, (&a, &b)) in out.iter().zip(&m.deq[r * cols..]).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{ty} {st:?} row {r} col {c}: {a} vs {b}");
                }
            }
        }
    }
}

fn f64_dot(w: &[f32], x: &[f32]) -> f64 {
    w.iter().zip(x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
}

/// `Σ (|scale| · 2^bits + |bias|) · |x|` per row, from the stored scales.
fn magnitude(m: &Mlx, bits: u8, group: u16, row: usize, cols: usize, x: &[f32]) -> f64 {
    let g = group as usize;
    let get = |b: &[u8], k: usize| -> f64 {
        match m.st {
            ScaleType::F16 => f16::from_le_bytes([b[2 * k], b[2 * k + 1]]).to_f64(),
            ScaleType::BF16 => bf16::from_le_bytes([b[2 * k], b[2 * k + 1]]).to_f64(),
            ScaleType::F32 => f64::from(f32::from_le_bytes(b[4 * k..4 * k + 4].try_into().unwrap())),
        }
    };
    (0..cols)
        .map(|c| {
            let k = row * (cols / g) + c / g;
            (get(&m.scales, k).abs() * f64::from(1u32 << bits) + get(&m.biases, k).abs()) * f64::from(x[c]).abs()
        })
        .sum()
}

#[test]
fn dot_row_matches_oracle() {
    let mut rng = Rng(2);
    for (bits, group) in all_formats() {
        let (rows, cols) = (4, 384);
        let m = make_mlx(&mut rng, bits, group, rows, cols, ScaleType::BF16);
        let ty = WeightType::affine(bits, group).unwrap();
        let w = repack(&m, bits, group, rows, cols);
        let rb = ty.row_bytes(cols).unwrap();
        let x: Vec<f32> = (0..cols).map(|_| rng.uniform(-1.0, 1.0)).collect();
        for r in 0..rows {
            let got = dot_row(ty, &w[r * rb..(r + 1) * rb], &x);
            let want = f64_dot(&m.deq[r * cols..(r + 1) * cols], &x);
            let mag = magnitude(&m, bits, group, r, cols, &x);
            assert!(
                (f64::from(got) - want).abs() <= 1e-5 * mag,
                "{ty} row {r}: {got} vs {want} (mag {mag})"
            );
        }
    }
}

/// The activations as the kernels see them (`q · d` per 32-element block).
fn dequantized_acts(acts: &QuantizedActs, t: usize) -> Vec<f32> {
    let (q, d) = (acts.token_quants(t), acts.token_scales(t));
    q.iter().enumerate().map(|(i, &v)| v as f32 * d[i / 32]).collect()
}

/// Integer dots, one and several tokens, single rows and row blocks, against the
/// oracle on the dequantized activations (and, more loosely, the original ones).
#[test]
fn q8_dots_match_oracle_on_every_path() {
    every_path(|path| {
        let mut rng = Rng(3);
        for (bits, group) in all_formats() {
            for st in [ScaleType::F16, ScaleType::BF16] {
                // 20 chunks: two full steps of 8 and a tail of 4.
                let (rows, cols, n) = (5, 640, 11);
                let m = make_mlx(&mut rng, bits, group, rows, cols, st);
                let ty = WeightType::affine(bits, group).unwrap();
                let w = repack(&m, bits, group, rows, cols);
                let rb = ty.row_bytes(cols).unwrap();
                let x: Vec<f32> = (0..n * cols).map(|_| rng.uniform(-2.0, 2.0)).collect();
                let mut acts = QuantizedActs::new();
                acts.quantize(ty, &x, n, cols);
                assert_eq!(acts.format(), ActFormat::Q8_1);
                let mut multi = vec![0.0f32; rows * n];
                dot_rows_q8_multi(ty, &w, &acts, 0..n, &mut multi);
                for r in 0..rows {
                    let row = &w[r * rb..(r + 1) * rb];
                    let wr = &m.deq[r * cols..(r + 1) * cols];
                    let mut one_row = vec![0.0f32; n];
                    dot_row_q8_multi(ty, row, &acts, 0..n, &mut one_row);
                    for t in 0..n {
                        let got = dot_row_q8(ty, row, &acts, t);
                        let xq = dequantized_acts(&acts, t);
                        let want = f64_dot(wr, &xq);
                        let mag = magnitude(&m, bits, group, r, cols, &xq);
                        assert!(
                            (f64::from(got) - want).abs() <= 1e-5 * mag,
                            "{path} {ty} {st:?} row {r} token {t}: {got} vs {want} (mag {mag})"
                        );
                        // Against the unquantized activations: plus the activation
                        // rounding, at most |w_i| · amax_block / 254 per element.
                        let xt = &x[t * cols..(t + 1) * cols];
                        let act_err: f64 = (0..cols)
                            .map(|i| {
                                let b = i / 32 * 32;
                                let amax = xt[b..b + 32].iter().fold(0.0f32, |a, v| a.max(v.abs()));
                                f64::from(wr[i].abs()) * f64::from(amax) / 254.0
                            })
                            .sum();
                        let exact = f64_dot(wr, xt);
                        assert!(
                            (f64::from(got) - exact).abs() <= 1e-5 * mag + act_err * 1.001,
                            "{path} {ty} row {r} token {t}: {got} vs unquantized {exact}"
                        );
                        assert_eq!(got.to_bits(), one_row[t].to_bits(), "{path} {ty} multi vs single");
                        assert_eq!(got.to_bits(), multi[r * n + t].to_bits(), "{path} {ty} rows_multi");
                    }
                }
                for t in 0..n {
                    let mut out = vec![0.0f32; rows];
                    dot_rows_q8(ty, &w, &acts, t, &mut out);
                    for r in 0..rows {
                        let one = dot_row_q8(ty, &w[r * rb..(r + 1) * rb], &acts, t);
                        assert_eq!(out[r].to_bits(), one.to_bits(), "{path} {ty} dot_rows_q8");
                    }
                }
            }
        }
    });
}

/// Sets every level of row `r` to its largest value (all bits of its words set) and
/// recomputes the oracle's values of that row from its stored scales and biases.
fn saturate_row(m: &mut Mlx, bits: u8, group: u16, r: usize, cols: usize) {
    let wpr = cols * bits as usize / 32;
    m.words[r * wpr..(r + 1) * wpr].fill(u32::MAX);
    let g = group as usize;
    let top = ((1u32 << bits) - 1) as f32;
    let get = |b: &[u8], k: usize| -> f32 {
        match m.st {
            ScaleType::F16 => f16::from_le_bytes([b[2 * k], b[2 * k + 1]]).to_f32(),
            ScaleType::BF16 => bf16::from_le_bytes([b[2 * k], b[2 * k + 1]]).to_f32(),
            ScaleType::F32 => f32::from_le_bytes(b[4 * k..4 * k + 4].try_into().unwrap()),
        }
    };
    for c in 0..cols {
        let k = r * (cols / g) + c / g;
        m.deq[r * cols + c] = get(&m.scales, k) * top + get(&m.biases, k);
    }
}

/// The prepared-tile prefill entry point (`TokenTile` + `dot_rows_q8_tile`, the CPU
/// backend's prefill loop) is bit-identical to `dot_row_q8_multi` row by row and to
/// `dot_row_q8` per (row, token), for every bits × group on every path: row counts
/// around the 16-row blocks, token counts around the 2-token pairs and 32-token blocks,
/// token offsets, and every chunk count remainder of the 8-chunk steps the groups allow.
/// Also checks the results against the `f64` oracle.
#[test]
fn tile_path_equals_row_path_bit_exactly() {
    every_path(|path| {
        let mut rng = Rng(5);
        for (bits, group) in all_formats() {
            let ty = WeightType::affine(bits, group).unwrap();
            let chunk_counts: &[usize] = match group {
                32 => &[1, 3, 9, 20, 23],
                64 => &[2, 6, 18, 22],
                _ => &[4, 12, 32],
            };
            for &nc in chunk_counts {
                let (rows, cols, n) = (35, 32 * nc, 45);
                let mut m = make_mlx(&mut rng, bits, group, rows, cols, ScaleType::BF16);
                // Row 1 at the largest levels: the largest integer sums the kernels meet.
                saturate_row(&mut m, bits, group, 1, cols);
                let w = repack(&m, bits, group, rows, cols);
                let rb = ty.row_bytes(cols).unwrap();
                let mut x: Vec<f32> = (0..n * cols).map(|_| rng.uniform(-2.0, 2.0)).collect();
                // Tokens 0 and 1: every quant +127 / alternating ±127 blocks.
                x[..cols].fill(1.0);
                for (i, v) in x[cols..2 * cols].iter_mut().enumerate() {
                    *v = if (i / 32) % 2 == 0 { -1.0 } else { 1.0 };
                }
                let mut acts = QuantizedActs::new();
                acts.quantize(ty, &x, n, cols);
                let xq: Vec<Vec<f32>> = (0..n).map(|t| dequantized_acts(&acts, t)).collect();
                let mut tile = TokenTile::new();
                for nr in [1, 5, 16, 19, 35] {
                    let r0 = if nr == 1 { 1 } else { rows - nr };
                    let block = &w[r0 * rb..(r0 + nr) * rb];
                    for (start, len) in [(0, 1), (2, 3), (0, 17), (1, 33), (0, 40), (5, 40), (44, 1)] {
                        tile.prepare(ty, &acts, start..start + len);
                        let mut got = vec![f32::NAN; nr * len];
                        dot_rows_q8_tile(ty, block, &acts, &tile, &mut got);
                        for r in 0..nr {
                            let row = &block[r * rb..(r + 1) * rb];
                            let mut one = vec![f32::NAN; len];
                            dot_row_q8_multi(ty, row, &acts, start..start + len, &mut one);
                            for j in 0..len {
                                let (t, g) = (start + j, got[r * len + j]);
                                assert_eq!(
                                    g.to_bits(),
                                    one[j].to_bits(),
                                    "{path} {ty} cols={cols} rows={nr} tokens {start}+{len}: row {r} token {t}: tile {g:e} vs row multi {:e}",
                                    one[j]
                                );
                                let single = dot_row_q8(ty, row, &acts, t);
                                assert_eq!(g.to_bits(), single.to_bits(), "{path} {ty} tile vs dot_row_q8");
                                let wr = &m.deq[(r0 + r) * cols..(r0 + r + 1) * cols];
                                let (want, mag) =
                                    (f64_dot(wr, &xq[t]), magnitude(&m, bits, group, r0 + r, cols, &xq[t]));
                                assert!(
                                    (f64::from(g) - want).abs() <= 1e-5 * mag,
                                    "{path} {ty} row {} token {t}: {g} vs {want} (mag {mag})",
                                    r0 + r
                                );
                            }
                        }
                    }
                }
            }
        }
    });
}

/// The CPU backend's prefill (token tiles, blocks of rows, several threads) gives every
/// token exactly what decoding it alone gives, for every format on every path: row and
/// token counts off the 16-row blocks and 32-token tiles, rows ending in partial steps of
/// 8 chunks. (Here, under the level lock: other tests switch the global level.)
#[test]
fn backend_prefill_equals_decode_bit_exactly() {
    every_path(|path| {
        let mut rng = Rng(6);
        for (bits, group) in all_formats() {
            let ty = WeightType::affine(bits, group).unwrap();
            let col_counts: &[usize] = if group == 128 { &[640] } else { &[576, 640] };
            for &cols in col_counts {
                let (rows, n) = (45, 41);
                let m = make_mlx(&mut rng, bits, group, rows, cols, ScaleType::F16);
                let w = repack(&m, bits, group, rows, cols);
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
                                "{path} {ty} cols={cols} token {t} row {row}: prefill {} vs decode {}",
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

/// The AVX2 path and the portable one agree (same integers, different f32 order).
#[test]
fn avx2_agrees_with_portable() {
    let mut rng = Rng(4);
    for (bits, group) in all_formats() {
        let (rows, cols, n) = (3, 256, 3);
        let m = make_mlx(&mut rng, bits, group, rows, cols, ScaleType::F16);
        let ty = WeightType::affine(bits, group).unwrap();
        let w = repack(&m, bits, group, rows, cols);
        let x: Vec<f32> = (0..n * cols).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let run = |level| {
            let _g = lock();
            force_q8_level(level);
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &x, n, cols);
            let mut out = vec![0.0f32; rows * n];
            dot_rows_q8_multi(ty, &w, &acts, 0..n, &mut out);
            force_q8_level(Q8Level::Best);
            (out, dequantized_acts(&acts, 0))
        };
        let (p, xq) = run(Q8Level::Portable);
        let (a, _) = run(Q8Level::Avx2);
        for r in 0..rows {
            let mag = magnitude(&m, bits, group, r, cols, &xq);
            let (pv, av) = (p[r * n], a[r * n]);
            assert!(
                (f64::from(pv) - f64::from(av)).abs() <= 2e-5 * mag,
                "{ty}: {pv} vs {av}"
            );
        }
    }
}

/// `quantize_row` (the simple min/max quantizer) stays within half a step, and its
/// output decodes through the same kernels.
#[test]
fn quantize_row_round_trip() {
    let mut rng = Rng(5);
    for (bits, group) in all_formats() {
        let ty = WeightType::affine(bits, group).unwrap();
        let cols = 256;
        let mut x: Vec<f32> = (0..cols).map(|_| rng.uniform(-1.0, 1.0)).collect();
        x[..group as usize].fill(0.25); // a constant group decodes exactly
        let mut blk = vec![0u8; ty.row_bytes(cols).unwrap()];
        quantize_row(ty, &x, &mut blk).unwrap();
        let mut back = vec![0.0f32; cols];
        dequantize_row(ty, &blk, &mut back);
        for (gi, (xs, bs)) in x.chunks(group as usize).zip(back.chunks(group as usize)).enumerate() {
            let (lo, hi) = xs.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let step = (hi - lo) / ((1u32 << bits) - 1) as f32;
            for (&a, &b) in xs.iter().zip(bs) {
                assert!((a - b).abs() <= step * 0.5001 + 1e-6, "{ty} group {gi}: {a} -> {b}");
            }
        }
        assert_eq!(&back[..group as usize], &x[..group as usize]);
        let mut bad = x.clone();
        bad[7] = f32::NAN;
        assert!(quantize_row(ty, &bad, &mut blk).is_err());
    }
}

#[test]
fn repack_rejects_bad_lengths() {
    let mut rng = Rng(6);
    let (bits, group, rows, cols) = (4u8, 64u16, 2, 128);
    let m = make_mlx(&mut rng, bits, group, rows, cols, ScaleType::F16);
    let wb = words_bytes(&m.words);
    let trip = |weight, scales, biases| MlxTriple {
        weight,
        scales,
        biases,
        scale_type: ScaleType::F16,
    };
    let err = |r: Result<Vec<u8>, String>| r.unwrap_err();
    let short = &wb[..wb.len() - 4];
    assert!(err(repack_mlx(bits, group, rows, cols, &trip(short, &m.scales, &m.biases))).contains("packed weight"));
    assert!(err(repack_mlx(
        bits,
        group,
        rows,
        cols,
        &trip(&wb, &m.scales[..2], &m.biases)
    ))
    .contains("scales"));
    assert!(err(repack_mlx(
        bits,
        group,
        rows,
        cols,
        &trip(&wb, &m.scales, &m.biases[2..])
    ))
    .contains("biases"));
    assert!(err(repack_mlx(bits, group, rows, 96, &trip(&wb, &m.scales, &m.biases))).contains("groups"));
    assert!(err(repack_mlx(7, group, rows, cols, &trip(&wb, &m.scales, &m.biases))).contains("unsupported"));
    assert!(err(repack_mlx(bits, 48, rows, cols, &trip(&wb, &m.scales, &m.biases))).contains("unsupported"));
    assert!(err(repack_mlx(
        bits,
        group,
        usize::MAX,
        cols,
        &trip(&wb, &m.scales, &m.biases)
    ))
    .contains("overflow"));
}
