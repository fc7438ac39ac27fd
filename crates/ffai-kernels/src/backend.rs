//! The backend seam. Model code holds `B::Mat` weights and `B::Buf` activations and
//! calls these ops; the CPU backend implements them now, a CUDA backend later.
//!
//! Conventions: activations are row-major `[n_tokens, width]` f32; a weight matrix is
//! `[rows, cols]` (out x in, the Hugging Face orientation) in any `WeightType`; the KV
//! cache is paged: per layer a pool of blocks `[block][kv_head][offset][head_dim]`,
//! addressed through per-sequence block tables that a [`StepLayout`] carries into the
//! backend once per step (a lone sequence is a one-sequence step).

use std::ops::Range;
use std::sync::Arc;

use crate::quant::WeightType;

/// Bytes owned by something shared (a memory map, a Vec), viewed as a sub-range.
#[derive(Clone)]
pub struct HostBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl HostBytes {
    /// Panics if the range lies outside the owner; callers validate offsets first.
    pub fn new<T: AsRef<[u8]> + Send + Sync + 'static>(owner: Arc<T>, start: usize, len: usize) -> HostBytes {
        let total = (*owner).as_ref().len();
        assert!(start <= total && len <= total - start, "HostBytes range out of bounds");
        HostBytes { owner, start, len }
    }

    pub fn from_vec(v: Vec<u8>) -> HostBytes {
        let len = v.len();
        HostBytes {
            owner: Arc::new(v),
            start: 0,
            len,
        }
    }

    /// A sub-range of these bytes (panics when out of range; callers check sizes).
    pub fn slice(&self, start: usize, len: usize) -> HostBytes {
        assert!(
            start <= self.len && len <= self.len - start,
            "HostBytes slice out of bounds"
        );
        HostBytes {
            owner: self.owner.clone(),
            start: self.start + start,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Rotary embedding parameters for one layer kind: the per-pair inverse frequencies
/// (with any scaling folded in) and the pairing.
pub struct RopeParams<'a, B: Backend + ?Sized> {
    pub inv_freq: &'a B::Buf,
    pub neox: bool,
}

/// Per-head RMSNorm weights of q and k (`[head_dim]` each; Qwen3's `q_norm` / `k_norm`)
/// for [`Backend::qk_norm_rope_kv_write_step`].
pub struct HeadNorms<'a, B: Backend + ?Sized> {
    pub q: &'a B::Buf,
    pub k: &'a B::Buf,
    pub eps: f32,
}

/// [`Backend::qk_norm_rope_kv_write_step`] as separate ops: the norms into `scratch`,
/// which then trades places with `q` and `k`, then [`Backend::rope_kv_write_step`] (the
/// trait's default, and a fusing backend's fallback).
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_then_rope<B: Backend + ?Sized>(
    b: &B,
    q: &mut B::Buf,
    k: &mut B::Buf,
    v: &B::Buf,
    norms: &HeadNorms<'_, B>,
    scratch: (&mut B::Buf, &mut B::Buf),
    n: usize,
    step: &B::Step,
    rope: &RopeParams<'_, B>,
    k_cache: &mut B::Kv,
    v_cache: &mut B::Kv,
    group: usize,
    shape: &AttnShape,
) {
    b.rms_norm(q, norms.q, norms.eps, n * shape.n_heads, scratch.0);
    b.rms_norm(k, norms.k, norms.eps, n * shape.n_kv_heads, scratch.1);
    std::mem::swap(q, scratch.0);
    std::mem::swap(k, scratch.1);
    b.rope_kv_write_step(q, k, v, n, step, rope, k_cache, v_cache, group, shape);
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Rows in this layer's cache. Position p lives in row `p % cap`: a global layer has
    /// one row per position of the context; a sliding-window layer only
    /// `window + chunk` rows (a ring buffer), so its memory follows the window.
    pub cap: usize,
    /// 0 = full causal attention; otherwise each query sees the last `window` positions.
    pub window: usize,
    pub scale: f32,
    /// 0 = off; else attention scores are soft-capped: `c * tanh(s / c)`.
    pub softcap: f32,
}

/// Most query heads per KV head an attention kernel handles: it keeps a group's softmax
/// statistics (2 floats a head) in a fixed array of 128.
pub const MAX_GQA_GROUP: usize = 64;

/// A block-table entry for a block that holds nothing readable: a sliding-window group's
/// blocks that fell out of the window are freed and their entries set to this.
pub const NO_BLOCK: u32 = u32::MAX;

/// One sequence's rows in a step's flat batch, and where its block table lies in its
/// group's flattened `block_tables`. The rows `first_row..first_row + n_rows` are at
/// consecutive positions (`positions[first_row] + i`); the table maps position `p` to block
/// `table[p / block_size]`, offset `p % block_size`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqRows {
    pub first_row: u32,
    pub n_rows: u32,
    pub table_start: u32,
    pub table_len: u32,
}

/// One KV group of a step: the layers sharing an attention window share one paged pool
/// geometry and one block table per sequence.
#[derive(Clone, Debug, Default)]
pub struct GroupLayout {
    /// Positions per block of this group's pools (every layer of the group has a K and a V
    /// pool of `n_blocks` blocks; see [`Backend::alloc_kv_pages`]).
    pub block_size: u32,
    /// Blocks in each pool of the group: table entries and slots are checked against it
    /// once here, so the ops need not check them again.
    pub n_blocks: u32,
    /// The group's attention window (0 = all positions): decides which table entries the
    /// step reads (they must be live blocks) and which it never reads (may be
    /// [`NO_BLOCK`]). The ops check it equals their `AttnShape::window`.
    pub window: u32,
    /// Per row: where its K/V go, `block * block_size + offset`. It must be the slot the
    /// sequence's table gives for the row's position (the attention reads it back through
    /// the table); rows that belong to no sequence (padding) have [`NO_BLOCK`] and are
    /// not written.
    pub slots: Vec<u32>,
    /// The sequences; the same ones, in the same order and with the same rows, in every
    /// group (only their tables differ).
    pub seqs: Vec<SeqRows>,
    /// Every sequence's block ids, flattened.
    pub block_tables: Vec<u32>,
}

/// What one batched step needs besides the activations, built by the scheduler on the
/// host once per step and copied into a backend's [`Backend::Step`] with
/// [`Backend::write_step`]; every op of the step reads it from there.
///
/// Row `r` of a sequence, at position `p`, attends to positions
/// `max(0, p - window + 1)..=p` of its own sequence, all of which are in its blocks by
/// the time the attention runs (the step's own K/V are written first).
#[derive(Clone, Debug, Default)]
pub struct StepLayout {
    /// Per row: its position in its sequence (RoPE, and how far it attends).
    pub positions: Vec<u32>,
    pub groups: Vec<GroupLayout>,
    /// Per sequence (in the order of the groups' `seqs`), its recurrent-state slot
    /// (`0..n_state_slots`, each used by one sequence): where the recurrent ops read and
    /// write its conv/SSM state. Empty for models without recurrent layers.
    pub state_slots: Vec<u32>,
    /// Slots of the recurrent state arrays (checked here, so the ops need not).
    pub n_state_slots: u32,
}

/// The capacities a [`Backend::Step`] is allocated for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepCaps {
    pub max_rows: usize,
    pub max_seqs: usize,
    /// Entries of one group's flattened block tables.
    pub max_table: usize,
    pub n_groups: usize,
}

impl StepLayout {
    /// Checks everything the ops rely on (see [`Backend::write_step`]); `row_seq` gets,
    /// per row, the index of its sequence (or `u32::MAX` for padding rows), and `sort`
    /// is scratch. Both are cleared and refilled within `caps.max_rows`, so a caller that
    /// reserved that much never allocates here. Backends share this host-side check.
    pub fn validate(&self, caps: &StepCaps, row_seq: &mut Vec<u32>, sort: &mut Vec<u32>) -> Result<(), String> {
        let n = self.positions.len();
        if n > caps.max_rows {
            return Err(format!("{n} rows exceed the step's capacity of {}", caps.max_rows));
        }
        if self.groups.len() > caps.n_groups {
            return Err(format!(
                "{} KV groups exceed the step's capacity of {}",
                self.groups.len(),
                caps.n_groups
            ));
        }
        row_seq.clear();
        row_seq.resize(n, u32::MAX);
        for (gi, g) in self.groups.iter().enumerate() {
            let err = |m: String| Err(format!("group {gi}: {m}"));
            if g.slots.len() != n {
                return err(format!("{} slots for {n} rows", g.slots.len()));
            }
            if g.seqs.len() > caps.max_seqs {
                return err(format!(
                    "{} sequences exceed the capacity of {}",
                    g.seqs.len(),
                    caps.max_seqs
                ));
            }
            if g.block_tables.len() > caps.max_table {
                return err(format!(
                    "{} block-table entries exceed the capacity of {}",
                    g.block_tables.len(),
                    caps.max_table
                ));
            }
            if g.block_size == 0 || g.n_blocks == 0 || g.n_blocks == NO_BLOCK {
                return err(format!("block size {} and {} blocks", g.block_size, g.n_blocks));
            }
            // Slots are u32 and NO_BLOCK must never be a real slot.
            let n_slots = g.n_blocks as u64 * g.block_size as u64;
            if n_slots >= u32::MAX as u64 {
                return err(format!("{n_slots} slots do not fit a u32 slot id"));
            }
            if let Some(e) = g.block_tables.iter().find(|&&b| b != NO_BLOCK && b >= g.n_blocks) {
                return err(format!("block id {e} outside the pool of {} blocks", g.n_blocks));
            }
            if gi > 0 && g.seqs.len() != self.groups[0].seqs.len() {
                return err("a different number of sequences than group 0".into());
            }
            let bs = g.block_size as u64;
            for (si, s) in g.seqs.iter().enumerate() {
                let err = |m: String| Err(format!("group {gi} sequence {si}: {m}"));
                let (r0, nr) = (s.first_row as usize, s.n_rows as usize);
                if nr == 0 {
                    return err("no rows".into());
                }
                if r0 + nr > n {
                    return err(format!("rows {r0}..{} outside the step's {n} rows", r0 + nr));
                }
                if gi > 0 {
                    let s0 = &self.groups[0].seqs[si];
                    if (s0.first_row, s0.n_rows) != (s.first_row, s.n_rows) {
                        return err("rows differ from the same sequence's in group 0".into());
                    }
                } else {
                    for o in &mut row_seq[r0..r0 + nr] {
                        if *o != u32::MAX {
                            return err(format!("rows {r0}..{} overlap sequence {o}", r0 + nr));
                        }
                        *o = si as u32;
                    }
                }
                let p0 = self.positions[r0] as u64;
                for (i, &p) in self.positions[r0..r0 + nr].iter().enumerate() {
                    if p as u64 != p0 + i as u64 {
                        return err(format!("row {} at position {p}, not {}", r0 + i, p0 + i as u64));
                    }
                }
                let last = p0 + nr as u64 - 1;
                let (t0, tl) = (s.table_start as usize, s.table_len as usize);
                if t0 + tl > g.block_tables.len() {
                    return err(format!(
                        "table {t0}..{} outside the {} entries",
                        t0 + tl,
                        g.block_tables.len()
                    ));
                }
                if last / bs >= tl as u64 {
                    return err(format!("a table of {tl} blocks does not reach position {last}"));
                }
                let table = &g.block_tables[t0..t0 + tl];
                // The oldest position any row of the sequence reads: blocks before it may
                // be freed (NO_BLOCK); every block from it to the last row is read.
                let lo = if g.window == 0 {
                    0
                } else {
                    p0.saturating_sub(g.window as u64 - 1)
                };
                if let Some(j) = (lo / bs..=last / bs).find(|&j| table[j as usize] == NO_BLOCK) {
                    return err(format!(
                        "table entry {j} (positions {}..{}) is NO_BLOCK but is read",
                        j * bs,
                        (j + 1) * bs
                    ));
                }
                for (i, &slot) in g.slots[r0..r0 + nr].iter().enumerate() {
                    let p = p0 + i as u64;
                    let want = table[(p / bs) as usize] as u64 * bs + p % bs;
                    if slot as u64 != want {
                        return err(format!(
                            "row {} (position {p}) has slot {slot}, its table gives {want}",
                            r0 + i
                        ));
                    }
                }
            }
            for (r, (&slot, &o)) in g.slots.iter().zip(row_seq.iter()).enumerate() {
                if o == u32::MAX && slot != NO_BLOCK {
                    return err(format!("row {r} belongs to no sequence but has slot {slot}"));
                }
            }
            // Two rows writing one slot would race (and one would be lost).
            sort.clear();
            sort.extend(g.slots.iter().copied().filter(|&s| s != NO_BLOCK));
            sort.sort_unstable();
            if let Some(w) = sort.windows(2).find(|w| w[0] == w[1]) {
                return err(format!("slot {} is written by two rows", w[0]));
            }
        }
        if !self.state_slots.is_empty() {
            let n_seqs = self.groups.first().map_or(0, |g| g.seqs.len());
            if self.state_slots.len() != n_seqs {
                return Err(format!(
                    "{} recurrent-state slots for {n_seqs} sequences",
                    self.state_slots.len()
                ));
            }
            if let Some(s) = self.state_slots.iter().find(|&&s| s >= self.n_state_slots) {
                return Err(format!(
                    "recurrent-state slot {s} outside the {} slots",
                    self.n_state_slots
                ));
            }
            // Two sequences in one slot would overwrite each other's state.
            sort.clear();
            sort.extend_from_slice(&self.state_slots);
            sort.sort_unstable();
            if let Some(w) = sort.windows(2).find(|w| w[0] == w[1]) {
                return Err(format!("recurrent-state slot {} is used by two sequences", w[0]));
            }
        }
        Ok(())
    }
}

/// How a step's layer ops run this time (see [`Backend::begin_graph`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphMode {
    /// Enqueue the ops as usual.
    Eager,
    /// Enqueue the ops; they are recorded, not run, until [`Backend::end_graph`].
    Capture,
    /// A recording exists: enqueue nothing; [`Backend::end_graph`] replays it.
    Replay,
}

pub trait Backend: Send + Sync + 'static {
    type Buf: Send + Sync;
    type Mat: Send + Sync;
    /// One layer's K or V cache (half precision on CPU: half the memory traffic of f32).
    type Kv: Send + Sync;

    fn name(&self) -> String;
    /// The first error of an op since the backend started, if any. Ops return nothing
    /// (the CPU's cannot fail once their inputs are checked); a GPU's launch or allocation
    /// can, so it keeps the error, skips every later op, and callers check here after
    /// loading, allocating and each forward.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    // --- memory ---
    /// Bytes this backend can give to activations and KV caches (CPU: the machine's
    /// physical memory). Callers refuse a state larger than this before allocating it.
    fn memory_bytes(&self) -> u64;
    /// Bytes per element of a KV cache (2 for f16, 4 for f32).
    fn kv_elem_bytes(&self) -> usize;
    fn matrix(&self, ty: WeightType, rows: usize, cols: usize, data: HostBytes) -> Self::Mat;
    fn mat_shape(&self, m: &Self::Mat) -> (usize, usize);
    fn mat_type(&self, m: &Self::Mat) -> WeightType;
    /// A zeroed buffer of `len` f32.
    fn alloc(&self, len: usize) -> Self::Buf;
    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// Copies `buf[range]` to the host.
    fn download(&self, buf: &Self::Buf, range: Range<usize>, out: &mut [f32]);
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    /// `dst[dst_off..dst_off+len] = src[src_off..src_off+len]`.
    fn copy(&self, src: &Self::Buf, src_off: usize, dst: &mut Self::Buf, dst_off: usize, len: usize);

    // --- ops; `n` is the number of token rows ---
    /// `out[t] = table[ids[t]]` dequantized.
    fn embed(&self, table: &Self::Mat, ids: &[u32], out: &mut Self::Buf);
    /// `out[n, rows] = x[n, cols] · Wᵀ`.
    fn matmul(&self, w: &Self::Mat, x: &Self::Buf, n: usize, out: &mut Self::Buf);
    /// Several products over the same input in one dispatch (q/k/v, gate/up):
    /// `outs[i] = x · ws[i]ᵀ`; the input is prepared (e.g. quantized) once.
    fn matmuls(&self, ws: &[&Self::Mat], x: &Self::Buf, n: usize, outs: &mut [&mut Self::Buf]);
    /// `x[t] += bias` for each of the n rows.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf, n: usize);
    /// RMSNorm of `n` rows of width `w.len()` (rows can be whole tokens or single heads).
    fn rms_norm(&self, x: &Self::Buf, w: &Self::Buf, eps: f32, n: usize, out: &mut Self::Buf);
    /// LayerNorm with bias of `n` rows of width `w.len()`.
    fn layer_norm(&self, x: &Self::Buf, w: &Self::Buf, b: &Self::Buf, eps: f32, n: usize, out: &mut Self::Buf);
    /// `x = gelu_tanh(x)` over the first `len` elements.
    fn gelu(&self, x: &mut Self::Buf, len: usize);
    /// `x *= s` over the first `len` elements.
    fn scale(&self, x: &mut Self::Buf, s: f32, len: usize);
    /// `x += alpha * y` over the first `len` elements.
    fn add_scaled(&self, x: &mut Self::Buf, y: &Self::Buf, alpha: f32, len: usize);
    /// `x = cap * tanh(x / cap)` over the first `len` elements.
    fn softcap(&self, x: &mut Self::Buf, cap: f32, len: usize);
    /// `gate = silu(gate) * up` over the first `len` elements.
    fn silu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf, len: usize);
    /// `gate = gelu_tanh(gate) * up` over the first `len` elements.
    fn gelu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf, len: usize);
    /// `x += y` over the first `len` elements.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize);
    /// `x += y`, then `out` = RMSNorm of `n` rows of `x` (width `w.len()`): a decoder's
    /// residual add and the next norm, [`Backend::add`] then [`Backend::rms_norm`] unless
    /// a backend fuses them (same result).
    fn add_rms_norm(&self, x: &mut Self::Buf, y: &Self::Buf, w: &Self::Buf, eps: f32, n: usize, out: &mut Self::Buf) {
        let width = self.buf_len(w);
        self.add(x, y, n * width);
        self.rms_norm(x, w, eps, n, out);
    }
    /// Index of the largest of `buf[range]` (ties: lowest index).
    fn argmax(&self, buf: &Self::Buf, range: Range<usize>) -> u32;
    /// `out[r]` = the index of the largest of row `r` of `buf` (`n` rows of `width`;
    /// ties: lowest index), for every row at once: on a GPU one launch and 4 bytes a row
    /// back instead of the rows.
    fn argmax_rows(&self, buf: &Self::Buf, n: usize, width: usize, out: &mut [u32]) {
        for (r, o) in out.iter_mut().enumerate().take(n) {
            *o = self.argmax(buf, r * width..(r + 1) * width);
        }
    }
    /// The sampler's candidates of each of `n` rows of `buf` (rows of `width`):
    /// [`crate::ops::top_candidates_masked`] of row `r` scaled by `inv_t[r]`, its `k` ids
    /// and values into `ids[r * k..]` / `vals[r * k..]` and its tail mass into `tail[r]`.
    /// `mask` (a grammar's allowed tokens): `width.div_ceil(32)` words a row, bit `t % 32`
    /// of word `t / 32` of row `r`'s words set when token `t` is allowed; a disallowed
    /// token is neither a candidate nor in the tail. None: every token (and the result is
    /// the bits it always was). On a GPU one launch, and `k * 8 + 8` bytes a row come back
    /// instead of the row. `k` is at most [`crate::ops::MAX_CANDIDATES`].
    #[allow(clippy::too_many_arguments)]
    fn top_candidates_rows(
        &self,
        buf: &Self::Buf,
        n: usize,
        width: usize,
        k: usize,
        inv_t: &[f32],
        mask: Option<&[u32]>,
        ids: &mut [u32],
        vals: &mut [f32],
        tail: &mut [f64],
    ) {
        let wpr = width.div_ceil(32);
        check_candidate_args(self.buf_len(buf), n, width, k, inv_t, mask, ids, vals, tail);
        let mut row = vec![0.0f32; width];
        for r in 0..n {
            self.download(buf, r * width..(r + 1) * width, &mut row);
            let (i, v) = (&mut ids[r * k..(r + 1) * k], &mut vals[r * k..(r + 1) * k]);
            let m = mask.map(|m| &m[r * wpr..(r + 1) * wpr]);
            tail[r] = crate::ops::top_candidates_masked(&row, m, inv_t[r], k, i, v);
        }
    }
    /// GPT-OSS's clamped SwiGLU over the first `len` elements
    /// ([`crate::ops::swiglu_clamped`]): `gate = (clamp(up, ±limit) + 1) · g · σ(alpha · g)`
    /// with `g = min(gate, limit)`.
    fn swiglu_clamped(&self, gate: &mut Self::Buf, up: &Self::Buf, alpha: f32, limit: f32, len: usize);
    /// `x = clamp(x, lo, hi)` over the first `len` elements (OLMoE's `clip_qkv`).
    fn clamp(&self, x: &mut Self::Buf, lo: f32, hi: f32, len: usize);

    /// `dst[r * dst_stride + dst_off ..][..width] = src[r * src_stride + src_off ..][..width]`
    /// for `rows` rows: a strided copy of a column range (splitting a projection into
    /// parts, or joining parts into one row).
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(
        &self,
        src: &Self::Buf,
        src_stride: usize,
        src_off: usize,
        dst: &mut Self::Buf,
        dst_stride: usize,
        dst_off: usize,
        width: usize,
        rows: usize,
    );

    // --- mixture of experts (see `ops::moe_route_with`) ---
    /// Routing of `n` rows of router logits `[n, n_experts]` under the rule `routing`
    /// ([`crate::ops::moe_route_with`]: softmax or sigmoid scores, the choice steered by
    /// `bias` (`[n_experts]`) when given, optionally limited to the best groups; the `k`
    /// best first, ties to the lower index): their ids (as f32) in `ids[n, k]` and their
    /// weights in `weights[n, k]`, each weight times its expert's entry of `expert_scale`
    /// (`[n_experts]`, Gemma 4) when given. `routing.check(n_experts, k)` must hold.
    #[allow(clippy::too_many_arguments)]
    fn moe_route(
        &self,
        logits: &Self::Buf,
        n: usize,
        n_experts: usize,
        k: usize,
        routing: &crate::ops::MoeRouting,
        bias: Option<&Self::Buf>,
        expert_scale: Option<&Self::Buf>,
        ids: &mut Self::Buf,
        weights: &mut Self::Buf,
    );
    /// The selected experts' products: `experts[m][e]` is matrix `m` (gate, up, down…)
    /// of expert `e`, all of one shape per `m` with the same `cols`. For token `t` and
    /// slot `j`, with `e = ids[t * k + j]`:
    /// `outs[m][(t * k + j) * rows_m ..] = experts[m][e] · x[r]`, where `r = t * k + j`
    /// when `x_per_slot` (the down projection reads each slot's own row) and `r = t`
    /// otherwise (gate/up read the token's row). Only the selected experts' rows are read;
    /// a row's result does not depend on what else the step holds.
    #[allow(clippy::too_many_arguments)]
    fn moe_matmuls(
        &self,
        experts: &[&[Self::Mat]],
        x: &Self::Buf,
        x_per_slot: bool,
        ids: &Self::Buf,
        n: usize,
        k: usize,
        outs: &mut [&mut Self::Buf],
    );
    /// Per-expert biases of the selected experts' products: for each of the `slots`
    /// slots `s`, `x[s * d..][..d] += biases[e * d..][..d]` with `e = ids[s]` (`biases` is
    /// `[n_experts, d]`; [`crate::ops::moe_add_bias`]).
    fn moe_add_bias(&self, x: &mut Self::Buf, biases: &Self::Buf, ids: &Self::Buf, slots: usize, d: usize);
    /// `out[t] = sum_j weights[t * k + j] * ys[t * k + j]` for `n` rows of width `d`
    /// ([`crate::ops::moe_combine`]).
    #[allow(clippy::too_many_arguments)]
    fn moe_combine(&self, ys: &Self::Buf, weights: &Self::Buf, n: usize, k: usize, d: usize, out: &mut Self::Buf);

    // --- batched steps over a paged KV cache ---
    /// A step's metadata in backend memory (see [`StepLayout`]): written once per step by
    /// [`write_step`](Self::write_step) at fixed addresses, read by every `*_step` op.
    type Step: Send + Sync;
    /// A step preallocated for up to `max_rows` rows, `max_seqs` sequences, `max_table`
    /// block-table entries per group and `n_groups` KV groups.
    fn new_step(&self, max_rows: usize, max_seqs: usize, max_table: usize, n_groups: usize) -> Self::Step;
    /// Copies `layout` into `step` without allocating. Refuses (and leaves `step` empty,
    /// so ops on it fail loudly) a layout beyond the step's capacities or inconsistent:
    /// lengths, sequence rows in bounds, non-empty, disjoint and at consecutive positions,
    /// the same sequences in every group, tables in bounds and reaching the last row,
    /// block ids in the pool, NO_BLOCK only where no row reads, each row's slot the one
    /// its table gives (padding rows: NO_BLOCK), no slot written twice. Ops trust it.
    fn write_step(&self, layout: &StepLayout, step: &mut Self::Step) -> Result<(), String>;
    /// The step's token ids, for [`embed_step`](Self::embed_step); after
    /// [`write_step`](Self::write_step), before the step's ops. The CPU reads them from
    /// the host and needs nothing here.
    fn write_step_tokens(&self, ids: &[u32], step: &mut Self::Step) -> Result<(), String> {
        let _ = (ids, step);
        Ok(())
    }
    /// [`embed`](Self::embed) of the step's token ids (`ids`, the same as written by
    /// [`write_step_tokens`](Self::write_step_tokens)): a GPU reads them from the step's
    /// buffer, so a recorded step replays with new ids.
    fn embed_step(&self, table: &Self::Mat, ids: &[u32], step: &Self::Step, out: &mut Self::Buf) {
        let _ = step;
        self.embed(table, ids, out);
    }
    /// Starts the part of a step that a GPU can record once and replay (the layers: no
    /// downloads, no host data but the step's buffers). `key` names everything the ops'
    /// launches depend on besides the step buffers' contents (row count, model options);
    /// `None` never records (e.g. while taps read activations). The CPU runs eagerly.
    fn begin_graph(&self, step: &mut Self::Step, key: Option<u64>) -> GraphMode {
        let _ = (step, key);
        GraphMode::Eager
    }
    /// Ends what [`begin_graph`](Self::begin_graph) started: a capture is instantiated
    /// and run, a recording replayed. Returns false when a capture failed, so nothing
    /// ran: the caller enqueues the ops again, eagerly.
    fn end_graph(&self, step: &mut Self::Step, mode: GraphMode) -> bool {
        let _ = (step, mode);
        true
    }
    /// A zeroed paged KV pool (K or V of one layer): `n_blocks` blocks of `block_size`
    /// positions, laid out `[block][kv_head][offset][head_dim]` so one head's rows of one
    /// block are contiguous. Elements f16, or f32 where the backend keeps an f32 cache.
    fn alloc_kv_pages(&self, n_blocks: usize, block_size: usize, kv_heads: usize, head_dim: usize) -> Self::Kv;
    /// RoPE on `[n, n_heads * head_dim]`, row t at the step's position of row t.
    fn rope_step(
        &self,
        x: &mut Self::Buf,
        n: usize,
        n_heads: usize,
        head_dim: usize,
        step: &Self::Step,
        rope: &RopeParams<'_, Self>,
    );
    /// RoPE on `q` (`shape.n_heads` heads) and `k` (`shape.n_kv_heads`), then `k` and `v`
    /// into their pools of KV group `group`: [`Backend::rope_step`] twice and
    /// [`Backend::kv_write_step`] twice, which is what this does unless a backend fuses
    /// them (the CUDA backend: one launch) with the same arithmetic.
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_write_step(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        n: usize,
        step: &Self::Step,
        rope: &RopeParams<'_, Self>,
        k_cache: &mut Self::Kv,
        v_cache: &mut Self::Kv,
        group: usize,
        shape: &AttnShape,
    ) {
        self.rope_step(q, n, shape.n_heads, shape.head_dim, step, rope);
        self.rope_step(k, n, shape.n_kv_heads, shape.head_dim, step, rope);
        self.kv_write_step(k_cache, k, n, step, group, shape);
        self.kv_write_step(v_cache, v, n, step, group, shape);
    }
    /// [`Backend::rms_norm`] of every q head and every k head (`norms`), then
    /// [`Backend::rope_kv_write_step`]: what this does (the norms into `scratch`, which
    /// then trades places with `q` and `k`) unless a backend fuses it (the CUDA backend:
    /// the norms inside the RoPE launch, the same arithmetic). Either way `q` and `k` hold
    /// the normalized, rotated rows afterwards.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope_kv_write_step(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        norms: &HeadNorms<'_, Self>,
        scratch: (&mut Self::Buf, &mut Self::Buf),
        n: usize,
        step: &Self::Step,
        rope: &RopeParams<'_, Self>,
        k_cache: &mut Self::Kv,
        v_cache: &mut Self::Kv,
        group: usize,
        shape: &AttnShape,
    ) {
        qk_norm_then_rope(
            self, q, k, v, norms, scratch, n, step, rope, k_cache, v_cache, group, shape,
        );
    }
    /// Writes `n` rows of K (or V), `[n, kv_heads * head_dim]`, into a paged pool of KV
    /// group `group`: row t goes to the group's slot of row t (padding rows nowhere).
    fn kv_write_step(
        &self,
        cache: &mut Self::Kv,
        src: &Self::Buf,
        n: usize,
        step: &Self::Step,
        group: usize,
        shape: &AttnShape,
    );
    /// Attention of each sequence's rows over its own blocks of KV group `group` (which
    /// already hold the step's rows); `out` is `[n, n_heads * head_dim]`, zero for padding
    /// rows. `shape.cap` is unused; `shape.window` must be the group's. A row's result is
    /// a function of its query, its position and its sequence's K/V alone: bit-identical
    /// whatever else the batch holds and however many threads run it. `sinks`: learned
    /// attention sinks (GPT-OSS), `n_heads` logits, each an extra term `exp(sink)` in its
    /// head's softmax denominator that contributes nothing to the output.
    #[allow(clippy::too_many_arguments)]
    fn attention_step(
        &self,
        q: &Self::Buf,
        k: &Self::Kv,
        v: &Self::Kv,
        n: usize,
        step: &Self::Step,
        group: usize,
        shape: &AttnShape,
        sinks: Option<&Self::Buf>,
        out: &mut Self::Buf,
    );
    /// Multi-head latent attention (DeepSeek's MLA in its absorbed form): every query head
    /// attends over one shared KV head. `q` is `[n, n_heads * head_dim]`; the pool `kv`
    /// holds one head (`shape.n_kv_heads == 1`) of `head_dim` per position, the key; the
    /// value of a position is the first `v_dim` elements of the same row (the latent), so
    /// nothing is stored twice. `out` is `[n, n_heads * v_dim]`, zero for padding rows.
    /// Otherwise as [`attention_step`](Self::attention_step) (windows, soft-cap, batch
    /// invariance); no sinks.
    #[allow(clippy::too_many_arguments)]
    fn attention_mla_step(
        &self,
        q: &Self::Buf,
        kv: &Self::Kv,
        n: usize,
        step: &Self::Step,
        group: usize,
        shape: &AttnShape,
        v_dim: usize,
        out: &mut Self::Buf,
    );

    // --- recurrent mixers (see `crate::ssm`) ---
    // Their state lives in plain buffers of `n_state_slots` slots; each sequence of the
    // step reads and writes its own slot (`StepLayout::state_slots`), and a sequence whose
    // first row is at position 0 starts from zeros.
    /// `x[..len] *= y[..len]`.
    fn mul(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize);
    /// `x = max(x, 0)^2` over the first `len` elements (NemotronH's `relu2` MLP).
    fn relu_sq(&self, x: &mut Self::Buf, len: usize);
    /// Causal depthwise convolution of each sequence's rows of `x` (`[n, channels]`) with
    /// `w` (`[kernel][channels]`) and `bias`, continuing from the sequence's slot of
    /// `state` (`[slots][kernel - 1][channels]`: its last `kernel - 1` inputs), which is
    /// updated; SiLU on the output when `silu` ([`crate::ssm::conv_seq`]). `out` is
    /// `[n, channels]`; padding rows are left alone.
    #[allow(clippy::too_many_arguments)]
    fn conv_step(
        &self,
        x: &Self::Buf,
        n: usize,
        channels: usize,
        kernel: usize,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        silu: bool,
        state: &mut Self::Buf,
        step: &Self::Step,
        out: &mut Self::Buf,
    );
    /// The Mamba 2 scan ([`crate::ssm::scan_head`]) of each sequence's rows: `xbc` rows
    /// `[x | B | C]`, `dt` rows `heads` wide (before the bias and softplus), per-head
    /// `a = -exp(A_log)`, `d`, `dt_bias`; `state` is `[slots][heads][head_dim][state]`;
    /// `out` rows `heads * head_dim` (`y = S C + d x`).
    #[allow(clippy::too_many_arguments)]
    fn ssm_scan_step(
        &self,
        xbc: &Self::Buf,
        dt: &Self::Buf,
        a: &Self::Buf,
        d: &Self::Buf,
        dt_bias: &Self::Buf,
        n: usize,
        shape: &crate::ssm::SsmShape,
        state: &mut Self::Buf,
        step: &Self::Step,
        out: &mut Self::Buf,
    );
    /// Gated RMSNorm in place over `n` rows of `w.len()` ([`crate::ssm::rms_norm_gated`]):
    /// `x = w * rmsnorm_per_group(x * silu(z))`, or with `norm_first`
    /// `x = w * rmsnorm_per_group(x) * silu(z)`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_gated(
        &self,
        x: &mut Self::Buf,
        z: &Self::Buf,
        w: &Self::Buf,
        eps: f32,
        n: usize,
        group: usize,
        norm_first: bool,
    );
    /// `x[..len] *= sigmoid(g[..len])` (Qwen3-Next's attention output gate).
    fn sigmoid_mul(&self, x: &mut Self::Buf, g: &Self::Buf, len: usize);
    /// The gated delta rule ([`crate::ssm::gdn_head`]) of each sequence's rows: `qkv` rows
    /// `[q | k | v]`, `b` and `a` rows `v_heads` wide (before the sigmoid / softplus),
    /// per value head `a_neg = -exp(A_log)` and `dt_bias`; `state` is
    /// `[slots][v_heads][k_dim][v_dim]`; `out` rows `v_heads * v_dim`.
    #[allow(clippy::too_many_arguments)]
    fn gdn_step(
        &self,
        qkv: &Self::Buf,
        b: &Self::Buf,
        a: &Self::Buf,
        a_neg: &Self::Buf,
        dt_bias: &Self::Buf,
        n: usize,
        shape: &crate::ssm::GdnShape,
        state: &mut Self::Buf,
        step: &Self::Step,
        out: &mut Self::Buf,
    );
    /// Copies slot `src` of a state array with slots of `slot_len` floats to slot `dst`
    /// (prefix caching of recurrent state: a snapshot taken, or restored).
    fn copy_slot(&self, state: &mut Self::Buf, slot_len: usize, src: usize, dst: usize);
}

/// The mixture-of-experts ops composed from other ops of a backend, with the routing
/// done on the host: a backend without kernels of its own for them calls these (CUDA
/// only for prefill-sized `moe_matmuls`, and experts of mixed shapes). They read ids,
/// weights and logits back to the host inside the forward and allocate per call, so a
/// step that uses them cannot be recorded as a graph.
pub mod host_moe {
    use super::Backend;
    use crate::ops;

    fn write<B: Backend>(b: &B, data: &[f32], dst: &mut B::Buf) {
        let tmp = b.upload(data);
        b.copy(&tmp, 0, dst, 0, data.len());
    }

    pub fn clamp<B: Backend>(b: &B, x: &mut B::Buf, lo: f32, hi: f32, len: usize) {
        let mut h = vec![0f32; len];
        b.download(x, 0..len, &mut h);
        h.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
        write(b, &h, x);
    }

    #[allow(clippy::too_many_arguments)]
    pub fn moe_route<B: Backend>(
        b: &B,
        logits: &B::Buf,
        n: usize,
        n_experts: usize,
        k: usize,
        routing: &ops::MoeRouting,
        bias: Option<&B::Buf>,
        expert_scale: Option<&B::Buf>,
        ids: &mut B::Buf,
        weights: &mut B::Buf,
    ) {
        let mut l = vec![0f32; n * n_experts];
        b.download(logits, 0..n * n_experts, &mut l);
        let table = |x: &B::Buf| {
            let mut h = vec![0f32; n_experts];
            b.download(x, 0..n_experts, &mut h);
            h
        };
        let hb = bias.map(table);
        let hs = expert_scale.map(table);
        let (mut hi, mut hw) = (vec![0f32; n * k], vec![0f32; n * k]);
        for t in 0..n {
            ops::moe_route_with(
                &l[t * n_experts..(t + 1) * n_experts],
                hb.as_deref(),
                hs.as_deref(),
                routing,
                &mut hi[t * k..(t + 1) * k],
                &mut hw[t * k..(t + 1) * k],
            );
        }
        write(b, &hi, ids);
        write(b, &hw, weights);
    }

    /// Per expert with tokens: its rows gathered with `copy`, one `matmuls` over the
    /// expert's matrices, the results copied back to their slots.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_matmuls<B: Backend>(
        b: &B,
        experts: &[&[B::Mat]],
        x: &B::Buf,
        x_per_slot: bool,
        ids: &B::Buf,
        n: usize,
        k: usize,
        outs: &mut [&mut B::Buf],
    ) {
        let mut hi = vec![0f32; n * k];
        b.download(ids, 0..n * k, &mut hi);
        let n_experts = experts[0].len();
        let cols = b.mat_shape(&experts[0][0]).1;
        let rows: Vec<usize> = experts.iter().map(|m| b.mat_shape(&m[0]).0).collect();
        let mut slots: Vec<Vec<usize>> = vec![Vec::new(); n_experts];
        for (s, &e) in hi.iter().enumerate() {
            slots[e as usize].push(s);
        }
        let most = slots.iter().map(|s| s.len()).max().unwrap_or(0);
        if most == 0 {
            return;
        }
        let mut xg = b.alloc(most * cols);
        let mut og: Vec<B::Buf> = rows.iter().map(|&r| b.alloc(most * r)).collect();
        for (e, ss) in slots.iter().enumerate() {
            if ss.is_empty() {
                continue;
            }
            for (i, &s) in ss.iter().enumerate() {
                let r = if x_per_slot { s } else { s / k };
                b.copy(x, r * cols, &mut xg, i * cols, cols);
            }
            let ws: Vec<&B::Mat> = experts.iter().map(|m| &m[e]).collect();
            let mut os: Vec<&mut B::Buf> = og.iter_mut().collect();
            b.matmuls(&ws, &xg, ss.len(), &mut os);
            for (m, out) in outs.iter_mut().enumerate() {
                for (i, &s) in ss.iter().enumerate() {
                    b.copy(&og[m], i * rows[m], out, s * rows[m], rows[m]);
                }
            }
        }
    }

    pub fn moe_add_bias<B: Backend>(b: &B, x: &mut B::Buf, biases: &B::Buf, ids: &B::Buf, slots: usize, d: usize) {
        let (mut hx, mut hi) = (vec![0f32; slots * d], vec![0f32; slots]);
        b.download(x, 0..slots * d, &mut hx);
        b.download(ids, 0..slots, &mut hi);
        let mut hb = vec![0f32; b.buf_len(biases)];
        b.download(biases, 0..hb.len(), &mut hb);
        ops::moe_add_bias(&mut hx, &hb, &hi, d);
        write(b, &hx, x);
    }

    pub fn moe_combine<B: Backend>(
        b: &B,
        ys: &B::Buf,
        weights: &B::Buf,
        n: usize,
        k: usize,
        d: usize,
        out: &mut B::Buf,
    ) {
        let (mut hy, mut hw) = (vec![0f32; n * k * d], vec![0f32; n * k]);
        b.download(ys, 0..n * k * d, &mut hy);
        b.download(weights, 0..n * k, &mut hw);
        let mut ho = vec![0f32; n * d];
        for t in 0..n {
            ops::moe_combine(
                &hy[t * k * d..(t + 1) * k * d],
                &hw[t * k..(t + 1) * k],
                &mut ho[t * d..(t + 1) * d],
            );
        }
        write(b, &ho, out);
    }
}

/// The bounds every [`Backend::top_candidates_rows`] asserts: `k` in
/// `1..=MAX_CANDIDATES`, `n` rows of `width` in a buffer of `buf_len`, a scale, a mask of
/// `width.div_ceil(32)` words (when given) and room for `k` candidates and a tail a row.
#[allow(clippy::too_many_arguments)]
pub fn check_candidate_args(
    buf_len: usize,
    n: usize,
    width: usize,
    k: usize,
    inv_t: &[f32],
    mask: Option<&[u32]>,
    ids: &[u32],
    vals: &[f32],
    tail: &[f64],
) {
    assert!(
        (1..=crate::ops::MAX_CANDIDATES).contains(&k)
            && n * width <= buf_len
            && inv_t.len() >= n
            && mask.is_none_or(|m| m.len() >= n * width.div_ceil(32))
            && ids.len() >= n * k
            && vals.len() >= n * k
            && tail.len() >= n,
        "top_candidates_rows: bad k, mask or buffers"
    );
}
