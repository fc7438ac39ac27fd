//! The CPU backend: buffers are `Vec<f32>`, weights stay in their stored format (usually
//! a memory map) and are dequantized on the fly inside the dot products. Every op is one
//! parallel region of the persistent pool.
//!
//! A panic inside an op (a failed shape assertion, an out-of-range slice) unwinds out of
//! the op on the calling thread, wherever it happened: the pool re-raises it only after
//! every thread has left the region, so no `SharedMut` write lands after the op's `&mut`
//! borrow ends. What an op leaves behind stays usable: the shared buffers sit behind
//! mutexes whose poisoning is ignored because each op rewrites them before reading, and
//! the thread-local scratch `RefCell`s are released by the unwind.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::backend::{AttnShape, Backend, HostBytes, RopeParams, SeqRows, StepCaps, StepLayout, NO_BLOCK};
use crate::ops;
use crate::pool::ThreadPool;
use crate::quant::{self, ActFormat, QuantizedActs, WeightType};

pub struct CpuMatrix {
    ty: WeightType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: HostBytes,
}

impl CpuMatrix {
    fn row(&self, r: usize) -> &[u8] {
        &self.data.as_slice()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}

/// Elementwise ops smaller than this run inline (a pool region costs about as much as
/// touching this many floats).
const PARALLEL_MIN: usize = 32 * 1024;

/// Prefill blocking: weight rows per block and tokens per tile (see `matmul_rows`).
const ROW_BLOCK: usize = 16;
const TOKEN_TILE: usize = 32;
/// Token tile of the float-weight GEMM (a multiple of its 4- and 3-token register tiles).
const FLOAT_TOKEN_TILE: usize = 48;

/// Most matrices one `matmuls` call takes (q/k/v is three).
const MAX_GROUP: usize = 4;

/// Which reusable activation buffer a weight type's integer dot uses (None: f32 path,
/// which every type takes when the backend keeps activations in f32).
fn act_slot(ty: WeightType, f32_acts: bool) -> Option<usize> {
    if f32_acts {
        return None;
    }
    match ActFormat::for_weight(ty) {
        ActFormat::F32 => None,
        ActFormat::Q8_0 => Some(0),
        ActFormat::Q8_1 => Some(1),
        ActFormat::Q8K => Some(2),
    }
}

/// True when a matmul with weights of type `ty` rounds its activations to bf16 and runs
/// the `vdpbf16ps` kernels: BF16 weights, the backend's bf16-activation option on (and
/// not the f32 one), and AVX-512 BF16 available (`quant::bf16_dot_available`). Otherwise
/// BF16 weights keep f32 activations (`float_gemm.rs`).
fn bf16_acts(ty: WeightType, mode: ActMode) -> bool {
    ty == WeightType::BF16 && mode.bf16 && !mode.f32 && quant::bf16_dot_available()
}

/// The backend's activation options, as the matmuls see them.
#[derive(Clone, Copy)]
struct ActMode {
    /// f32 activations for every weight type (`with_f32_activations`).
    f32: bool,
    /// bf16 activations for BF16 weights where AVX-512 BF16 exists (`with_bf16_activations`).
    bf16: bool,
}

/// Rows `rows` of `out = x · wᵀ` for the token rows `tokens` of `x` (and of `acts`, the
/// same rows quantized), on the calling thread: token `t`'s row `r` goes to
/// `out[t * w.rows + r]`.
/// A token's result does not depend on which other tokens share the range.
fn matmul_rows(
    w: &CpuMatrix,
    x: &[f32],
    tokens: Range<usize>,
    acts: &[QuantizedActs; 3],
    mode: ActMode,
    rows: Range<usize>,
    out: SharedMut,
) {
    let (n_rows, cols) = (w.rows, w.cols);
    let (base, n) = (tokens.start, tokens.len());
    match act_slot(w.ty, mode.f32) {
        Some(slot) if n == 1 => {
            // SAFETY: each thread writes only its own rows of the single output row.
            let o = unsafe { out.slice(base * n_rows + rows.start, rows.len()) };
            let bytes = &w.data.as_slice()[rows.start * w.row_bytes..rows.end * w.row_bytes];
            quant::dot_rows_q8(w.ty, bytes, &acts[slot], base, o);
        }
        Some(slot) => with_scratch(ROW_BLOCK * TOKEN_TILE, |tmp| {
            // Blocked: a block of weight rows against a tile of tokens at a time, so the
            // rows and the tile's activations both stay in L1 while every pair is dotted
            // (streaming all tokens per row would re-read them from L2 for every row).
            // Tokens outermost: each tile's activations are laid out once for all of
            // this thread's rows (the rows come back from L2, which is cheap).
            TILE.with(|tile| {
                let mut tile = tile.borrow_mut();
                for t0 in tokens.clone().step_by(TOKEN_TILE) {
                    let t1 = (t0 + TOKEN_TILE).min(tokens.end);
                    tile.prepare(w.ty, &acts[slot], t0..t1);
                    for rb in (rows.start..rows.end).step_by(ROW_BLOCK) {
                        let re = (rb + ROW_BLOCK).min(rows.end);
                        let data = w.data.as_slice();
                        let bytes = &data[rb * w.row_bytes..re * w.row_bytes];
                        if t0 == base {
                            // The first tile streams the rows from memory: ask for the
                            // next block now (later tiles find this thread's rows in L2).
                            let ne = (re + ROW_BLOCK).min(rows.end);
                            ops::prefetch_bytes(&data[re * w.row_bytes..ne * w.row_bytes]);
                        }
                        let (nr, nt) = (re - rb, t1 - t0);
                        let tmp = &mut tmp[..nr * nt];
                        quant::q8::dot_rows_q8_tile(w.ty, bytes, &acts[slot], &tile, tmp);
                        // Scatter token by token: each token's `nr` outputs are contiguous.
                        for j in 0..nt {
                            // SAFETY: rows rb..re of token t0+j belong to this thread's range.
                            let dst = unsafe { out.slice((t0 + j) * n_rows + rb, nr) };
                            for (r, d) in dst.iter_mut().enumerate() {
                                *d = tmp[r * nt + j];
                            }
                        }
                    }
                }
            })
        }),
        None if bf16_acts(w.ty, mode) => BF16_ACTS.with(|xb| {
            // BF16 weights on AVX-512 BF16: each token tile's activations rounded to bf16
            // once, then `vdpbf16ps` (quant/bf16_gemm.rs). Decode rounds its one row the
            // same way and runs the same per-output arithmetic, so prefill, chunks and
            // decode agree bit for bit.
            let mut xb = xb.borrow_mut();
            let data = w.data.as_slice();
            if n == 1 {
                xb.resize(cols, 0);
                quant::round_to_bf16(&x[base * cols..(base + 1) * cols], &mut xb[..]);
                // SAFETY: as above, disjoint rows per thread.
                let o = unsafe { out.slice(base * n_rows + rows.start, rows.len()) };
                quant::dot_rows_bf16(&data[rows.start * w.row_bytes..rows.end * w.row_bytes], &xb, cols, o);
                return;
            }
            with_scratch(ROW_BLOCK * FLOAT_TOKEN_TILE, |tmp| {
                for t0 in tokens.clone().step_by(FLOAT_TOKEN_TILE) {
                    let t1 = (t0 + FLOAT_TOKEN_TILE).min(tokens.end);
                    xb.resize((t1 - t0) * cols, 0);
                    quant::round_to_bf16(&x[t0 * cols..t1 * cols], &mut xb[..]);
                    for rb in (rows.start..rows.end).step_by(ROW_BLOCK) {
                        let re = (rb + ROW_BLOCK).min(rows.end);
                        let (nr, nt) = (re - rb, t1 - t0);
                        let tmp = &mut tmp[..nr * nt];
                        quant::dot_rows_bf16(&data[rb * w.row_bytes..re * w.row_bytes], &xb, cols, tmp);
                        for j in 0..nt {
                            // SAFETY: rows rb..re of token t0+j belong to this thread's range.
                            let dst = unsafe { out.slice((t0 + j) * n_rows + rb, nr) };
                            for (r, d) in dst.iter_mut().enumerate() {
                                *d = tmp[r * nt + j];
                            }
                        }
                    }
                }
            })
        }),
        None if n == 1 && matches!(w.ty, WeightType::F16 | WeightType::BF16) => {
            // SAFETY: as above, disjoint rows per thread.
            let o = unsafe { out.slice(base * n_rows + rows.start, rows.len()) };
            // One token: the GEMM kernel widens the 16-bit weights with SIMD (`dot_row`
            // converts f16 through a stack buffer), same bits. (F32 needs no widening,
            // and `dot_row` streamed it from DRAM faster.)
            let bytes = &w.data.as_slice()[rows.start * w.row_bytes..rows.end * w.row_bytes];
            quant::dot_rows_multi(w.ty, bytes, &x[base * cols..(base + 1) * cols], cols, o);
        }
        None if n == 1 && !w.ty.is_quantized() => {
            // SAFETY: as above, disjoint rows per thread.
            let o = unsafe { out.slice(base * n_rows + rows.start, rows.len()) };
            let xr = &x[base * cols..(base + 1) * cols];
            for (k, row) in rows.enumerate() {
                o[k] = quant::dot_row(w.ty, w.row(row), xr);
            }
        }
        None if !w.ty.is_quantized() => with_scratch(ROW_BLOCK * FLOAT_TOKEN_TILE, |tmp| {
            // Float weights: blocks of rows against tiles of tokens as for the integer
            // path (tokens outermost, so a tile's activations stay in L2 while the rows
            // pass), each block through the register-blocked GEMM kernel, which gives
            // exactly what `dot_row` (the decode path above) gives.
            for t0 in tokens.clone().step_by(FLOAT_TOKEN_TILE) {
                let t1 = (t0 + FLOAT_TOKEN_TILE).min(tokens.end);
                let xs = &x[t0 * cols..t1 * cols];
                for rb in (rows.start..rows.end).step_by(ROW_BLOCK) {
                    let re = (rb + ROW_BLOCK).min(rows.end);
                    let bytes = &w.data.as_slice()[rb * w.row_bytes..re * w.row_bytes];
                    let (nr, nt) = (re - rb, t1 - t0);
                    let tmp = &mut tmp[..nr * nt];
                    quant::dot_rows_multi(w.ty, bytes, xs, cols, tmp);
                    for j in 0..nt {
                        // SAFETY: rows rb..re of token t0+j belong to this thread's range.
                        let dst = unsafe { out.slice((t0 + j) * n_rows + rb, nr) };
                        for (r, d) in dst.iter_mut().enumerate() {
                            *d = tmp[r * nt + j];
                        }
                    }
                }
            }
        }),
        None => with_scratch(cols, |wrow| {
            // Quantized weights with f32 activations: widen each row once and reuse it
            // for every token. One token takes this path too, so a row's result does not
            // depend on how many tokens share the step (batch invariance).
            for row in rows {
                quant::dequantize_row(w.ty, w.row(row), wrow);
                for t in tokens.clone() {
                    let v = ops::dot_f32(wrow, &x[t * cols..(t + 1) * cols]);
                    // SAFETY: element (t, row) belongs to this thread's row range.
                    unsafe { out.slice(t * n_rows + row, 1)[0] = v };
                }
            }
        }),
    }
}

/// One layer's K or V cache: half precision by default, f32 on request (exact parity
/// tests, or users who want it).
pub enum KvCache {
    F16(Vec<half::f16>),
    F32(Vec<f32>),
}

impl KvCache {
    /// The stored values widened to f32 (inspection and tests).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            KvCache::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            KvCache::F32(v) => v.clone(),
        }
    }
}

/// A step's metadata on the CPU: host vectors allocated once for the step's capacities
/// and refilled by `write_step`. The fields are private and only `write_step` fills them
/// (after `StepLayout::validate`), so the ops may rely on what validation guarantees:
/// sequences own disjoint rows, every slot is written by at most one row, every table
/// entry a row reads is a block of the pool.
pub struct CpuStep {
    caps: StepCaps,
    positions: Vec<u32>,
    /// `caps.n_groups` groups, each preallocated; the first `n_groups` are in use.
    groups: Vec<CpuGroup>,
    n_groups: usize,
    /// Per row: its sequence, or `u32::MAX` for a padding row.
    row_seq: Vec<u32>,
    /// Per sequence: its recurrent-state slot (empty without recurrent state).
    state_slots: Vec<u32>,
    /// Scratch of the validation.
    sort: Vec<u32>,
}

struct CpuGroup {
    block_size: usize,
    n_blocks: usize,
    window: usize,
    slots: Vec<u32>,
    seqs: Vec<SeqRows>,
    tables: Vec<u32>,
}

impl CpuStep {
    /// Rows of the step written last (0 before any, and after a refused layout).
    pub fn n_rows(&self) -> usize {
        self.positions.len()
    }

    fn clear(&mut self) {
        self.positions.clear();
        self.row_seq.clear();
        self.state_slots.clear();
        self.n_groups = 0;
    }

    fn group(&self, g: usize) -> &CpuGroup {
        assert!(
            g < self.n_groups,
            "KV group {g} not in this step ({} groups)",
            self.n_groups
        );
        &self.groups[g]
    }
}

/// One unit of `attention_step`'s work: spans `k_lo..k_hi` of one row for one KV head's
/// GQA group. `split == u32::MAX`: the item covers the row's every span and writes its
/// output; otherwise it writes per-span partials for `splits[split]` to fold.
#[derive(Clone, Copy)]
struct AttnItem {
    seq: u32,
    row: u32,
    kvh: u32,
    k_lo: u32,
    k_hi: u32,
    split: u32,
}

/// A (row, KV head) whose spans were spread over several items: its partials start at
/// `base` in `PagedWork::partial`, one per span from `k0` to `k1`, and the item that
/// brings `remaining` to zero folds them.
struct AttnSplit {
    seq: u32,
    row: u32,
    kvh: u32,
    k0: u32,
    k1: u32,
    base: usize,
    remaining: AtomicU32,
}

#[derive(Default)]
struct PagedWork {
    items: Vec<AttnItem>,
    /// Item ranges of the region's chunks: chunk c is `bounds[c]..bounds[c + 1]`.
    bounds: Vec<usize>,
    splits: Vec<AttnSplit>,
    partial: Vec<f32>,
}

/// A fixed cost per work item (row setup, the fold), in positions, for balancing chunks.
const ITEM_COST: usize = 16;

thread_local! {
    /// Each thread's block ranges of the span it is attending over.
    static SEGS: RefCell<Vec<Range<usize>>> = const { RefCell::new(Vec::new()) };
}

pub struct CpuBackend {
    /// Store the KV cache in f32 instead of f16.
    kv_f32: bool,
    /// Dot quantized weights with the f32 activations (dequantizing the weights) instead
    /// of 8-bit activations: slower, and free of the activations' rounding.
    f32_acts: bool,
    /// Round activations to bf16 for BF16 weights and dot them with `vdpbf16ps` where the
    /// CPU has AVX-512 BF16 (off by default: see `with_bf16_activations`).
    bf16_acts: bool,
    /// Partial attention results (split decode attention), reused across calls.
    attn_partial: std::sync::Mutex<Vec<f32>>,
    /// Positions per span of `attention_step` (see `ops::PagedAttn`): part of the
    /// arithmetic, so fixed per backend.
    attn_span: usize,
    /// `attention_step`'s work list and partial results, reused across calls.
    paged: std::sync::Mutex<PagedWork>,
    pool: ThreadPool,
    /// Quantized activations, one buffer per activation format, reused by every matmul.
    acts: std::sync::Mutex<[QuantizedActs; 3]>,
    /// `moe_matmuls`' gathered rows, permuted outputs and work list, reused across calls.
    moe: std::sync::Mutex<MoeWork>,
    /// Per-op wall time, only when profiling was asked for (one branch per op otherwise).
    profile: Option<std::sync::Mutex<Vec<(String, f64, u64)>>>,
}

/// Scratch of `moe_matmuls`: the step's (token, slot) pairs sorted by expert, the rows
/// they read gathered in that order, each matrix's outputs in that order, and the
/// (expert, matrix) pieces of work.
#[derive(Default)]
struct MoeWork {
    /// Sorted position p -> slot `t * k + j`.
    order: Vec<u32>,
    /// Per expert, its first sorted position (`n_experts + 1` entries).
    starts: Vec<u32>,
    /// Per expert, the next free sorted position while filling `order`.
    next: Vec<u32>,
    xg: Vec<f32>,
    outs: [Vec<f32>; MAX_GROUP],
    /// (expert, matrix) for each piece, in the order their rows are numbered.
    pieces: Vec<(u32, u32)>,
}

/// Records the time of one op on drop.
struct ProfGuard<'a> {
    sink: &'a std::sync::Mutex<Vec<(String, f64, u64)>>,
    key: String,
    start: std::time::Instant,
}

impl Drop for ProfGuard<'_> {
    fn drop(&mut self) {
        let dt = self.start.elapsed().as_secs_f64();
        let mut v = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        match v.iter_mut().find(|e| e.0 == self.key) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => v.push((std::mem::take(&mut self.key), dt, 1)),
        }
    }
}

/// A raw pointer that may be shared with pool threads writing disjoint ranges.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: used only to hand out non-overlapping sub-slices to different threads within
// one parallel region; the owning `&mut` borrow outlives the region (also when a chunk
// panics: `run_chunks` returns or unwinds only after every thread has left the region).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// # Safety
    /// The range must lie inside the original slice and no two threads may get
    /// overlapping ranges during the same region.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        // SAFETY: guaranteed by the caller (see above).
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's bf16-rounded token tile (`bf16_acts` matmuls).
    static BF16_ACTS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// Each thread's prepared token tile for the blocked prefill kernels.
    static TILE: RefCell<quant::q8::TokenTile> = RefCell::new(quant::q8::TokenTile::new());
}

/// Runs `f` with a thread-local scratch buffer of at least `len` floats; it only
/// allocates when a larger size is first needed, never per token in steady state.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

impl CpuBackend {
    pub fn new(n_threads: usize) -> CpuBackend {
        Self::with_options(n_threads, false, false)
    }

    /// `profile`: time every op; `kv_f32`: keep the KV cache in f32 rather than f16.
    pub fn with_options(n_threads: usize, profile: bool, kv_f32: bool) -> CpuBackend {
        CpuBackend {
            kv_f32,
            f32_acts: false,
            bf16_acts: false,
            attn_partial: Default::default(),
            attn_span: ops::ATTN_SPAN,
            paged: Default::default(),
            pool: ThreadPool::new(n_threads),
            acts: Default::default(),
            moe: Default::default(),
            profile: profile.then(Default::default),
        }
    }

    /// Keep activations in f32 for every matmul (see the field); for measuring what a
    /// weight format alone costs, or for the last bit of accuracy.
    pub fn with_f32_activations(mut self, on: bool) -> CpuBackend {
        self.f32_acts = on;
        self
    }

    /// Round the activations of BF16-weight matmuls to bf16 and dot them with AVX-512
    /// BF16's `vdpbf16ps` (where the CPU has it; elsewhere, or with
    /// [`with_f32_activations`](Self::with_f32_activations), they stay f32). The prefill
    /// GEMM runs 2-4x the f32-activation kernel's GFLOP/s (Zen 4), at the cost of the
    /// activations' rounding (relative 2⁻⁹ per element, as llama.cpp's BF16 path rounds
    /// them): prefill and decode round the same way,
    /// so they still agree bit for bit. Off by default: the rounding moves the logits of
    /// the `llama_bf16` parity fixture past its 1e-3 bound against transformers' f32.
    pub fn with_bf16_activations(mut self, on: bool) -> CpuBackend {
        self.bf16_acts = on;
        self
    }

    fn act_mode(&self) -> ActMode {
        ActMode {
            f32: self.f32_acts,
            bf16: self.bf16_acts,
        }
    }

    /// Positions per span of `attention_step` (default `ops::ATTN_SPAN`). It is part of
    /// the arithmetic: results are batch-invariant among backends with the same span, and
    /// differ in the last bits between spans. For tests (many spans from short contexts)
    /// and measurement.
    pub fn with_attn_span(mut self, span: usize) -> CpuBackend {
        assert!(span >= 1, "attention span of at least one position");
        self.attn_span = span;
        self
    }

    /// A backend that times every op (for `ffai bench --profile`).
    pub fn with_profiling(n_threads: usize) -> CpuBackend {
        Self::with_options(n_threads, true, false)
    }

    #[inline]
    fn prof(&self, key: impl FnOnce() -> String) -> Option<ProfGuard<'_>> {
        self.profile.as_ref().map(|sink| ProfGuard {
            sink,
            key: key(),
            start: std::time::Instant::now(),
        })
    }

    /// Mean wall time of one empty parallel region (wake every worker, wait for all):
    /// the fixed cost each parallel op pays.
    pub fn region_overhead_seconds(&self, regions: usize) -> f64 {
        let t = std::time::Instant::now();
        for _ in 0..regions {
            self.pool.run(|i, _| {
                std::hint::black_box(i);
            });
        }
        t.elapsed().as_secs_f64() / regions.max(1) as f64
    }

    /// Runs `f(t)` for each of `n` rows of `width` elements: on the pool when there is
    /// enough work to pay for a region (prefill), inline otherwise (decode).
    fn for_rows(&self, n: usize, width: usize, f: impl Fn(usize) + Sync) {
        if n * width < PARALLEL_MIN {
            (0..n).for_each(f);
        } else {
            self.pool.for_ranges(n, 1, |r| r.for_each(&f));
        }
    }

    /// Runs `f(range)` over `0..len` in spans, on the pool when `len` is large.
    fn for_spans(&self, len: usize, f: impl Fn(Range<usize>) + Sync) {
        if len < PARALLEL_MIN {
            f(0..len);
        } else {
            self.pool.for_ranges(len, 1024, f);
        }
    }

    /// `attention_step` (and `attention_mla_step`) for one element type of the pools.
    /// `vd`: the value width (`head_dim`, or a prefix of the V row for MLA); `chunk`: the
    /// query heads one work unit takes (the GQA group, or for MLA's single KV head a
    /// divisor of all heads of at most 8, so the SIMD score kernels take them).
    #[allow(clippy::too_many_arguments)]
    fn attention_paged<T: ops::KvElem>(
        &self,
        q: &[f32],
        k: &[T],
        v: &[T],
        n: usize,
        step: &CpuStep,
        gi: usize,
        s: &AttnShape,
        sinks: Option<&[f32]>,
        (vd, chunk): (usize, usize),
        out: &mut [f32],
    ) {
        let g = step.group(gi);
        let (hd, kvh_n) = (s.head_dim, s.n_kv_heads);
        assert!(
            kvh_n > 0 && s.n_heads.is_multiple_of(kvh_n),
            "{} query heads over {kvh_n} KV heads",
            s.n_heads
        );
        let group = s.n_heads / kvh_n;
        assert!(
            chunk >= 1 && group.is_multiple_of(chunk) && chunk <= crate::backend::MAX_GQA_GROUP,
            "at most {} query heads per KV head",
            crate::backend::MAX_GQA_GROUP
        );
        assert!(vd >= 1 && vd <= hd, "value width {vd} outside 1..={hd}");
        assert!(chunk == group || sinks.is_none(), "sinks with split head groups");
        // Work units per row: each takes `chunk` heads of one KV head.
        let units = s.n_heads / chunk;
        assert_eq!(
            n,
            step.n_rows(),
            "attention_step over {n} rows of a {}-row step",
            step.n_rows()
        );
        assert_eq!(s.window, g.window, "the layer's window differs from its KV group's");
        let pool_len = g.n_blocks * g.block_size * kvh_n * hd;
        assert!(
            k.len() == pool_len && v.len() == pool_len,
            "KV pools of {} / {} elements, the group's geometry needs {pool_len}",
            k.len(),
            v.len()
        );
        let (qw, ow) = (s.n_heads * hd, s.n_heads * vd);
        assert!(
            q.len() >= n * qw && out.len() >= n * ow,
            "attention_step buffers too small"
        );
        assert!(
            sinks.is_none_or(|x| x.len() >= s.n_heads),
            "attention sinks shorter than the {} heads",
            s.n_heads
        );
        let sinks = sinks.map(|x| &x[..s.n_heads]);
        let span = self.attn_span;
        let view = |seq: u32| {
            let sr = &g.seqs[seq as usize];
            ops::PagedAttn {
                k,
                v,
                table: &g.tables[sr.table_start as usize..sr.table_start as usize + sr.table_len as usize],
                block_size: g.block_size,
                kv_heads: kvh_n,
                head_dim: hd,
                v_dim: vd,
                scale: s.scale,
                softcap: s.softcap,
                window: g.window,
                span,
                sinks,
            }
        };
        for (r, &o) in step.row_seq.iter().enumerate() {
            if o == u32::MAX {
                out[r * ow..(r + 1) * ow].fill(0.0);
            }
        }

        // Work items. Scheduling only: which thread computes which spans never changes a
        // row's arithmetic (see `ops::PagedAttn`). A row's spans go to one item unless
        // that item would hold more than about 1/(4 · threads) of all the work (a long
        // decode row among few), then to pieces whose partials are folded afterwards.
        let nt = self.pool.n_threads();
        let total_spans: usize = g
            .seqs
            .iter()
            .enumerate()
            .map(|(si, sr)| {
                let a = view(si as u32);
                let p0 = step.positions[sr.first_row as usize] as usize;
                (p0..p0 + sr.n_rows as usize).map(|p| a.spans(p).len()).sum::<usize>()
            })
            .sum::<usize>()
            * units;
        let max_sp = if nt == 1 {
            usize::MAX
        } else {
            total_spans.div_ceil(4 * nt).max(1)
        };
        let stride = chunk * (vd + 2);
        let mut work = self.paged.lock().unwrap_or_else(|e| e.into_inner());
        let work = &mut *work;
        work.items.clear();
        work.splits.clear();
        let mut partial_len = 0;
        // Sequence, then KV head, then row: neighbouring items read the same head's
        // blocks, which a thread's chunk then keeps in cache.
        for (si, sr) in g.seqs.iter().enumerate() {
            let a = view(si as u32);
            for kvh in 0..units {
                for row in sr.first_row..sr.first_row + sr.n_rows {
                    let ks = a.spans(step.positions[row as usize] as usize);
                    let mut item = AttnItem {
                        seq: si as u32,
                        row,
                        kvh: kvh as u32,
                        k_lo: ks.start as u32,
                        k_hi: ks.end as u32,
                        split: u32::MAX,
                    };
                    if ks.len() <= max_sp {
                        work.items.push(item);
                        continue;
                    }
                    let pieces = ks.len().div_ceil(max_sp);
                    item.split = work.splits.len() as u32;
                    work.splits.push(AttnSplit {
                        seq: si as u32,
                        row,
                        kvh: kvh as u32,
                        k0: ks.start as u32,
                        k1: ks.end as u32,
                        base: partial_len,
                        remaining: AtomicU32::new(pieces as u32),
                    });
                    partial_len += ks.len() * stride;
                    for i in 0..pieces {
                        let r = crate::pool::split_range(ks.len(), i, pieces, 1);
                        item.k_lo = (ks.start + r.start) as u32;
                        item.k_hi = (ks.start + r.end) as u32;
                        work.items.push(item);
                    }
                }
            }
        }
        if work.partial.len() < partial_len {
            work.partial.resize(partial_len, 0.0);
        }
        // Chunks of about equal cost (positions attended), claimed dynamically.
        let cost = |it: &AttnItem| {
            let p = step.positions[it.row as usize] as usize;
            let a = view(it.seq);
            let (lo, hi) = (it.k_lo as usize, it.k_hi as usize - 1);
            a.span_positions(hi, p).end - a.span_positions(lo, p).start + ITEM_COST
        };
        let total_cost: usize = work.items.iter().map(cost).sum();
        let n_chunks = work.items.len().min(4 * nt);
        work.bounds.clear();
        work.bounds.push(0);
        let mut acc = 0;
        for (i, it) in work.items.iter().enumerate() {
            acc += cost(it);
            let next = work.bounds.len();
            if next < n_chunks && acc * n_chunks >= total_cost * next {
                work.bounds.push(i + 1);
            }
        }
        work.bounds.push(work.items.len());

        let (items, bounds, splits) = (&work.items, &work.bounds, &work.splits);
        let part_ptr = SharedMut(work.partial.as_mut_ptr());
        let out_ptr = SharedMut(out.as_mut_ptr());
        let scratch_len = ops::paged_row_scratch(chunk, hd, span);
        self.pool.run_chunks(bounds.len() - 1, |c| {
            with_scratch(scratch_len, |scratch| {
                SEGS.with(|segs| {
                    let segs = &mut *segs.borrow_mut();
                    for it in &items[bounds[c]..bounds[c + 1]] {
                        // `it.kvh` is the work unit: heads `u * chunk..` of KV head
                        // `u * chunk / group`.
                        let (row, u) = (it.row as usize, it.kvh as usize);
                        let kvh = u * chunk / group;
                        let p = step.positions[row] as usize;
                        let a = view(it.seq);
                        let q_off = row * qw + u * chunk * hd;
                        let o_off = row * ow + u * chunk * vd;
                        let qs = &q[q_off..q_off + chunk * hd];
                        if it.split == u32::MAX {
                            // SAFETY: sequences own disjoint rows (validated by
                            // `write_step`), and each (row, unit) has exactly one
                            // unsplit item, so this group of heads of this row is written
                            // by this thread alone; it lies inside `out[..n * ow]`.
                            let o = unsafe { out_ptr.slice(o_off, chunk * vd) };
                            a.attend_row(qs, chunk, kvh, p, segs, scratch, o);
                            continue;
                        }
                        let sp = &splits[it.split as usize];
                        let scores = &mut scratch[..chunk * span];
                        for k in it.k_lo..it.k_hi {
                            let base = sp.base + (k - sp.k0) as usize * stride;
                            // SAFETY: each span of each split (row, KV head) has its own
                            // `stride` floats in `partial` (laid out above, inside its
                            // length), and exactly one item computes each span.
                            let (po, st) = unsafe {
                                (
                                    part_ptr.slice(base, chunk * vd),
                                    part_ptr.slice(base + chunk * vd, 2 * chunk),
                                )
                            };
                            a.span_partial(qs, chunk, kvh, k as usize, p, segs, scores, po, st);
                        }
                        // The last piece to finish folds every span in order. AcqRel: the
                        // pieces' partial writes (released by their decrements) are
                        // visible to whichever thread sees the count reach zero.
                        if sp.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
                            continue;
                        }
                        debug_assert!(sp.seq == it.seq && sp.row == it.row && sp.kvh == it.kvh);
                        // SAFETY: as for an unsplit item, this (row, unit) output is
                        // written only here, by the one thread that ended the count.
                        let o = unsafe { out_ptr.slice(o_off, chunk * vd) };
                        let mut stats = [0f32; 2 * crate::backend::MAX_GQA_GROUP];
                        for k in sp.k0..sp.k1 {
                            let base = sp.base + (k - sp.k0) as usize * stride;
                            // SAFETY: every piece of this split is done (the count reached
                            // zero), so nobody writes these partials any more; reading
                            // them through the shared pointer does not alias a live `&mut`.
                            let (po, st) = unsafe {
                                (
                                    &*part_ptr.slice(base, chunk * vd),
                                    &*part_ptr.slice(base + chunk * vd, 2 * chunk),
                                )
                            };
                            ops::fold_span(o, &mut stats[..2 * chunk], po, st, chunk, k == sp.k0);
                        }
                        ops::finish_fold(o, &stats[..2 * chunk], chunk, a.group_sinks(kvh, chunk));
                    }
                })
            })
        });
    }

    /// Accumulated (op, seconds, calls), most expensive first; clears the counters.
    pub fn take_profile(&self) -> Vec<(String, f64, u64)> {
        let Some(p) = &self.profile else { return Vec::new() };
        let mut v = std::mem::take(&mut *p.lock().unwrap_or_else(|e| e.into_inner()));
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// Threads available on this machine.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }
}

/// The machine's physical memory (Linux: MemTotal of /proc/meminfo). Where it cannot be
/// read, 1 TiB: large enough for any real state, small enough that a size computed from a
/// hostile config is still refused before the allocator aborts on it.
pub fn physical_memory_bytes() -> u64 {
    // Read once: it is checked on every forward.
    static BYTES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BYTES.get_or_init(read_physical_memory_bytes)
}

fn read_physical_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb.saturating_mul(1024))
        .unwrap_or(1 << 40)
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Mat = CpuMatrix;
    type Kv = KvCache;

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.pool.n_threads())
    }

    fn matrix(&self, ty: WeightType, rows: usize, cols: usize, data: HostBytes) -> CpuMatrix {
        let row_bytes = ty.row_bytes(cols).expect("matrix row length validated by the loader");
        assert_eq!(data.len(), row_bytes * rows, "matrix byte size validated by the loader");
        CpuMatrix {
            ty,
            rows,
            cols,
            row_bytes,
            data,
        }
    }

    fn mat_shape(&self, m: &CpuMatrix) -> (usize, usize) {
        (m.rows, m.cols)
    }

    fn mat_type(&self, m: &CpuMatrix) -> WeightType {
        m.ty
    }

    fn alloc(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }

    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }

    fn memory_bytes(&self) -> u64 {
        physical_memory_bytes()
    }

    fn kv_elem_bytes(&self) -> usize {
        if self.kv_f32 {
            4
        } else {
            2
        }
    }

    fn download(&self, buf: &Vec<f32>, range: Range<usize>, out: &mut [f32]) {
        out.copy_from_slice(&buf[range]);
    }

    fn buf_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn copy(&self, src: &Vec<f32>, src_off: usize, dst: &mut Vec<f32>, dst_off: usize, len: usize) {
        dst[dst_off..dst_off + len].copy_from_slice(&src[src_off..src_off + len]);
    }

    fn copy_rows(
        &self,
        src: &Vec<f32>,
        src_stride: usize,
        src_off: usize,
        dst: &mut Vec<f32>,
        dst_stride: usize,
        dst_off: usize,
        width: usize,
        rows: usize,
    ) {
        if rows == 0 || width == 0 {
            return;
        }
        assert!(
            src_off + width <= src_stride.max(width) && dst_off + width <= dst_stride.max(width),
            "copy_rows: columns {src_off}+{width} / {dst_off}+{width} outside rows of {src_stride} / {dst_stride}"
        );
        let (last_s, last_d) = ((rows - 1) * src_stride + src_off, (rows - 1) * dst_stride + dst_off);
        assert!(
            last_s + width <= src.len() && last_d + width <= dst.len(),
            "copy_rows: buffers too small"
        );
        for r in 0..rows {
            let (a, b) = (r * src_stride + src_off, r * dst_stride + dst_off);
            dst[b..b + width].copy_from_slice(&src[a..a + width]);
        }
    }

    fn embed(&self, table: &CpuMatrix, ids: &[u32], out: &mut Vec<f32>) {
        let _p = self.prof(|| "embed".into());
        let d = table.cols;
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            assert!(
                id < table.rows,
                "token id {id} outside the embedding table ({} rows)",
                table.rows
            );
            quant::dequantize_row(table.ty, table.row(id), &mut out[t * d..(t + 1) * d]);
        }
    }

    fn matmul(&self, w: &CpuMatrix, x: &Vec<f32>, n: usize, out: &mut Vec<f32>) {
        self.matmuls(&[w], x, n, &mut [out]);
    }

    fn matmuls(&self, ws: &[&CpuMatrix], x: &Vec<f32>, n: usize, outs: &mut [&mut Vec<f32>]) {
        let _p = self.prof(|| {
            let names: Vec<String> = ws.iter().map(|w| format!("{}x{}", w.rows, w.cols)).collect();
            format!("matmul {} {}", names.join("+"), ws[0].ty.name())
        });
        assert!(
            ws.len() == outs.len() && !ws.is_empty() && ws.len() <= MAX_GROUP,
            "1..={MAX_GROUP} matrices per group"
        );
        let cols = ws[0].cols;
        assert!(x.len() >= n * cols, "matmul input too small");
        let mut out_ptrs = [SharedMut(std::ptr::null_mut()); MAX_GROUP];
        for (k, (w, o)) in ws.iter().zip(outs.iter_mut()).enumerate() {
            assert!(w.cols == cols && o.len() >= n * w.rows, "matmul group shapes disagree");
            out_ptrs[k] = SharedMut(o.as_mut_ptr());
        }
        // Quantize the activations once per format the group needs (usually one).
        let mut acts = self.acts.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = [false; 3];
        for w in ws {
            if let Some(slot) = act_slot(w.ty, self.f32_acts) {
                if !done[slot] {
                    acts[slot].quantize(w.ty, &x[..n * cols], n, cols);
                    done[slot] = true;
                }
            }
        }
        let acts = &*acts;
        let mode = self.act_mode();
        let x = &x[..n * cols];
        let total: usize = ws.iter().map(|w| w.rows).sum();
        self.pool.for_ranges(total, 16, |r| {
            // Walk the matrices whose global row span overlaps this thread's range.
            let mut base = 0;
            for (k, w) in ws.iter().enumerate() {
                let lo = r.start.max(base);
                let hi = r.end.min(base + w.rows);
                if lo < hi {
                    matmul_rows(w, x, 0..n, acts, mode, lo - base..hi - base, out_ptrs[k]);
                }
                base += w.rows;
            }
        });
    }

    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>, n: usize) {
        let _p = self.prof(|| "add_bias".into());
        let d = bias.len();
        for t in 0..n {
            ops::add_inplace(&mut x[t * d..(t + 1) * d], bias);
        }
    }

    fn rms_norm(&self, x: &Vec<f32>, w: &Vec<f32>, eps: f32, n: usize, out: &mut Vec<f32>) {
        let _p = self.prof(|| "rms_norm".into());
        let d = w.len();
        let op = SharedMut(out.as_mut_ptr());
        assert!(out.len() >= n * d);
        self.for_rows(n, d, |t| {
            // SAFETY: each row is handed to exactly one thread, inside `out[..n * d]`.
            let o = unsafe { op.slice(t * d, d) };
            ops::rms_norm(&x[t * d..(t + 1) * d], w, eps, o);
        });
    }

    fn layer_norm(&self, x: &Vec<f32>, w: &Vec<f32>, b: &Vec<f32>, eps: f32, n: usize, out: &mut Vec<f32>) {
        let _p = self.prof(|| "layer_norm".into());
        let d = w.len();
        for t in 0..n {
            ops::layer_norm(&x[t * d..(t + 1) * d], w, b, eps, &mut out[t * d..(t + 1) * d]);
        }
    }

    fn gelu(&self, x: &mut Vec<f32>, len: usize) {
        let _p = self.prof(|| "gelu".into());
        for v in &mut x[..len] {
            *v = ops::gelu_tanh(*v);
        }
    }

    fn scale(&self, x: &mut Vec<f32>, s: f32, len: usize) {
        for v in &mut x[..len] {
            *v *= s;
        }
    }

    fn add_scaled(&self, x: &mut Vec<f32>, y: &Vec<f32>, alpha: f32, len: usize) {
        let _p = self.prof(|| "add".into());
        for (a, &b) in x[..len].iter_mut().zip(&y[..len]) {
            *a += alpha * b;
        }
    }

    fn softcap(&self, x: &mut Vec<f32>, cap: f32, len: usize) {
        let inv = 1.0 / cap;
        for v in &mut x[..len] {
            *v = cap * (*v * inv).tanh();
        }
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>, len: usize) {
        let _p = self.prof(|| "silu_mul".into());
        let gp = SharedMut(gate.as_mut_ptr());
        self.for_spans(len, |r| {
            // SAFETY: spans are disjoint and inside `gate[..len]`.
            ops::silu_mul(unsafe { gp.slice(r.start, r.len()) }, &up[r]);
        });
    }

    fn gelu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>, len: usize) {
        let _p = self.prof(|| "gelu_mul".into());
        let gp = SharedMut(gate.as_mut_ptr());
        self.for_spans(len, |r| {
            // SAFETY: spans are disjoint and inside `gate[..len]`.
            ops::gelu_mul(unsafe { gp.slice(r.start, r.len()) }, &up[r]);
        });
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) {
        let _p = self.prof(|| "add".into());
        ops::add_inplace(&mut x[..len], &y[..len]);
    }

    fn argmax(&self, buf: &Vec<f32>, range: Range<usize>) -> u32 {
        ops::argmax(&buf[range]).0 as u32
    }

    fn top_candidates_rows(
        &self,
        buf: &Vec<f32>,
        n: usize,
        width: usize,
        k: usize,
        inv_t: &[f32],
        mask: Option<&[u32]>,
        ids: &mut [u32],
        vals: &mut [f32],
        tail: &mut [f64],
    ) {
        let _p = self.prof(|| "top_candidates_rows".into());
        let wpr = width.div_ceil(32);
        crate::backend::check_candidate_args(buf.len(), n, width, k, inv_t, mask, ids, vals, tail);
        // The rows in place (the trait's default copies each row out first).
        for r in 0..n {
            let row = &buf[r * width..(r + 1) * width];
            let (i, v) = (&mut ids[r * k..(r + 1) * k], &mut vals[r * k..(r + 1) * k]);
            let m = mask.map(|m| &m[r * wpr..(r + 1) * wpr]);
            tail[r] = ops::top_candidates_masked(row, m, inv_t[r], k, i, v);
        }
    }

    fn swiglu_clamped(&self, gate: &mut Vec<f32>, up: &Vec<f32>, alpha: f32, limit: f32, len: usize) {
        let _p = self.prof(|| "swiglu_clamped".into());
        let gp = SharedMut(gate.as_mut_ptr());
        assert!(len <= gate.len() && len <= up.len(), "swiglu_clamped buffers too small");
        self.for_spans(len, |r| {
            // SAFETY: spans are disjoint and inside `gate[..len]` (checked above).
            ops::swiglu_clamped(unsafe { gp.slice(r.start, r.len()) }, &up[r], alpha, limit);
        });
    }

    fn clamp(&self, x: &mut Vec<f32>, lo: f32, hi: f32, len: usize) {
        for v in &mut x[..len] {
            *v = v.clamp(lo, hi);
        }
    }

    fn moe_route(
        &self,
        logits: &Vec<f32>,
        n: usize,
        n_experts: usize,
        k: usize,
        routing: &ops::MoeRouting,
        bias: Option<&Vec<f32>>,
        expert_scale: Option<&Vec<f32>>,
        ids: &mut Vec<f32>,
        weights: &mut Vec<f32>,
    ) {
        let _p = self.prof(|| "moe_route".into());
        if let Err(e) = routing.check(n_experts, k) {
            panic!("moe_route: {e}");
        }
        assert!(logits.len() >= n * n_experts && ids.len() >= n * k && weights.len() >= n * k);
        assert!(
            bias.is_none_or(|b| b.len() >= n_experts),
            "moe_route: bias shorter than the experts"
        );
        assert!(
            expert_scale.is_none_or(|s| s.len() >= n_experts),
            "moe_route: expert scales shorter than the experts"
        );
        let bias = bias.map(|b| &b[..n_experts]);
        let expert_scale = expert_scale.map(|s| &s[..n_experts]);
        let (ip, wp) = (SharedMut(ids.as_mut_ptr()), SharedMut(weights.as_mut_ptr()));
        self.for_rows(n, n_experts * k, |t| {
            // SAFETY: each row's k entries are handed to exactly one thread, inside the
            // first n * k of each buffer (checked above).
            let (i, w) = unsafe { (ip.slice(t * k, k), wp.slice(t * k, k)) };
            ops::moe_route_with(
                &logits[t * n_experts..(t + 1) * n_experts],
                bias,
                expert_scale,
                routing,
                i,
                w,
            );
        });
    }

    fn moe_matmuls(
        &self,
        experts: &[&[CpuMatrix]],
        x: &Vec<f32>,
        x_per_slot: bool,
        ids: &Vec<f32>,
        n: usize,
        k: usize,
        outs: &mut [&mut Vec<f32>],
    ) {
        let _p = self.prof(|| {
            let names: Vec<String> = experts.iter().map(|m| format!("{}x{}", m[0].rows, m[0].cols)).collect();
            format!("moe_matmul {} {}", names.join("+"), experts[0][0].ty.name())
        });
        assert!(
            experts.len() == outs.len() && !experts.is_empty() && experts.len() <= MAX_GROUP,
            "1..={MAX_GROUP} matrices per expert"
        );
        let n_experts = experts[0].len();
        let cols = experts[0][0].cols;
        for (m, o) in experts.iter().zip(outs.iter()) {
            assert!(
                m.len() == n_experts && n_experts > 0,
                "every matrix needs one per expert"
            );
            assert!(
                m.iter().all(|w| w.cols == cols && w.rows == m[0].rows),
                "experts' matrices differ in shape"
            );
            assert!(o.len() >= n * k * m[0].rows, "moe_matmuls output too small");
        }
        let slots = n * k;
        assert!(ids.len() >= slots && x.len() >= if x_per_slot { slots } else { n } * cols);
        let mut guard = self.moe.lock().unwrap_or_else(|e| e.into_inner());
        let work = &mut *guard;
        // Counting sort of the slots by expert (stable: token order within an expert).
        work.starts.clear();
        work.starts.resize(n_experts + 1, 0);
        for &e in &ids[..slots] {
            let e = e as usize;
            assert!(e < n_experts, "expert id {e} outside the {n_experts} experts");
            work.starts[e + 1] += 1;
        }
        for e in 0..n_experts {
            work.starts[e + 1] += work.starts[e];
        }
        work.order.clear();
        work.order.resize(slots, 0);
        work.next.clear();
        work.next.extend_from_slice(&work.starts[..n_experts]);
        for (s, &e) in ids[..slots].iter().enumerate() {
            let p = &mut work.next[e as usize];
            work.order[*p as usize] = s as u32;
            *p += 1;
        }
        // Gather the rows each sorted slot reads.
        work.xg.resize(slots * cols, 0.0);
        for (p, &s) in work.order.iter().enumerate() {
            let r = if x_per_slot { s as usize } else { s as usize / k };
            work.xg[p * cols..(p + 1) * cols].copy_from_slice(&x[r * cols..(r + 1) * cols]);
        }
        // Quantize the gathered rows once per activation format the matrices need.
        let mut acts = self.acts.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = [false; 3];
        for m in experts {
            if let Some(slot) = act_slot(m[0].ty, self.f32_acts) {
                if !done[slot] {
                    acts[slot].quantize(m[0].ty, &work.xg, slots, cols);
                    done[slot] = true;
                }
            }
        }
        let acts = &*acts;
        let mut out_ptrs = [SharedMut(std::ptr::null_mut()); MAX_GROUP];
        for (m, mats) in experts.iter().enumerate() {
            work.outs[m].resize(slots * mats[0].rows, 0.0);
            out_ptrs[m] = SharedMut(work.outs[m].as_mut_ptr());
        }
        // One region over every used expert's matrices' rows.
        work.pieces.clear();
        let mut total = 0;
        for e in 0..n_experts {
            if work.starts[e] < work.starts[e + 1] {
                for (m, mats) in experts.iter().enumerate() {
                    work.pieces.push((e as u32, m as u32));
                    total += mats[0].rows;
                }
            }
        }
        let (mode, xg, starts, pieces) = (self.act_mode(), &work.xg, &work.starts, &work.pieces);
        self.pool.for_ranges(total, 16, |r| {
            let mut base = 0;
            for &(e, m) in pieces {
                let (e, m) = (e as usize, m as usize);
                let w = &experts[m][e];
                let lo = r.start.max(base);
                let hi = r.end.min(base + w.rows);
                if lo < hi {
                    let tokens = starts[e] as usize..starts[e + 1] as usize;
                    matmul_rows(w, xg, tokens, acts, mode, lo - base..hi - base, out_ptrs[m]);
                }
                base += w.rows;
                if base >= r.end {
                    break;
                }
            }
        });
        // Back to slot order.
        for (m, out) in outs.iter_mut().enumerate() {
            let rows = experts[m][0].rows;
            let src = &work.outs[m];
            for (p, &s) in work.order.iter().enumerate() {
                let s = s as usize;
                out[s * rows..(s + 1) * rows].copy_from_slice(&src[p * rows..(p + 1) * rows]);
            }
        }
    }

    fn moe_add_bias(&self, x: &mut Vec<f32>, biases: &Vec<f32>, ids: &Vec<f32>, slots: usize, d: usize) {
        let _p = self.prof(|| "moe_add_bias".into());
        assert!(
            x.len() >= slots * d && ids.len() >= slots,
            "moe_add_bias buffers too small"
        );
        let n_experts = biases.len() / d.max(1);
        assert!(
            ids[..slots].iter().all(|&e| e >= 0.0 && (e as usize) < n_experts),
            "moe_add_bias: an expert id outside the {n_experts} biases"
        );
        ops::moe_add_bias(&mut x[..slots * d], biases, &ids[..slots], d);
    }

    fn moe_combine(&self, ys: &Vec<f32>, weights: &Vec<f32>, n: usize, k: usize, d: usize, out: &mut Vec<f32>) {
        let _p = self.prof(|| "moe_combine".into());
        assert!(ys.len() >= n * k * d && weights.len() >= n * k && out.len() >= n * d);
        let op = SharedMut(out.as_mut_ptr());
        self.for_rows(n, k * d, |t| {
            // SAFETY: each row is handed to exactly one thread, inside `out[..n * d]`.
            let o = unsafe { op.slice(t * d, d) };
            ops::moe_combine(&ys[t * k * d..(t + 1) * k * d], &weights[t * k..(t + 1) * k], o);
        });
    }

    type Step = CpuStep;

    fn new_step(&self, max_rows: usize, max_seqs: usize, max_table: usize, n_groups: usize) -> CpuStep {
        CpuStep {
            caps: StepCaps {
                max_rows,
                max_seqs,
                max_table,
                n_groups,
            },
            positions: Vec::with_capacity(max_rows),
            groups: (0..n_groups)
                .map(|_| CpuGroup {
                    block_size: 0,
                    n_blocks: 0,
                    window: 0,
                    slots: Vec::with_capacity(max_rows),
                    seqs: Vec::with_capacity(max_seqs),
                    tables: Vec::with_capacity(max_table),
                })
                .collect(),
            n_groups: 0,
            row_seq: Vec::with_capacity(max_rows),
            state_slots: Vec::with_capacity(max_seqs),
            sort: Vec::with_capacity(max_rows),
        }
    }

    fn write_step(&self, layout: &StepLayout, step: &mut CpuStep) -> Result<(), String> {
        let caps = step.caps;
        if let Err(e) = layout.validate(&caps, &mut step.row_seq, &mut step.sort) {
            step.clear();
            return Err(e);
        }
        // Within the capacities just checked: no allocation.
        step.positions.clear();
        step.positions.extend_from_slice(&layout.positions);
        for (dst, src) in step.groups.iter_mut().zip(&layout.groups) {
            dst.block_size = src.block_size as usize;
            dst.n_blocks = src.n_blocks as usize;
            dst.window = src.window as usize;
            dst.slots.clear();
            dst.slots.extend_from_slice(&src.slots);
            dst.seqs.clear();
            dst.seqs.extend_from_slice(&src.seqs);
            dst.tables.clear();
            dst.tables.extend_from_slice(&src.block_tables);
        }
        step.n_groups = layout.groups.len();
        step.state_slots.clear();
        step.state_slots.extend_from_slice(&layout.state_slots);
        Ok(())
    }

    fn alloc_kv_pages(&self, n_blocks: usize, block_size: usize, kv_heads: usize, head_dim: usize) -> KvCache {
        let len = n_blocks
            .checked_mul(block_size)
            .and_then(|x| x.checked_mul(kv_heads))
            .and_then(|x| x.checked_mul(head_dim))
            .expect("KV pool size overflows");
        self.alloc_kv(len)
    }

    fn rope_step(
        &self,
        x: &mut Vec<f32>,
        n: usize,
        n_heads: usize,
        head_dim: usize,
        step: &CpuStep,
        rope: &RopeParams<'_, Self>,
    ) {
        let _p = self.prof(|| "rope".into());
        assert_eq!(
            n,
            step.n_rows(),
            "rope_step over {n} rows of a {}-row step",
            step.n_rows()
        );
        let w = n_heads * head_dim;
        assert!(x.len() >= n * w, "rope_step input too small");
        let (xp, inv) = (SharedMut(x.as_mut_ptr()), &rope.inv_freq[..]);
        // Each row on its own: the same rotation as `rope` at that position, whatever
        // else is in the batch.
        self.for_rows(n, w, |t| {
            // SAFETY: each row is handed to exactly one thread, inside `x[..n * w]`.
            let row = unsafe { xp.slice(t * w, w) };
            ops::rope(row, n_heads, head_dim, step.positions[t] as usize, inv, rope.neox);
        });
    }

    fn kv_write_step(
        &self,
        cache: &mut KvCache,
        src: &Vec<f32>,
        n: usize,
        step: &CpuStep,
        group: usize,
        s: &AttnShape,
    ) {
        let _p = self.prof(|| "kv_write".into());
        let g = step.group(group);
        assert_eq!(
            n,
            step.n_rows(),
            "kv_write_step of {n} rows into a {}-row step",
            step.n_rows()
        );
        let (hd, kvh_n, bs) = (s.head_dim, s.n_kv_heads, g.block_size);
        let width = kvh_n * hd;
        let pool_len = g.n_blocks * bs * width;
        let len = match cache {
            KvCache::F16(c) => c.len(),
            KvCache::F32(c) => c.len(),
        };
        assert_eq!(
            len, pool_len,
            "a KV pool of {len} elements, the group's geometry needs {pool_len}"
        );
        assert!(src.len() >= n * width, "kv_write_step input too small");
        for (t, &slot) in g.slots.iter().enumerate() {
            if slot == NO_BLOCK {
                continue; // padding row
            }
            let (block, off) = (slot as usize / bs, slot as usize % bs);
            for h in 0..kvh_n {
                let dst = ((block * kvh_n + h) * bs + off) * hd;
                let row = &src[t * width + h * hd..t * width + (h + 1) * hd];
                match cache {
                    KvCache::F16(c) => {
                        half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut c[dst..dst + hd], row)
                    }
                    KvCache::F32(c) => c[dst..dst + hd].copy_from_slice(row),
                }
            }
        }
    }

    fn attention_step(
        &self,
        q: &Vec<f32>,
        k: &KvCache,
        v: &KvCache,
        n: usize,
        step: &CpuStep,
        group: usize,
        s: &AttnShape,
        sinks: Option<&Vec<f32>>,
        out: &mut Vec<f32>,
    ) {
        let _p = self.prof(|| "attention".into());
        let sinks = sinks.map(|x| x.as_slice());
        match (k, v) {
            (KvCache::F16(k), KvCache::F16(v)) => self.attention_paged(
                q,
                k,
                v,
                n,
                step,
                group,
                s,
                sinks,
                (s.head_dim, s.n_heads / s.n_kv_heads.max(1)),
                out,
            ),
            (KvCache::F32(k), KvCache::F32(v)) => self.attention_paged(
                q,
                k,
                v,
                n,
                step,
                group,
                s,
                sinks,
                (s.head_dim, s.n_heads / s.n_kv_heads.max(1)),
                out,
            ),
            _ => panic!("K and V caches of different precision"),
        }
    }

    fn attention_mla_step(
        &self,
        q: &Vec<f32>,
        kv: &KvCache,
        n: usize,
        step: &CpuStep,
        group: usize,
        s: &AttnShape,
        v_dim: usize,
        out: &mut Vec<f32>,
    ) {
        let _p = self.prof(|| "attention_mla".into());
        assert_eq!(s.n_kv_heads, 1, "latent attention has one KV head");
        // Work units of up to 8 heads (the SIMD score kernels' widest group), a divisor of
        // the heads so every unit has the same shape.
        let chunk = (1..=8.min(s.n_heads))
            .rev()
            .find(|c| s.n_heads.is_multiple_of(*c))
            .unwrap_or(1);
        match kv {
            KvCache::F16(c) => self.attention_paged(q, c, c, n, step, group, s, None, (v_dim, chunk), out),
            KvCache::F32(c) => self.attention_paged(q, c, c, n, step, group, s, None, (v_dim, chunk), out),
        }
    }

    fn mul(&self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) {
        let _p = self.prof(|| "mul".into());
        let xp = SharedMut(x.as_mut_ptr());
        assert!(len <= x.len() && len <= y.len(), "mul out of range");
        self.for_spans(len, |r| {
            // SAFETY: spans are disjoint and inside `x[..len]`.
            let xs = unsafe { xp.slice(r.start, r.len()) };
            for (a, &b) in xs.iter_mut().zip(&y[r]) {
                *a *= b;
            }
        });
    }

    fn relu_sq(&self, x: &mut Vec<f32>, len: usize) {
        let _p = self.prof(|| "relu_sq".into());
        for v in &mut x[..len] {
            let r = v.max(0.0);
            *v = r * r;
        }
    }

    fn conv_step(
        &self,
        x: &Vec<f32>,
        n: usize,
        channels: usize,
        kernel: usize,
        w: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        silu: bool,
        state: &mut Vec<f32>,
        step: &CpuStep,
        out: &mut Vec<f32>,
    ) {
        let _p = self.prof(|| "conv_step".into());
        assert_eq!(
            n,
            step.n_rows(),
            "conv_step over {n} rows of a {}-row step",
            step.n_rows()
        );
        assert!(kernel >= 1 && w.len() == kernel * channels, "conv_step weight shape");
        assert!(bias.is_none_or(|b| b.len() == channels), "conv_step bias shape");
        assert!(x.len() >= n * channels && out.len() >= n * channels, "conv_step rows");
        let slot_len = (kernel - 1) * channels;
        let seqs = &step.group(0).seqs;
        assert_eq!(step.state_slots.len(), seqs.len(), "conv_step without state slots");
        let slots = state.len().checked_div(slot_len).unwrap_or(usize::MAX);
        assert!(
            step.state_slots.iter().all(|&s| (s as usize) < slots),
            "conv_step: a state slot outside the {slots} slots"
        );
        let (op, sp) = (SharedMut(out.as_mut_ptr()), SharedMut(state.as_mut_ptr()));
        let bias = bias.map(|b| b.as_slice());
        let run = |si: usize| {
            let sq = seqs[si];
            let (r0, nr) = (sq.first_row as usize, sq.n_rows as usize);
            let slot = step.state_slots[si] as usize;
            // SAFETY: sequences own disjoint rows and distinct slots (validated), so each
            // item's output rows and state slot are its own.
            let (o, st) = unsafe {
                (
                    op.slice(r0 * channels, nr * channels),
                    sp.slice(slot * slot_len, slot_len),
                )
            };
            with_scratch(slot_len, |scratch| {
                crate::ssm::conv_seq(
                    &x[r0 * channels..(r0 + nr) * channels],
                    nr,
                    channels,
                    kernel,
                    w,
                    bias,
                    silu,
                    step.positions[r0] as usize,
                    0,
                    channels,
                    st,
                    o,
                    scratch,
                )
            });
        };
        if n * channels * kernel < PARALLEL_MIN {
            (0..seqs.len()).for_each(run);
        } else {
            self.pool.for_ranges(seqs.len(), 1, |r| r.for_each(&run));
        }
    }

    fn ssm_scan_step(
        &self,
        xbc: &Vec<f32>,
        dt: &Vec<f32>,
        a: &Vec<f32>,
        d: &Vec<f32>,
        dt_bias: &Vec<f32>,
        n: usize,
        shape: &crate::ssm::SsmShape,
        state: &mut Vec<f32>,
        step: &CpuStep,
        out: &mut Vec<f32>,
    ) {
        let _p = self.prof(|| "ssm_scan".into());
        let sh = *shape;
        let (heads, hd, ns) = (sh.heads, sh.head_dim, sh.state);
        assert_eq!(
            n,
            step.n_rows(),
            "ssm_scan_step over {n} rows of a {}-row step",
            step.n_rows()
        );
        assert!(
            heads > 0
                && sh.groups > 0
                && heads.is_multiple_of(sh.groups)
                && a.len() == heads
                && d.len() == heads
                && dt_bias.len() == heads,
            "ssm_scan_step parameter shapes"
        );
        let width = sh.row_width();
        assert!(
            xbc.len() >= n * width && dt.len() >= n * heads && out.len() >= n * heads * hd,
            "ssm_scan_step rows"
        );
        let slot_len = sh.slot_len();
        let seqs = &step.group(0).seqs;
        assert_eq!(step.state_slots.len(), seqs.len(), "ssm_scan_step without state slots");
        let slots = state.len().checked_div(slot_len).unwrap_or(usize::MAX);
        assert!(
            step.state_slots.iter().all(|&s| (s as usize) < slots),
            "ssm_scan_step: a state slot outside the {slots} slots"
        );
        let (op, sp) = (SharedMut(out.as_mut_ptr()), SharedMut(state.as_mut_ptr()));
        let params = crate::ssm::SsmParams { a, d, dt_bias };
        let items = seqs.len() * heads;
        let run = |item: usize| {
            let (si, h) = (item / heads, item % heads);
            let sq = seqs[si];
            let (r0, nr) = (sq.first_row as usize, sq.n_rows as usize);
            let slot = step.state_slots[si] as usize;
            let head_len = hd * ns;
            // SAFETY: (sequence, head) items own distinct parts of distinct slots.
            let st = unsafe { sp.slice(slot * slot_len + h * head_len, head_len) };
            let scan = crate::ssm::scan_scratch(&sh);
            with_scratch(scan + nr * hd, |buf| {
                let (scratch, y) = buf.split_at_mut(scan);
                crate::ssm::scan_head(
                    &xbc[r0 * width..(r0 + nr) * width],
                    &dt[r0 * heads..(r0 + nr) * heads],
                    nr,
                    step.positions[r0] as usize,
                    h,
                    &sh,
                    &params,
                    st,
                    y,
                    scratch,
                );
                for t in 0..nr {
                    // SAFETY: row r0 + t's part of head h belongs to this item alone.
                    let o = unsafe { op.slice((r0 + t) * heads * hd + h * hd, hd) };
                    o.copy_from_slice(&y[t * hd..(t + 1) * hd]);
                }
            });
        };
        if n * heads * hd * ns < PARALLEL_MIN {
            (0..items).for_each(run);
        } else {
            self.pool.for_ranges(items, 1, |r| r.for_each(&run));
        }
    }

    fn sigmoid_mul(&self, x: &mut Vec<f32>, g: &Vec<f32>, len: usize) {
        let _p = self.prof(|| "sigmoid_mul".into());
        for (v, &gv) in x[..len].iter_mut().zip(&g[..len]) {
            *v *= crate::ssm::sigmoid(gv);
        }
    }

    fn gdn_step(
        &self,
        qkv: &Vec<f32>,
        b: &Vec<f32>,
        a: &Vec<f32>,
        a_neg: &Vec<f32>,
        dt_bias: &Vec<f32>,
        n: usize,
        shape: &crate::ssm::GdnShape,
        state: &mut Vec<f32>,
        step: &CpuStep,
        out: &mut Vec<f32>,
    ) {
        let _p = self.prof(|| "gdn".into());
        let sh = *shape;
        let (vh, dv) = (sh.v_heads, sh.v_dim);
        assert_eq!(
            n,
            step.n_rows(),
            "gdn_step over {n} rows of a {}-row step",
            step.n_rows()
        );
        assert!(
            sh.k_heads > 0 && vh.is_multiple_of(sh.k_heads) && a_neg.len() == vh && dt_bias.len() == vh,
            "gdn_step parameter shapes"
        );
        let width = sh.row_width();
        assert!(
            qkv.len() >= n * width && b.len() >= n * vh && a.len() >= n * vh && out.len() >= n * vh * dv,
            "gdn_step rows"
        );
        let slot_len = sh.slot_len();
        let seqs = &step.group(0).seqs;
        assert_eq!(step.state_slots.len(), seqs.len(), "gdn_step without state slots");
        let slots = state.len().checked_div(slot_len).unwrap_or(usize::MAX);
        assert!(
            step.state_slots.iter().all(|&s| (s as usize) < slots),
            "gdn_step: a state slot outside the {slots} slots"
        );
        let (op, sp) = (SharedMut(out.as_mut_ptr()), SharedMut(state.as_mut_ptr()));
        let run = |item: usize| {
            let (si, h) = (item / vh, item % vh);
            let sq = seqs[si];
            let (r0, nr) = (sq.first_row as usize, sq.n_rows as usize);
            let head_len = sh.k_dim * dv;
            // SAFETY: (sequence, head) items own distinct parts of distinct slots.
            let st = unsafe { sp.slice(step.state_slots[si] as usize * slot_len + h * head_len, head_len) };
            let need = crate::ssm::gdn_scratch(&sh);
            with_scratch(need + nr * dv, |buf| {
                let (scratch, y) = buf.split_at_mut(need);
                crate::ssm::gdn_head(
                    &qkv[r0 * width..(r0 + nr) * width],
                    &b[r0 * vh..(r0 + nr) * vh],
                    &a[r0 * vh..(r0 + nr) * vh],
                    nr,
                    step.positions[r0] as usize,
                    h,
                    &sh,
                    a_neg[h],
                    dt_bias[h],
                    st,
                    y,
                    scratch,
                );
                for t in 0..nr {
                    // SAFETY: row r0 + t's part of head h belongs to this item alone.
                    let o = unsafe { op.slice((r0 + t) * vh * dv + h * dv, dv) };
                    o.copy_from_slice(&y[t * dv..(t + 1) * dv]);
                }
            });
        };
        let items = seqs.len() * vh;
        if n * vh * sh.k_dim * dv < PARALLEL_MIN {
            (0..items).for_each(run);
        } else {
            self.pool.for_ranges(items, 1, |r| r.for_each(&run));
        }
    }

    fn rms_norm_gated(
        &self,
        x: &mut Vec<f32>,
        z: &Vec<f32>,
        w: &Vec<f32>,
        eps: f32,
        n: usize,
        group: usize,
        norm_first: bool,
    ) {
        let _p = self.prof(|| "rms_norm_gated".into());
        let d = w.len();
        assert!(group > 0 && d.is_multiple_of(group), "rms_norm_gated group");
        assert!(x.len() >= n * d && z.len() >= n * d, "rms_norm_gated rows");
        let xp = SharedMut(x.as_mut_ptr());
        self.for_rows(n, d, |t| {
            // SAFETY: each row is handed to exactly one thread, inside `x[..n * d]`.
            let row = unsafe { xp.slice(t * d, d) };
            crate::ssm::rms_norm_gated(row, &z[t * d..(t + 1) * d], w, eps, group, norm_first);
        });
    }

    fn copy_slot(&self, state: &mut Vec<f32>, slot_len: usize, src: usize, dst: usize) {
        let (s, d) = (src * slot_len, dst * slot_len);
        assert!(
            s + slot_len <= state.len() && d + slot_len <= state.len(),
            "copy_slot out of range"
        );
        state.copy_within(s..s + slot_len, d);
    }
}

/// The contiguous, one-sequence KV layout that came before paging. No model runs on it;
/// it stays as the reference the paged ops are tested against (tests/paged.rs, ops.rs)
/// and the baseline `paged_bench` times them against.
impl CpuBackend {
    /// A zeroed contiguous KV cache of `len` elements (f16, or f32 with `kv_f32`).
    pub fn alloc_kv(&self, len: usize) -> KvCache {
        if self.kv_f32 {
            KvCache::F32(vec![0.0; len])
        } else {
            KvCache::F16(vec![half::f16::ZERO; len])
        }
    }

    /// RoPE on `[n, n_heads * head_dim]`, token t at position `pos0 + t`.
    pub fn rope(
        &self,
        x: &mut [f32],
        n: usize,
        n_heads: usize,
        head_dim: usize,
        pos0: usize,
        rope: &RopeParams<'_, Self>,
    ) {
        let _p = self.prof(|| "rope".into());
        let w = n_heads * head_dim;
        let (xp, inv) = (SharedMut(x.as_mut_ptr()), &rope.inv_freq[..]);
        // Prefill chunks: tokens split over the pool; one token runs inline.
        self.for_rows(n, w, |t| {
            // SAFETY: each token row is handed to exactly one thread.
            let row = unsafe { xp.slice(t * w, w) };
            ops::rope(row, n_heads, head_dim, pos0 + t, inv, rope.neox);
        });
    }

    /// Writes `n` tokens of K (or V) into a contiguous cache `[kv_head, row, head_dim]`
    /// at `pos0` (row = position mod `shape.cap`).
    pub fn kv_write(&self, cache: &mut KvCache, src: &[f32], n: usize, pos0: usize, s: &AttnShape) {
        let _p = self.prof(|| "kv_write".into());
        assert!(
            n <= s.cap && (s.window > 0 || pos0 + n <= s.cap),
            "KV cache overflow: positions {pos0}..{} do not fit {} rows",
            pos0 + n,
            s.cap
        );
        let hd = s.head_dim;
        let width = s.n_kv_heads * hd;
        for t in 0..n {
            for h in 0..s.n_kv_heads {
                let dst = (h * s.cap + (pos0 + t) % s.cap) * hd;
                let row = &src[t * width + h * hd..t * width + (h + 1) * hd];
                match cache {
                    KvCache::F16(c) => {
                        half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut c[dst..dst + hd], row)
                    }
                    KvCache::F32(c) => c[dst..dst + hd].copy_from_slice(row),
                }
            }
        }
    }

    /// Causal attention of `n` queries at positions `pos0..pos0+n` over a contiguous cache
    /// (which already holds them), splitting a decode step's positions over threads
    /// (flash-decoding): its rounding depends on the thread count, unlike `attention_step`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &[f32],
        k: &KvCache,
        v: &KvCache,
        n: usize,
        pos0: usize,
        s: &AttnShape,
        out: &mut [f32],
    ) {
        let _p = self.prof(|| "attention".into());
        let hd = s.head_dim;
        let q_width = s.n_heads * hd;
        let group = s.n_heads / s.n_kv_heads;
        let max_visible = if s.window > 0 { s.window.min(pos0 + n) } else { pos0 + n };
        assert!(s.window > 0 || pos0 + n <= s.cap, "attention past the cache capacity");
        assert!(
            s.window == 0 || pos0 + n <= s.cap || s.window + n - 1 <= s.cap,
            "ring buffer smaller than window + chunk"
        );
        let kvh_n = s.n_kv_heads;
        assert!(
            group <= crate::backend::MAX_GQA_GROUP,
            "at most {} query heads per KV head",
            crate::backend::MAX_GQA_GROUP
        );
        // Work items are (token, KV head, part): each handles the whole GQA group of
        // its KV head, so K/V rows are read once per group. When there are too few
        // (decode: one token), the visible positions are split into parts whose partial
        // softmax results are merged afterwards (flash-decoding), so every thread works.
        let nt = self.pool.n_threads();
        let base_items = n * kvh_n;
        let parts = if base_items >= 4 * nt {
            1
        } else {
            (4 * nt).div_ceil(base_items).min(max_visible.div_ceil(64)).max(1)
        };
        let items = base_items * parts;
        let mut partial = self.attn_partial.lock().unwrap_or_else(|e| e.into_inner());
        if parts > 1 && partial.len() < items * group * (hd + 2) {
            partial.resize(items * group * (hd + 2), 0.0);
        }
        let part_ptr = SharedMut(partial.as_mut_ptr());
        let out_ptr = SharedMut(out.as_mut_ptr());
        self.pool.for_ranges(items, 1, |r| {
            with_scratch(group * max_visible, |scores| {
                let mut local_stats = [0f32; 128];
                for item in r.clone() {
                    let (tk, part) = (item / parts, item % parts);
                    let (t, kvh) = (tk / kvh_n, tk % kvh_n);
                    let n_ctx = pos0 + t + 1;
                    let first = if s.window > 0 {
                        n_ctx.saturating_sub(s.window)
                    } else {
                        0
                    };
                    let pr = crate::pool::split_range(n_ctx - first, part, parts, 1);
                    let (p_lo, p_hi) = (first + pr.start, first + pr.end);
                    // Positions p_lo..p_hi live in rows p % cap: one range, or two when
                    // the ring wrapped.
                    let (a, b) = (p_lo % s.cap, p_lo % s.cap + (p_hi - p_lo));
                    let rows = if b <= s.cap {
                        [a..b, 0..0]
                    } else {
                        [a..s.cap, 0..b - s.cap]
                    };
                    let head = ops::HeadAttn {
                        rows,
                        scale: s.scale,
                        softcap: s.softcap,
                    };
                    let q_off = t * q_width + kvh * group * hd;
                    let qs = &q[q_off..q_off + group * hd];
                    let span = kvh * s.cap * hd..(kvh + 1) * s.cap * hd;
                    // SAFETY: each item owns its output slice: the group's heads of one
                    // token (parts == 1), or its own slot of the partial buffer.
                    let (o, stats) = unsafe {
                        if parts == 1 {
                            (out_ptr.slice(q_off, group * hd), &mut local_stats[..2 * group])
                        } else {
                            let base = item * group * (hd + 2);
                            (
                                part_ptr.slice(base, group * hd),
                                part_ptr.slice(base + group * hd, 2 * group),
                            )
                        }
                    };
                    if p_hi == p_lo {
                        o.fill(0.0);
                        for g in 0..group {
                            stats[2 * g] = f32::NEG_INFINITY;
                            stats[2 * g + 1] = 0.0;
                        }
                        continue;
                    }
                    match (k, v) {
                        (KvCache::F16(k), KvCache::F16(v)) => {
                            ops::attend_group(qs, group, &k[span.clone()], &v[span], hd, &head, scores, o, stats)
                        }
                        (KvCache::F32(k), KvCache::F32(v)) => {
                            ops::attend_group(qs, group, &k[span.clone()], &v[span], hd, &head, scores, o, stats)
                        }
                        _ => panic!("K and V caches of different precision"),
                    }
                    if parts == 1 {
                        for g in 0..group {
                            let inv = 1.0 / stats[2 * g + 1];
                            o[g * hd..(g + 1) * hd].iter_mut().for_each(|x| *x *= inv);
                        }
                    }
                }
            });
        });
        if parts > 1 {
            let stride = group * (hd + 2);
            for tk in 0..base_items {
                let (t, kvh) = (tk / kvh_n, tk % kvh_n);
                for g in 0..group {
                    let slots = (0..parts).map(|p| {
                        let base = (tk * parts + p) * stride;
                        let o = &partial[base + g * hd..base + (g + 1) * hd];
                        let st = base + group * hd + 2 * g;
                        (o, partial[st], partial[st + 1])
                    });
                    let off = t * q_width + (kvh * group + g) * hd;
                    ops::merge_partials(slots, &mut out[off..off + hd]);
                }
            }
        }
    }
}
