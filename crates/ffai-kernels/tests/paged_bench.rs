//! `attention_step` (paged pool, fixed spans) against the contiguous `attention` it
//! replaces: one decode row at contexts 512 / 2048 / 8192 and a 512-row prefill chunk,
//! for a few span lengths; and 16 sequences decoding in one step against one call per
//! sequence (the default span). Not a test: run with
//! `cargo test -p ffai-kernels --release --test paged_bench -- --ignored --nocapture`
//! (`PAGED_BENCH_THREADS=2` threads by default, `PAGED_BENCH_SPANS=64,128,256,512`,
//! `PAGED_BENCH_MS=300` per measurement, `PAGED_BENCH_ONLY=decode|prefill`,
//! `PAGED_BENCH_SCRAMBLE=0` for blocks in order, `PAGED_BENCH_BS=16` positions per block). Each number is the median of many calls; the
//! machine may be shared, so the load average is printed first and medians are what to
//! compare.

use std::time::{Duration, Instant};

use ffai_kernels::backend::{AttnShape, Backend, GroupLayout, SeqRows, StepLayout};
use ffai_kernels::cpu::CpuBackend;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// (median, minimum) seconds of each of `fs`, measured interleaved (one call of each per round,
/// after 2 warm-up rounds, for about `ms` milliseconds and at least 7 rounds), so that
/// load from other processes falls on all of them alike.
fn medians(ms: u64, fs: &mut [Box<dyn FnMut() + '_>]) -> Vec<(f64, f64)> {
    for _ in 0..2 {
        fs.iter_mut().for_each(|f| f());
    }
    let mut times = vec![Vec::new(); fs.len()];
    let start = Instant::now();
    while times[0].len() < 7 || start.elapsed() < Duration::from_millis(ms) {
        for (f, t) in fs.iter_mut().zip(&mut times) {
            let t0 = Instant::now();
            f();
            t.push(t0.elapsed().as_secs_f64());
        }
    }
    times
        .iter_mut()
        .map(|t| {
            t.sort_by(f64::total_cmp);
            (t[t.len() / 2], t[0])
        })
        .collect()
}

/// One sequence: rows `pos0..pos0 + n` after `pos0` positions of history.
#[allow(clippy::too_many_arguments)]
fn bench_case(threads: usize, spans: &[usize], ms: u64, heads: usize, kvh: usize, hd: usize, pos0: usize, n: usize) {
    let ctx = pos0 + n;
    let (qw, kw) = (heads * hd, kvh * hd);
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    let (q, k, v) = (r.vec(n * qw), r.vec(ctx * kw), r.vec(ctx * kw));
    let shape = AttnShape {
        n_heads: heads,
        n_kv_heads: kvh,
        head_dim: hd,
        cap: ctx,
        window: 0,
        scale: 1.0 / (hd as f32).sqrt(),
        softcap: 0.0,
    };

    // Today's contiguous cache, and the paged pool: blocks of 16 in a scrambled order
    // (a pool that has been in use), unless PAGED_BENCH_SCRAMBLE=0.
    let b = CpuBackend::new(threads);
    let (mut kc, mut vc) = (b.alloc_kv(kw * ctx), b.alloc_kv(kw * ctx));
    b.kv_write(&mut kc, &k, ctx, 0, &shape);
    b.kv_write(&mut vc, &v, ctx, 0, &shape);
    let bs: usize = env_or("PAGED_BENCH_BS", 16);
    let n_blocks = ctx.div_ceil(bs) + 8;
    let mut table: Vec<u32> = (0..n_blocks as u32).collect();
    if env_or("PAGED_BENCH_SCRAMBLE", 1) != 0 {
        for i in (1..table.len()).rev() {
            let j = (r.next().abs() * (i + 1) as f32) as usize % (i + 1);
            table.swap(i, j);
        }
    }
    table.truncate(ctx.div_ceil(bs));
    let layout = |positions: std::ops::Range<usize>| {
        let rows = positions.len() as u32;
        StepLayout {
            positions: positions.clone().map(|p| p as u32).collect(),
            groups: vec![GroupLayout {
                block_size: bs as u32,
                n_blocks: n_blocks as u32,
                window: 0,
                slots: positions.map(|p| table[p / bs] * bs as u32 + (p % bs) as u32).collect(),
                seqs: vec![SeqRows {
                    first_row: 0,
                    n_rows: rows,
                    table_start: 0,
                    table_len: table.len() as u32,
                }],
                block_tables: table.clone(),
            }],
            ..Default::default()
        }
    };
    let (mut kp, mut vp) = (
        b.alloc_kv_pages(n_blocks, bs, kvh, hd),
        b.alloc_kv_pages(n_blocks, bs, kvh, hd),
    );
    // Fill the history (a step over every position), then the measured step.
    let mut step = b.new_step(ctx, 1, table.len(), 1);
    b.write_step(&layout(0..ctx), &mut step).unwrap();
    b.kv_write_step(&mut kp, &k, ctx, &step, 0, &shape);
    b.kv_write_step(&mut vp, &v, ctx, &step, 0, &shape);
    b.write_step(&layout(pos0..ctx), &mut step).unwrap();
    drop(b);

    let mut line = format!("{heads:>2}/{kvh} heads hd {hd}, {n:>3} row(s) at {pos0:>4}..{ctx:<5}");
    // One backend per span, measuring both ops interleaved on the same pool threads.
    for &span in spans {
        let b = CpuBackend::new(threads).with_attn_span(span);
        let (mut o1, mut o2) = (vec![0f32; n * qw], vec![0f32; n * qw]);
        let t = medians(
            ms,
            &mut [
                Box::new(|| b.attention(&q, &kc, &vc, n, pos0, &shape, &mut o1)),
                Box::new(|| b.attention_step(&q, &kp, &vp, n, &step, 0, &shape, None, &mut o2)),
            ],
        );
        line += &format!(
            " | span {span:>3}: {:>6.0} / {:>6.0} µs = {:.2} (min {:>6.0} / {:>6.0} = {:.2})",
            t[0].0 * 1e6,
            t[1].0 * 1e6,
            t[1].0 / t[0].0,
            t[0].1 * 1e6,
            t[1].1 * 1e6,
            t[1].1 / t[0].1,
        );
    }
    println!("{line}");
}

/// `n_seqs` sequences decoding one row each at context `ctx`: one `attention_step` over
/// the batch against one `attention` call per sequence (what a batch costs today).
fn bench_decode_batch(threads: usize, ms: u64, heads: usize, kvh: usize, hd: usize, n_seqs: usize, ctx: usize) {
    let (qw, kw) = (heads * hd, kvh * hd);
    let mut r = Rng(0x2545_F491_4F6C_DD1D);
    let shape = AttnShape {
        n_heads: heads,
        n_kv_heads: kvh,
        head_dim: hd,
        cap: ctx,
        window: 0,
        scale: 1.0 / (hd as f32).sqrt(),
        softcap: 0.0,
    };
    let b = CpuBackend::new(threads);
    let q = r.vec(n_seqs * qw);
    let (k, v) = (r.vec(n_seqs * ctx * kw), r.vec(n_seqs * ctx * kw));
    let caches: Vec<_> = (0..n_seqs)
        .map(|s| {
            let (mut kc, mut vc) = (b.alloc_kv(kw * ctx), b.alloc_kv(kw * ctx));
            b.kv_write(&mut kc, &k[s * ctx * kw..(s + 1) * ctx * kw], ctx, 0, &shape);
            b.kv_write(&mut vc, &v[s * ctx * kw..(s + 1) * ctx * kw], ctx, 0, &shape);
            (kc, vc)
        })
        .collect();
    let qs: Vec<Vec<f32>> = (0..n_seqs).map(|s| q[s * qw..(s + 1) * qw].to_vec()).collect();
    // Sequence s owns blocks s, s + n_seqs, ... (interleaved, as a busy pool would be).
    let bs = 16;
    let per = ctx.div_ceil(bs);
    let n_blocks = per * n_seqs;
    let table = |s: usize| (0..per).map(move |j| (j * n_seqs + s) as u32);
    let (mut kp, mut vp) = (
        b.alloc_kv_pages(n_blocks, bs, kvh, hd),
        b.alloc_kv_pages(n_blocks, bs, kvh, hd),
    );
    let layout = |rows_per_seq: usize| {
        let mut g = GroupLayout {
            block_size: bs as u32,
            n_blocks: n_blocks as u32,
            ..Default::default()
        };
        let mut positions = Vec::new();
        for s in 0..n_seqs {
            let p0 = ctx - rows_per_seq;
            g.seqs.push(SeqRows {
                first_row: (s * rows_per_seq) as u32,
                n_rows: rows_per_seq as u32,
                table_start: (s * per) as u32,
                table_len: per as u32,
            });
            g.block_tables.extend(table(s));
            let t: Vec<u32> = table(s).collect();
            for p in p0..ctx {
                positions.push(p as u32);
                g.slots.push(t[p / bs] * bs as u32 + (p % bs) as u32);
            }
        }
        StepLayout {
            positions,
            groups: vec![g],
            ..Default::default()
        }
    };
    let mut step = b.new_step(n_seqs * ctx, n_seqs, n_seqs * per, 1);
    b.write_step(&layout(ctx), &mut step).unwrap();
    b.kv_write_step(&mut kp, &k, n_seqs * ctx, &step, 0, &shape);
    b.kv_write_step(&mut vp, &v, n_seqs * ctx, &step, 0, &shape);
    b.write_step(&layout(1), &mut step).unwrap();
    let (mut o1, mut o2) = (vec![0f32; qw], vec![0f32; n_seqs * qw]);
    let t = medians(
        ms,
        &mut [
            Box::new(|| {
                for (s, (kc, vc)) in caches.iter().enumerate() {
                    b.attention(&qs[s], kc, vc, 1, ctx - 1, &shape, &mut o1);
                }
            }),
            Box::new(|| b.attention_step(&q, &kp, &vp, n_seqs, &step, 0, &shape, None, &mut o2)),
        ],
    );
    println!(
        "{heads:>2}/{kvh} heads hd {hd}, {n_seqs} sequences decoding at {ctx} | {n_seqs} x attention {:>6.0} µs, one attention_step {:>6.0} µs = {:.2} (min {:>6.0} / {:>6.0} = {:.2})",
        t[0].0 * 1e6,
        t[1].0 * 1e6,
        t[1].0 / t[0].0,
        t[0].1 * 1e6,
        t[1].1 * 1e6,
        t[1].1 / t[0].1
    );
}

#[test]
#[ignore]
fn bench_attention_step() {
    let threads: usize = env_or("PAGED_BENCH_THREADS", 2);
    let ms: u64 = env_or("PAGED_BENCH_MS", 300);
    let spans: Vec<usize> = std::env::var("PAGED_BENCH_SPANS")
        .unwrap_or_else(|_| "64,128,256,512".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{threads} threads, f16 KV, blocks of 16; attention / attention_step medians (and minima); load average {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    // PAGED_BENCH_ONLY=decode or =prefill runs half of them.
    let only = std::env::var("PAGED_BENCH_ONLY").unwrap_or_default();
    for (heads, kvh) in [(32, 8), (16, 2)] {
        if only != "prefill" {
            for ctx in [512, 2048, 8192] {
                bench_case(threads, &spans, ms, heads, kvh, 128, ctx - 1, 1);
            }
        }
        if only != "decode" {
            bench_case(threads, &spans, ms, heads, kvh, 128, 0, 512);
            bench_case(threads, &spans, ms, heads, kvh, 128, 1536, 512);
        }
    }
    if only != "prefill" {
        for (heads, kvh) in [(32, 8), (16, 2)] {
            bench_decode_batch(threads, ms, heads, kvh, 128, 16, 1024);
        }
    }
}
