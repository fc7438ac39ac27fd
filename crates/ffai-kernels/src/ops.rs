//! Plain single-threaded kernels over slices. Each is the unit the CPU backend
//! parallelises, and each has an oracle test in `tests/ops.rs` (the paged attention's,
//! [`PagedAttn`] and the span fold, in `tests/paged.rs`).

use std::ops::Range;

use half::f16;

/// f32 dot product with eight independent accumulators so the compiler vectorises it.
/// (Plain multiply-add, not `mul_add`: without the FMA target feature that is a libm call.)
#[inline(always)]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `out = x / rms(x) * w`, with rms computed in f64-free f32 over the row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = dot_f32(x, x) / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * inv * wi;
    }
}

/// LayerNorm: `out = (x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = sum_f32(x) / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, &xi), &wi), &bi) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = (xi - mean) * inv * wi + bi;
    }
}

/// Rotary position embedding for one token's heads, in place.
///
/// `inv_freq` has one entry per rotated pair (its length times two is the rotated width,
/// so partial rotary works); scaling schemes are folded into it by the caller.
/// `neox` pairs element i with i + rot/2 (Hugging Face's rotate_half); otherwise pairs are
/// adjacent (2i, 2i+1), the layout llama.cpp's Llama conversion produces.
pub fn rope(x: &mut [f32], n_heads: usize, head_dim: usize, pos: usize, inv_freq: &[f32], neox: bool) {
    let half = inv_freq.len();
    let rotate = |head: &mut [f32], i: usize, (sin, cos): (f32, f32)| {
        let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0 * cos - x1 * sin;
        head[b] = x0 * sin + x1 * cos;
    };
    // One sin/cos per frequency, shared by every head (libm's sincos dominates otherwise);
    // rotations wider than the stack table (none known) recompute them per head instead
    // of allocating.
    let mut table = [(0f32, 0f32); 256];
    if half <= table.len() {
        for (t, &f) in table.iter_mut().zip(inv_freq) {
            *t = (pos as f32 * f).sin_cos();
        }
        for head in x.chunks_exact_mut(head_dim).take(n_heads) {
            for (i, &sc) in table[..half].iter().enumerate() {
                rotate(head, i, sc);
            }
        }
    } else {
        for head in x.chunks_exact_mut(head_dim).take(n_heads) {
            for (i, &f) in inv_freq.iter().enumerate() {
                rotate(head, i, (pos as f32 * f).sin_cos());
            }
        }
    }
}

/// SiLU `x * sigmoid(x)`, with the exponential from `exp_nonpos` on -|x| so it never
/// overflows and the loop vectorises.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    let e = exp_nonpos(-x.abs());
    let sig = if x >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    x * sig
}

/// GELU, tanh approximation (what Gemma and GPT-2 style MLPs use).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + tanh_fast(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)))
}

/// tanh through `exp_nonpos` (branch-free, vectorisable; libm's tanhf is a scalar call):
/// tanh|x| = (1 - e) / (1 + e) with e = exp(-2|x|), sign restored. Absolute error < 3e-7.
#[inline(always)]
pub fn tanh_fast(x: f32) -> f32 {
    let e = exp_nonpos(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

/// Defines `fn $name(args) body` built three times — baseline, AVX2 and AVX-512 — with
/// the widest this CPU has (and the q8 level allows) picked at run time: the baseline
/// build only vectorises 4 lanes wide. The arithmetic is the same in every build (no
/// fused operations are introduced), so the results are bit-identical.
macro_rules! widest {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn wide($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if avx2_available() {
                    if wide_available() {
                        // SAFETY: the level in force implies AVX-512F.
                        return unsafe { wide($($arg),*) };
                    }
                    // SAFETY: the CPU has AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

widest!(
    /// `gate = silu(gate) * up`, the SwiGLU gate, in place.
    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = silu(*g) * u;
        }
    }
);

widest!(
    /// `gate = gelu_tanh(gate) * up` (GeGLU), in place.
    pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = gelu_tanh(*g) * u;
        }
    }
);

/// GPT-OSS's clamped SwiGLU, in place: `g = min(gate, limit)`, `u = clamp(up, ±limit)`,
/// `gate = (u + 1) · g · σ(alpha · g)`.
pub fn swiglu_clamped(gate: &mut [f32], up: &[f32], alpha: f32, limit: f32) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = g.min(limit);
        let u = u.clamp(-limit, limit);
        let a = alpha * x;
        let e = exp_nonpos(-a.abs());
        let sig = if a >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
        *g = (u + 1.0) * (x * sig);
    }
}

pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// e^x for x <= 0 (softmax arguments), branch-free so loops over it vectorise:
/// x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n by building the
/// exponent bits. Relative error below 3e-7; inputs below -87 flush to about 0.
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits: both the
    // float n and its integer value come out of plain adds and bit ops (no libm round,
    // no saturating cast), so the loop vectorises on every target.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // n is in [-126, 0] here, so the biased exponent stays normal.
    p * f32::from_bits((ni.wrapping_add(127) as u32) << 23)
}

/// Sum with eight independent accumulators (vectorises; order differs from sequential).
#[inline(always)]
pub fn sum_f32(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = x.chunks_exact(8);
    let rest: f32 = c.remainder().iter().sum();
    for v in c {
        for k in 0..8 {
            acc[k] += v[k];
        }
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + rest
}

/// Numerically stable softmax in place.
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in x.iter_mut() {
        *v = exp_nonpos(*v - max);
    }
    let inv = 1.0 / sum_f32(x);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Most candidates [`top_candidates`] (and `Backend::top_candidates_rows`) keep a row:
/// bounds the device's per-row sort and the bytes that come back.
pub const MAX_CANDIDATES: usize = 1024;

/// The sampler's candidates of one row of logits, so a GPU can send back these instead of
/// the row. Scales the row by `inv_t` (`s = l * inv_t`, one f32 multiply as the sampler
/// does it) and writes the `k` largest non-NaN `s` with their ids into `ids` / `vals`
/// (`k` each), highest first and ties by lowest id (the sampler's `by_logit`: f32
/// `total_cmp`, so -0.0 ranks below +0.0 and infinities rank as numbers); when the row
/// has fewer than `k` non-NaN values the rest are `u32::MAX` / NaN. Returns the tail mass
/// top-p needs: the f64 sum over the row's other non-NaN values of `exp(s - m)` (the exp
/// in f32), `m` the largest `s` (0 when nothing is left over).
///
/// This is the oracle of the device kernels: a selection, then a sort of the `k` kept.
pub fn top_candidates(row: &[f32], inv_t: f32, k: usize, ids: &mut [u32], vals: &mut [f32]) -> f64 {
    top_candidates_masked(row, None, inv_t, k, ids, vals)
}

/// Whether token `t` is allowed by an allowed-token bitmask (bit `t % 32` of word
/// `t / 32`; see [`top_candidates_masked`]).
#[inline(always)]
pub fn mask_allows(mask: &[u32], t: usize) -> bool {
    mask[t / 32] >> (t % 32) & 1 != 0
}

/// [`top_candidates`] over only the tokens an allowed-token bitmask lets through (a
/// grammar's mask; None: every token): `mask` holds at least `row.len().div_ceil(32)`
/// words, bit `t % 32` of word `t / 32` set when token `t` is allowed. A disallowed token
/// is left out exactly as a NaN is: it is never a candidate and adds nothing to the tail
/// mass. The sampler's whole-row path sets a disallowed logit to −∞, whose weight is 0:
/// the allowed candidates and the tail are the same, and the candidates are complete
/// (fewer than `k`) whenever the grammar allows fewer than `k` non-NaN values.
pub fn top_candidates_masked(
    row: &[f32],
    mask: Option<&[u32]>,
    inv_t: f32,
    k: usize,
    ids: &mut [u32],
    vals: &mut [f32],
) -> f64 {
    assert!(
        (1..=MAX_CANDIDATES).contains(&k)
            && ids.len() >= k
            && vals.len() >= k
            && mask.is_none_or(|m| m.len() >= row.len().div_ceil(32)),
        "top_candidates: bad k, output or mask"
    );
    let by = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut cand: Vec<(u32, f32)> = match mask {
        None => row
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l * inv_t))
            .filter(|c| !c.1.is_nan())
            .collect(),
        Some(mask) => row
            .iter()
            .enumerate()
            .filter(|&(i, _)| mask_allows(mask, i))
            .map(|(i, &l)| (i as u32, l * inv_t))
            .filter(|c| !c.1.is_nan())
            .collect(),
    };
    if cand.len() > k {
        cand.select_nth_unstable_by(k - 1, by);
    }
    let kept = cand.len().min(k);
    let rest = cand.len() - kept;
    let top = &mut cand[..kept];
    top.sort_unstable_by(by);
    for (i, (id, v)) in ids[..k].iter_mut().zip(&mut vals[..k]).enumerate() {
        (*id, *v) = top.get(i).copied().unwrap_or((u32::MAX, f32::NAN));
    }
    if rest == 0 {
        return 0.0;
    }
    // The rest in id order (so the sum does not depend on how the selection left them):
    // the row again, every value taken that ranks after the k-th. One pass, no sort (a
    // sort of the rest cost ~1 ms a 49k row, a greedy grammar row's whole budget).
    let (m, last) = (top[0].1, top[kept - 1]);
    row.iter()
        .enumerate()
        .filter(|&(i, _)| mask.is_none_or(|mk| mask_allows(mk, i)))
        .map(|(i, &l)| (i as u32, l * inv_t))
        .filter(|c| !c.1.is_nan() && by(c, &last).is_gt())
        .map(|c| (c.1 - m).exp() as f64)
        .sum()
}

/// Index and value of the largest element; ties go to the lowest index, NaN never wins.
///
/// Two passes a vectorizer can widen: the largest value, kept per lane of 16 (a compare
/// and select; NaN never replaces a lane), then the first index holding it. A 262144-entry
/// row of logits took 0.2 ms as one branchy loop, which 64 sequences a step paid on the
/// scheduler's thread.
pub fn argmax(x: &[f32]) -> (usize, f32) {
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let chunks = x.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(tail) {
        max = if v > max { v } else { max };
    }
    if max == f32::NEG_INFINITY {
        // No element above -inf (all -inf or NaN): nothing ever won.
        return (0, f32::NEG_INFINITY);
    }
    // `==` also finds a zero of the other sign; the element itself is returned.
    let i = x.iter().position(|&v| v == max).unwrap_or(0);
    (i, x[i])
}

/// What one attention work item sees: the cache rows and how scores are shaped.
#[derive(Clone, Debug)]
pub struct HeadAttn {
    /// Cache rows to attend over, oldest first: one range, or two when a ring buffer
    /// wrapped (rows `a..cap` then `0..b`). Row r holds `head_dim` values at `r * head_dim`.
    pub rows: [std::ops::Range<usize>; 2],
    pub scale: f32,
    /// 0 = off; otherwise scores become `softcap * tanh(score / softcap)` (Gemma 2).
    pub softcap: f32,
}

/// Asks for the `hd` elements of row `row` of `base` to be brought into cache.
///
/// Why: a paged pool keeps one head's rows in runs of one block (4 KiB for 16 rows of 128
/// halves), too short for the hardware prefetchers to get going on, so a long decode
/// context streamed from DRAM stalls at every block. The score kernels therefore ask,
/// while on row `o` of one range, for row `o` of the next range, K and V (V is read by
/// the values pass right after). Long ranges (the old contiguous cache) get no
/// prefetches ([`prefetch_target`]). Prefetching changes no result.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_row<T>(base: *const T, row: usize, hd: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // `wrapping_add` keeps the pointer arithmetic defined whatever the row (the callers'
    // rows come from ranges checked against the slice anyway).
    let p = base.wrapping_add(row * hd).cast::<i8>();
    for off in (0..hd * std::mem::size_of::<T>()).step_by(64) {
        // SAFETY: SSE is part of x86_64; a prefetch is only an address hint, it never
        // faults and changes no memory, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off)) };
    }
}

/// Asks for `bytes` to be brought into cache (a no-op off x86-64).
///
/// Why: a matmul over a few token rows reads a block of 16 weight rows a column block at
/// a time, 16 interleaved streams that the hardware prefetchers follow poorly when the
/// weights come from DRAM: a 16-row step of a decoder was 2–4× slower per row than
/// the same matmul from cache. The caller asks for the next row block while it computes
/// this one. Prefetching changes no result.
#[inline(always)]
pub fn prefetch_bytes(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let p = bytes.as_ptr().cast::<i8>();
        for off in (0..bytes.len()).step_by(64) {
            // SAFETY: SSE is part of x86_64; a prefetch is only an address hint (this one
            // inside `bytes`), it never faults and changes no memory.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Longest run of rows after which the next range is still prefetched by hand: past a
/// few KiB the hardware prefetchers have locked on, and the next range's rows would be
/// asked for long before they are used (a ring buffer's wrapped part, say).
#[cfg(target_arch = "x86_64")]
const PREFETCH_MAX_RUN: usize = 64;

/// The range whose rows are prefetched while range `si` is processed (see
/// [`prefetch_row`]): the next one, if range `si` is short.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_target(segs: &[Range<usize>], si: usize) -> Range<usize> {
    match segs.get(si + 1) {
        Some(next) if segs[si].len() <= PREFETCH_MAX_RUN => next.clone(),
        _ => 0..0,
    }
}

/// Rows in a list of row ranges.
#[inline]
fn rows_in(segs: &[Range<usize>]) -> usize {
    segs.iter().map(|r| r.len()).sum()
}

/// A KV-cache element type: half precision (the default, half the memory traffic) or f32.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// The AVX2 path needs F16C to widen this type.
    const NEEDS_F16C: bool;
    fn to_f32(self) -> f32;
    /// Loads 8 consecutive elements widened to f32.
    ///
    /// # Safety
    /// `p` must point to 8 readable elements, and the CPU must have AVX2 (and F16C when
    /// `NEEDS_F16C`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f16 {
    const NEEDS_F16C: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable halves and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

impl KvElem for f32 {
    const NEEDS_F16C: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable floats and AVX.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

/// True when the CPU has AVX2 and FMA and the portable paths are not forced (tests
/// compare both).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn avx2_available() -> bool {
    crate::quant::q8::avx2_allowed()
}

/// Partial attention of a whole GQA group (the `group` query heads that share one KV
/// head) over some cache rows: K and V rows are loaded once for all heads of the group.
///
/// For each head g (query `qs[g*hd..]`): scores `s_r = scale * q·k_r` (soft-capped when
/// asked), `m_g = max s`, weights `e_r = exp(s_r - m_g)`, `l_g = sum e`, and the
/// *unnormalised* `out_g = sum e_r v_r`; `stats[2g] = m_g`, `stats[2g+1] = l_g`. Parts
/// over disjoint row sets merge exactly with `merge_partials`. `scores` is scratch of at
/// least `group * rows`.
#[allow(clippy::too_many_arguments)]
pub fn attend_group<T: KvElem>(
    qs: &[f32],
    group: usize,
    k: &[T],
    v: &[T],
    hd: usize,
    a: &HeadAttn,
    scores: &mut [f32],
    out: &mut [f32],
    stats: &mut [f32],
) {
    attend_segments(qs, group, k, v, hd, &a.rows, a.scale, a.softcap, scores, out, stats)
}

/// [`attend_group`] over any number of row ranges `segs`, oldest first (a paged cache:
/// one range per block a span touches). Every score is the same dot product whatever
/// range its row sits in or how the ranges are cut, and the softmax sum and the V sums
/// run over the rows in order, so the result depends only on the sequence of rows
/// attended, not on where they are stored.
#[allow(clippy::too_many_arguments)]
pub fn attend_segments<T: KvElem>(
    qs: &[f32],
    group: usize,
    k: &[T],
    v: &[T],
    hd: usize,
    segs: &[Range<usize>],
    scale: f32,
    softcap: f32,
    scores: &mut [f32],
    out: &mut [f32],
    stats: &mut [f32],
) {
    attend_segments_v(qs, group, k, v, hd, hd, segs, scale, softcap, scores, out, stats)
}

/// [`attend_segments`] with values narrower than keys: the value of a row is the first
/// `vd` (`<= hd`) elements of its V row (rows are still `hd` apart), and `out` holds `vd`
/// floats per head. Multi-head latent attention reads K and V from one pool this way (the
/// latent is both the value and the front of the key). With `vd == hd` it is
/// [`attend_segments`] exactly.
#[allow(clippy::too_many_arguments)]
pub fn attend_segments_v<T: KvElem>(
    qs: &[f32],
    group: usize,
    k: &[T],
    v: &[T],
    hd: usize,
    vd: usize,
    segs: &[Range<usize>],
    scale: f32,
    softcap: f32,
    scores: &mut [f32],
    out: &mut [f32],
    stats: &mut [f32],
) {
    let n: usize = segs.iter().map(|r| r.len()).sum();
    let end = segs.iter().map(|r| r.end).max().unwrap_or(0);
    assert!(vd >= 1 && vd <= hd, "value width {vd} outside 1..={hd}");
    assert!(group >= 1 && qs.len() >= group * hd && out.len() >= group * vd && stats.len() >= 2 * group);
    assert!(scores.len() >= group * n && k.len() >= end * hd && v.len() >= end * hd);
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(8) && group <= 8 && avx2_available() && (!T::NEEDS_F16C || is_x86_feature_detected!("f16c")) {
        // SAFETY: AVX2/FMA (and F16C when needed) are present; the slice lengths the
        // kernel indexes were asserted above.
        unsafe {
            if wide_available() {
                match group {
                    1 => group_scores512::<T, 1>(qs, k, v, hd, segs, scale, scores),
                    2 => group_scores512::<T, 2>(qs, k, v, hd, segs, scale, scores),
                    3 => group_scores512::<T, 3>(qs, k, v, hd, segs, scale, scores),
                    4 => group_scores512::<T, 4>(qs, k, v, hd, segs, scale, scores),
                    5 => group_scores512::<T, 5>(qs, k, v, hd, segs, scale, scores),
                    6 => group_scores512::<T, 6>(qs, k, v, hd, segs, scale, scores),
                    7 => group_scores512::<T, 7>(qs, k, v, hd, segs, scale, scores),
                    _ => group_scores512::<T, 8>(qs, k, v, hd, segs, scale, scores),
                }
            } else {
                group_scores_avx2(qs, group, k, v, hd, segs, scale, scores)
            }
        };
    } else {
        group_scores_portable(qs, group, k, hd, segs, scale, scores);
    }
    #[cfg(not(target_arch = "x86_64"))]
    group_scores_portable(qs, group, k, hd, segs, scale, scores);
    group_softmax(&mut scores[..group * n], n, softcap, stats);
    if vd != hd {
        group_values_prefix(group, v, hd, vd, segs, scores, out);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(8) && group <= 8 && avx2_available() && (!T::NEEDS_F16C || is_x86_feature_detected!("f16c")) {
        // SAFETY: as above.
        unsafe { group_values_avx2(group, v, hd, segs, scores, out) };
        return;
    }
    group_values_portable(group, v, hd, segs, scores, out);
}

fn group_scores_portable<T: KvElem>(
    qs: &[f32],
    group: usize,
    k: &[T],
    hd: usize,
    segs: &[Range<usize>],
    scale: f32,
    scores: &mut [f32],
) {
    let n = rows_in(segs);
    for (j, r) in segs.iter().flat_map(|r| r.clone()).enumerate() {
        let row = &k[r * hd..(r + 1) * hd];
        for g in 0..group {
            let q = &qs[g * hd..(g + 1) * hd];
            scores[g * n + j] = q.iter().zip(row).map(|(x, y)| x * y.to_f32()).sum::<f32>() * scale;
        }
    }
}

fn group_values_portable<T: KvElem>(
    group: usize,
    v: &[T],
    hd: usize,
    segs: &[Range<usize>],
    w: &[f32],
    out: &mut [f32],
) {
    let n = rows_in(segs);
    out[..group * hd].fill(0.0);
    for (j, r) in segs.iter().flat_map(|r| r.clone()).enumerate() {
        let row = &v[r * hd..(r + 1) * hd];
        for g in 0..group {
            let wg = w[g * n + j];
            for (o, x) in out[g * hd..(g + 1) * hd].iter_mut().zip(row) {
                *o += wg * x.to_f32();
            }
        }
    }
}

/// The values of [`attend_segments_v`] when they are the first `vd` of `hd` elements of
/// each row: per head, the weighted sum of the rows' prefixes in row order.
fn group_values_prefix<T: KvElem>(
    group: usize,
    v: &[T],
    hd: usize,
    vd: usize,
    segs: &[Range<usize>],
    w: &[f32],
    out: &mut [f32],
) {
    let n = rows_in(segs);
    out[..group * vd].fill(0.0);
    // Pieces of 64 elements widened once into a stack buffer and used by every head.
    let mut buf = [0f32; 64];
    for (j, r) in segs.iter().flat_map(|r| r.clone()).enumerate() {
        for c0 in (0..vd).step_by(64) {
            let c1 = (c0 + 64).min(vd);
            let piece = &mut buf[..c1 - c0];
            for (d, x) in piece.iter_mut().zip(&v[r * hd + c0..r * hd + c1]) {
                *d = x.to_f32();
            }
            for g in 0..group {
                let wg = w[g * n + j];
                for (o, &x) in out[g * vd + c0..g * vd + c1].iter_mut().zip(piece.iter()) {
                    *o += wg * x;
                }
            }
        }
    }
}

/// Scores for every head of the group: each K row chunk is loaded once and used by all
/// heads (independent FMA chains, one per head).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn group_scores_avx2<T: KvElem>(
    qs: &[f32],
    group: usize,
    k: &[T],
    v: &[T],
    hd: usize,
    segs: &[Range<usize>],
    scale: f32,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = rows_in(segs);
    // SAFETY (whole body): row indices are below the largest range end and chunk offsets
    // below hd, which `attend_segments` checked against the slice lengths; group <= 8.
    unsafe {
        let (qp, kp, vp) = (qs.as_ptr(), k.as_ptr(), v.as_ptr());
        let mut j = 0;
        for (si, seg) in segs.iter().enumerate() {
            let next = prefetch_target(segs, si);
            for (o, r) in seg.clone().enumerate() {
                if o < next.len() {
                    prefetch_row(kp, next.start + o, hd);
                    prefetch_row(vp, next.start + o, hd);
                }
                let kr = kp.add(r * hd);
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut c = 0;
                while c < hd {
                    let kv = T::load8(kr.add(c));
                    for (g, ag) in acc.iter_mut().enumerate().take(group) {
                        *ag = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(g * hd + c)), kv, *ag);
                    }
                    c += 8;
                }
                for (g, ag) in acc.iter().enumerate().take(group) {
                    let s = _mm_add_ps(_mm256_castps256_ps128(*ag), _mm256_extractf128_ps(*ag, 1));
                    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                    let s = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
                    scores[g * n + j] = s * scale;
                }
                j += 1;
            }
        }
    }
}

/// [`group_scores_avx2`] on 512-bit vectors: two K rows per vector (one per 256-bit
/// half) against each head's query chunk duplicated in both halves. Every half does the
/// 256-bit kernel's lane arithmetic and the same final lane sum, so the scores are
/// bit-identical to it; each FMA now serves two rows.
///
/// # Safety
/// As for [`group_scores_avx2`], with AVX-512F present and `G` the group size.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn group_scores512<T: KvElem, const G: usize>(
    qs: &[f32],
    k: &[T],
    v: &[T],
    hd: usize,
    segs: &[Range<usize>],
    scale: f32,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = rows_in(segs);
    let hsum = |v: __m256| {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    };
    // SAFETY (whole body): row indices are below the largest range end and chunk offsets
    // below hd, which `attend_segments` checked against the slice lengths; qs holds G · hd.
    // The element type is f16 exactly when `T::NEEDS_F16C`, so the casts read what is
    // stored.
    unsafe {
        let (qp, kp) = (qs.as_ptr(), k.as_ptr());
        // Two rows' 8-element chunks at `c`, row `r0` in the low half.
        let load_pair = |r0: usize, r1: usize, c: usize| -> __m512 {
            if T::NEEDS_F16C {
                let lo = _mm_loadu_si128(kp.add(r0 * hd + c).cast());
                let hi = _mm_loadu_si128(kp.add(r1 * hd + c).cast());
                _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi))
            } else {
                let lo = _mm256_loadu_ps(kp.add(r0 * hd + c).cast());
                let hi = _mm256_loadu_ps(kp.add(r1 * hd + c).cast());
                pair_f32x8(lo, hi)
            }
        };
        let vp = v.as_ptr();
        let pair = |r0: usize, r1: usize, j: usize, scores: &mut [f32]| {
            let mut acc = [_mm512_setzero_ps(); G];
            for c in (0..hd).step_by(8) {
                let kv = load_pair(r0, r1, c);
                for (g, ag) in acc.iter_mut().enumerate() {
                    let q = _mm256_loadu_ps(qp.add(g * hd + c));
                    let qq = pair_f32x8(q, q);
                    *ag = _mm512_fmadd_ps(qq, kv, *ag);
                }
            }
            for (g, ag) in acc.iter().enumerate() {
                let lo = _mm512_castps512_ps256(*ag);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*ag)));
                scores[g * n + j] = hsum(lo) * scale;
                scores[g * n + j + 1] = hsum(hi) * scale;
            }
        };
        // Rows in order across the ranges, in pairs that may straddle two ranges.
        let (mut j, mut pending) = (0, None);
        for (si, seg) in segs.iter().enumerate() {
            let next = prefetch_target(segs, si);
            for (o, r) in seg.clone().enumerate() {
                if o < next.len() {
                    prefetch_row(kp, next.start + o, hd);
                    prefetch_row(vp, next.start + o, hd);
                }
                match pending.take() {
                    None => pending = Some(r),
                    Some(r0) => {
                        pair(r0, r, j, scores);
                        j += 2;
                    }
                }
            }
        }
        if let Some(r) = pending {
            // The odd last row: the 256-bit arithmetic on its own.
            let kr = kp.add(r * hd);
            let mut acc = [_mm256_setzero_ps(); G];
            for c in (0..hd).step_by(8) {
                let kv = T::load8(kr.add(c));
                for (g, ag) in acc.iter_mut().enumerate() {
                    *ag = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(g * hd + c)), kv, *ag);
                }
            }
            for (g, ag) in acc.iter().enumerate() {
                scores[g * n + j] = hsum(*ag) * scale;
            }
        }
    }
}

/// `lo` in the low 256 bits, `hi` in the high ones (AVX-512F only; `vinsertf32x8` needs DQ).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,avx512f")]
fn pair_f32x8(lo: std::arch::x86_64::__m256, hi: std::arch::x86_64::__m256) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
        _mm256_castps_pd(hi),
    ))
}

/// Weighted sum of V rows for every head of the group. The output is built in register
/// tiles (`D` 8-wide chunks of dims × the group's heads) over all rows, so each V chunk
/// is loaded once per tile and the accumulators never go through memory. Every output
/// element is the same chain of FMAs in row order as a plain loop, so the tiling does
/// not change results.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_values_avx2<T: KvElem>(
    group: usize,
    v: &[T],
    hd: usize,
    segs: &[Range<usize>],
    w: &[f32],
    out: &mut [f32],
) {
    // Tiles of D chunks: 4 for groups up to 3, 2 up to 6, else 1 (the accumulators must
    // fit the registers), when hd splits into whole tiles.
    macro_rules! by_group {
        ($tile:ident, $lanes:expr) => {
            match (
                group,
                hd.is_multiple_of(4 * $lanes),
                hd.is_multiple_of(2 * $lanes),
            ) {
                (1, true, _) => $tile::<T, 1, 4>(v, hd, segs, w, out),
                (2, true, _) => $tile::<T, 2, 4>(v, hd, segs, w, out),
                (3, true, _) => $tile::<T, 3, 4>(v, hd, segs, w, out),
                (4, _, true) => $tile::<T, 4, 2>(v, hd, segs, w, out),
                (5, _, true) => $tile::<T, 5, 2>(v, hd, segs, w, out),
                (6, _, true) => $tile::<T, 6, 2>(v, hd, segs, w, out),
                (1, ..) => $tile::<T, 1, 1>(v, hd, segs, w, out),
                (2, ..) => $tile::<T, 2, 1>(v, hd, segs, w, out),
                (3, ..) => $tile::<T, 3, 1>(v, hd, segs, w, out),
                (4, ..) => $tile::<T, 4, 1>(v, hd, segs, w, out),
                (5, ..) => $tile::<T, 5, 1>(v, hd, segs, w, out),
                (6, ..) => $tile::<T, 6, 1>(v, hd, segs, w, out),
                (7, ..) => $tile::<T, 7, 1>(v, hd, segs, w, out),
                _ => $tile::<T, 8, 1>(v, hd, segs, w, out),
            }
        };
    }
    // SAFETY (both): the caller's contract; hd is a multiple of the tile width picked, and
    // AVX-512F is present for the 512-bit tiles.
    unsafe {
        if hd.is_multiple_of(16) && wide_available() {
            by_group!(values_tile512, 16)
        } else {
            by_group!(values_tile, 8)
        }
    }
}

/// [`group_values_avx2`] for `G` heads and tiles of `D` chunks.
///
/// # Safety
/// AVX2/FMA (F16C for f16) present; `hd` a multiple of `8 · D`; every row of `segs`
/// below `v.len() / hd`; `w` holds `G ·` (rows of `segs`) weights and `out` `G · hd` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn values_tile<T: KvElem, const G: usize, const D: usize>(
    v: &[T],
    hd: usize,
    segs: &[Range<usize>],
    w: &[f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = rows_in(segs);
    // SAFETY (whole body): row indices are below the largest range end and dim offsets
    // below hd, which `attend_segments` checked against the slice lengths; `w` and `out`
    // hold G · n and G · hd floats.
    unsafe {
        let (vp, wp, op) = (v.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        for c0 in (0..hd).step_by(8 * D) {
            let mut acc = [[_mm256_setzero_ps(); D]; G];
            let mut j = 0;
            for seg in segs {
                for r in seg.clone() {
                    let vr = vp.add(r * hd + c0);
                    let mut vv = [_mm256_setzero_ps(); D];
                    for (d, x) in vv.iter_mut().enumerate() {
                        *x = T::load8(vr.add(8 * d));
                    }
                    for (g, ag) in acc.iter_mut().enumerate() {
                        let wg = _mm256_broadcast_ss(&*wp.add(g * n + j));
                        for (x, &y) in ag.iter_mut().zip(&vv) {
                            *x = _mm256_fmadd_ps(wg, y, *x);
                        }
                    }
                    j += 1;
                }
            }
            for (g, ag) in acc.iter().enumerate() {
                for (d, &x) in ag.iter().enumerate() {
                    _mm256_storeu_ps(op.add(g * hd + c0 + 8 * d), x);
                }
            }
        }
    }
}

/// True when the 512-bit kernels here may run: the q8 level in force is AVX-512 VNNI
/// (which implies AVX-512F, AVX2, FMA and F16C).
#[cfg(target_arch = "x86_64")]
fn wide_available() -> bool {
    crate::quant::q8::avx512_allowed()
}

/// [`values_tile`] on 512-bit vectors: chunks of 16 dims. Each output element is still
/// one FMA chain over the rows in order, so the results equal the 256-bit kernel's.
///
/// # Safety
/// As for [`values_tile`], with AVX-512F present and `hd` a multiple of `16 · D`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn values_tile512<T: KvElem, const G: usize, const D: usize>(
    v: &[T],
    hd: usize,
    segs: &[Range<usize>],
    w: &[f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = rows_in(segs);
    // SAFETY (whole body): as in `values_tile`. The element type is f16 exactly when
    // `T::NEEDS_F16C` (the two `KvElem` types), so the casts read what is stored.
    unsafe {
        let (vp, wp, op) = (v.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        let load16 = |p: *const T| -> __m512 {
            if T::NEEDS_F16C {
                _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
            } else {
                _mm512_loadu_ps(p.cast())
            }
        };
        for c0 in (0..hd).step_by(16 * D) {
            let mut acc = [[_mm512_setzero_ps(); D]; G];
            let mut j = 0;
            for seg in segs {
                for r in seg.clone() {
                    let vr = vp.add(r * hd + c0);
                    let mut vv = [_mm512_setzero_ps(); D];
                    for (d, x) in vv.iter_mut().enumerate() {
                        *x = load16(vr.add(16 * d));
                    }
                    for (g, ag) in acc.iter_mut().enumerate() {
                        let wg = _mm512_set1_ps(*wp.add(g * n + j));
                        for (x, &y) in ag.iter_mut().zip(&vv) {
                            *x = _mm512_fmadd_ps(wg, y, *x);
                        }
                    }
                    j += 1;
                }
            }
            for (g, ag) in acc.iter().enumerate() {
                for (d, &x) in ag.iter().enumerate() {
                    _mm512_storeu_ps(op.add(g * hd + c0 + 16 * d), x);
                }
            }
        }
    }
}

widest!(
    /// Unnormalised softmax of each `n`-score row of `scores` (after the optional
    /// soft-cap): the scores become `exp(s - max)`, and `stats` gets `(max, sum)` per row.
    fn group_softmax(scores: &mut [f32], n: usize, softcap: f32, stats: &mut [f32]) {
        if n == 0 {
            return;
        }
        for (g, s) in scores.chunks_exact_mut(n).enumerate() {
            if softcap > 0.0 {
                let inv = 1.0 / softcap;
                for x in s.iter_mut() {
                    *x = softcap * (*x * inv).tanh();
                }
            }
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for x in s.iter_mut() {
                *x = exp_nonpos(*x - m);
            }
            stats[2 * g] = m;
            stats[2 * g + 1] = sum_f32(s);
        }
    }
);

/// Combines partial results of one head over disjoint row sets (flash-decoding):
/// `parts` yields (unnormalised out, m, l); writes the normalised attention output.
pub fn merge_partials<'a>(parts: impl Iterator<Item = (&'a [f32], f32, f32)> + Clone, out: &mut [f32]) {
    let m = parts.clone().map(|p| p.1).fold(f32::NEG_INFINITY, f32::max);
    let l: f32 = parts.clone().map(|p| p.2 * (p.1 - m).exp()).sum();
    let inv = 1.0 / l;
    out.fill(0.0);
    for (o_part, mp, _) in parts {
        let f = (mp - m).exp() * inv;
        for (o, &x) in out.iter_mut().zip(o_part) {
            *o += f * x;
        }
    }
}

// ------------------------------------------------------------- paged attention

/// Positions per span of the paged attention (see [`PagedAttn`]); the CPU backend's
/// default. Measured with `tests/paged_bench.rs` against 64, 128 and 512 (2 threads):
/// spans of 64 cost up to 20% over the contiguous kernel (a call and a fold per 64
/// rows), 128 up to 10%; 256 and 512 were within a few percent of each other and at
/// 0.8-1.05 of the contiguous kernel; 256 keeps twice as many
/// spans as 512 for one decode row to spread over threads (2048 positions: 8 per KV
/// head), and is a multiple of every usual block size.
pub const ATTN_SPAN: usize = 256;

/// A sequence's K/V in a paged pool, seen by one attention call: what
/// [`attend_row`](PagedAttn::attend_row) and
/// [`span_partial`](PagedAttn::span_partial) need to find and weigh its rows.
///
/// # Batch invariance
/// A row at position `p` attends to `lo..=p` (`lo = max(0, p - window + 1)`). Those
/// positions are cut into *spans* at the multiples of `span` (absolute positions, so the
/// cut depends on nothing but `p`, the window and `span`); each span's partial softmax is
/// computed on its own ([`span_partial`](Self::span_partial)) and the spans are folded
/// oldest first ([`fold_span`]), then normalised ([`finish_fold`]). Every step of that is
/// a fixed function of the row's query, position and K/V (for a given span length and
/// SIMD level), so a backend may compute the spans of one row on different threads, at
/// different times, in a batch of any size, and still get the same bits, provided it
/// folds them in the same order with the same functions. Where the rows are stored
/// (block size, block ids) does not matter either: scores are per row and the sums run
/// over the rows in position order. Cutting at absolute positions also gives every row
/// of a prefill chunk the same span boundaries, so a kernel that shares K/V loads
/// between the rows of a chunk can keep each row's arithmetic unchanged.
#[derive(Clone, Copy)]
pub struct PagedAttn<'a, T> {
    /// One layer's pool, `[block][kv_head][offset][head_dim]`.
    pub k: &'a [T],
    pub v: &'a [T],
    /// The sequence's block ids (entry j: positions `j*block_size..(j+1)*block_size`).
    pub table: &'a [u32],
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Elements of a V row that are the value (`head_dim`, or fewer: the prefix, as
    /// [`attend_segments_v`] reads it); outputs are `v_dim` per head.
    pub v_dim: usize,
    pub scale: f32,
    pub softcap: f32,
    /// 0 = all positions.
    pub window: usize,
    /// Positions per span.
    pub span: usize,
    /// Learned attention sinks (GPT-OSS), one logit per query head (all `kv_heads ·
    /// group` of them): each adds `exp(sink)` to its head's softmax denominator and
    /// nothing to the output ([`finish_fold`]).
    pub sinks: Option<&'a [f32]>,
}

/// Floats of scratch [`PagedAttn::attend_row`] needs for a GQA group of `group` heads.
pub fn paged_row_scratch(group: usize, head_dim: usize, span: usize) -> usize {
    group * span + group * head_dim + 4 * group
}

impl<T: KvElem> PagedAttn<'_, T> {
    /// The first position a row at `p` sees.
    #[inline]
    pub fn first_visible(&self, p: usize) -> usize {
        if self.window == 0 {
            0
        } else {
            (p + 1).saturating_sub(self.window)
        }
    }

    /// The spans (by index k: positions `k*span..(k+1)*span`) a row at `p` attends over.
    #[inline]
    pub fn spans(&self, p: usize) -> Range<usize> {
        self.first_visible(p) / self.span..p / self.span + 1
    }

    /// Positions of span `k` that a row at `p` sees.
    #[inline]
    pub fn span_positions(&self, k: usize, p: usize) -> Range<usize> {
        self.first_visible(p).max(k * self.span)..(p + 1).min((k + 1) * self.span)
    }

    /// The pool rows (in units of `head_dim`) of KV head `kvh` holding `positions`, one
    /// range per block touched, oldest first, into `segs`.
    pub fn segments(&self, kvh: usize, positions: Range<usize>, segs: &mut Vec<Range<usize>>) {
        segs.clear();
        let bs = self.block_size;
        let mut p = positions.start;
        while p < positions.end {
            let (j, off) = (p / bs, p % bs);
            let len = (bs - off).min(positions.end - p);
            let base = (self.table[j] as usize * self.kv_heads + kvh) * bs;
            segs.push(base + off..base + off + len);
            p += len;
        }
    }

    /// Span `k`'s partial attention of the row at `p` for the GQA group of KV head
    /// `kvh` (queries `qs`, `group` heads): as [`attend_group`] leaves it, unnormalised
    /// `out` (`group * v_dim`) and `(max, sum)` per head in `stats`. `scores` holds
    /// at least `group * span` floats.
    #[allow(clippy::too_many_arguments)]
    pub fn span_partial(
        &self,
        qs: &[f32],
        group: usize,
        kvh: usize,
        k: usize,
        p: usize,
        segs: &mut Vec<Range<usize>>,
        scores: &mut [f32],
        out: &mut [f32],
        stats: &mut [f32],
    ) {
        self.segments(kvh, self.span_positions(k, p), segs);
        let hd = self.head_dim;
        attend_segments_v(
            qs,
            group,
            self.k,
            self.v,
            hd,
            self.v_dim,
            segs,
            self.scale,
            self.softcap,
            scores,
            out,
            stats,
        );
    }

    /// The whole, normalised attention of the row at `p` for the GQA group of KV head
    /// `kvh` into `out` (`group * v_dim`): every span in order, folded as it comes.
    /// `scratch` holds [`paged_row_scratch`] floats. This is the reference the batched
    /// kernels reproduce bit for bit however they spread a row's spans.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_row(
        &self,
        qs: &[f32],
        group: usize,
        kvh: usize,
        p: usize,
        segs: &mut Vec<Range<usize>>,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        let vd = self.v_dim;
        let (scores, rest) = scratch.split_at_mut(group * self.span);
        let (po, rest) = rest.split_at_mut(group * self.head_dim);
        let po = &mut po[..group * vd];
        let (pstats, rest) = rest.split_at_mut(2 * group);
        let stats = &mut rest[..2 * group];
        for (i, k) in self.spans(p).enumerate() {
            self.span_partial(qs, group, kvh, k, p, segs, scores, po, pstats);
            fold_span(&mut out[..group * vd], stats, po, pstats, group, i == 0);
        }
        finish_fold(&mut out[..group * vd], stats, group, self.group_sinks(kvh, group));
    }

    /// The sinks of KV head `kvh`'s `group` query heads, if any.
    #[inline]
    pub fn group_sinks(&self, kvh: usize, group: usize) -> Option<&[f32]> {
        self.sinks.map(|s| &s[kvh * group..(kvh + 1) * group])
    }
}

/// Folds one span's partial result (`po`, `pstats`, as [`attend_segments`] leaves them)
/// into the running result of the spans before it (`o`, `stats`, same layout), for
/// `group` heads: the online-softmax rescaling to the larger maximum. `first`: there is
/// no running result yet; it becomes a copy of the span's.
pub fn fold_span(o: &mut [f32], stats: &mut [f32], po: &[f32], pstats: &[f32], group: usize, first: bool) {
    if first {
        o.copy_from_slice(po);
        stats[..2 * group].copy_from_slice(&pstats[..2 * group]);
        return;
    }
    let hd = o.len() / group;
    for g in 0..group {
        let (m, l) = (stats[2 * g], stats[2 * g + 1]);
        let (pm, pl) = (pstats[2 * g], pstats[2 * g + 1]);
        let mx = m.max(pm);
        let (a, b) = (exp_nonpos(m - mx), exp_nonpos(pm - mx));
        stats[2 * g] = mx;
        stats[2 * g + 1] = l * a + pl * b;
        for (x, &y) in o[g * hd..(g + 1) * hd].iter_mut().zip(&po[g * hd..(g + 1) * hd]) {
            *x = *x * a + y * b;
        }
    }
}

/// Normalises a folded result: each head's output divided by its softmax sum. With
/// `sinks` (one logit per head of the group), head `g`'s denominator also holds
/// `exp(sinks[g])` on the scores' scale: the sum becomes `l·e^(m−m') + e^(sink−m')` with
/// `m' = max(m, sink)`, and the output is scaled by `e^(m−m')` over it (a sink far above
/// every score drives the output to 0, as the softmax does).
pub fn finish_fold(o: &mut [f32], stats: &[f32], group: usize, sinks: Option<&[f32]>) {
    let hd = o.len() / group;
    for g in 0..group {
        let (m, l) = (stats[2 * g], stats[2 * g + 1]);
        let inv = match sinks {
            None => 1.0 / l,
            Some(s) => {
                let mx = m.max(s[g]);
                let a = (m - mx).exp();
                a / (l * a + (s[g] - mx).exp())
            }
        };
        o[g * hd..(g + 1) * hd].iter_mut().for_each(|x| *x *= inv);
    }
}

/// Most experts a router may choose from, and most it may pick per token (the
/// released MoE models use up to 256 and 8 or 16; the limits keep the per-row scratch on
/// the stack).
pub const MAX_EXPERTS: usize = 1024;
pub const MAX_EXPERTS_PER_TOKEN: usize = 64;

/// How the router's scores are made from its logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeScoring {
    /// A softmax over all experts.
    Softmax,
    /// Each expert's own sigmoid (DeepSeek-V3).
    Sigmoid,
}

/// How a group of experts is scored for group-limited routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupScore {
    /// The group's largest choice score (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// The sum of its two largest (DeepSeek-V3).
    TopTwoSum,
}

/// A router's rule ([`moe_route_with`]): scoring, optional group limit, renormalisation
/// and a final scale. [`MoeRouting::softmax`] is the plain rule of Qwen-MoE, Mixtral,
/// OLMoE and GPT-OSS.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeRouting {
    pub scoring: MoeScoring,
    /// Divide the chosen experts' scores by their sum.
    pub renormalize: bool,
    /// Multiplies the final weights (DeepSeek's `routed_scaling_factor`; 1 for the rest).
    pub scale: f32,
    /// Experts form `n_groups` equal consecutive groups and only the `topk_groups` best
    /// groups (by `group_score` of the choice scores) may be chosen from; 1 = no limit.
    pub n_groups: usize,
    pub topk_groups: usize,
    pub group_score: GroupScore,
}

impl MoeRouting {
    /// Softmax over all experts, top-k, optionally renormalised.
    pub fn softmax(renormalize: bool) -> MoeRouting {
        MoeRouting {
            scoring: MoeScoring::Softmax,
            renormalize,
            scale: 1.0,
            n_groups: 1,
            topk_groups: 1,
            group_score: GroupScore::Max,
        }
    }

    /// Whether the rule can pick `k` of `n_experts`: groups divide the experts, at most
    /// [`MAX_EXPERTS`] of them, and the allowed groups hold at least `k` experts.
    pub fn check(&self, n_experts: usize, k: usize) -> Result<(), String> {
        if !(1..=MAX_EXPERTS).contains(&n_experts) || !(1..=n_experts.min(MAX_EXPERTS_PER_TOKEN)).contains(&k) {
            return Err(format!("top {k} of {n_experts} experts"));
        }
        let (g, tg) = (self.n_groups, self.topk_groups);
        if g == 0 || !n_experts.is_multiple_of(g) {
            return Err(format!("{n_experts} experts do not split into {g} groups"));
        }
        if g > 1 && (tg == 0 || tg > g || tg * (n_experts / g) < k) {
            return Err(format!(
                "{tg} of {g} groups of {} experts cannot hold {k} chosen experts",
                n_experts / g
            ));
        }
        if !self.scale.is_finite() {
            return Err(format!("routed scaling factor {}", self.scale));
        }
        Ok(())
    }
}

/// One token's routing under `r` ([`MoeRouting::check`] holds): scores (softmax or
/// sigmoid of `logits`); choice scores = scores `+ bias` when a bias is given (DeepSeek-V3's
/// `e_score_correction_bias`: it steers the choice only); with groups, the `topk_groups`
/// groups of the best group scores (ties to the lower group) are the only candidates;
/// the `ids.len()` best candidates by choice score (largest first, ties to the lower
/// index); `weights` are their unbiased scores, divided by their sum when `renormalize`,
/// times `scale`, then each times its expert's entry of `expert_scale` when given (Gemma 4's
/// `per_expert_scale`). With [`MoeRouting::softmax`] and neither table it is [`moe_route`]
/// bit for bit.
pub fn moe_route_with(
    logits: &[f32],
    bias: Option<&[f32]>,
    expert_scale: Option<&[f32]>,
    r: &MoeRouting,
    ids: &mut [f32],
    weights: &mut [f32],
) {
    let (k, ne) = (ids.len(), logits.len());
    debug_assert!(k == weights.len() && k <= ne && ne <= MAX_EXPERTS && k <= MAX_EXPERTS_PER_TOKEN);
    debug_assert!(bias.is_none_or(|b| b.len() >= ne));
    debug_assert!(expert_scale.is_none_or(|s| s.len() >= ne));
    let mut score = [0f32; MAX_EXPERTS];
    match r.scoring {
        MoeScoring::Softmax => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for &l in logits {
                sum += (l - max).exp();
            }
            let inv = 1.0 / sum;
            for (s, &l) in score.iter_mut().zip(logits) {
                *s = (l - max).exp() * inv;
            }
        }
        MoeScoring::Sigmoid => {
            for (s, &l) in score.iter_mut().zip(logits) {
                *s = 1.0 / (1.0 + (-l).exp());
            }
        }
    }
    let mut choice = [0f32; MAX_EXPERTS];
    for e in 0..ne {
        choice[e] = score[e] + bias.map_or(0.0, |b| b[e]);
    }
    // Allowed experts: all, or those of the best groups.
    let mut allowed = [true; MAX_EXPERTS];
    if r.n_groups > 1 {
        let gs = ne / r.n_groups;
        let mut gscore = [0f32; MAX_EXPERTS];
        for (g, out) in gscore.iter_mut().enumerate().take(r.n_groups) {
            let c = &choice[g * gs..(g + 1) * gs];
            *out = match r.group_score {
                GroupScore::Max => c.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                GroupScore::TopTwoSum => {
                    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                    for &x in c {
                        if x > a {
                            (a, b) = (x, a);
                        } else if x > b {
                            b = x;
                        }
                    }
                    // A group of one expert counts it once.
                    if gs == 1 {
                        a
                    } else {
                        a + b
                    }
                }
            };
        }
        let mut keep = [false; MAX_EXPERTS];
        for _ in 0..r.topk_groups {
            let mut best = usize::MAX;
            for g in 0..r.n_groups {
                if !keep[g] && (best == usize::MAX || gscore[g] > gscore[best]) {
                    best = g;
                }
            }
            keep[best] = true;
        }
        for (e, a) in allowed.iter_mut().enumerate().take(ne) {
            *a = keep[e / gs];
        }
    }
    let mut taken = [usize::MAX; MAX_EXPERTS_PER_TOKEN];
    for j in 0..k {
        let mut best = usize::MAX;
        let mut best_c = f32::NEG_INFINITY;
        for e in 0..ne {
            if !allowed[e] || taken[..j].contains(&e) {
                continue;
            }
            if best == usize::MAX || choice[e] > best_c {
                best = e;
                best_c = choice[e];
            }
        }
        taken[j] = best;
        ids[j] = best as f32;
        weights[j] = score[best];
    }
    if r.renormalize {
        let s: f32 = weights.iter().sum();
        let inv = 1.0 / s;
        weights.iter_mut().for_each(|w| *w *= inv);
    }
    if r.scale != 1.0 {
        weights.iter_mut().for_each(|w| *w *= r.scale);
    }
    if let Some(es) = expert_scale {
        for (w, &e) in weights.iter_mut().zip(taken.iter()) {
            *w *= es[e];
        }
    }
}

/// One token's routing: `softmax(logits)` over all experts, the `ids.len()` most
/// probable (largest first; equal probabilities: the lower expert index first), and
/// their probabilities in `weights`, divided by their sum when `renormalize`.
///
/// The softmax uses `f32::exp` (not [`exp_nonpos`]): a routing decision is discrete, so
/// the probabilities are kept as close to torch's as f32 allows. torch.topk leaves the
/// order of exactly equal values unspecified (its CPU kernel does not keep the lower
/// index first); such ties need bit-equal router logits, which real inputs do not give.
/// Expert ids are written as f32 (exact below 2^24) so they travel in activation buffers.
pub fn moe_route(logits: &[f32], renormalize: bool, ids: &mut [f32], weights: &mut [f32]) {
    moe_route_with(logits, None, None, &MoeRouting::softmax(renormalize), ids, weights)
}

/// Adds each slot's expert bias: `x[s] += biases[ids[s]]` for the `ids.len()` slots,
/// rows of width `d` (`biases` is `[n_experts, d]`; ids as f32, as `moe_route` writes them).
pub fn moe_add_bias(x: &mut [f32], biases: &[f32], ids: &[f32], d: usize) {
    for (s, &e) in ids.iter().enumerate() {
        let e = e as usize;
        for (a, &b) in x[s * d..(s + 1) * d].iter_mut().zip(&biases[e * d..(e + 1) * d]) {
            *a += b;
        }
    }
}

/// `out = sum_j weights[j] * ys[j]` over a token's `k` expert outputs (`ys` is
/// `[k, out.len()]`), in slot order.
pub fn moe_combine(ys: &[f32], weights: &[f32], out: &mut [f32]) {
    let d = out.len();
    out.fill(0.0);
    for (j, &w) in weights.iter().enumerate() {
        for (o, &y) in out.iter_mut().zip(&ys[j * d..(j + 1) * d]) {
            *o += w * y;
        }
    }
}
