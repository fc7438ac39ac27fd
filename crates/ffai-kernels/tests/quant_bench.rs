//! Throughput of `dot_row` / `dequantize_row` (single thread). Not a test:
//! run with
//! `cargo test -p ffai-kernels --release --test quant_bench -- --ignored --nocapture`.

use std::hint::black_box;
use std::time::Instant;

use ffai_kernels::quant::{dequantize_row, dot_row, quantize_row, WeightType};

#[test]
#[ignore]
fn bench_dot_row() {
    let (rows, cols) = (2048usize, 4096usize);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let src: Vec<f32> = (0..cols).map(|_| next()).collect();
    let x: Vec<f32> = (0..cols).map(|_| next()).collect();
    for ty in WeightType::ALL {
        let rb = ty.row_bytes(cols).unwrap();
        let mut row = vec![0u8; rb];
        quantize_row(ty, &src, &mut row).unwrap();
        let w: Vec<u8> = row.iter().copied().cycle().take(rb * rows).collect();

        let mut best = f64::MAX;
        let mut sink = 0.0f32;
        for _ in 0..5 {
            let t = Instant::now();
            for r in 0..rows {
                sink += dot_row(ty, black_box(&w[r * rb..(r + 1) * rb]), black_box(&x));
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let mut out = vec![0.0f32; cols];
        let mut best_dq = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for r in 0..rows {
                dequantize_row(ty, black_box(&w[r * rb..(r + 1) * rb]), &mut out);
                black_box(&out);
            }
            best_dq = best_dq.min(t.elapsed().as_secs_f64());
        }
        let elems = (rows * cols) as f64;
        println!(
            "{:>5}: dot {:6.2} Gelem/s {:6.2} GB/s of weights | dequantize {:6.2} Gelem/s   ({sink:.1})",
            ty.name(),
            elems / best / 1e9,
            (rows * rb) as f64 / best / 1e9,
            elems / best_dq / 1e9,
        );
    }
}
