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

use crate::backend::{AttnShape, Backend, HostBytes, RopeParams};
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

/// Rows `rows` of `out = x · wᵀ` for `n` tokens, on the calling thread.
fn matmul_rows(
    w: &CpuMatrix,
    x: &[f32],
    n: usize,
    acts: &[QuantizedActs; 3],
    f32_acts: bool,
    rows: Range<usize>,
    out: SharedMut,
) {
    let (n_rows, cols) = (w.rows, w.cols);
    match act_slot(w.ty, f32_acts) {
        Some(slot) if n == 1 => {
            // SAFETY: each thread writes only its own rows of the single output row.
            let o = unsafe { out.slice(rows.start, rows.len()) };
            let bytes = &w.data.as_slice()[rows.start * w.row_bytes..rows.end * w.row_bytes];
            quant::dot_rows_q8(w.ty, bytes, &acts[slot], 0, o);
        }
        Some(slot) => with_scratch(ROW_BLOCK * TOKEN_TILE, |tmp| {
            // Blocked: a block of weight rows against a tile of tokens at a time, so the
            // rows and the tile's activations both stay in L1 while every pair is dotted
            // (streaming all tokens per row would re-read them from L2 for every row).
            // Tokens outermost: each tile's activations are laid out once for all of
            // this thread's rows (the rows come back from L2, which is cheap).
            TILE.with(|tile| {
                let mut tile = tile.borrow_mut();
                for t0 in (0..n).step_by(TOKEN_TILE) {
                    let t1 = (t0 + TOKEN_TILE).min(n);
                    tile.prepare(w.ty, &acts[slot], t0..t1);
                    for rb in (rows.start..rows.end).step_by(ROW_BLOCK) {
                        let re = (rb + ROW_BLOCK).min(rows.end);
                        let bytes = &w.data.as_slice()[rb * w.row_bytes..re * w.row_bytes];
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
        None if n == 1 && matches!(w.ty, WeightType::F16 | WeightType::BF16) => {
            // SAFETY: as above, disjoint rows per thread.
            let o = unsafe { out.slice(rows.start, rows.len()) };
            // One token: the GEMM kernel widens the 16-bit weights with SIMD (`dot_row`
            // converts f16 through a stack buffer), same bits. (F32 needs no widening,
            // and `dot_row` streamed it from DRAM faster.)
            let bytes = &w.data.as_slice()[rows.start * w.row_bytes..rows.end * w.row_bytes];
            quant::dot_rows_multi(w.ty, bytes, x, cols, o);
        }
        None if n == 1 => {
            // SAFETY: as above, disjoint rows per thread.
            let o = unsafe { out.slice(rows.start, rows.len()) };
            for (k, row) in rows.enumerate() {
                o[k] = quant::dot_row(w.ty, w.row(row), x);
            }
        }
        None if !w.ty.is_quantized() => with_scratch(ROW_BLOCK * FLOAT_TOKEN_TILE, |tmp| {
            // Float weights: blocks of rows against tiles of tokens as for the integer
            // path (tokens outermost, so a tile's activations stay in L2 while the rows
            // pass), each block through the register-blocked GEMM kernel, which gives
            // exactly what `dot_row` (the decode path above) gives.
            for t0 in (0..n).step_by(FLOAT_TOKEN_TILE) {
                let t1 = (t0 + FLOAT_TOKEN_TILE).min(n);
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
            // for every token.
            for row in rows {
                quant::dequantize_row(w.ty, w.row(row), wrow);
                for t in 0..n {
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

pub struct CpuBackend {
    /// Store the KV cache in f32 instead of f16.
    kv_f32: bool,
    /// Dot quantized weights with the f32 activations (dequantizing the weights) instead
    /// of 8-bit activations: slower, and free of the activations' rounding.
    f32_acts: bool,
    /// Partial attention results (split decode attention), reused across calls.
    attn_partial: std::sync::Mutex<Vec<f32>>,
    pool: ThreadPool,
    /// Quantized activations, one buffer per activation format, reused by every matmul.
    acts: std::sync::Mutex<[QuantizedActs; 3]>,
    /// Per-op wall time, only when profiling was asked for (one branch per op otherwise).
    profile: Option<std::sync::Mutex<Vec<(String, f64, u64)>>>,
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
            attn_partial: Default::default(),
            pool: ThreadPool::new(n_threads),
            acts: Default::default(),
            profile: profile.then(Default::default),
        }
    }

    /// Keep activations in f32 for every matmul (see the field); for measuring what a
    /// weight format alone costs, or for the last bit of accuracy.
    pub fn with_f32_activations(mut self, on: bool) -> CpuBackend {
        self.f32_acts = on;
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

    fn alloc_kv(&self, len: usize) -> KvCache {
        if self.kv_f32 {
            KvCache::F32(vec![0.0; len])
        } else {
            KvCache::F16(vec![half::f16::ZERO; len])
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
        let f32_acts = self.f32_acts;
        let x = &x[..n * cols];
        let total: usize = ws.iter().map(|w| w.rows).sum();
        self.pool.for_ranges(total, 16, |r| {
            // Walk the matrices whose global row span overlaps this thread's range.
            let mut base = 0;
            for (k, w) in ws.iter().enumerate() {
                let lo = r.start.max(base);
                let hi = r.end.min(base + w.rows);
                if lo < hi {
                    matmul_rows(w, x, n, acts, f32_acts, lo - base..hi - base, out_ptrs[k]);
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

    fn rope(
        &self,
        x: &mut Vec<f32>,
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

    fn kv_write(&self, cache: &mut KvCache, src: &Vec<f32>, n: usize, pos0: usize, s: &AttnShape) {
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

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &KvCache,
        v: &KvCache,
        n: usize,
        pos0: usize,
        s: &AttnShape,
        out: &mut Vec<f32>,
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

    fn argmax(&self, buf: &Vec<f32>, range: Range<usize>) -> u32 {
        ops::argmax(&buf[range]).0 as u32
    }
}
