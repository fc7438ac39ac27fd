//! The portable implementation: plain Rust, any target.
//!
//! It defines the arithmetic the AVX2 kernels must reproduce: the activation bytes
//! exactly, and per block (sub-block for the K-quants) the exact integer dot of the
//! weight levels with the activation quants. The `f32` side is one term per block,
//! `(d_w · d_x) · isum`, summed sequentially per token (plus the min terms).

use super::{k_scales, Step, View, KSUMS};
use crate::quant::{read_f16, WeightType, QK, QK_K};

/// Tokens processed together per pass over a weight row.
const TILE: usize = 8;

// -------------------------------------------------------------- quantization

/// `max |x|` ordered by IEEE bit pattern (so NaN > inf > every finite value).
#[inline]
fn amax(x: &[f32]) -> f32 {
    f32::from_bits(x.iter().map(|v| v.to_bits() & 0x7FFF_FFFF).max().unwrap_or(0))
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
                let r = ((v * st.m1) * st.m2).round_ties_even() as i32;
                *o = r as i8;
                sum += r;
            }
            (st.d, sum)
        }
    }
}

pub(super) fn quantize_q8_row(x: &[f32], q: &mut [i8], d: &mut [f32], mut s: Option<&mut [f32]>) {
    for (b, (xb, qb)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
        let (db, sum) = quant_block(xb, qb);
        d[b] = db;
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
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => unreachable!("float types have no q8 path"),
        }
    }
}

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q5_1: u8 = 3;
const Q8_0: u8 = 4;

/// Bytes per block of legacy kind `K`.
const fn legacy_bytes(k: u8) -> usize {
    match k {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        _ => 34,
    }
}

/// Decodes a legacy block into its integer levels `w` and `(d, m)`: the block is
/// `w · d + m` (`m = 0` for the symmetric kinds, whose zero point is folded into `w`).
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
        let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        for (i, v) in w.iter_mut().enumerate() {
            *v |= (((qh >> i) & 1) << 4) as i8;
        }
    };
    match K {
        Q4_0 => {
            nibbles(2, w);
            w.iter_mut().for_each(|v| *v -= 8);
            (d, 0.0)
        }
        Q4_1 => {
            nibbles(4, w);
            (d, read_f16(b, 2))
        }
        Q5_0 => {
            nibbles(6, w);
            high_bit(2, w);
            w.iter_mut().for_each(|v| *v -= 16);
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

#[inline(always)]
fn idot(w: &[i8], a: &[i8]) -> i32 {
    w.iter().zip(a).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// Up to `TILE` tokens `t0..t0 + out.len()` against one legacy row.
fn dot_legacy<const K: u8>(row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
    let has_min = K == Q4_1 || K == Q5_1;
    let mut acc = [0.0f32; TILE];
    let mut summ = [0.0f32; TILE];
    let mut w = [0i8; QK];
    for (b, blk) in row.chunks_exact(legacy_bytes(K)).enumerate() {
        let (dw, m) = decode_legacy::<K>(blk, &mut w);
        for (j, (a, sm)) in acc.iter_mut().zip(&mut summ).take(out.len()).enumerate() {
            let t = t0 + j;
            let isum = idot(&w, &v.qs[t * v.cols + b * QK..][..QK]);
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
            let x = &v.qs[t * v.cols + sb * QK_K..][..QK_K];
            let bs = &v.bsums[(t * v.nblk + sb) * KSUMS..][..KSUMS];
            let mut sumi = 0i32;
            let mut msum = 0i32;
            for s in 0..8 {
                sumi += sc[s] as i32 * idot(&q[32 * s..32 * s + 32], &x[32 * s..32 * s + 32]);
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
            let x = &v.qs[t * v.cols + sb * QK_K..][..QK_K];
            let mut sumi = 0i32;
            for (s, (q16, x16)) in q.chunks_exact(16).zip(x.chunks_exact(16)).enumerate() {
                sumi += sc[s] as i8 as i32 * idot(q16, x16);
            }
            *a += (d * v.d[t * v.nblk + sb]) * sumi as f32;
        }
    }
    out.copy_from_slice(&acc[..out.len()]);
}
