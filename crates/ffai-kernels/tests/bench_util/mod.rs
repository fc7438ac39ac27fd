//! What the single-thread kernel benchmarks share (`tests/q8_bench.rs` and
//! `examples/q8_decode_bench.rs`, which includes this file by path): a small xorshift
//! generator, random quantized matrices and a best-of-eight timer.

use std::time::{Duration, Instant};

use ffai_kernels::quant::{quantize_row, WeightType};

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
    }
}

/// A `rows × cols` matrix of distinct quantized rows (so the memory traffic is real).
pub fn matrix(ty: WeightType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let rb = ty.row_bytes(cols).unwrap();
    let mut w = vec![0u8; rows * rb];
    let mut src = vec![0.0f32; cols];
    for r in w.chunks_exact_mut(rb) {
        src.iter_mut().for_each(|v| *v = rng.next() * 0.1);
        quantize_row(ty, &src, r).unwrap();
    }
    w
}

/// Best time of several runs of `f`, each at least `budget / 8` long; returns
/// seconds per call.
pub fn time(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let per_run = ((budget.as_secs_f64() / 8.0 / once).ceil() as usize).max(1);
    let mut best = f64::MAX;
    for _ in 0..8 {
        let t = Instant::now();
        for _ in 0..per_run {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / per_run as f64);
    }
    best
}
