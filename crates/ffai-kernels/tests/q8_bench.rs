//! Single-thread matvec / small-batch matmul throughput: the integer-dot path
//! (`quantize` + `dot_row_q8[_multi]`) against the f32 path the CPU backend uses
//! (`dot_row` per row for one token; `dequantize_row` + `ops::dot_f32` per token for
//! several). Not a test: run with
//! `cargo test -p ffai-kernels --release --test q8_bench -- --ignored --nocapture`
//! (optionally `Q8_BENCH_MS=400` for longer timings, `Q8_BENCH_ONLY=Q4_0,Q6_K` to
//! pick types, `Q8_BENCH_BIG=1` to add a 178 MB LM head, `Q8_BENCH_PATHS=avx512vnni,avx2`
//! to pick implementations; default: every one this CPU has, fastest first). Numbers are noisy when the
//! machine is busy; the load average is printed first.

use std::hint::black_box;
use std::time::Duration;

use ffai_kernels::ops;
use ffai_kernels::quant::q8::{dot_rows_q8_multi, dot_rows_q8_tile, force_q8_level, Q8Level, TokenTile};
use ffai_kernels::quant::{
    bf16_dot_available, dequantize_row, dot_row, dot_row_q8, dot_row_q8_multi, dot_rows_bf16, dot_rows_multi,
    dot_rows_q8, force_portable, q8_backend_name, round_to_bf16, QuantizedActs, WeightType,
};

mod bench_util;
use bench_util::{matrix, time, Rng};

fn budget() -> Duration {
    let ms = std::env::var("Q8_BENCH_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    Duration::from_millis(ms)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// One matrix: matvec (1 token) and n-token matmul, f32 path vs q8 path.
fn bench_matrix(ty: WeightType, rows: usize, cols: usize, tokens: &[usize]) {
    if let Ok(only) = std::env::var("Q8_BENCH_ONLY") {
        if !only.split(',').any(|o| o == ty.name()) {
            return;
        }
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (rows * 31 + cols) as u64);
    let w = matrix(ty, rows, cols, &mut rng);
    let rb = ty.row_bytes(cols).unwrap();
    let nmax = tokens.iter().copied().max().unwrap_or(1).max(1);
    let x: Vec<f32> = (0..nmax * cols).map(|_| rng.next()).collect();
    let bytes = w.len() as f64;
    let elems = (rows * cols) as f64;
    let mut out = vec![0.0f32; nmax * rows];
    let mut acts = QuantizedActs::new();
    let b = budget();

    // ---- one token
    let f32_t = time(b, || {
        for r in 0..rows {
            out[r] = dot_row(ty, black_box(&w[r * rb..(r + 1) * rb]), black_box(&x[..cols]));
        }
        black_box(&out);
    });
    let quant_t = time(b / 4, || {
        acts.quantize(ty, black_box(&x[..cols]), 1, cols);
        black_box(&acts);
    });
    let q8_t = time(b, || {
        acts.quantize(ty, black_box(&x[..cols]), 1, cols);
        for r in 0..rows {
            out[r] = dot_row_q8(ty, black_box(&w[r * rb..(r + 1) * rb]), &acts, 0);
        }
        black_box(&out);
    });
    let rows_t = time(b, || {
        acts.quantize(ty, black_box(&x[..cols]), 1, cols);
        dot_rows_q8(ty, black_box(&w), &acts, 0, &mut out[..rows]);
        black_box(&out);
    });
    println!(
        "{:>5} {rows:>5}x{cols:<5} {:>6.1} MB | n=1  f32 {:6.2} GB/s {:6.2} Gel/s | q8 {:6.2} GB/s {:6.2} Gel/s | x{:4.2} | dot_rows_q8 {:6.2} GB/s {:6.2} Gel/s x{:4.2} (quantize acts {:5.2} us)",
        ty.name(),
        bytes / 1e6,
        bytes / f32_t / 1e9,
        elems / f32_t / 1e9,
        bytes / q8_t / 1e9,
        elems / q8_t / 1e9,
        f32_t / q8_t,
        bytes / rows_t / 1e9,
        elems / rows_t / 1e9,
        f32_t / rows_t,
        quant_t * 1e6,
    );

    // ---- several tokens (prefill): per-token element rate.
    for &n in tokens.iter().filter(|&&n| n > 1) {
        let xs = &x[..n * cols];
        let mut wrow = vec![0.0f32; cols];
        let f32_t = time(b, || {
            for r in 0..rows {
                dequantize_row(ty, black_box(&w[r * rb..(r + 1) * rb]), &mut wrow);
                for t in 0..n {
                    out[t * rows + r] = ops::dot_f32(&wrow, &xs[t * cols..(t + 1) * cols]);
                }
            }
            black_box(&out);
        });
        let mut tmp = vec![0.0f32; n];
        let q8_t = time(b, || {
            acts.quantize(ty, black_box(xs), n, cols);
            for r in 0..rows {
                dot_row_q8_multi(ty, black_box(&w[r * rb..(r + 1) * rb]), &acts, 0..n, &mut tmp);
                for (t, &v) in tmp.iter().enumerate() {
                    out[t * rows + r] = v;
                }
            }
            black_box(&out);
        });
        let te = elems * n as f64;
        println!(
            "{:>5} {rows:>5}x{cols:<5}          | n={n:<2} f32 {:6.2} Gel/s (tok·el)      | q8 {:6.2} Gel/s (tok·el)      | x{:4.2}  ({:5.2} us/token·matrix)",
            ty.name(),
            te / f32_t / 1e9,
            te / q8_t / 1e9,
            f32_t / q8_t,
            q8_t / n as f64 * 1e6,
        );
    }
}

/// Prefill GEMM tile as the CPU backend runs it (blocks of 16 rows, all `n` tokens
/// of the tile): `dot_row_q8_multi` per row vs `dot_rows_q8_multi` per 16-row block.
/// Activations are quantized once outside the timing; rates are multiply-adds/s.
fn bench_rows_multi(ty: WeightType, rows: usize, cols: usize, n: usize) {
    if let Ok(only) = std::env::var("Q8_BENCH_ONLY") {
        if !only.split(',').any(|o| o == ty.name()) {
            return;
        }
    }
    const BLOCK: usize = 16;
    let mut rng = Rng(0x51ED_270B_1C3A_9E01 ^ (rows * 31 + cols) as u64);
    let w = matrix(ty, rows, cols, &mut rng);
    let rb = ty.row_bytes(cols).unwrap();
    let x: Vec<f32> = (0..n * cols).map(|_| rng.next()).collect();
    let mut acts = QuantizedActs::new();
    acts.quantize(ty, &x, n, cols);
    let mut out_a = vec![0.0f32; rows * n];
    let mut out_b = vec![0.0f32; rows * n];
    let b = budget();
    let per_row = time(b, || {
        for (r, o) in out_a.chunks_exact_mut(n).enumerate() {
            dot_row_q8_multi(ty, black_box(&w[r * rb..(r + 1) * rb]), &acts, 0..n, o);
        }
        black_box(&out_a);
    });
    let blocked = time(b, || {
        for (r0, o) in out_b.chunks_mut(BLOCK * n).enumerate() {
            let nr = o.len() / n;
            dot_rows_q8_multi(
                ty,
                black_box(&w[r0 * BLOCK * rb..(r0 * BLOCK + nr) * rb]),
                &acts,
                0..n,
                o,
            );
        }
        black_box(&out_b);
    });
    // The prefill loop's shape: the token tile prepared once, then every block of rows.
    let mut out_c = vec![0.0f32; rows * n];
    let mut tile = TokenTile::new();
    let tiled = time(b, || {
        tile.prepare(ty, &acts, 0..n);
        for (r0, o) in out_c.chunks_mut(BLOCK * n).enumerate() {
            let nr = o.len() / n;
            dot_rows_q8_tile(
                ty,
                black_box(&w[r0 * BLOCK * rb..(r0 * BLOCK + nr) * rb]),
                &acts,
                &tile,
                o,
            );
        }
        black_box(&out_c);
    });
    assert!(
        out_a.iter().zip(&out_b).all(|(a, b)| a.to_bits() == b.to_bits()),
        "results differ"
    );
    assert!(
        out_a.iter().zip(&out_c).all(|(a, b)| a.to_bits() == b.to_bits()),
        "tile results differ"
    );
    let macs = (rows * cols * n) as f64;
    println!(
        "{:>5} {rows:>5}x{cols:<5} n={n:<3} | per row {:6.1} GMAC/s | rows x16 {:6.1} GMAC/s | prepared tile {:6.1} GMAC/s | x{:4.2}",
        ty.name(),
        macs / per_row / 1e9,
        macs / blocked / 1e9,
        macs / tiled / 1e9,
        per_row / tiled,
    );
}

/// Prefill shapes for [`bench_rows_multi`].
const GEMM_SHAPES: &[(WeightType, usize, usize)] = &[
    (WeightType::Q5_0, 2048, 640),
    (WeightType::Q4K, 640, 2048),
    (WeightType::Q6K, 640, 2048),
    (WeightType::Q4_1, 1536, 576),
    (WeightType::Q4_0, 1536, 576),
    (WeightType::Q8_0, 1536, 576),
    (aff(4, 32), 1536, 576),
    (aff(4, 64), 1536, 576),
    (aff(4, 128), 576, 1536),
    (aff(8, 32), 1536, 576),
    (aff(8, 64), 1536, 576),
    (aff(2, 64), 1536, 576),
    (aff(3, 64), 1536, 576),
    (aff(5, 64), 1536, 576),
    (aff(6, 64), 1536, 576),
];

/// The MLX affine type of `bits` and `group` (for the tables).
const fn aff(bits: u8, group: u16) -> WeightType {
    WeightType::Affine { bits, group }
}

#[test]
#[ignore]
fn bench_q8_rows_multi() {
    println!("load average: {}", load_average());
    let mut paths: Vec<(Q8Level, &'static str)> = Vec::new();
    for level in [Q8Level::Best, Q8Level::AvxVnni, Q8Level::Avx2, Q8Level::Portable] {
        force_q8_level(level);
        let name = q8_backend_name();
        if !paths.iter().any(|&(_, n)| n == name) {
            paths.push((level, name));
        }
    }
    let only = std::env::var("Q8_BENCH_PATHS").ok();
    for (level, name) in paths {
        if only.as_ref().is_some_and(|o| !o.split(',').any(|p| p == name)) {
            continue;
        }
        force_q8_level(level);
        println!(
            "\n=== q8 backend: {} (prefill GEMM, single thread) ===",
            q8_backend_name()
        );
        for &(ty, rows, cols) in GEMM_SHAPES {
            bench_rows_multi(ty, rows, cols, 32);
        }
    }
    force_portable(false);
    println!("\nload average: {}", load_average());
}

/// (type, rows, cols) of the matrices of the models in use, plus the other types.
const SHAPES: &[(WeightType, usize, usize)] = &[
    // SmolLM2-135M Q4_1: attention q/o, k/v, ffn gate/up, ffn down; Q8_0 LM head.
    (WeightType::Q4_1, 576, 576),
    (WeightType::Q4_1, 192, 576),
    (WeightType::Q4_1, 1536, 576),
    (WeightType::Q4_1, 576, 1536),
    (WeightType::Q8_0, 49152, 576),
    // gemma-3-270m Q4_K_M: Q5_0 (640 columns), Q4_K / Q6_K (1024 / 2048 columns).
    (WeightType::Q5_0, 2048, 640),
    (WeightType::Q5_0, 1024, 640),
    (WeightType::Q4K, 640, 1024),
    (WeightType::Q4K, 640, 2048),
    (WeightType::Q6K, 640, 2048),
    // The remaining types.
    (WeightType::Q4_0, 576, 1536),
    (WeightType::Q4_0, 1536, 576),
    (WeightType::Q5_1, 576, 1536),
    (WeightType::Q5_1, 1536, 576),
    (WeightType::Q8_0, 576, 1536),
    (WeightType::Q8_0, 1536, 576),
    (WeightType::Q5K, 640, 2048),
    (WeightType::Q6K, 2048, 768),
    // The low-bit types.
    (WeightType::Q2K, 640, 2048),
    (WeightType::Q3K, 640, 2048),
    (WeightType::Q8K, 640, 2048),
    (WeightType::IQ4XS, 640, 2048),
    (WeightType::IQ4NL, 640, 2048),
    (WeightType::MXFP4, 640, 2048),
    // MLX affine (compare 4 bits with Q4_0 / Q4_1, 8 bits with Q8_0).
    (aff(4, 32), 1536, 576),
    (aff(4, 64), 1536, 576),
    (aff(4, 64), 576, 1536),
    (aff(4, 128), 576, 1536),
    (aff(8, 32), 1536, 576),
    (aff(8, 64), 1536, 576),
    (aff(2, 64), 1536, 576),
    (aff(3, 64), 1536, 576),
    (aff(5, 64), 1536, 576),
    (aff(6, 64), 1536, 576),
];

#[test]
#[ignore]
fn bench_q8_matvec() {
    println!("load average: {}", load_average());
    // Every distinct implementation here, fastest first.
    let mut paths: Vec<(Q8Level, &'static str)> = Vec::new();
    for level in [Q8Level::Best, Q8Level::AvxVnni, Q8Level::Avx2, Q8Level::Portable] {
        force_q8_level(level);
        let name = q8_backend_name();
        if !paths.iter().any(|&(_, n)| n == name) {
            paths.push((level, name));
        }
    }
    let only = std::env::var("Q8_BENCH_PATHS").ok();
    for (level, name) in paths {
        if only.as_ref().is_some_and(|o| !o.split(',').any(|p| p == name)) {
            continue;
        }
        force_q8_level(level);
        let portable = name == "portable";
        println!("\n=== q8 backend: {} ===", q8_backend_name());
        let toks: &[usize] = if portable { &[1, 8] } else { &[1, 4, 8, 16] };
        for &(ty, rows, cols) in SHAPES {
            bench_matrix(ty, rows, cols, toks);
        }
        if level == Q8Level::Best && std::env::var("Q8_BENCH_BIG").is_ok() {
            // gemma-3-270m's LM head: 178 MB of Q8_0, far beyond the caches.
            bench_matrix(WeightType::Q8_0, 262144, 640, &[1]);
        }
    }
    force_portable(false);
    println!("\nload average: {}", load_average());
}

/// Float-weight prefill GEMM, single thread, in GFLOP/s (2 per multiply-add): what the CPU
/// backend ran before (`dequantize_row` once per row, then `ops::dot_f32` per token), the
/// per-(row, token) `dot_row` (the decode arithmetic), and `dot_rows_multi` in the
/// backend's shape (blocks of 16 rows against all `n` tokens), checked bit-identical
/// to `dot_row`. `Q8_BENCH_PATHS=avx2` etc. picks the levels.
fn bench_float_gemm(ty: WeightType, rows: usize, cols: usize, n: usize) {
    const BLOCK: usize = 16;
    let mut rng = Rng(0x0F1E_2D3C_4B5A_6978 ^ (rows * 31 + cols) as u64);
    let w = matrix(ty, rows, cols, &mut rng);
    let rb = ty.row_bytes(cols).unwrap();
    let x: Vec<f32> = (0..n * cols).map(|_| rng.next()).collect();
    let b = budget();
    let mut out_old = vec![0.0f32; rows * n];
    let mut wrow = vec![0.0f32; cols];
    let old = time(b, || {
        for (r, o) in out_old.chunks_exact_mut(n).enumerate() {
            dequantize_row(ty, black_box(&w[r * rb..(r + 1) * rb]), &mut wrow);
            for (t, ov) in o.iter_mut().enumerate() {
                *ov = ops::dot_f32(&wrow, &x[t * cols..(t + 1) * cols]);
            }
        }
        black_box(&out_old);
    });
    let mut out_row = vec![0.0f32; rows * n];
    let per_dot = time(b, || {
        for (r, o) in out_row.chunks_exact_mut(n).enumerate() {
            for (t, ov) in o.iter_mut().enumerate() {
                *ov = dot_row(ty, black_box(&w[r * rb..(r + 1) * rb]), &x[t * cols..(t + 1) * cols]);
            }
        }
        black_box(&out_row);
    });
    let mut out_new = vec![0.0f32; rows * n];
    let gemm = time(b, || {
        for (r0, o) in out_new.chunks_mut(BLOCK * n).enumerate() {
            let nr = o.len() / n;
            dot_rows_multi(ty, black_box(&w[r0 * BLOCK * rb..(r0 * BLOCK + nr) * rb]), &x, cols, o);
        }
        black_box(&out_new);
    });
    assert!(
        out_row.iter().zip(&out_new).all(|(a, b)| a.to_bits() == b.to_bits()),
        "dot_rows_multi differs from dot_row"
    );
    // The kernel without the once-per-call widening of 16-bit rows (what ran before it):
    // `dot_rows_multi` on 4 tokens at a time, which it does not widen for.
    let mut tmp4 = vec![0.0f32; BLOCK * 4];
    let unwidened = time(b, || {
        for r0 in (0..rows).step_by(BLOCK) {
            let nr = BLOCK.min(rows - r0);
            for t0 in (0..n).step_by(4) {
                let nt = 4.min(n - t0);
                let o = &mut tmp4[..nr * nt];
                dot_rows_multi(
                    ty,
                    black_box(&w[r0 * rb..(r0 + nr) * rb]),
                    &x[t0 * cols..(t0 + nt) * cols],
                    cols,
                    o,
                );
            }
        }
        black_box(&tmp4);
    });
    // One token (decode): `dot_row` row by row vs `dot_rows_multi` over all rows.
    let mut one_a = vec![0.0f32; rows];
    let mv_row = time(b, || {
        for (r, o) in one_a.iter_mut().enumerate() {
            *o = dot_row(ty, black_box(&w[r * rb..(r + 1) * rb]), &x[..cols]);
        }
        black_box(&one_a);
    });
    let mut one_b = vec![0.0f32; rows];
    let mv_multi = time(b, || {
        dot_rows_multi(ty, black_box(&w), &x[..cols], cols, &mut one_b);
        black_box(&one_b);
    });
    assert!(
        one_a.iter().zip(&one_b).all(|(a, b)| a.to_bits() == b.to_bits()),
        "dot_rows_multi (one token) differs from dot_row"
    );
    let flops = 2.0 * (rows * cols) as f64;
    println!(
        "{:>5} {rows:>5}x{cols:<5} n=1   | dot_row {:6.1} GFLOP/s | dot_rows_multi {:6.1} GFLOP/s | x{:4.2}",
        ty.name(),
        flops / mv_row / 1e9,
        flops / mv_multi / 1e9,
        mv_row / mv_multi,
    );
    if ty == WeightType::BF16 && bf16_dot_available() {
        // bf16 activations (`vdpbf16ps`): the tokens rounded once, then the same blocks.
        let mut xb = vec![0u16; n * cols];
        let mut out_bf = vec![0.0f32; rows * n];
        let bf = time(b, || {
            round_to_bf16(&x, &mut xb);
            for (r0, o) in out_bf.chunks_mut(BLOCK * n).enumerate() {
                let nr = o.len() / n;
                dot_rows_bf16(black_box(&w[r0 * BLOCK * rb..(r0 * BLOCK + nr) * rb]), &xb, cols, o);
            }
            black_box(&out_bf);
        });
        let mut one_bf = vec![0.0f32; rows];
        let mv_bf = time(b, || {
            round_to_bf16(&x[..cols], &mut xb[..cols]);
            dot_rows_bf16(black_box(&w), &xb[..cols], cols, &mut one_bf);
            black_box(&one_bf);
        });
        println!(
            " bf16 acts {rows:>5}x{cols:<5} | n={n}: dot_rows_bf16 {:6.1} GFLOP/s (x{:4.2} vs dot_rows_multi) | n=1: {:6.1} GFLOP/s (x{:4.2})",
            2.0 * (rows * cols * n) as f64 / bf / 1e9,
            gemm / bf,
            2.0 * (rows * cols) as f64 / mv_bf / 1e9,
            mv_multi / mv_bf,
        );
    }
    let flops = 2.0 * (rows * cols * n) as f64;
    println!(
        "{:>5} {rows:>5}x{cols:<5} n={n:<3} | before (dequant + dot_f32) {:6.1} GFLOP/s | dot_row {:6.1} GFLOP/s | dot_rows_multi {:6.1} GFLOP/s | x{:4.2} vs before | 4-token calls (no widening) {:6.1} GFLOP/s",
        ty.name(),
        flops / old / 1e9,
        flops / per_dot / 1e9,
        flops / gemm / 1e9,
        old / gemm,
        flops / unwidened / 1e9,
    );
}

#[test]
#[ignore]
fn bench_float_prefill_gemm() {
    println!("load average: {}", load_average());
    let only = std::env::var("Q8_BENCH_PATHS").ok();
    let mut seen = Vec::new();
    for level in [Q8Level::Best, Q8Level::Avx2, Q8Level::Portable] {
        force_q8_level(level);
        let name = q8_backend_name();
        if seen.contains(&name) || only.as_ref().is_some_and(|o| !o.split(',').any(|p| p == name)) {
            continue;
        }
        seen.push(name);
        println!("\n=== level: {name} (float prefill GEMM, single thread) ===");
        for ty in [WeightType::BF16, WeightType::F16, WeightType::F32] {
            // SmolLM2-135M: ffn gate/up, ffn down, attention q/o.
            for (rows, cols) in [(1536, 576), (576, 1536), (576, 576)] {
                bench_float_gemm(ty, rows, cols, 48);
            }
            if std::env::var("Q8_BENCH_BIG").is_ok() {
                // The tied LM head (57 MB of bf16): far beyond the caches.
                bench_float_gemm(ty, 49152, 576, 48);
            }
        }
    }
    force_portable(false);
    println!("\nload average: {}", load_average());
}
