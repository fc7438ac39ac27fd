//! The portable implementation: plain Rust, any target.
//!
//! It defines the arithmetic the AVX2 kernels must reproduce: the activation bytes
//! exactly, and per block (sub-block for the K-quants) the exact integer dot of the
//! weight levels with the activation quants. The `f32` side is one term per block,
//! `(d_w · d_x) · isum`, summed sequentially per token (plus the min terms).

use super::{k_scales, Step, View, KSUMS};
use crate::quant::{read_f16, WeightType, QK, QK_K};

/// Tokens processed together per pass over a weight row.
pub(super) const TILE: usize = 8;

// -------------------------------------------------------------- quantization

/// `max |x|` ordered by IEEE bit pattern (so NaN > inf > every finite value).
#[inline]
fn amax(x: &[f32]) -> f32 {
    f32::from_bits(x.iter().map(|v| v.to_bits() & 0x7FFF_FFFF).max().unwrap_or(0))
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2^22`: adding and
/// subtracting 1.5 · 2^23 leaves no fraction bits, and IEEE addition rounds to
/// nearest-even. Exactly `v.round_ties_even()` (up to the sign of a zero), which on
/// baseline x86-64 is a libm call.
#[inline(always)]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Quantizes one block; returns `(d, Σq)`.
#[inline]
fn quant_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    match Step::new(amax(x)) {
        None => {
            q.fill(0);
            (f32::NAN, 0)
        }
        Some(st) => {
            let mut sum = 0i32;
            for (o, &v) in q.iter_mut().zip(x) {
                // |v · m1 · m2| ≤ 127 (+ rounding), far inside `round_even`'s range.
                let r = round_even((v * st.m1) * st.m2) as i32;
                *o = r as i8;
                sum += r;
            }
            (st.d, sum)
        }
    }
}

pub(super) fn quantize_q8_row(x: &[f32], q: &mut [i8], d: &mut [f32], qsum: &mut [i32], mut s: Option<&mut [f32]>) {
    for (b, (xb, qb)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
        let (db, sum) = quant_block(xb, qb);
        d[b] = db;
        qsum[b] = sum;
        if let Some(s) = s.as_deref_mut() {
            s[b] = db * sum as f32;
        }
    }
}

pub(super) fn quantize_q8k_row(x: &[f32], q: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    let blocks = x.chunks_exact(QK_K).zip(q.chunks_exact_mut(QK_K));
    for ((xb, qb), (db, bs)) in blocks.zip(d.iter_mut().zip(bsums.chunks_exact_mut(KSUMS))) {
        *db = quant_block(xb, qb).0;
        for (o, q16) in bs.iter_mut().zip(qb.chunks_exact(16)) {
            *o = q16.iter().map(|&v| v as i16).sum();
        }
    }
}

// ---------------------------------------------------------------------- dots

pub(super) fn dot_multi(ty: WeightType, row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
    for (i, o) in out.chunks_mut(TILE).enumerate() {
        let t = t0 + i * TILE;
        match ty {
            WeightType::Q4_0 => dot_legacy::<Q4_0>(row, v, t, o),
            WeightType::Q4_1 => dot_legacy::<Q4_1>(row, v, t, o),
            WeightType::Q5_0 => dot_legacy::<Q5_0>(row, v, t, o),
            WeightType::Q5_1 => dot_legacy::<Q5_1>(row, v, t, o),
            WeightType::Q8_0 => dot_legacy::<Q8_0>(row, v, t, o),
            WeightType::Q4K => dot_q45k::<false>(row, v, t, o),
            WeightType::Q5K => dot_q45k::<true>(row, v, t, o),
            WeightType::Q6K => dot_q6k(row, v, t, o),
            WeightType::Q2K
            | WeightType::Q3K
            | WeightType::Q8K
            | WeightType::IQ4NL
            | WeightType::IQ4XS
            | WeightType::MXFP4 => super::lowbit::dot_multi(ty, row, v, t, o),
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => unreachable!("float types have no q8 path"),
            WeightType::Affine { .. } => unreachable!("affine rows run quant::q8::affine"),
        }
    }
}

use super::{legacy_bytes, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};

use crate::quant::legacy::SPREAD as BIT4;

/// Decodes a legacy block into its stored integer levels `w` and `(d, m)`: the
/// block is `(w - z) · d + m` with the zero point `z` = 8 (Q4_0), 16 (Q5_0), else 0,
/// and `m = 0` for the kinds without a min.
#[inline(always)]
fn decode_legacy<const K: u8>(b: &[u8], w: &mut [i8; QK]) -> (f32, f32) {
    let d = read_f16(b, 0);
    let nibbles = |at: usize, w: &mut [i8; QK]| {
        let (lo, hi) = w.split_at_mut(QK / 2);
        for ((&q, l), h) in b[at..at + QK / 2].iter().zip(lo).zip(hi) {
            *l = (q & 0x0F) as i8;
            *h = (q >> 4) as i8;
        }
    };
    let high_bit = |at: usize, w: &mut [i8; QK]| {
        // Element i's bit 4 is bit i % 8 of qh byte i / 8.
        for (w8, &h) in w.chunks_exact_mut(8).zip(&b[at..at + 4]) {
            for (v, s) in w8.iter_mut().zip(BIT4[h as usize].to_le_bytes()) {
                *v |= s as i8;
            }
        }
    };
    match K {
        Q4_0 => {
            nibbles(2, w);
            (d, 0.0)
        }
        Q4_1 => {
            nibbles(4, w);
            (d, read_f16(b, 2))
        }
        Q5_0 => {
            nibbles(6, w);
            high_bit(2, w);
            (d, 0.0)
        }
        Q5_1 => {
            nibbles(8, w);
            high_bit(4, w);
            (d, read_f16(b, 2))
        }
        _ => {
            for (v, &q) in w.iter_mut().zip(&b[2..2 + QK]) {
                *v = q as i8;
            }
            (d, 0.0)
        }
    }
}

/// Exact `Σ w·a` of `N` (a multiple of 16) bytes, in 16 `i32` lanes of `i16` products
/// (|w·a| ≤ 2^14). Kept out of line: on its own it vectorises (`pmaddwd` on SSE2),
/// inlined into the kernels LLVM left it scalar (about 3x slower).
#[inline(never)]
pub(super) fn idot<const N: usize>(w: &[i8; N], a: &[i8; N]) -> i32 {
    let mut acc = [0i32; 16];
    for (wc, ac) in w.chunks_exact(16).zip(a.chunks_exact(16)) {
        for ((s, &x), &y) in acc.iter_mut().zip(wc).zip(ac) {
            *s += i32::from(x as i16 * y as i16);
        }
    }
    acc.iter().sum()
}

/// The `N` activation quants of token `t` from element `at` on.
#[inline(always)]
pub(super) fn quants<'a, const N: usize>(v: &View<'a>, t: usize, at: usize) -> &'a [i8; N] {
    v.qs[t * v.cols + at..][..N].try_into().unwrap()
}

/// Up to `TILE` tokens `t0..t0 + out.len()` against one legacy row.
fn dot_legacy<const K: u8>(row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
    let has_min = K == Q4_1 || K == Q5_1;
    let zero_point = match K {
        Q4_0 => 8,
        Q5_0 => 16,
        _ => 0,
    };
    let mut acc = [0.0f32; TILE];
    let mut summ = [0.0f32; TILE];
    let mut w = [0i8; QK];
    for (b, blk) in row.chunks_exact(legacy_bytes(K)).enumerate() {
        let (dw, m) = decode_legacy::<K>(blk, &mut w);
        for (j, (a, sm)) in acc.iter_mut().zip(&mut summ).take(out.len()).enumerate() {
            let t = t0 + j;
            // Σ (w - z) x = Σ w x - z Σ x, exactly.
            let mut isum = idot(&w, quants::<QK>(&v, t, b * QK));
            if zero_point != 0 {
                isum -= zero_point * v.qsum[t * v.nblk + b];
            }
            *a += (dw * v.d[t * v.nblk + b]) * isum as f32;
            if has_min {
                *sm += m * v.s[t * v.nblk + b];
            }
        }
    }
    for ((o, a), sm) in out.iter_mut().zip(acc).zip(summ) {
        *o = a + sm;
    }
}

/// Up to `TILE` tokens against one Q4_K (`Q5 = false`) or Q5_K row.
fn dot_q45k<const Q5: bool>(row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
    let bytes = if Q5 { 176 } else { 144 };
    let mut acc = [0.0f32; TILE];
    let mut q = [0i8; QK_K];
    for (sb, blk) in row.chunks_exact(bytes).enumerate() {
        let d = read_f16(blk, 0);
        let dmin = read_f16(blk, 2);
        let (sc, mn) = k_scales(blk[4..16].try_into().unwrap());
        let (sc, mn) = (sc.to_le_bytes(), mn.to_le_bytes());
        let qs = &blk[if Q5 { 48 } else { 16 }..];
        for (g, (q32, o64)) in qs.chunks_exact(32).zip(q.chunks_exact_mut(64)).enumerate() {
            let (lo, hi) = o64.split_at_mut(32);
            for (l, ((&b, ql), qh)) in q32.iter().zip(lo).zip(hi).enumerate() {
                *ql = (b & 0x0F) as i8;
                *qh = (b >> 4) as i8;
                if Q5 {
                    let h = blk[16 + l];
                    *ql |= (((h >> (2 * g)) & 1) << 4) as i8;
                    *qh |= (((h >> (2 * g + 1)) & 1) << 4) as i8;
                }
            }
        }
        for (j, a) in acc.iter_mut().enumerate().take(out.len()) {
            let t = t0 + j;
            let x = quants::<QK_K>(&v, t, sb * QK_K);
            let bs = &v.bsums[(t * v.nblk + sb) * KSUMS..][..KSUMS];
            let mut sumi = 0i32;
            let mut msum = 0i32;
            for s in 0..8 {
                let (qs, xs) = (&q[32 * s..32 * s + 32], &x[32 * s..32 * s + 32]);
                sumi += sc[s] as i32 * idot::<32>(qs.try_into().unwrap(), xs.try_into().unwrap());
                msum += mn[s] as i32 * (bs[2 * s] as i32 + bs[2 * s + 1] as i32);
            }
            let da = v.d[t * v.nblk + sb];
            *a += (d * da) * sumi as f32;
            *a -= (dmin * da) * msum as f32;
        }
    }
    out.copy_from_slice(&acc[..out.len()]);
}

/// Up to `TILE` tokens against one Q6_K row.
fn dot_q6k(row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
    let mut acc = [0.0f32; TILE];
    let mut q = [0i8; QK_K];
    for (sb, blk) in row.chunks_exact(210).enumerate() {
        let d = read_f16(blk, 208);
        let (ql, rest) = blk.split_at(128);
        let (qh, sc) = rest.split_at(64);
        for (n, o128) in q.chunks_exact_mut(128).enumerate() {
            for l in 0..32 {
                let (a, c, h) = (ql[64 * n + l], ql[64 * n + l + 32], qh[32 * n + l]);
                o128[l] = ((a & 0x0F) | ((h & 0x03) << 4)) as i8 - 32;
                o128[l + 32] = ((c & 0x0F) | (((h >> 2) & 0x03) << 4)) as i8 - 32;
                o128[l + 64] = ((a >> 4) | (((h >> 4) & 0x03) << 4)) as i8 - 32;
                o128[l + 96] = ((c >> 4) | (((h >> 6) & 0x03) << 4)) as i8 - 32;
            }
        }
        for (j, a) in acc.iter_mut().enumerate().take(out.len()) {
            let t = t0 + j;
            let x = quants::<QK_K>(&v, t, sb * QK_K);
            let mut sumi = 0i32;
            for (s, (q16, x16)) in q.chunks_exact(16).zip(x.chunks_exact(16)).enumerate() {
                sumi += sc[s] as i8 as i32 * idot::<16>(q16.try_into().unwrap(), x16.try_into().unwrap());
            }
            *a += (d * v.d[t * v.nblk + sb]) * sumi as f32;
        }
    }
    out.copy_from_slice(&acc[..out.len()]);
}
