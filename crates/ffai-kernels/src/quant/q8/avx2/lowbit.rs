//! AVX2 integer dots for the low-bit types with Q8_K activations: Q2_K, Q3_K, Q8_K,
//! IQ4_XS. The VNNI levels run these too (`q8::level_for`), so every x86 level gives
//! the same bits. (IQ4_NL and MXFP4, with Q8_0 activations, run the legacy kernels of
//! every level, as kinds of their own: `q8::NL4`, `q8::FP4`.)
//!
//! Per (sub-)block the integer dot is exact and equal to the portable one:
//! * unsigned levels (Q2_K 0..=3, Q3_K shifted to 0..=7) go into `vpmaddubsw` as is
//!   (a pair is at most `2 · 7 · 127`); Q3_K's `-4` is taken out exactly afterwards as
//!   `4 · Σ_s scale[s] · (sum of sub-block s's quants)`;
//! * signed codebook values (IQ4 ±127, Q8_K's bytes, -128 included) use
//!   `|w| · (sign(w) · x)`: at most `2 · 128 · 127 = 32512`, no saturation.
//!
//! The `f32` side keeps 8 lanes per token: each lane holds a partial integer sum of
//! the (super-)block, scaled by one FMA, and the lanes are added at the end, as the
//! other AVX2 kernels do. Tokens are processed 8 at a time, then 4, then one at a time; each
//! token's operations do not depend on the tile, so multi-token results are
//! bit-identical to single-token ones.

use std::arch::x86_64::*;

use super::{align_frame, hsum_ps, load32, nibbles, TILE};
use crate::quant::iq4::KVALUES as IQ4;
use crate::quant::q8::{View, KSUMS};
use crate::quant::{WeightType, QK_K};

/// True for the types with a kernel here.
pub(in crate::quant::q8) const fn handles(ty: WeightType) -> bool {
    matches!(
        ty,
        WeightType::Q2K | WeightType::Q3K | WeightType::Q8K | WeightType::IQ4XS
    )
}

/// `out[j] = row · token (t0 + j)` for every `j`.
///
/// # Safety
/// The AVX2/FMA/F16C features must have been detected; `row` must hold `v.nblk`
/// blocks of `ty` (one of [`handles`]), `v` must be in `ty`'s activation format and
/// hold tokens `t0..t0 + out.len()`.
pub(in crate::quant::q8) unsafe fn dot_multi(ty: WeightType, row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
    macro_rules! run {
        ($kern:ident [$($p:tt),*]) => {{
            let mut chunks = out.chunks_exact_mut(TILE);
            let mut t = t0;
            for o in &mut chunks {
                $kern::<$($p,)* TILE>(row, v, t, o);
                t += TILE;
            }
            let mut rest = chunks.into_remainder();
            if rest.len() >= 4 {
                let (four, tail) = rest.split_at_mut(4);
                $kern::<$($p,)* 4>(row, v, t, four);
                t += 4;
                rest = tail;
            }
            for o in rest {
                $kern::<$($p,)* 1>(row, v, t, std::slice::from_mut(o));
                t += 1;
            }
        }};
    }
    // SAFETY (every arm): the caller's contract is exactly each kernel's.
    unsafe {
        match ty {
            WeightType::Q2K => run!(dot_q2k[]),
            WeightType::Q3K => run!(dot_q3k[]),
            WeightType::Q8K => run!(dot_q8k[]),
            WeightType::IQ4XS => run!(dot_iq4xs[]),
            _ => unreachable!("{ty} has no kernel here"),
        }
    }
}

/// The `f16` at `p` as `f32`, converted in scalar code. A lone 2-byte F16C conversion
/// made these kernels up to 3x slower at one token (IQ4_NL, Q3_K: measured): LLVM
/// loads the `f16` with a `vpinsrw` into whatever vector register is free, often the
/// accumulator, which chains each block's scale to the previous block's FMAs (see
/// `super::f16_pair`). The scalar conversion is off the critical path.
///
/// # Safety
/// `p..p + 2` must be readable.
#[inline]
unsafe fn f16_scalar(p: *const u8) -> f32 {
    // SAFETY: two readable bytes (caller).
    half::f16::from_bits(unsafe { p.cast::<u16>().read_unaligned() }).to_f32()
}

/// `Σ w·x` of 32 signed weights and 32 activation quants, as 8 `i16`-pair sums
/// widened to `i32` and multiplied by `scale` (an `i16` per lane): exact.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn signed_dot(w: __m256i, x: __m256i, scale: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), scale)
}

/// Sub-blocks `2d` and `2d + 1` of sixteen `i16` scales (sub-block `i` in lane `i`):
/// the first broadcast over the low 128 bits, the second over the high 128 bits,
/// matching 32 elements whose first 16 belong to sub-block `2d`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pair_scale(scales: __m256i, d: usize) -> __m256i {
    // Dword `d` holds both (low word: 2d, high word: 2d + 1).
    let both = _mm256_permutevar8x32_epi32(scales, _mm256_set1_epi32(d as i32));
    let pick = _mm256_setr_epi8(
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
    );
    _mm256_shuffle_epi8(both, pick)
}

/// Q3_K's sixteen scales (`u - 32`, sub-block `i` in `i16` lane `i`) from the 12
/// packed bytes that end at `p + 14`, unpacked in SIMD (layout in `kquant_low.rs`).
///
/// # Safety
/// `p..p + 16` must be readable (the scales are bytes 2..14 of it).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3k_scales_simd(p: *const u8) -> __m256i {
    // SAFETY: 16 readable bytes (caller); the scale bytes move to 0..12.
    let x = _mm_srli_si128::<2>(unsafe { _mm_loadu_si128(p.cast()) });
    let m4 = _mm_set1_epi8(0x0F);
    // Low 4 bits: low nibbles of bytes 0..8, then their high nibbles.
    let low = _mm_unpacklo_epi64(_mm_and_si128(x, m4), _mm_and_si128(_mm_srli_epi16::<4>(x), m4));
    // Top 2 bits: byte 8 + i % 4 shifted right by 2 (i / 4): replicate bytes 8..12 into
    // every dword, shift dword k by 2k (bits crossing from the next byte land above
    // bit 1 and are masked off).
    let h = _mm_shuffle_epi8(x, _mm_setr_epi8(8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11));
    let h = _mm_and_si128(_mm_srlv_epi32(h, _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3));
    let u = _mm_or_si128(low, _mm_slli_epi16::<4>(h));
    _mm256_sub_epi16(_mm256_cvtepu8_epi16(u), _mm256_set1_epi16(32))
}

/// The 32 activation quants of token `t` from element `at` on.
///
/// # Safety
/// Token `t` and elements `at..at + 32` must exist in `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn acts32(v: &View<'_>, t: usize, at: usize) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe { load32(v.qs.as_ptr().add(t * v.cols + at)) }
}

/// `T` tokens against one Q2_K row.
///
/// # Safety
/// As for [`dot_multi`], for Q2_K rows; `out.len() >= T`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q2k<const T: usize>(row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
    align_frame();
    let m3 = _mm256_set1_epi8(3);
    let mut acc = [_mm256_setzero_ps(); T];
    for sb in 0..v.nblk {
        // SAFETY: super-block `sb` (84 bytes) lies inside `row` (caller).
        let p = unsafe { row.as_ptr().add(sb * 84) };
        // SAFETY: the 16 scale bytes at 0, `d` at 80, `dmin` at 82.
        let (sc, d, dmin) = unsafe { (_mm_loadu_si128(p.cast()), f16_scalar(p.add(80)), f16_scalar(p.add(82))) };
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sc), _mm_set1_epi8(0x0F)));
        let scales = _mm256_cvtepu8_epi16(_mm_and_si128(sc, _mm_set1_epi8(0x0F)));
        let mut sumi = [_mm256_setzero_si256(); T];
        for n in 0..2 {
            // SAFETY: half `n`'s 32 level bytes at 16 + 32n.
            let raw = unsafe { load32(p.add(16 + 32 * n)) };
            for j in 0..4 {
                // Elements 128n + 32j + l: bits 2j, 2j+1 of byte l; l < 16 is sub-block
                // 8n + 2j (low 128 bits), l ≥ 16 the next one (high 128 bits).
                let q = _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(2 * j as i32)), m3);
                let scale = pair_scale(scales, 4 * n + j);
                for (k, si) in sumi.iter_mut().enumerate() {
                    // SAFETY: token `t0 + k`, elements of super-block `sb` (caller).
                    let x = unsafe { acts32(v, t0 + k, sb * QK_K + 128 * n + 32 * j) };
                    *si = _mm256_add_epi32(*si, _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), scale));
                }
            }
        }
        for (k, (a, si)) in acc.iter_mut().zip(sumi).enumerate() {
            let i = (t0 + k) * v.nblk + sb;
            // SAFETY: token `t0 + k`, super-block `sb` exist in the Q8_K buffers.
            let (dx, bs) = unsafe { (*v.d.get_unchecked(i), load32(v.bsums.as_ptr().add(i * KSUMS))) };
            let msum = _mm256_madd_epi16(bs, mins);
            *a = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(si), *a);
            *a = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(msum), *a);
        }
    }
    for (o, a) in out[..T].iter_mut().zip(acc) {
        *o = hsum_ps(a);
    }
}

/// `T` tokens against one Q3_K row.
///
/// # Safety
/// As for [`dot_multi`], for Q3_K rows; `out.len() >= T`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q3k<const T: usize>(row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
    align_frame();
    let (m3, one) = (_mm256_set1_epi8(3), _mm256_set1_epi8(1));
    let mut acc = [_mm256_setzero_ps(); T];
    for sb in 0..v.nblk {
        // SAFETY: super-block `sb` (110 bytes) lies inside `row` (caller).
        let p = unsafe { row.as_ptr().add(sb * 110) };
        // SAFETY: bytes 94..110 (the 12 scale bytes at 96 and `d` at 108) are inside.
        let (scales, d) = unsafe { (q3k_scales_simd(p.add(94)), f16_scalar(p.add(108))) };
        // SAFETY: the 32 high-bit bytes at 0.
        let hm = unsafe { load32(p) };
        let mut sumi = [_mm256_setzero_si256(); T];
        for n in 0..2 {
            // SAFETY: half `n`'s 32 level bytes at 32 + 32n.
            let raw = unsafe { load32(p.add(32 + 32 * n)) };
            for j in 0..4 {
                // Level + 4 = low 2 bits | high bit << 2 (bit 4n + j of hmask[l]; the
                // 16-bit shift leaves bit 0 of every byte clean for shifts up to 7).
                let low = _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(2 * j as i32)), m3);
                let high = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128((4 * n + j) as i32)), one);
                let q = _mm256_or_si256(low, _mm256_slli_epi16::<2>(high));
                let scale = pair_scale(scales, 4 * n + j);
                for (k, si) in sumi.iter_mut().enumerate() {
                    // SAFETY: token `t0 + k`, elements of super-block `sb` (caller).
                    let x = unsafe { acts32(v, t0 + k, sb * QK_K + 128 * n + 32 * j) };
                    *si = _mm256_add_epi32(*si, _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), scale));
                }
            }
        }
        for (k, (a, si)) in acc.iter_mut().zip(sumi).enumerate() {
            let i = (t0 + k) * v.nblk + sb;
            // SAFETY: token `t0 + k`, super-block `sb` exist in the Q8_K buffers.
            let (dx, bs) = unsafe { (*v.d.get_unchecked(i), load32(v.bsums.as_ptr().add(i * KSUMS))) };
            // Σ_s scale[s] · Σ (u - 4) x = Σ_s scale[s] · Σ u x - 4 Σ_s scale[s] · bsum[s].
            let corr = _mm256_slli_epi32::<2>(_mm256_madd_epi16(bs, scales));
            let isum = _mm256_sub_epi32(si, corr);
            *a = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(isum), *a);
        }
    }
    for (o, a) in out[..T].iter_mut().zip(acc) {
        *o = hsum_ps(a);
    }
}

/// `T` tokens against one Q8_K row.
///
/// # Safety
/// As for [`dot_multi`], for Q8_K rows; `out.len() >= T`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8k<const T: usize>(row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
    align_frame();
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); T];
    for sb in 0..v.nblk {
        // SAFETY: super-block `sb` (292 bytes) lies inside `row` (caller).
        let p = unsafe { row.as_ptr().add(sb * 292) };
        // SAFETY: the f32 scale at 0.
        let d = unsafe { p.cast::<f32>().read_unaligned() };
        let mut sumi = [_mm256_setzero_si256(); T];
        for c in 0..QK_K / 32 {
            // SAFETY: 32 of the 256 quants at 4.
            let w = unsafe { load32(p.add(4 + 32 * c)) };
            for (k, si) in sumi.iter_mut().enumerate() {
                // SAFETY: token `t0 + k`, elements of super-block `sb` (caller).
                let x = unsafe { acts32(v, t0 + k, sb * QK_K + 32 * c) };
                *si = _mm256_add_epi32(*si, signed_dot(w, x, ones));
            }
        }
        for (k, (a, si)) in acc.iter_mut().zip(sumi).enumerate() {
            // SAFETY: token `t0 + k`, super-block `sb` exist.
            let dx = unsafe { *v.d.get_unchecked((t0 + k) * v.nblk + sb) };
            *a = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(si), *a);
        }
    }
    for (o, a) in out[..T].iter_mut().zip(acc) {
        *o = hsum_ps(a);
    }
}

/// The codebook as a `vpshufb` table (the same 16 bytes in both 128-bit halves).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn table(values: &[i8; 16]) -> __m256i {
    // SAFETY: 16 readable bytes.
    _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(values.as_ptr().cast()) })
}

/// `T` tokens against one IQ4_XS row.
///
/// # Safety
/// As for [`dot_multi`], for IQ4_XS rows; `out.len() >= T`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_iq4xs<const T: usize>(row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
    align_frame();
    let tab = table(&IQ4);
    let mut acc = [_mm256_setzero_ps(); T];
    for sb in 0..v.nblk {
        // SAFETY: super-block `sb` (136 bytes) lies inside `row` (caller).
        let p = unsafe { row.as_ptr().add(sb * 136) };
        // SAFETY: `d` at 0, `scales_h` at 2, `scales_l` at 4..8.
        let (d, sh, sl) = unsafe {
            (
                f16_scalar(p),
                p.add(2).cast::<u16>().read_unaligned(),
                p.add(4).cast::<u32>().read_unaligned(),
            )
        };
        let mut sumi = [_mm256_setzero_si256(); T];
        for s in 0..8 {
            let u = ((sl >> (4 * s)) & 0x0F) | ((u32::from(sh) >> (2 * s)) & 3) << 4;
            let scale = _mm256_set1_epi16(u as i16 - 32);
            // SAFETY: sub-block `s`'s 16 index bytes at 8 + 16s.
            let w = _mm256_shuffle_epi8(tab, unsafe { nibbles(p.add(8 + 16 * s)) });
            for (k, si) in sumi.iter_mut().enumerate() {
                // SAFETY: token `t0 + k`, elements of super-block `sb` (caller).
                let x = unsafe { acts32(v, t0 + k, sb * QK_K + 32 * s) };
                *si = _mm256_add_epi32(*si, signed_dot(w, x, scale));
            }
        }
        for (k, (a, si)) in acc.iter_mut().zip(sumi).enumerate() {
            // SAFETY: token `t0 + k`, super-block `sb` exist.
            let dx = unsafe { *v.d.get_unchecked((t0 + k) * v.nblk + sb) };
            *a = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(si), *a);
        }
    }
    for (o, a) in out[..T].iter_mut().zip(acc) {
        *o = hsum_ps(a);
    }
}
