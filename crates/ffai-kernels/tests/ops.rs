//! Every op of the CPU backend against a naive f32/f64 oracle written independently here.
//! Tolerances: pure-f32 ops 1e-5 relative (summation order differs); matmul over
//! quantized weights is compared with the dequantized-weight f64 oracle within the error
//! the 8-bit activation rounding allows (see the test), float weights at 1e-4 of sum |w x|.

use std::sync::{Mutex, MutexGuard};

use ffai_kernels::backend::{AttnShape, Backend, HostBytes, RopeParams};
use ffai_kernels::cpu::CpuBackend;
use ffai_kernels::ops;
use ffai_kernels::quant::q8::{avx2_allowed, avx512_allowed, env_level, force_q8_level, Q8Level};
use ffai_kernels::quant::{self, q8_backend_name, WeightType};

/// The kernel level (portable, AVX2, AVX-512) is one global switch: every test in this
/// file holds this lock, so a test that forces a level never changes the level another
/// test believes it runs at.
static LOCK: Mutex<()> = Mutex::new(());

/// Holds [`LOCK`]; the level is the default (fastest) while held unless the test forces
/// another, and is the default again when released, even after a failed assertion.
struct LevelLock {
    _held: MutexGuard<'static, ()>,
}

impl Drop for LevelLock {
    fn drop(&mut self) {
        force_q8_level(Q8Level::Best);
    }
}

fn lock() -> LevelLock {
    let g = LevelLock {
        _held: LOCK.lock().unwrap_or_else(|e| e.into_inner()),
    };
    force_q8_level(Q8Level::Best);
    g
}

/// The levels the attention kernels tell apart — 512-bit (AVX-512 VNNI level), 256-bit
/// (AVX2; the AVX-VNNI level runs the same attention code) and portable — as
/// (level, `q8_backend_name` it must give, whether this CPU can run it and
/// `FFAI_CPU_LEVEL` allows it), detected here independently of the library.
fn attention_levels() -> [(Q8Level, &'static str, bool); 3] {
    #[cfg(target_arch = "x86_64")]
    let (avx2, avx512) = {
        let avx2 =
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        (avx2, avx512)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (avx2, avx512) = (false, false);
    let cap = env_level().unwrap_or_else(|e| panic!("{e}"));
    let (avx2, avx512) = (avx2 && cap >= Q8Level::Avx2, avx512 && cap >= Q8Level::Avx512Vnni);
    [
        (Q8Level::Avx512Vnni, "avx512vnni", avx512),
        (Q8Level::Avx2, "avx2", avx2),
        (Q8Level::Portable, "portable", true),
    ]
}

/// The attention levels this CPU runs, fastest first; says on stderr which ran and which
/// this CPU lacks, so a leg that could not run is visible in the test output.
fn attention_levels_here(test: &str) -> Vec<(Q8Level, &'static str)> {
    let all = attention_levels();
    let run: Vec<_> = all.iter().filter(|l| l.2).map(|l| (l.0, l.1)).collect();
    let missing: Vec<_> = all.iter().filter(|l| !l.2).map(|l| l.1).collect();
    eprintln!(
        "{test}: levels run: {:?}; not supported by this CPU or above FFAI_CPU_LEVEL: {missing:?}",
        run.iter().map(|l| l.1).collect::<Vec<_>>()
    );
    run
}

/// Forces `level` and checks that the implementation in effect is the expected one.
fn force_level(level: Q8Level, name: &str) {
    force_q8_level(level);
    assert_eq!(q8_backend_name(), name, "force_q8_level({level:?})");
    assert_eq!(avx512_allowed(), name == "avx512vnni", "512-bit kernels at {name}");
    assert_eq!(avx2_allowed(), name != "portable", "256-bit kernels at {name}");
}

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn f(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

fn assert_all_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g, *w, tol), "{what}[{i}]: got {g}, want {w}");
    }
}

/// One and three threads, f16 and f32 KV caches.
fn backends() -> Vec<CpuBackend> {
    vec![
        CpuBackend::new(1),
        CpuBackend::new(3),
        CpuBackend::with_options(2, false, true),
    ]
}

#[test]
fn rms_norm_matches_oracle() {
    let _g = lock();
    let mut r = Rng(1);
    let (n, d) = (3, 37);
    let x = r.vec(n * d);
    let w = r.vec(d);
    let eps = 1e-5;
    let mut want = vec![0f32; n * d];
    for t in 0..n {
        let row = &x[t * d..(t + 1) * d];
        let ms: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
        for i in 0..d {
            want[t * d + i] = (row[i] as f64 / (ms + eps as f64).sqrt() * w[i] as f64) as f32;
        }
    }
    for b in backends() {
        let mut out = b.alloc(n * d);
        b.rms_norm(&x, &w, eps, n, &mut out);
        assert_all_close(&out, &want, 1e-5, "rms_norm");
    }
}

/// Rotation by the textbook complex-number definition, for both pairings.
fn rope_oracle(x: &[f32], n_heads: usize, hd: usize, pos: usize, inv_freq: &[f32], neox: bool) -> Vec<f32> {
    let mut out = x.to_vec();
    for h in 0..n_heads {
        for (i, &f) in inv_freq.iter().enumerate() {
            let (a, b) = if neox { (i, i + hd / 2) } else { (2 * i, 2 * i + 1) };
            let theta = pos as f64 * f as f64;
            let (re, im) = (x[h * hd + a] as f64, x[h * hd + b] as f64);
            out[h * hd + a] = (re * theta.cos() - im * theta.sin()) as f32;
            out[h * hd + b] = (re * theta.sin() + im * theta.cos()) as f32;
        }
    }
    out
}

#[test]
fn rope_both_pairings_match_oracle() {
    let _g = lock();
    let mut r = Rng(2);
    let (n, heads, hd) = (4, 3, 16);
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    // A scaled table (as llama3/linear scaling produce) goes through the same path.
    let scaled: Vec<f32> = inv.iter().map(|f| f / 8.0).collect();
    for table in [&inv, &scaled] {
        for neox in [false, true] {
            let x = r.vec(n * heads * hd);
            let pos0 = 17;
            let mut want = Vec::new();
            for t in 0..n {
                want.extend(rope_oracle(
                    &x[t * heads * hd..(t + 1) * heads * hd],
                    heads,
                    hd,
                    pos0 + t,
                    table,
                    neox,
                ));
            }
            for b in backends() {
                let mut got = x.clone();
                let inv_buf = b.upload(table);
                b.rope(
                    &mut got,
                    n,
                    heads,
                    hd,
                    pos0,
                    &RopeParams {
                        inv_freq: &inv_buf,
                        neox,
                    },
                );
                assert_all_close(&got, &want, 2e-5, "rope");
            }
        }
    }
}

#[test]
fn activations_match_oracle() {
    let _g = lock();
    let mut r = Rng(3);
    let g: Vec<f32> = r.vec(100).iter().map(|v| v * 8.0).collect();
    let u = r.vec(100);
    let silu: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(&g, &u)| ((g as f64 / (1.0 + (-g as f64).exp())) * u as f64) as f32)
        .collect();
    let gelu: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(&g, &u)| {
            let g = g as f64;
            (0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g.powi(3))).tanh()) * u as f64)
                as f32
        })
        .collect();
    for b in backends() {
        let mut x = g.clone();
        b.silu_mul(&mut x, &u, 100);
        assert_all_close(&x, &silu, 1e-5, "silu_mul");
        let mut x = g.clone();
        b.gelu_mul(&mut x, &u, 100);
        assert_all_close(&x, &gelu, 1e-5, "gelu_mul");
        let mut x = g.clone();
        b.add(&mut x, &u, 100);
        let sum: Vec<f32> = g.iter().zip(&u).map(|(a, b)| a + b).collect();
        assert_all_close(&x, &sum, 0.0, "add");
        let mut x = g.clone();
        let bias = r.vec(25);
        b.add_bias(&mut x, &bias, 4);
        let want: Vec<f32> = g.iter().enumerate().map(|(i, v)| v + bias[i % 25]).collect();
        assert_all_close(&x, &want, 0.0, "add_bias");
    }
}

#[test]
fn softmax_and_argmax() {
    let _g = lock();
    let mut x = vec![1.0f32, 2.0, 3.0, 1000.0, -1000.0];
    ops::softmax(&mut x);
    let e: Vec<f64> = [1.0f64, 2.0, 3.0, 1000.0, -1000.0]
        .iter()
        .map(|v| (v - 1000.0).exp())
        .collect();
    let s: f64 = e.iter().sum();
    for (g, w) in x.iter().zip(&e) {
        assert!((*g as f64 - w / s).abs() < 1e-7);
    }
    assert_eq!(
        ops::argmax(&[0.5, 2.0, f32::NAN, 2.0, 1.0]),
        (1, 2.0),
        "ties go to the lowest id, NaN never wins"
    );
    let b = CpuBackend::new(1);
    assert_eq!(b.argmax(&vec![3.0, 1.0, 9.0, 9.5], 0..3), 2);
    // Against the plain definition (first strictly larger wins) on rows of every length
    // around the 16-lane chunks, with ties, NaNs, infinities and negative zeros.
    let naive = |x: &[f32]| {
        let mut best = (0, f32::NEG_INFINITY);
        for (i, &v) in x.iter().enumerate() {
            if v > best.1 {
                best = (i, v);
            }
        }
        best
    };
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for len in (0..70).chain([262_144]) {
        for _ in 0..20 {
            let x: Vec<f32> = (0..len)
                .map(|_| match next() % 10 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => -0.0,
                    3 => 0.0,
                    4 => f32::INFINITY * ((next() % 7 == 0) as u8 as f32 - 0.5).signum(),
                    _ => (next() % 9) as f32 - 4.0,
                })
                .collect();
            let (got, want) = (ops::argmax(&x), naive(&x));
            assert_eq!(got.0, want.0, "len {len}: {x:?}");
            assert_eq!(got.1.to_bits(), want.1.to_bits(), "len {len}");
        }
    }
}

/// Naive attention: for each query token and head, softmax over visible positions.
/// k, v are `[total_positions, kv_heads * hd]` (token-major), independent of any cache layout.
#[allow(clippy::too_many_arguments)]
fn attention_oracle(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: usize,
    softcap: f64,
) -> Vec<f32> {
    let mut out = vec![0f32; n * heads * hd];
    let scale = 1.0 / (hd as f64).sqrt();
    for p in 0..n {
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            let lo = if window > 0 { (p + 1).saturating_sub(window) } else { 0 };
            let scores: Vec<f64> = (lo..=p)
                .map(|j| {
                    let s = (0..hd)
                        .map(|d| q[(p * heads + h) * hd + d] as f64 * k[(j * kv_heads + kvh) * hd + d] as f64)
                        .sum::<f64>()
                        * scale;
                    if softcap > 0.0 {
                        softcap * (s / softcap).tanh()
                    } else {
                        s
                    }
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let acc: f64 = (lo..=p)
                    .zip(&e)
                    .map(|(j, w)| w / z * v[(j * kv_heads + kvh) * hd + d] as f64)
                    .sum();
                out[(p * heads + h) * hd + d] = acc as f32;
            }
        }
    }
    out
}

#[test]
fn attention_prefill_decode_gqa_windows_rings_and_softcap_match_oracle() {
    let _g = lock();
    let mut r = Rng(4);
    // 150 positions: decode steps late in the sequence split their positions into parts
    // whose partial softmax results are merged.
    let (heads, kv_heads, hd, total) = (6, 2, 16, 150);
    // (window, cap, softcap): full causal; a window over a full-length cache; a window
    // in a ring buffer of window + chunk - 1 rows (so it wraps several times); soft-capping.
    let cases = [
        (0, 160, 0.0),
        (5, 160, 0.0),
        (5, 5 + 6 - 1, 0.0),
        (0, 160, 0.5),
        (7, 12, 0.5),
        (100, 106, 0.0),
    ];
    // Every level of the kernels this CPU runs (512-bit, 256-bit, portable), each checked
    // to be in effect.
    for (level, name) in attention_levels_here("attention vs oracle") {
        force_level(level, name);
        for &(window, cap, softcap) in &cases {
            // The cache may store K and V in half precision: the oracle sees the same
            // rounded values, so the comparison stays tight.
            let to_half = |v: Vec<f32>| -> Vec<f32> { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() };
            let k_all = to_half(r.vec(total * kv_heads * hd));
            let v_all = to_half(r.vec(total * kv_heads * hd));
            let q_all = r.vec(total * heads * hd);
            let want = attention_oracle(
                &q_all,
                &k_all,
                &v_all,
                total,
                heads,
                kv_heads,
                hd,
                window,
                softcap as f64,
            );
            for b in backends() {
                let shape = AttnShape {
                    n_heads: heads,
                    n_kv_heads: kv_heads,
                    head_dim: hd,
                    cap,
                    window,
                    scale: 1.0 / (hd as f32).sqrt(),
                    softcap,
                };
                let mut kc = b.alloc_kv(kv_heads * cap * hd);
                let mut vc = b.alloc_kv(kv_heads * cap * hd);
                // Causal prefill chunks of 6 tokens, then decode one token at a time.
                let (qw, kw) = (heads * hd, kv_heads * hd);
                let mut got = vec![0f32; total * qw];
                let mut steps: Vec<(usize, usize)> = (0..20).map(|c| (c * 6, 6)).collect();
                steps.extend((120..total).map(|p| (p, 1)));
                for (p0, n) in steps {
                    b.kv_write(&mut kc, &k_all[p0 * kw..(p0 + n) * kw], n, p0, &shape);
                    b.kv_write(&mut vc, &v_all[p0 * kw..(p0 + n) * kw], n, p0, &shape);
                    let mut out = b.alloc(n * qw);
                    b.attention(&q_all[p0 * qw..(p0 + n) * qw], &kc, &vc, n, p0, &shape, &mut out);
                    got[p0 * qw..(p0 + n) * qw].copy_from_slice(&out);
                }
                let what = format!("attention window {window} cap {cap} softcap {softcap} level {name}");
                assert_all_close(&got, &want, 1e-5, &what);
                if cap >= total {
                    // The cache layout is [kv_head, row, head_dim], row = position.
                    let cached = kc.to_f32_vec()[(cap + 3) * hd..(cap + 4) * hd].to_vec();
                    assert_eq!(cached, k_all[(3 * kv_heads + 1) * hd..(3 * kv_heads + 2) * hd]);
                }
            }
        }
    }
}

#[test]
fn layer_norm_and_elementwise_ops_match_oracle() {
    let _g = lock();
    let mut r = Rng(12);
    let (n, d) = (3, 20);
    let x = r.vec(n * d);
    let (w, bias) = (r.vec(d), r.vec(d));
    let mut want = vec![0f32; n * d];
    for t in 0..n {
        let row: Vec<f64> = x[t * d..(t + 1) * d].iter().map(|&v| v as f64).collect();
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
        for i in 0..d {
            want[t * d + i] = ((row[i] - mean) / (var + 1e-5).sqrt() * w[i] as f64 + bias[i] as f64) as f32;
        }
    }
    for b in backends() {
        let mut out = b.alloc(n * d);
        b.layer_norm(&x, &w, &bias, 1e-5, n, &mut out);
        assert_all_close(&out, &want, 1e-5, "layer_norm");
        let mut g = x.iter().map(|v| v * 4.0).collect::<Vec<f32>>();
        b.gelu(&mut g, n * d);
        for (i, &v) in g.iter().enumerate() {
            let z = x[i] as f64 * 4.0;
            let e = 0.5 * z * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (z + 0.044715 * z.powi(3))).tanh());
            assert!(close(v, e as f32, 1e-5), "gelu({z}) = {v}, want {e}");
        }
        let mut y = x.clone();
        b.scale(&mut y, 3.0, n * d);
        b.add_scaled(&mut y, &x, -2.0, n * d);
        assert_all_close(&y, &x, 1e-6, "scale then add_scaled");
        let mut c = x.iter().map(|v| v * 100.0).collect::<Vec<f32>>();
        b.softcap(&mut c, 30.0, n * d);
        for (i, &v) in c.iter().enumerate() {
            let e = 30.0 * ((x[i] as f64 * 100.0) / 30.0).tanh();
            assert!(close(v, e as f32, 1e-5) && v.abs() <= 30.0, "softcap");
        }
    }
}

/// Random weights of a type: quantize random floats where a quantizer exists, else raw
/// random blocks with sane f16 scales (every bit pattern of the rest is valid).
fn random_rows(ty: WeightType, rows: usize, cols: usize, r: &mut Rng) -> Vec<u8> {
    let rb = ty.row_bytes(cols).unwrap();
    let mut out = vec![0u8; rows * rb];
    for row in 0..rows {
        let src = r.vec(cols);
        if quant::quantize_row(ty, &src, &mut out[row * rb..(row + 1) * rb]).is_err() {
            for b in &mut out[row * rb..(row + 1) * rb] {
                *b = r.next_u64() as u8;
            }
            // K-quant superblocks start with f16 d (and dmin except Q6_K ends with d): set sane scales.
            let bb = ty.block_bytes();
            for blk in 0..cols / ty.block_len() {
                let o = row * rb + blk * bb;
                let scale = half::f16::from_f32(0.001 + (r.f().abs() * 0.01))
                    .to_bits()
                    .to_le_bytes();
                match ty {
                    WeightType::Q6K => out[o + bb - 2..o + bb].copy_from_slice(&scale),
                    _ => {
                        out[o..o + 2].copy_from_slice(&scale);
                        out[o + 2..o + 4].copy_from_slice(&scale);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn matmul_and_embed_every_weight_type_match_dequantized_oracle() {
    let _g = lock();
    let mut r = Rng(5);
    for ty in WeightType::ALL {
        let (rows, cols) = (45, if ty.block_len() == 256 { 512 } else { 96 });
        let bytes = random_rows(ty, rows, cols, &mut r);
        let rb = ty.row_bytes(cols).unwrap();
        let mut deq = vec![0f32; rows * cols];
        for row in 0..rows {
            quant::dequantize_row(
                ty,
                &bytes[row * rb..(row + 1) * rb],
                &mut deq[row * cols..(row + 1) * cols],
            );
        }
        for n in [1, 5] {
            let x = r.vec(n * cols);
            let mut want = vec![0f32; n * rows];
            let mut bound = vec![0f32; n * rows];
            // Quantized weights pair with 8-bit activations: each activation moves by at
            // most half a step of its block (max|x| / 254 for 32- and 256-element blocks),
            // so the product moves by at most sum |w_i| * that. Float weights keep f32
            // activations: only summation order differs (1e-4 of sum |w x|).
            let ab = if ty.is_quantized() { ty.block_len() } else { cols };
            for t in 0..n {
                for row in 0..rows {
                    let (mut s, mut m, mut q) = (0f64, 0f64, 0f64);
                    for blk in 0..cols / ab {
                        let xs = &x[t * cols + blk * ab..t * cols + (blk + 1) * ab];
                        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                        for (j, &xv) in xs.iter().enumerate() {
                            let w = deq[row * cols + blk * ab + j] as f64;
                            s += w * xv as f64;
                            m += (w * xv as f64).abs();
                            q += w.abs() * amax / 254.0;
                        }
                    }
                    want[t * rows + row] = s as f32;
                    bound[t * rows + row] = if ty.is_quantized() {
                        (q * 1.01 + 1e-4 * m) as f32
                    } else {
                        (1e-4 * m) as f32
                    } + 1e-6;
                }
            }
            for b in backends() {
                let m = b.matrix(ty, rows, cols, HostBytes::from_vec(bytes.clone()));
                let mut out = b.alloc(n * rows);
                b.matmul(&m, &x, n, &mut out);
                for i in 0..n * rows {
                    assert!(
                        (out[i] - want[i]).abs() <= bound[i],
                        "{} matmul n={n} [{i}]: got {}, want {} (bound {})",
                        ty.name(),
                        out[i],
                        want[i],
                        bound[i]
                    );
                }
                let ids = [3u32, 0, 44, 3];
                let mut emb = b.alloc(ids.len() * cols);
                b.embed(&m, &ids, &mut emb);
                for (t, &id) in ids.iter().enumerate() {
                    assert_eq!(
                        &emb[t * cols..(t + 1) * cols],
                        &deq[id as usize * cols..(id as usize + 1) * cols],
                        "{} embed",
                        ty.name()
                    );
                }
            }
        }
    }
}

#[test]
fn exp_nonpos_matches_libm() {
    let _g = lock();
    let mut worst = 0f64;
    for i in 0..=200_000 {
        let x = -(i as f32) * 90.0 / 200_000.0;
        let want = (x as f64).exp();
        let got = ops::exp_nonpos(x) as f64;
        if want > 1e-37 {
            worst = worst.max(((got - want) / want).abs());
        } else {
            assert!(got < 1e-36, "exp({x}) = {got}");
        }
    }
    assert!(worst < 3e-7, "worst relative error {worst}");
    assert_eq!(ops::exp_nonpos(0.0), 1.0);
}

/// `attend_group`'s results in f64: per head g, scores `s_r = scale · q·k_r` (soft-capped),
/// `m = max s`, `l = Σ exp(s_r - m)`, `out = Σ exp(s_r - m) v_r` (unnormalised).
fn attend_group_oracle(
    qs: &[f32],
    group: usize,
    k: &[f32],
    v: &[f32],
    hd: usize,
    a: &ops::HeadAttn,
) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut stats) = (vec![0f64; group * hd], vec![0f64; 2 * group]);
    let rows: Vec<usize> = a.rows.iter().flat_map(|r| r.clone()).collect();
    for g in 0..group {
        let s: Vec<f64> = rows
            .iter()
            .map(|&r| {
                let dot: f64 = (0..hd).map(|d| qs[g * hd + d] as f64 * k[r * hd + d] as f64).sum();
                let s = dot * a.scale as f64;
                if a.softcap > 0.0 {
                    a.softcap as f64 * (s / a.softcap as f64).tanh()
                } else {
                    s
                }
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        stats[2 * g] = m;
        stats[2 * g + 1] = e.iter().sum();
        for d in 0..hd {
            out[g * hd + d] = rows.iter().zip(&e).map(|(&r, w)| w * v[r * hd + d] as f64).sum();
        }
    }
    (out, stats)
}

/// `attend_group` at every level this CPU runs, each checked to be in effect: the 512-bit
/// kernels (scores two rows per vector, V sums 16 dims wide) do the 256-bit kernels'
/// arithmetic lane for lane, so those two give the same bits; the portable code sums in
/// another order, so it and every other level are held to an f64 oracle at 2e-6 relative
/// (an f32 dot of ≤ 256 products and a sum of ≤ 50 weighted rows; measured worst 4.5e-7)
/// and the 256-bit kernels to the portable ones at the same bound. For every group size,
/// odd row counts, split row ranges, a one-row part and soft-capping, with f16 and f32 K/V.
#[test]
fn attention_kernels_agree_across_levels() {
    let _g = lock();
    let levels = attention_levels_here("attend_group across levels");
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let mut worst = 0f64;
    let mut compared_512 = 0;
    for hd in [64usize, 80, 256] {
        for group in 1..=8usize {
            let cap = 50;
            let k: Vec<f32> = (0..cap * hd).map(|_| next()).collect();
            let v: Vec<f32> = (0..cap * hd).map(|_| next()).collect();
            let qs: Vec<f32> = (0..group * hd).map(|_| next()).collect();
            let (k16, v16): (Vec<half::f16>, Vec<half::f16>) = (
                k.iter().map(|&x| half::f16::from_f32(x)).collect(),
                v.iter().map(|&x| half::f16::from_f32(x)).collect(),
            );
            // What the kernels see of an f16 cache, for the oracle.
            let (kw, vw): (Vec<f32>, Vec<f32>) = (
                k16.iter().map(|x| x.to_f32()).collect(),
                v16.iter().map(|x| x.to_f32()).collect(),
            );
            for rows in [[5..37, 0..12], [0..1, 0..0], [3..5, 0..0], [49..50, 0..6]] {
                for softcap in [0.0f32, 30.0] {
                    let a = ops::HeadAttn {
                        rows: rows.clone(),
                        scale: 1.0 / (hd as f32).sqrt(),
                        softcap,
                    };
                    for half in [true, false] {
                        let what = format!("hd {hd} group {group} rows {rows:?} softcap {softcap} f16 {half}");
                        let (want_out, want_stats) = if half {
                            attend_group_oracle(&qs, group, &kw, &vw, hd, &a)
                        } else {
                            attend_group_oracle(&qs, group, &k, &v, hd, &a)
                        };
                        // Each output element's scale: Σ e_r |v_r| ≤ l · max |v| = l.
                        let check =
                            |got_out: &[f32], got_stats: &[f32], vs_out: &[f64], vs_stats: &[f64], who: &str| {
                                let mut w = 0f64;
                                for g in 0..group {
                                    let (m, l) = (vs_stats[2 * g], vs_stats[2 * g + 1]);
                                    let em = (got_stats[2 * g] as f64 - m).abs() / (1.0 + m.abs());
                                    let el = (got_stats[2 * g + 1] as f64 - l).abs() / l;
                                    w = w.max(em).max(el);
                                    for d in 0..hd {
                                        let e = (got_out[g * hd + d] as f64 - vs_out[g * hd + d]).abs() / l;
                                        w = w.max(e);
                                    }
                                }
                                assert!(w <= 2e-6, "{what}: {who}: relative error {w:.2e}");
                                w
                            };
                        let mut res: Vec<(&str, Vec<f32>, Vec<f32>)> = Vec::new();
                        for &(level, name) in &levels {
                            force_level(level, name);
                            let mut scores = vec![0f32; group * 64];
                            let mut out = vec![0f32; group * hd];
                            let mut stats = vec![0f32; 2 * group];
                            if half {
                                ops::attend_group(&qs, group, &k16, &v16, hd, &a, &mut scores, &mut out, &mut stats);
                            } else {
                                ops::attend_group(&qs, group, &k, &v, hd, &a, &mut scores, &mut out, &mut stats);
                            }
                            worst = worst.max(check(&out, &stats, &want_out, &want_stats, name));
                            res.push((name, out, stats));
                        }
                        let get = |n: &str| res.iter().find(|r| r.0 == n);
                        if let (Some(wide), Some(avx2)) = (get("avx512vnni"), get("avx2")) {
                            let bits = |r: &(&str, Vec<f32>, Vec<f32>)| {
                                r.1.iter().chain(&r.2).map(|x| x.to_bits()).collect::<Vec<_>>()
                            };
                            assert_eq!(bits(wide), bits(avx2), "{what}: 512-bit vs 256-bit");
                            compared_512 += 1;
                        }
                        if let (Some(avx2), Some(port)) = (get("avx2"), get("portable")) {
                            let as64 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
                            check(&avx2.1, &avx2.2, &as64(&port.1), &as64(&port.2), "avx2 vs portable");
                        }
                    }
                }
            }
        }
    }
    eprintln!("attend_group: worst relative error against the oracle {worst:.2e}; 512-bit vs 256-bit compared bit for bit in {compared_512} cases");
}

/// `ops::top_candidates` against a full sort of the scaled row: the first k (value
/// descending by `total_cmp`, ties lowest id first; NaN left out; unused slots u32::MAX /
/// NaN) and the tail mass summed in id order over the rest — the same arithmetic, so
/// exactly equal. Rows with ties, NaN, ±inf, ±0; k below, at and above the non-NaN count.
#[test]
fn top_candidates_are_the_first_k_of_the_sorted_row() {
    let mut seed = 0x9e37_79b9u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for case in 0..300usize {
        let width = 1 + (next() % 700) as usize;
        let row: Vec<f32> = (0..width)
            .map(|_| match next() % 16 {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                2 => 0.0,
                3 => -0.0,
                4 if case.is_multiple_of(3) => f32::INFINITY,
                // Few distinct values: ties.
                _ => ((next() % 41) as f32 - 20.0) * 0.25,
            })
            .collect();
        let inv_t = [1.0f32, 1.0 / 0.7, 2.5][case % 3];
        let k = [
            1usize,
            2,
            7,
            width / 2 + 1,
            width,
            width + 5,
            ffai_kernels::ops::MAX_CANDIDATES,
        ][case % 7]
            .clamp(1, ffai_kernels::ops::MAX_CANDIDATES);
        let mut want: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l * inv_t))
            .filter(|c| !c.1.is_nan())
            .collect();
        want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut rest: Vec<(u32, f32)> = want.split_off(want.len().min(k));
        rest.sort_by_key(|c| c.0);
        // Nothing left over: +0.0 (std's empty f64 sum is -0.0).
        let want_tail: f64 = match want.first() {
            Some(&(_, m)) if !rest.is_empty() => rest.iter().map(|c| (c.1 - m).exp() as f64).sum(),
            _ => 0.0,
        };
        let (mut ids, mut vals) = (vec![0u32; k], vec![0.0f32; k]);
        let tail = ffai_kernels::ops::top_candidates(&row, inv_t, k, &mut ids, &mut vals);
        for i in 0..k {
            let (wi, wv) = want.get(i).copied().unwrap_or((u32::MAX, f32::NAN));
            assert_eq!(ids[i], wi, "case {case}, slot {i}");
            assert_eq!(vals[i].to_bits(), wv.to_bits(), "case {case}, slot {i}");
        }
        assert!(
            tail.to_bits() == want_tail.to_bits() || (tail.is_nan() && want_tail.is_nan()),
            "case {case}: tail {tail} vs {want_tail}"
        );
    }
}

/// `CpuBackend::top_candidates_rows` with allowed-token masks (a grammar's) against the
/// oracle on the unmasked op: a disallowed token is left out exactly as a NaN is, so the
/// masked call equals `ops::top_candidates` of the row with the disallowed entries set to
/// NaN, bit for bit. Against the row with the disallowed entries at −∞ (what the
/// sampler's whole-row path does): the same candidates wherever that oracle's value is
/// above −∞ (after them it lists disallowed ids at −∞, weight 0, where the masked call
/// lists allowed −∞ values or leaves the slots unused), and the same tail mass when some
/// allowed value is above −∞ (the disallowed add exp(−∞) = 0). Random rows (ties, NaN,
/// ±inf, ±0) and masks: every token, none, exactly one (so k above the allowed count),
/// sparse, dense, whole words on and off, and bits set past the row (ignored); several
/// rows a call with a mask each; every token allowed gives the unmasked call's bits.
#[test]
fn masked_top_candidates_are_the_oracle_on_the_masked_row() {
    let _g = lock();
    let b = CpuBackend::new(2);
    let mut seed = 0x51ed_2701u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut above_k, mut one, mut none) = (0usize, 0usize, 0usize);
    for case in 0..400usize {
        let n = 1 + (next() % 4) as usize;
        let width = 1 + (next() % 900) as usize;
        let wpr = width.div_ceil(32);
        let k =
            [1usize, 2, 5, 40, width / 3 + 1, width + 3, ops::MAX_CANDIDATES][case % 7].clamp(1, ops::MAX_CANDIDATES);
        let x: Vec<f32> = (0..n * width)
            .map(|_| match next() % 16 {
                0 if case.is_multiple_of(4) => f32::NAN,
                1 if case % 4 == 1 => f32::NEG_INFINITY,
                2 => 0.0,
                3 => -0.0,
                4 if case.is_multiple_of(9) => f32::INFINITY,
                5..=8 => ((next() % 41) as f32 - 20.0) * 0.25,
                _ => ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 20.0,
            })
            .collect();
        let mut mask = vec![0u32; n * wpr];
        for r in 0..n {
            let m = &mut mask[r * wpr..(r + 1) * wpr];
            match (case + r) % 7 {
                0 => m.fill(u32::MAX),
                1 => {}
                2 => {
                    let t = (next() as usize) % width;
                    m[t / 32] |= 1 << (t % 32);
                }
                3 => (0..width)
                    .filter(|_| next().is_multiple_of(20))
                    .for_each(|t| m[t / 32] |= 1 << (t % 32)),
                4 => m.iter_mut().for_each(|w| *w = next() as u32),
                5 => m
                    .iter_mut()
                    .for_each(|w| *w = if next().is_multiple_of(2) { u32::MAX } else { 0 }),
                _ => m
                    .iter_mut()
                    .for_each(|w| *w = !(next() as u32 & next() as u32 & next() as u32)),
            }
            // Bits past the row mean nothing.
            if !width.is_multiple_of(32) && next().is_multiple_of(2) {
                m[wpr - 1] |= !0u32 << (width % 32);
            }
        }
        let inv_t: Vec<f32> = (0..n).map(|r| [1.0f32, 1.0 / 0.7, 2.5][(case + r) % 3]).collect();
        let buf = b.upload(&x);
        let (mut ids, mut vals, mut tail) = (vec![0u32; n * k], vec![0.0f32; n * k], vec![0.0f64; n]);
        b.top_candidates_rows(&buf, n, width, k, &inv_t, Some(&mask), &mut ids, &mut vals, &mut tail);
        for r in 0..n {
            let what = format!("case {case} row {r}: width {width}, k {k}");
            let row = &x[r * width..(r + 1) * width];
            let m = &mask[r * wpr..(r + 1) * wpr];
            let allowed = |t: usize| m[t / 32] >> (t % 32) & 1 != 0;
            let (gi, gv, gt) = (&ids[r * k..(r + 1) * k], &vals[r * k..(r + 1) * k], tail[r]);
            let with = |fill: f32| -> (Vec<u32>, Vec<f32>, f64) {
                let masked: Vec<f32> = row
                    .iter()
                    .enumerate()
                    .map(|(t, &l)| if allowed(t) { l } else { fill })
                    .collect();
                let (mut i, mut v) = (vec![0u32; k], vec![0.0f32; k]);
                let t = ops::top_candidates(&masked, inv_t[r], k, &mut i, &mut v);
                (i, v, t)
            };
            // Exactly the NaN-masked row.
            let (ni, nv, nt) = with(f32::NAN);
            assert_eq!(gi, &ni[..], "{what}: ids vs the NaN-masked row");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(gv), bits(&nv), "{what}: values vs the NaN-masked row");
            assert!(
                gt.to_bits() == nt.to_bits() || (gt.is_nan() && nt.is_nan()),
                "{what}: tail {gt} vs {nt}"
            );
            // Against the −∞-masked row.
            let (wi, wv, wt) = with(f32::NEG_INFINITY);
            let live = wv.iter().take_while(|&&v| v > f32::NEG_INFINITY).count();
            assert_eq!(&gi[..live], &wi[..live], "{what}: ids vs the -inf-masked row");
            assert_eq!(
                bits(&gv[..live]),
                bits(&wv[..live]),
                "{what}: values vs the -inf-masked row"
            );
            for (&i, &v) in gi[live..].iter().zip(&gv[live..]) {
                assert!(
                    (i == u32::MAX && v.is_nan()) || (allowed(i as usize) && v == f32::NEG_INFINITY),
                    "{what}: slot past the live ones: {i} {v}"
                );
            }
            for &i in gi.iter().filter(|&&i| i != u32::MAX) {
                assert!(allowed(i as usize), "{what}: disallowed id {i} among the candidates");
            }
            if live > 0 {
                assert!(gt == wt || (gt.is_nan() && wt.is_nan()), "{what}: tail {gt} vs {wt}");
            }
            let n_allowed = (0..width).filter(|&t| allowed(t) && !row[t].is_nan()).count();
            above_k += (n_allowed < k && n_allowed > 0) as usize;
            one += (n_allowed == 1) as usize;
            if n_allowed == 0 {
                none += 1;
                assert!(
                    gi.iter().all(|&i| i == u32::MAX) && gt == 0.0,
                    "{what}: nothing allowed"
                );
            }
        }
        // Every token allowed: the unmasked call's bits.
        let all = vec![u32::MAX; n * wpr];
        let (mut ai, mut av, mut at) = (vec![0u32; n * k], vec![0.0f32; n * k], vec![0.0f64; n]);
        b.top_candidates_rows(&buf, n, width, k, &inv_t, Some(&all), &mut ai, &mut av, &mut at);
        let (mut ui, mut uv, mut ut) = (vec![0u32; n * k], vec![0.0f32; n * k], vec![0.0f64; n]);
        b.top_candidates_rows(&buf, n, width, k, &inv_t, None, &mut ui, &mut uv, &mut ut);
        assert_eq!(ai, ui, "case {case}: all allowed vs no mask");
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&av), bits(&uv), "case {case}: all allowed vs no mask");
        let tbits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(tbits(&at), tbits(&ut), "case {case}: all allowed vs no mask");
    }
    // The edge cases came up often enough to mean something.
    assert!(above_k > 50 && one > 30 && none > 30, "{above_k} {one} {none}");
}
