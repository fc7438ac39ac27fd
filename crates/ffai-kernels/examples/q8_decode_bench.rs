//! One-token matrix-vector rate of the integer-dot kernels (`dot_rows_q8`) on one
//! thread, per CPU level, for the decode shapes of the mixture-of-experts models:
//! `cargo run --release -p ffai-kernels --example q8_decode_bench`.
//! `Q8_DECODE_ONLY=Q4_K,MXFP4` picks types, `Q8_DECODE_MS=300` the time per figure.
//! "hot" repeats one matrix that fits in L2 (the kernel's compute rate); "cold" walks a
//! 64 MB set of matrices (what memory allows on top). The load average is printed first.

use std::hint::black_box;
use std::time::Duration;

use ffai_kernels::quant::q8::{force_q8_level, Q8Level};
use ffai_kernels::quant::{dot_rows_q8, q8_backend_name, QuantizedActs, WeightType};

#[path = "../tests/bench_util/mod.rs"]
mod bench_util;
use bench_util::{matrix, time, Rng};

fn main() {
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    let ms = std::env::var("Q8_DECODE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let budget = Duration::from_millis(ms);
    let only = std::env::var("Q8_DECODE_ONLY").ok();
    let shapes: &[(WeightType, usize, usize)] = &[
        (WeightType::Q4K, 2048, 2048),
        (WeightType::Q4K, 768, 2048),
        (WeightType::Q4K, 2048, 768),
        (WeightType::MXFP4, 2880, 2880),
        (WeightType::IQ4NL, 2048, 2048),
        (WeightType::IQ4XS, 2048, 2048),
        (WeightType::Q8_0, 2880, 2880),
        (WeightType::Q4_0, 2048, 2048),
    ];
    {
        // Plain streaming read of 64 MB, for scale.
        let big = vec![1u8; 64 << 20];
        let t = time(budget, || {
            let s: u64 = big
                .chunks_exact(8)
                .fold(0u64, |a, c| a ^ u64::from_le_bytes(c.try_into().unwrap()));
            black_box(s);
        });
        println!("stream read {:6.2} GB/s", big.len() as f64 / t / 1e9);
    }
    for &(ty, rows, cols) in shapes {
        if let Some(o) = &only {
            if !o.split(',').any(|n| n == ty.name()) {
                continue;
            }
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (rows * 31 + cols) as u64);
        let rb = ty.row_bytes(cols).unwrap();
        // Hot: the first rows that fit in 512 KB.
        let hot_rows = (512 * 1024 / rb).min(rows);
        let w = matrix(ty, rows, cols, &mut rng);
        let copies = (64 << 20) / w.len() + 1;
        let cold: Vec<Vec<u8>> = (0..copies).map(|_| w.clone()).collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.next()).collect();
        let mut out = vec![0.0f32; rows];
        for level in [Q8Level::Avx512Vnni, Q8Level::Avx2] {
            force_q8_level(level);
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &x, 1, cols);
            let hot = time(budget, || {
                dot_rows_q8(ty, black_box(&w[..hot_rows * rb]), &acts, 0, &mut out[..hot_rows]);
                black_box(&out);
            });
            let mut i = 0;
            let cold_t = time(budget, || {
                dot_rows_q8(ty, black_box(&cold[i % copies]), &acts, 0, &mut out);
                i += 1;
                black_box(&out);
            });
            // The cold walk again, asking for the next chunk of rows while dotting this one.
            let chunk = (4096 / rb).max(1);
            let mut i = 0;
            let pf_t = time(budget, || {
                let w = black_box(&cold[i % copies]);
                for (k, o) in out.chunks_mut(chunk).enumerate() {
                    let a = k * chunk * rb;
                    let e = (a + o.len() * rb).min(w.len());
                    ffai_kernels::ops::prefetch_bytes(&w[e..(e + 2 * chunk * rb).min(w.len())]);
                    dot_rows_q8(ty, &w[a..e], &acts, 0, o);
                }
                i += 1;
                black_box(&out);
            });
            let check: f64 = out.iter().map(|&v| v as f64).sum();
            println!(
                "{:>6} {rows:>5}x{cols:<5} {:>11} | hot {:6.2} GB/s | cold {:6.2} GB/s | cold+prefetch {:6.2} GB/s | checksum {check:.6e}",
                ty.name(),
                q8_backend_name(),
                (hot_rows * rb) as f64 / hot / 1e9,
                w.len() as f64 / cold_t / 1e9,
                w.len() as f64 / pf_t / 1e9,
            );
        }
    }
}
