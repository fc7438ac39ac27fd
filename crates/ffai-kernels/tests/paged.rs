//! The batched-step ops over a paged KV cache (`write_step`, `rope_step`,
//! `kv_write_step`, `attention_step`):
//! - attention against a naive f64 oracle over contiguous K/V, for sequences of mixed
//!   lengths (1 to several spans and many blocks) scheduled as mixed batches of prefill
//!   chunks and decode rows, GQA groups of 1, 2, 3 and 8, windows shorter than a block and
//!   crossing blocks (their dead blocks freed, poisoned with NaN and reused), soft-capping,
//!   f16 and f32 pools;
//! - batch invariance, bit for bit: a sequence's outputs alone token by token, alone in one
//!   chunk, and inside mixed batches at other batch positions, with other block
//!   placements, on 1 to 4 threads;
//! - `write_step`'s refusals, `kv_write_step`'s slot mapping, `rope_step` against `rope`.
//!
//! The SIMD level is process-global and one test switches it, so every test holds `LOCK`
//! (as the q8 and float-GEMM tests do).

// Index loops over parallel per-sequence / per-group arrays read clearer here.
#![allow(clippy::needless_range_loop)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::{Mutex, MutexGuard};

use ffai_kernels::backend::{AttnShape, Backend, GroupLayout, RopeParams, SeqRows, StepLayout, NO_BLOCK};
use ffai_kernels::cpu::{CpuBackend, KvCache};
use ffai_kernels::quant::q8::{avx512_allowed, force_q8_level, Q8Level};

static LOCK: Mutex<()> = Mutex::new(());

/// The system allocator, counting the allocations each thread makes (for the
/// steady-state test: `write_step` and the step ops must not allocate once warm).
struct Counting;

thread_local! {
    // Const-initialised and destructor-free, so the allocator may touch it.
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to `System` unchanged; the counter is a thread-local
// `Cell` that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: as above.
        unsafe { System.realloc(p, l, size) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocs_here() -> usize {
    ALLOCS.with(|c| c.get())
}

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
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
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

// ------------------------------------------------------------------ the harness

/// One configuration: a global group (window 0) and a sliding-window group.
#[derive(Clone, Copy, Debug)]
struct Case {
    heads: usize,
    kv_heads: usize,
    hd: usize,
    block_size: usize,
    span: usize,
    windows: [usize; 2],
    softcap: f32,
    kv_f32: bool,
    /// Learned attention sinks (GPT-OSS), one logit per query head ([`Case::sinks`]).
    sinks: bool,
}

impl Case {
    /// Per-head sink logits: spread over [-4, 6] so some heads' sinks sit far below the
    /// scores, some near them and some far above (the output then shrinks toward 0).
    fn sinks(&self) -> Option<Vec<f32>> {
        self.sinks
            .then(|| (0..self.heads).map(|h| (h as f32 * 2.3).sin() * 5.0 + 1.0).collect())
    }
    fn shape(&self, g: usize) -> AttnShape {
        AttnShape {
            n_heads: self.heads,
            n_kv_heads: self.kv_heads,
            head_dim: self.hd,
            cap: 0,
            window: self.windows[g],
            scale: 1.0 / (self.hd as f32).sqrt(),
            softcap: self.softcap,
        }
    }
    fn backend(&self, threads: usize) -> CpuBackend {
        CpuBackend::with_options(threads, false, self.kv_f32).with_attn_span(self.span)
    }
}

/// A sequence's whole history, token-major: q `[len][heads*hd]`, k and v
/// `[len][kv_heads*hd]` (already rounded to f16 when the pools store f16, so the oracle
/// sees what the kernel reads). Each group gets its own K/V (they are different layers).
struct SeqData {
    len: usize,
    q: Vec<f32>,
    k: [Vec<f32>; 2],
    v: [Vec<f32>; 2],
}

fn make_world(c: &Case, lens: &[usize], seed: u64) -> Vec<SeqData> {
    let mut r = Rng(seed);
    let round = |v: Vec<f32>| -> Vec<f32> {
        if c.kv_f32 {
            v
        } else {
            v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
        }
    };
    lens.iter()
        .map(|&len| {
            let kw = len * c.kv_heads * c.hd;
            SeqData {
                len,
                q: r.vec(len * c.heads * c.hd),
                k: [round(r.vec(kw)), round(r.vec(kw))],
                v: [round(r.vec(kw)), round(r.vec(kw))],
            }
        })
        .collect()
}

/// Steps of (sequence, rows) in batch order; sequence `PAD` is one padding row.
type Schedule = Vec<Vec<(usize, usize)>>;
const PAD: usize = usize::MAX;

/// Every sequence alone, one row per step.
fn alone_tokens(world: &[SeqData], s: usize) -> Schedule {
    (0..world[s].len).map(|_| vec![(s, 1)]).collect()
}

/// Every sequence alone, all its rows in one step.
fn alone_chunk(world: &[SeqData], s: usize) -> Schedule {
    vec![vec![(s, world[s].len)]]
}

/// Mixed batches: each step takes a random subset of the unfinished sequences in random
/// order; a sequence's first ~60% come in prefill chunks of 1..=48 rows, the rest one
/// decode row a step; sometimes a padding row sits between them.
fn mixed(world: &[SeqData], seed: u64) -> Schedule {
    let mut r = Rng(seed);
    let mut done = vec![0; world.len()];
    let mut steps = Vec::new();
    while done.iter().zip(world).any(|(&d, s)| d < s.len) {
        let mut order: Vec<usize> = (0..world.len()).filter(|&s| done[s] < world[s].len).collect();
        r.shuffle(&mut order);
        let take = 1 + r.below(order.len());
        let mut step = Vec::new();
        for &s in &order[..take] {
            let left = world[s].len - done[s];
            let n = if done[s] * 10 < world[s].len * 6 {
                (1 + r.below(48)).min(left)
            } else {
                1
            };
            if r.below(5) == 0 {
                step.push((PAD, 1));
            }
            step.push((s, n));
            done[s] += n;
        }
        steps.push(step);
    }
    steps
}

fn poison_block(pool: &mut KvCache, block: usize, block_elems: usize) {
    let r = block * block_elems..(block + 1) * block_elems;
    match pool {
        KvCache::F16(v) => v[r].fill(half::f16::NAN),
        KvCache::F32(v) => v[r].fill(f32::NAN),
    }
}

/// Runs `sched` through the step ops: per step, K/V of both groups written, then both
/// groups' attention. Blocks come from a free list shuffled by `seed`; a windowed group's
/// blocks that fell out of every row's window are poisoned with NaN, freed (NO_BLOCK in
/// the table) and handed to later allocations; a finished sequence's blocks too. The
/// pools start as NaN, so reading any slot not written for this sequence shows.
/// Returns `out[seq][group]`, `[len][heads*hd]` (NaN where never computed).
fn run(b: &CpuBackend, c: &Case, world: &[SeqData], sched: &Schedule, seed: u64) -> Vec<[Vec<f32>; 2]> {
    let mut r = Rng(seed);
    let (bs, kvw, qw) = (c.block_size, c.kv_heads * c.hd, c.heads * c.hd);
    let n_blocks = world.iter().map(|s| s.len.div_ceil(bs) + 1).sum::<usize>() + 3;
    let block_elems = bs * kvw;
    let mut pools: Vec<[KvCache; 2]> = (0..2)
        .map(|_| {
            let mut kv = [
                b.alloc_kv_pages(n_blocks, bs, c.kv_heads, c.hd),
                b.alloc_kv_pages(n_blocks, bs, c.kv_heads, c.hd),
            ];
            for p in &mut kv {
                (0..n_blocks).for_each(|blk| poison_block(p, blk, block_elems));
            }
            kv
        })
        .collect();
    let mut free: [Vec<u32>; 2] = std::array::from_fn(|_| {
        let mut f: Vec<u32> = (0..n_blocks as u32).collect();
        r.shuffle(&mut f);
        f
    });
    let mut tables: Vec<[Vec<u32>; 2]> = world.iter().map(|_| [Vec::new(), Vec::new()]).collect();
    let mut done = vec![0usize; world.len()];
    let mut outs: Vec<[Vec<f32>; 2]> = world
        .iter()
        .map(|s| [vec![f32::NAN; s.len * qw], vec![f32::NAN; s.len * qw]])
        .collect();
    let max_rows = sched
        .iter()
        .map(|st| st.iter().map(|x| x.1).sum::<usize>())
        .max()
        .unwrap_or(0);
    let max_seqs = sched.iter().map(|st| st.len()).max().unwrap_or(0);
    let mut step = b.new_step(max_rows, max_seqs, world.len() * (n_blocks + 1), 2);
    for st in sched {
        // Free what no row of this step (or later) reads, then allocate what it writes.
        for g in 0..2 {
            let w = c.windows[g];
            for &(s, _) in st.iter().filter(|x| x.0 != PAD && w > 0) {
                let lo = (done[s] + 1).saturating_sub(w);
                for j in 0..lo / bs {
                    let id = std::mem::replace(&mut tables[s][g][j], NO_BLOCK);
                    if id != NO_BLOCK {
                        pools[g]
                            .iter_mut()
                            .for_each(|p| poison_block(p, id as usize, block_elems));
                        free[g].push(id);
                    }
                }
            }
            for &(s, n) in st.iter().filter(|x| x.0 != PAD) {
                while tables[s][g].len() * bs < done[s] + n {
                    let id = free[g].pop().expect("pool large enough");
                    tables[s][g].push(id);
                }
            }
        }
        let mut layout = StepLayout {
            positions: Vec::new(),
            groups: (0..2)
                .map(|g| GroupLayout {
                    block_size: bs as u32,
                    n_blocks: n_blocks as u32,
                    window: c.windows[g] as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let mut q = Vec::new();
        let mut kv: [[Vec<f32>; 2]; 2] = Default::default();
        for &(s, n) in st {
            let first_row = layout.positions.len() as u32;
            if s == PAD {
                layout.positions.push(r.below(1000) as u32);
                for g in 0..2 {
                    layout.groups[g].slots.push(NO_BLOCK);
                    kv[g].iter_mut().for_each(|x| x.extend(r.vec(kvw)));
                }
                q.extend(r.vec(qw));
                continue;
            }
            let p0 = done[s];
            layout.positions.extend((p0..p0 + n).map(|p| p as u32));
            q.extend_from_slice(&world[s].q[p0 * qw..(p0 + n) * qw]);
            for (g, gl) in layout.groups.iter_mut().enumerate() {
                let t = &tables[s][g];
                gl.seqs.push(SeqRows {
                    first_row,
                    n_rows: n as u32,
                    table_start: gl.block_tables.len() as u32,
                    table_len: t.len() as u32,
                });
                gl.block_tables.extend_from_slice(t);
                gl.slots
                    .extend((p0..p0 + n).map(|p| t[p / bs] * bs as u32 + (p % bs) as u32));
                kv[g][0].extend_from_slice(&world[s].k[g][p0 * kvw..(p0 + n) * kvw]);
                kv[g][1].extend_from_slice(&world[s].v[g][p0 * kvw..(p0 + n) * kvw]);
            }
        }
        let rows = layout.positions.len();
        b.write_step(&layout, &mut step).unwrap();
        for g in 0..2 {
            let shape = c.shape(g);
            let [kp, vp] = &mut pools[g];
            b.kv_write_step(kp, &kv[g][0], rows, &step, g, &shape);
            b.kv_write_step(vp, &kv[g][1], rows, &step, g, &shape);
            let mut out = vec![f32::NAN; rows * qw];
            let sinks = c.sinks();
            b.attention_step(&q, kp, vp, rows, &step, g, &shape, sinks.as_ref(), &mut out);
            let mut row = 0;
            for &(s, n) in st {
                if s == PAD {
                    assert!(out[row * qw..(row + 1) * qw].iter().all(|&x| x == 0.0), "padding row");
                } else {
                    let p0 = done[s];
                    outs[s][g][p0 * qw..(p0 + n) * qw].copy_from_slice(&out[row * qw..(row + n) * qw]);
                }
                row += n;
            }
        }
        for &(s, n) in st.iter().filter(|x| x.0 != PAD) {
            done[s] += n;
            if done[s] == world[s].len {
                for g in 0..2 {
                    for id in tables[s][g].drain(..).filter(|&id| id != NO_BLOCK) {
                        pools[g]
                            .iter_mut()
                            .for_each(|p| poison_block(p, id as usize, block_elems));
                        free[g].push(id);
                    }
                }
            }
        }
    }
    outs
}

/// Naive causal attention of one sequence in f64 over its contiguous history.
fn oracle(c: &Case, s: &SeqData, g: usize) -> Vec<f32> {
    let (heads, kvh, hd, w) = (c.heads, c.kv_heads, c.hd, c.windows[g]);
    let (k, v) = (&s.k[g], &s.v[g]);
    let scale = 1.0 / (hd as f64).sqrt();
    let cap = c.softcap as f64;
    let sinks = c.sinks();
    let mut out = vec![0f32; s.len * heads * hd];
    for p in 0..s.len {
        let lo = if w > 0 { (p + 1).saturating_sub(w) } else { 0 };
        for h in 0..heads {
            let kh = h / (heads / kvh);
            let qv = &s.q[(p * heads + h) * hd..(p * heads + h + 1) * hd];
            let scores: Vec<f64> = (lo..=p)
                .map(|j| {
                    let kr = &k[(j * kvh + kh) * hd..(j * kvh + kh + 1) * hd];
                    let d = qv.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale;
                    if cap > 0.0 {
                        cap * (d / cap).tanh()
                    } else {
                        d
                    }
                })
                .collect();
            let sink = sinks.as_ref().map(|x| x[h] as f64);
            let m = scores.iter().cloned().chain(sink).fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            // The sink is one more term of the softmax's sum, with no value row.
            let z: f64 = e.iter().sum::<f64>() + sink.map_or(0.0, |x| (x - m).exp());
            for d in 0..hd {
                let acc: f64 = (lo..=p)
                    .zip(&e)
                    .map(|(j, wt)| wt * v[(j * kvh + kh) * hd + d] as f64)
                    .sum();
                out[(p * heads + h) * hd + d] = (acc / z) as f32;
            }
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: element {i} differs: {} vs {}", got[i], want[i]);
    }
}

const LENS: [usize; 6] = [1, 5, 40, 130, 300, 17];

fn cases() -> Vec<Case> {
    let c = |heads, kv_heads, hd, block_size, span, windows, softcap, kv_f32| Case {
        heads,
        kv_heads,
        hd,
        block_size,
        span,
        windows,
        softcap,
        kv_f32,
        sinks: false,
    };
    let sinks = |c: Case| Case { sinks: true, ..c };
    vec![
        // GQA 1; a window shorter than a block; spans of two blocks.
        c(8, 8, 32, 16, 32, [0, 5], 0.0, false),
        // GQA 2; a window across blocks; spans that cut blocks; soft-capping; f32.
        c(8, 4, 32, 16, 40, [0, 37], 0.5, true),
        // GQA 8 with blocks of 7 and soft-capping.
        c(16, 2, 64, 7, 32, [0, 20], 30.0, false),
        // GQA 8 over one KV head: the default span (two spans at 300), f32.
        c(8, 1, 16, 16, ffai_kernels::ops::ATTN_SPAN, [0, 100], 0.0, true),
        // GQA 3 with a head size the SIMD kernels do not take (portable path).
        c(6, 2, 12, 5, 16, [0, 9], 0.0, false),
        // Attention sinks (GPT-OSS): GQA 2 over many spans (split over threads, folded
        // by the last piece) with a window across blocks; GQA 4 at the default span, f16.
        sinks(c(8, 4, 32, 16, 32, [0, 37], 0.0, false)),
        sinks(c(8, 2, 64, 32, ffai_kernels::ops::ATTN_SPAN, [0, 128], 0.0, false)),
    ]
}

/// Every case: the oracle within 1e-5, and every run (mixed batches on 1-4 threads with
/// other seeds, each sequence alone token by token, alone in one chunk) bit-identical.
fn check_case(c: &Case, check_oracle: bool) {
    let world = make_world(c, &LENS, 7);
    let reference = run(&c.backend(1), c, &world, &mixed(&world, 1), 11);
    if check_oracle {
        for (s, seq) in world.iter().enumerate() {
            for g in 0..2 {
                let what = format!("{c:?} seq {s} (len {}) group {g}", seq.len);
                assert_close(&reference[s][g], &oracle(c, seq, g), 1e-5, &what);
            }
        }
    }
    let mut runs = Vec::new();
    for threads in 1..=4 {
        let sched = mixed(&world, 100 + threads as u64);
        runs.push((
            format!("mixed, {threads} threads"),
            run(&c.backend(threads), c, &world, &sched, 7 * threads as u64),
        ));
    }
    for (threads, seed) in [(3, 5u64), (1, 6)] {
        let b = c.backend(threads);
        let mut tok = reference.iter().map(|_| [Vec::new(), Vec::new()]).collect::<Vec<_>>();
        let mut chunk = tok.clone();
        for s in 0..world.len() {
            tok[s] = run(&b, c, &world, &alone_tokens(&world, s), seed).swap_remove(s);
            chunk[s] = run(&b, c, &world, &alone_chunk(&world, s), seed + 1).swap_remove(s);
        }
        runs.push((format!("alone token by token, {threads} threads"), tok));
        runs.push((format!("alone in one chunk, {threads} threads"), chunk));
    }
    for (name, got) in &runs {
        for s in 0..world.len() {
            for g in 0..2 {
                assert_bits(
                    &got[s][g],
                    &reference[s][g],
                    &format!("{c:?} {name}: seq {s} group {g}"),
                );
            }
        }
    }
}

#[test]
fn attention_step_matches_oracle_and_is_batch_invariant() {
    let _l = lock();
    force_q8_level(Q8Level::Best);
    for c in cases() {
        check_case(&c, true);
    }
}

/// The portable kernels against the oracle (and invariant among themselves); and where
/// AVX-512 runs, the 256-bit kernels give its bits exactly.
#[test]
fn attention_step_portable_and_avx2_levels() {
    let _l = lock();
    let c = cases()[2];
    force_q8_level(Q8Level::Portable);
    check_case(&c, true);
    force_q8_level(Q8Level::Best);
    if !avx512_allowed() {
        eprintln!("no AVX-512 here: no 512/256-bit comparison");
        return;
    }
    for c in cases() {
        let world = make_world(&c, &LENS, 3);
        let sched = mixed(&world, 9);
        let best = run(&c.backend(2), &c, &world, &sched, 4);
        force_q8_level(Q8Level::Avx2);
        let avx2 = run(&c.backend(2), &c, &world, &sched, 4);
        force_q8_level(Q8Level::Best);
        for s in 0..world.len() {
            for g in 0..2 {
                assert_bits(
                    &avx2[s][g],
                    &best[s][g],
                    &format!("{c:?} AVX2 vs AVX-512 seq {s} group {g}"),
                );
            }
        }
    }
}

/// The span length is part of the arithmetic, the block size is not: the same sequences
/// in blocks of 1, 3 and 64 positions give the same bits.
#[test]
fn attention_step_does_not_depend_on_block_size() {
    let _l = lock();
    force_q8_level(Q8Level::Best);
    let base = cases()[1];
    let world = make_world(&base, &LENS, 21);
    let mut results = Vec::new();
    for bs in [1, 3, 16, 64] {
        let c = Case { block_size: bs, ..base };
        results.push((bs, run(&c.backend(2), &c, &world, &mixed(&world, 2), bs as u64)));
    }
    for (bs, got) in &results[1..] {
        for s in 0..world.len() {
            for g in 0..2 {
                assert_bits(
                    &got[s][g],
                    &results[0].1[s][g],
                    &format!("block size {bs} seq {s} group {g}"),
                );
            }
        }
    }
}

// ------------------------------------------------------------------ write_step

/// Two sequences (positions 30..33 and 5..6) in blocks of 4 over a pool of 20 blocks;
/// group 1 has a window of 6, so the first sequence's blocks 0..=5 (positions < 25) are
/// never read and are NO_BLOCK.
fn valid_layout() -> StepLayout {
    let bs = 4u32;
    let t_a: Vec<u32> = (0..9).map(|j| 10 + j).collect::<Vec<_>>(); // positions 0..36
    let t_b = vec![3u32, 1];
    let mut t_a_w = t_a.clone();
    t_a_w[..6].fill(NO_BLOCK);
    let slot = |t: &[u32], p: u32| t[(p / bs) as usize] * bs + p % bs;
    let group = |ta: &[u32], window| GroupLayout {
        block_size: bs,
        n_blocks: 20,
        window,
        // rows: a at 30, 31, 32; one padding row; b at 5.
        slots: vec![slot(ta, 30), slot(ta, 31), slot(ta, 32), NO_BLOCK, slot(&t_b, 5)],
        seqs: vec![
            SeqRows {
                first_row: 0,
                n_rows: 3,
                table_start: 0,
                table_len: 9,
            },
            SeqRows {
                first_row: 4,
                n_rows: 1,
                table_start: 9,
                table_len: 2,
            },
        ],
        block_tables: ta.iter().chain(&t_b).copied().collect(),
    };
    StepLayout {
        positions: vec![30, 31, 32, 0, 5],
        groups: vec![group(&t_a, 0), group(&t_a_w, 6)],
        ..Default::default()
    }
}

#[test]
fn write_step_refuses_inconsistent_layouts() {
    let _l = lock();
    let b = CpuBackend::new(2);
    let mut step = b.new_step(5, 2, 11, 2);
    b.write_step(&valid_layout(), &mut step).unwrap();
    assert_eq!(step.n_rows(), 5);
    type Edit = fn(&mut StepLayout);
    let bad: Vec<(&str, Edit, &str)> = vec![
        ("too many rows", |l| l.positions.push(6), "capacity"),
        ("too many groups", |l| l.groups.push(l.groups[0].clone()), "capacity"),
        (
            "slots length",
            |l| {
                l.groups[1].slots.pop();
            },
            "slots for",
        ),
        (
            "too many sequences",
            |l| {
                let s = l.groups[0].seqs[1];
                l.groups[0].seqs.push(s)
            },
            "capacity",
        ),
        ("table too long", |l| l.groups[0].block_tables.push(0), "capacity"),
        ("rows out of range", |l| l.groups[0].seqs[1].n_rows = 2, "outside"),
        ("empty sequence", |l| l.groups[0].seqs[1].n_rows = 0, "no rows"),
        ("overlapping rows", |l| l.groups[0].seqs[1].first_row = 2, "overlap"),
        (
            "groups disagree on rows",
            |l| l.groups[1].seqs[1].first_row = 3,
            "group 0",
        ),
        ("positions not consecutive", |l| l.positions[1] = 40, "position"),
        (
            "table out of range",
            |l| l.groups[0].seqs[1].table_start = 10,
            "outside",
        ),
        (
            "table too short",
            |l| l.groups[0].seqs[0].table_len = 8,
            "does not reach",
        ),
        (
            "block id out of pool",
            |l| l.groups[0].block_tables[2] = 20,
            "outside the pool",
        ),
        (
            "NO_BLOCK read (global)",
            |l| l.groups[0].block_tables[0] = NO_BLOCK,
            "NO_BLOCK",
        ),
        (
            "NO_BLOCK read (window)",
            |l| l.groups[1].block_tables[6] = NO_BLOCK, // positions 24..28, window reaches 25
            "NO_BLOCK",
        ),
        ("slot not the table's", |l| l.groups[0].slots[4] += 1, "table gives"),
        ("padding row with a slot", |l| l.groups[0].slots[3] = 0, "no sequence"),
        (
            "slot written twice",
            |l| {
                // b's second block becomes a's block 7 and b moves to position 6: both
                // write slot 70.
                l.positions[4] = 6;
                l.groups[0].block_tables[10] = 17;
                l.groups[0].slots[4] = 17 * 4 + 2;
                l.groups[1].slots[4] = 4 + 2;
            },
            "written by two rows",
        ),
        ("block size 0", |l| l.groups[0].block_size = 0, "block size"),
        (
            "slots overflow u32",
            |l| l.groups[0].n_blocks = u32::MAX - 1,
            "fit a u32",
        ),
    ];
    for (what, edit, msg) in bad {
        let mut l = valid_layout();
        edit(&mut l);
        let e = b.write_step(&l, &mut step).expect_err(what);
        assert!(e.contains(msg), "{what}: error {e:?} lacks {msg:?}");
        assert_eq!(step.n_rows(), 0, "{what}: a refused layout leaves the step empty");
        b.write_step(&valid_layout(), &mut step).unwrap();
    }
    // Fewer rows, sequences and groups than the capacities are fine.
    let mut l = valid_layout();
    l.groups.pop();
    l.positions.truncate(3);
    l.groups[0].slots.truncate(3);
    l.groups[0].seqs.truncate(1);
    b.write_step(&l, &mut step).unwrap();
    assert_eq!(step.n_rows(), 3);
}

/// An op refuses a step written for another row count, and a group the step lacks.
#[test]
#[should_panic(expected = "KV group 2 not in this step")]
fn ops_refuse_missing_group() {
    let _l = lock();
    let b = CpuBackend::new(1);
    let mut step = b.new_step(5, 2, 11, 3);
    b.write_step(&valid_layout(), &mut step).unwrap();
    let c = Case {
        heads: 2,
        kv_heads: 1,
        hd: 8,
        block_size: 4,
        span: 16,
        windows: [0, 0],
        softcap: 0.0,
        kv_f32: true,
        sinks: false,
    };
    let mut pool = b.alloc_kv_pages(20, 4, 1, 8);
    b.kv_write_step(&mut pool, &vec![0.0; 5 * 8], 5, &step, 2, &c.shape(0));
}

// ------------------------------------------------------------------ kv_write_step, rope_step

#[test]
fn kv_write_step_puts_each_row_at_its_slot() {
    let _l = lock();
    let (kvh, hd, bs) = (3usize, 8usize, 4usize);
    for kv_f32 in [false, true] {
        let b = CpuBackend::with_options(2, false, kv_f32);
        let layout = valid_layout();
        let mut step = b.new_step(5, 2, 11, 2);
        b.write_step(&layout, &mut step).unwrap();
        let src = Rng(3).vec(5 * kvh * hd);
        for g in 0..2 {
            let shape = AttnShape {
                n_heads: kvh,
                n_kv_heads: kvh,
                head_dim: hd,
                cap: 0,
                window: layout.groups[g].window as usize,
                scale: 1.0,
                softcap: 0.0,
            };
            let mut pool = b.alloc_kv_pages(20, bs, kvh, hd);
            b.kv_write_step(&mut pool, &src, 5, &step, g, &shape);
            let got = pool.to_f32_vec();
            let mut want = vec![0f32; 20 * bs * kvh * hd];
            for (t, &slot) in layout.groups[g].slots.iter().enumerate() {
                if slot == NO_BLOCK {
                    continue;
                }
                let (blk, off) = (slot as usize / bs, slot as usize % bs);
                for h in 0..kvh {
                    for d in 0..hd {
                        let x = src[(t * kvh + h) * hd + d];
                        let x = if kv_f32 { x } else { half::f16::from_f32(x).to_f32() };
                        want[((blk * kvh + h) * bs + off) * hd + d] = x;
                    }
                }
            }
            assert_bits(&got, &want, &format!("kv_write_step group {g} f32 {kv_f32}"));
        }
    }
}

#[test]
fn rope_step_equals_rope_row_by_row() {
    let _l = lock();
    let (heads, hd) = (4, 16);
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    for threads in [1, 3] {
        let b = CpuBackend::new(threads);
        let inv_buf = b.upload(&inv);
        for neox in [false, true] {
            let rope = RopeParams {
                inv_freq: &inv_buf,
                neox,
            };
            // 600 consecutive positions from 77 (a prefill chunk large enough to go
            // parallel) against `rope` at pos0 77: the same bits.
            let n = 600;
            let x = Rng(9).vec(n * heads * hd);
            let layout = StepLayout {
                positions: (77..77 + n as u32).collect(),
                groups: vec![GroupLayout {
                    block_size: 16,
                    n_blocks: 64,
                    window: 0,
                    slots: (0..n as u32).map(|p| 77 + p).collect(),
                    seqs: vec![SeqRows {
                        first_row: 0,
                        n_rows: n as u32,
                        table_start: 0,
                        table_len: 64,
                    }],
                    block_tables: (0..64).collect(),
                }],
                ..Default::default()
            };
            let mut step = b.new_step(n, 1, 64, 1);
            b.write_step(&layout, &mut step).unwrap();
            let (mut got, mut want) = (x.clone(), x.clone());
            b.rope_step(&mut got, n, heads, hd, &step, &rope);
            b.rope(&mut want, n, heads, hd, 77, &rope);
            assert_bits(&got, &want, "rope_step vs rope, consecutive positions");
            // Two sequences and a padding row: each row as `rope` of that row alone.
            let layout = valid_layout();
            let mut step = b.new_step(5, 2, 11, 2);
            b.write_step(&layout, &mut step).unwrap();
            let x = Rng(10).vec(5 * heads * hd);
            let mut got = x.clone();
            b.rope_step(&mut got, 5, heads, hd, &step, &rope);
            let w = heads * hd;
            for (t, &p) in layout.positions.iter().enumerate() {
                let mut want = x[t * w..(t + 1) * w].to_vec();
                b.rope(&mut want, 1, heads, hd, p as usize, &rope);
                assert_bits(&got[t * w..(t + 1) * w], &want, &format!("rope_step row {t}"));
            }
        }
    }
}

/// Once a step and the ops have run at a size, `write_step` of any layout within the
/// capacities and the step ops allocate nothing (single-threaded backend: every
/// allocation would be on this thread).
#[test]
fn steady_state_steps_do_not_allocate() {
    let _l = lock();
    force_q8_level(Q8Level::Best);
    let c = cases()[1];
    let b = c.backend(1);
    let (big, small) = (valid_layout(), {
        let mut l = valid_layout();
        l.groups.pop();
        l.positions.truncate(3);
        l.groups[0].slots.truncate(3);
        l.groups[0].seqs.truncate(1);
        l
    });
    let mut step = b.new_step(5, 2, 11, 2);
    let (q, kv) = (Rng(1).vec(5 * c.heads * c.hd), Rng(2).vec(5 * c.kv_heads * c.hd));
    let mut pools = [
        b.alloc_kv_pages(20, 4, c.kv_heads, c.hd),
        b.alloc_kv_pages(20, 4, c.kv_heads, c.hd),
    ];
    let mut out = vec![0f32; 5 * c.heads * c.hd];
    let inv = b.upload(&vec![0.01; c.hd / 2]);
    let rope = RopeParams {
        inv_freq: &inv,
        neox: true,
    };
    let mut run = |layout: &StepLayout, step: &mut _| {
        b.write_step(layout, step).unwrap();
        let n = layout.positions.len();
        let shape = Case { windows: [0, 6], ..c }.shape(0);
        let mut x = q.clone();
        let before = allocs_here();
        b.rope_step(&mut x, n, c.heads, c.hd, step, &rope);
        let [kp, vp] = &mut pools;
        b.kv_write_step(kp, &kv, n, step, 0, &shape);
        b.kv_write_step(vp, &kv, n, step, 0, &shape);
        b.attention_step(&x, kp, vp, n, step, 0, &shape, None, &mut out);
        allocs_here() - before
    };
    // Warm-up: scratch and work lists grow to this size (which shows the counter counts).
    assert!(run(&big, &mut step) > 0);
    for layout in [&small, &big, &small] {
        let before = allocs_here();
        b.write_step(layout, &mut step).unwrap();
        assert_eq!(allocs_here(), before, "write_step allocated");
        assert_eq!(run(layout, &mut step), 0, "the step ops allocated");
    }
}
