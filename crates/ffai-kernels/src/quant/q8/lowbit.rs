//! Portable integer dots for Q2_K, Q3_K, Q8_K, IQ4_XS (with Q8_K activations) and
//! IQ4_NL, MXFP4 (with Q8_0 activations): the portable level, and the reference the
//! AVX2 kernels (`avx2/lowbit.rs`, also run at the VNNI levels) must match per block.
//!
//! Each weight block is decoded once per tile of tokens into its integer levels
//! (layouts in `kquant_low.rs`, `iq4.rs`, `mxfp4.rs`); per (sub-)block the exact
//! integer dot with the activation quants is scaled once in `f32`, and the terms
//! are added sequentially per token, as the portable path does for the other types.

use super::portable::{idot, quants, TILE};
use super::{View, KSUMS};
use crate::quant::iq4::{iq4xs_scale, KVALUES as IQ4};
use crate::quant::kquant_low::q3k_scales;
use crate::quant::mxfp4::{half_scale, KVALUES as E2M1};
use crate::quant::{read_f16, WeightType, QK, QK_K};

/// True for the weight types whose integer dots live here.
pub(super) const fn handles(ty: WeightType) -> bool {
    matches!(
        ty,
        WeightType::Q2K | WeightType::Q3K | WeightType::Q8K | WeightType::IQ4NL | WeightType::IQ4XS | WeightType::MXFP4
    )
}

/// `out[j]` = dot of `row` with token `t0 + j`, for a type that [`handles`] accepts.
pub(super) fn dot_multi(ty: WeightType, row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
    for (i, o) in out.chunks_mut(TILE).enumerate() {
        let t = t0 + i * TILE;
        match ty {
            WeightType::Q2K => dot_q2k(row, v, t, o),
            WeightType::Q3K => dot_q3k(row, v, t, o),
            WeightType::Q8K => dot_q8k(row, v, t, o),
            WeightType::IQ4XS => dot_iq4xs(row, v, t, o),
            WeightType::IQ4NL => dot_32::<false>(row, v, t, o),
            WeightType::MXFP4 => dot_32::<true>(row, v, t, o),
            _ => unreachable!("{ty} has no kernel here"),
        }
    }
}

/// The 2-bit fields of a Q2_K / Q3_K `qs` area (64 bytes) into `q`: element
/// `128n + 32j + l` sits in bits `2j, 2j+1` of byte `32n + l`.
#[inline(always)]
fn two_bits(qs: &[u8], q: &mut [i8; QK_K]) {
    for (q32, o128) in qs.chunks_exact(32).zip(q.chunks_exact_mut(128)) {
        for (j, o32) in o128.chunks_exact_mut(32).enumerate() {
            for (o, &b) in o32.iter_mut().zip(q32) {
                *o = ((b >> (2 * j)) & 3) as i8;
            }
        }
    }
}

/// Up to `TILE` tokens against one Q2_K row: `Σ_s (d·sc_s)·Σ q·a - (dmin·mn_s)·Σ a`,
/// the second sum taken from the activations' sums of 16 (one per sub-block).
fn dot_q2k(row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
    let mut acc = [0.0f32; TILE];
    let mut q = [0i8; QK_K];
    for (sb, blk) in row.chunks_exact(84).enumerate() {
        let (d, dmin) = (read_f16(blk, 80), read_f16(blk, 82));
        two_bits(&blk[16..80], &mut q);
        for (j, a) in acc.iter_mut().enumerate().take(out.len()) {
            let t = t0 + j;
            let x = quants::<QK_K>(&v, t, sb * QK_K);
            let bs = &v.bsums[(t * v.nblk + sb) * KSUMS..][..KSUMS];
            let (mut sumi, mut msum) = (0i32, 0i32);
            for (s, ((q16, x16), &sc)) in q.chunks_exact(16).zip(x.chunks_exact(16)).zip(&blk[..16]).enumerate() {
                sumi += (sc & 0x0F) as i32 * idot::<16>(q16.try_into().unwrap(), x16.try_into().unwrap());
                msum += (sc >> 4) as i32 * bs[s] as i32;
            }
            let da = v.d[t * v.nblk + sb];
            *a += (d * da) * sumi as f32;
            *a -= (dmin * da) * msum as f32;
        }
    }
    out.copy_from_slice(&acc[..out.len()]);
}

/// Up to `TILE` tokens against one Q3_K row (signed levels -4..=3, scales `u - 32`).
fn dot_q3k(row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
    let mut acc = [0.0f32; TILE];
    let mut q = [0i8; QK_K];
    for (sb, blk) in row.chunks_exact(110).enumerate() {
        let d = read_f16(blk, 108);
        let hmask = &blk[..32];
        let u = q3k_scales(blk[96..108].try_into().unwrap());
        two_bits(&blk[32..96], &mut q);
        // A clear bit `i / 32` of `hmask[i % 32]` subtracts 4.
        for (k, q32) in q.chunks_exact_mut(32).enumerate() {
            for (w, &h) in q32.iter_mut().zip(hmask) {
                *w -= (((h >> k) & 1) ^ 1) as i8 * 4;
            }
        }
        for (j, a) in acc.iter_mut().enumerate().take(out.len()) {
            let t = t0 + j;
            let x = quants::<QK_K>(&v, t, sb * QK_K);
            let mut sumi = 0i32;
            for ((q16, x16), &us) in q.chunks_exact(16).zip(x.chunks_exact(16)).zip(&u) {
                sumi += (us as i32 - 32) * idot::<16>(q16.try_into().unwrap(), x16.try_into().unwrap());
            }
            *a += (d * v.d[t * v.nblk + sb]) * sumi as f32;
        }
    }
    out.copy_from_slice(&acc[..out.len()]);
}

/// Up to `TILE` tokens against one Q8_K row (one `f32` scale per super-block).
fn dot_q8k(row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
    let mut acc = [0.0f32; TILE];
    let mut q = [0i8; QK_K];
    for (sb, blk) in row.chunks_exact(292).enumerate() {
        let d = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
        for (w, &b) in q.iter_mut().zip(&blk[4..4 + QK_K]) {
            *w = b as i8;
        }
        for (j, a) in acc.iter_mut().enumerate().take(out.len()) {
            let t = t0 + j;
            let sumi = idot::<QK_K>(&q, quants::<QK_K>(&v, t, sb * QK_K));
            *a += (d * v.d[t * v.nblk + sb]) * sumi as f32;
        }
    }
    out.copy_from_slice(&acc[..out.len()]);
}

/// The codebook values of a 32-element group of indices `qs[..16]` (low nibbles are
/// elements 0..16, high nibbles 16..32).
#[inline(always)]
fn lookup_group(qs: &[u8], table: &[i8; 16], w: &mut [i8]) {
    let (lo, hi) = w.split_at_mut(16);
    for ((&b, l), h) in qs.iter().zip(lo).zip(hi) {
        *l = table[(b & 0x0F) as usize];
        *h = table[(b >> 4) as usize];
    }
}

/// Up to `TILE` tokens against one IQ4_XS row (eight scales `u - 32` per super-block).
fn dot_iq4xs(row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
    let mut acc = [0.0f32; TILE];
    let mut q = [0i8; QK_K];
    for (sb, blk) in row.chunks_exact(136).enumerate() {
        let d = read_f16(blk, 0);
        for (qs, w) in blk[8..].chunks_exact(16).zip(q.chunks_exact_mut(32)) {
            lookup_group(qs, &IQ4, w);
        }
        for (j, a) in acc.iter_mut().enumerate().take(out.len()) {
            let t = t0 + j;
            let x = quants::<QK_K>(&v, t, sb * QK_K);
            let mut sumi = 0i32;
            for (s, (q32, x32)) in q.chunks_exact(32).zip(x.chunks_exact(32)).enumerate() {
                let ls = iq4xs_scale(blk, s) as i32 - 32;
                sumi += ls * idot::<32>(q32.try_into().unwrap(), x32.try_into().unwrap());
            }
            *a += (d * v.d[t * v.nblk + sb]) * sumi as f32;
        }
    }
    out.copy_from_slice(&acc[..out.len()]);
}

/// Up to `TILE` tokens against one IQ4_NL (`FP4 = false`) or MXFP4 row: 32-element
/// blocks of codebook indices with one scale each.
fn dot_32<const FP4: bool>(row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
    let bytes = if FP4 { 17 } else { 18 };
    let mut acc = [0.0f32; TILE];
    let mut w = [0i8; QK];
    for (b, blk) in row.chunks_exact(bytes).enumerate() {
        let dw = if FP4 {
            lookup_group(&blk[1..], &E2M1, &mut w);
            half_scale(blk[0])
        } else {
            lookup_group(&blk[2..], &IQ4, &mut w);
            read_f16(blk, 0)
        };
        for (j, a) in acc.iter_mut().enumerate().take(out.len()) {
            let t = t0 + j;
            let isum = idot::<QK>(&w, quants::<QK>(&v, t, b * QK));
            *a += (dw * v.d[t * v.nblk + b]) * isum as f32;
        }
    }
    out.copy_from_slice(&acc[..out.len()]);
}
