//! Integer dots of affine rows (`WeightType::Affine`, layout in `quant/affine.rs`)
//! with Q8_1 activations.
//!
//! Per 32-element chunk `c` of a group with `(scale, bias)` and activation block
//! `(d, q, s = d · Σq)`:
//! `Σ (scale · w + bias) · d · q = (scale · d) · Σ w·q + bias · s`.
//! The integer `Σ w·q` is exact. For 8 bits the stored bytes are `w - 128`, so
//! `Σ w·q = Σ (w - 128)·q + 128 · Σq`: the portable path adds `128 · Σq` to the
//! integer sum; the AVX2 path folds it into the bias term as `(bias + 128 · scale) · s`
//! (ordinary `f32` rounding apart, the same value).
//!
//! Tokens are processed in tiles of up to 8; each token's arithmetic is the same
//! whatever its tile, so multi-token results equal single-token ones bit for bit.

use super::View;
use crate::quant::affine::{assert_valid, block_bytes, chunk_bytes, decode_chunk, read_f32, HEADER};

/// Tokens per pass over a weight row.
const TILE: usize = 8;

/// `out[i] = row i · token t` for `out.len()` rows of `rb` bytes.
#[allow(clippy::too_many_arguments)]
pub(super) fn dot_rows(
    bits: u8,
    group: u16,
    rows: &[u8],
    rb: usize,
    v: View<'_>,
    t: usize,
    out: &mut [f32],
    level: u8,
) {
    assert_valid(bits, group);
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
        dot_tokens(bits, group, row, &v, t, std::slice::from_mut(o), level);
    }
}

/// `out[r · n + j] = row r · token (t0 + j)` for every row of `rows` (`rb` bytes each)
/// and `n = out.len() / rows` tokens.
#[allow(clippy::too_many_arguments)]
pub(super) fn dot_rows_multi(
    bits: u8,
    group: u16,
    rows: &[u8],
    rb: usize,
    v: View<'_>,
    t0: usize,
    out: &mut [f32],
    level: u8,
) {
    assert_valid(bits, group);
    let nrows = rows.len() / rb;
    if nrows == 0 {
        return;
    }
    let ntok = out.len() / nrows;
    for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(ntok)) {
        dot_tokens(bits, group, row, &v, t0, o, level);
    }
}

/// One row against tokens `t0..t0 + out.len()`, on the implementation `level`.
/// The callers (through `q8::check`) verified the format, the row length and that the
/// tokens exist; the asserts below re-check what the unsafe kernels index.
fn dot_tokens(bits: u8, group: u16, row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32], level: u8) {
    let nblk = row.len() / block_bytes(bits, group);
    assert!(
        row.len() == nblk * block_bytes(bits, group) && nblk * group as usize == v.cols,
        "affine row of {} bytes does not match {} activation columns",
        row.len(),
        v.cols
    );
    assert!((t0 + out.len()) * v.cols <= v.qs.len() && (t0 + out.len()) * v.nblk <= v.d.len());
    #[cfg(target_arch = "x86_64")]
    if level >= super::AVX2 {
        // SAFETY: every level from AVX2 up was detected on this CPU (AVX2, FMA, F16C);
        // the row is `nblk` whole blocks covering `v.cols` activations and the tokens
        // lie inside the activation buffers (asserted above).
        unsafe { avx2::dot(bits, group, row, v, t0, out) };
        return;
    }
    let _ = level;
    for (i, o) in out.chunks_mut(TILE).enumerate() {
        portable(bits, group, row, v, t0 + i * TILE, o);
    }
}

/// Exact `Σ w·a` of 32 bytes (kept out of line so it vectorises on its own).
#[inline(never)]
fn idot32(w: &[i8; 32], a: &[i8; 32]) -> i32 {
    let mut acc = [0i32; 16];
    for (wc, ac) in w.chunks_exact(16).zip(a.chunks_exact(16)) {
        for ((s, &x), &y) in acc.iter_mut().zip(wc).zip(ac) {
            *s += i32::from(x as i16 * y as i16);
        }
    }
    acc.iter().sum()
}

/// Up to `TILE` tokens against one row, in plain Rust.
fn portable(bits: u8, group: u16, row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
    let (bb, cb, nsub) = (block_bytes(bits, group), chunk_bytes(bits), group as usize / 32);
    let mut acc = [0.0f32; TILE];
    let mut summ = [0.0f32; TILE];
    let mut q = [0u8; 32];
    let mut w = [0i8; 32];
    for (b, blk) in row.chunks_exact(bb).enumerate() {
        let (scale, bias) = (read_f32(blk, 0), read_f32(blk, 4));
        for (c, chunk) in blk[HEADER..].chunks_exact(cb).enumerate() {
            let sub = b * nsub + c;
            if bits == 8 {
                for (o, &s) in w.iter_mut().zip(chunk) {
                    *o = s as i8;
                }
            } else {
                decode_chunk(bits, chunk, &mut q);
                for (o, &l) in w.iter_mut().zip(&q) {
                    *o = l as i8;
                }
            }
            for (j, (a, sm)) in acc.iter_mut().zip(&mut summ).take(out.len()).enumerate() {
                let t = t0 + j;
                let k = t * v.nblk + sub;
                let x: &[i8; 32] = v.qs[t * v.cols + sub * 32..][..32].try_into().unwrap();
                let mut isum = idot32(&w, x);
                if bits == 8 {
                    isum += 128 * v.qsum[k];
                }
                *a += (scale * v.d[k]) * isum as f32;
                *sm += bias * v.s[k];
            }
        }
    }
    for ((o, a), sm) in out.iter_mut().zip(acc).zip(summ) {
        *o = a + sm;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{View, TILE};
    use crate::quant::affine::{block_bytes, chunk_bytes, read_f32, HEADER};

    /// Dispatches on the width so each kernel is compiled for one `BITS`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `row` must be whole blocks covering
    /// `v.cols` activations, and tokens `t0..t0 + out.len()` must exist in `v`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(bits: u8, group: u16, row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
        // SAFETY: the caller's contract is each kernel's.
        unsafe {
            match bits {
                2 => tiles::<2>(group, row, v, t0, out),
                3 => tiles::<3>(group, row, v, t0, out),
                4 => tiles::<4>(group, row, v, t0, out),
                5 => tiles::<5>(group, row, v, t0, out),
                6 => tiles::<6>(group, row, v, t0, out),
                _ => tiles::<8>(group, row, v, t0, out),
            }
        }
    }

    /// Runs the kernel over `out` in tiles of `TILE` tokens, then the rest.
    ///
    /// # Safety
    /// As for [`dot`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tiles<const BITS: u8>(group: u16, row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
        let mut t = t0;
        let mut chunks = out.chunks_exact_mut(TILE);
        // SAFETY (every call): the caller's contract, for a sub-range of its tokens.
        unsafe {
            for o in &mut chunks {
                kernel::<BITS, TILE>(group, row, v, t, o);
                t += TILE;
            }
            let rest = chunks.into_remainder();
            match rest.len() {
                0 => {}
                1 => kernel::<BITS, 1>(group, row, v, t, rest),
                2 => kernel::<BITS, 2>(group, row, v, t, rest),
                3 => kernel::<BITS, 3>(group, row, v, t, rest),
                4 => kernel::<BITS, 4>(group, row, v, t, rest),
                5 => kernel::<BITS, 5>(group, row, v, t, rest),
                6 => kernel::<BITS, 6>(group, row, v, t, rest),
                _ => kernel::<BITS, 7>(group, row, v, t, rest),
            }
        }
    }

    /// 16 nibble bytes at `p` as 32 bytes: the low nibbles, then the high nibbles.
    ///
    /// # Safety
    /// `p..p + 16` readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        // SAFETY: 16 readable bytes (caller); unaligned load.
        let x = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p.cast()) });
        let x = _mm256_srlv_epi32(x, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
        _mm256_and_si256(x, _mm256_set1_epi8(0x0F))
    }

    /// The 2-bit plane at `p` (8 bytes): byte `j + 8k` = bits `2k..2k+2` of byte `j`.
    ///
    /// # Safety
    /// `p..p + 8` readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pairs(p: *const u8) -> __m256i {
        // SAFETY: 8 readable bytes (caller); unaligned read.
        let x = unsafe { p.cast::<i64>().read_unaligned() };
        let x = _mm256_srlv_epi64(_mm256_set1_epi64x(x), _mm256_setr_epi64x(0, 2, 4, 6));
        _mm256_and_si256(x, _mm256_set1_epi8(3))
    }

    /// The 1-bit plane at `p` (a little-endian `u32`): byte `i` = `val` when bit `i`
    /// is set, else 0.
    ///
    /// # Safety
    /// `p..p + 4` readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn bits(p: *const u8, val: i8) -> __m256i {
        // SAFETY: 4 readable bytes (caller); unaligned read.
        let x = _mm256_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() });
        // Byte i takes byte i / 8 of the word (each 128-bit half holds a full copy).
        let ctrl = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let m = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let x = _mm256_and_si256(_mm256_shuffle_epi8(x, ctrl), m);
        _mm256_and_si256(_mm256_cmpeq_epi8(x, m), _mm256_set1_epi8(val))
    }

    /// The 32 levels of the chunk at `p`: unsigned for `BITS < 8`, the stored signed
    /// `w - 128` bytes for 8.
    ///
    /// # Safety
    /// `p..p + 4 · BITS` readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn levels<const BITS: u8>(p: *const u8) -> __m256i {
        // SAFETY: each read stays inside the chunk's `4 · BITS` bytes.
        unsafe {
            match BITS {
                2 => pairs(p),
                3 => _mm256_or_si256(pairs(p), bits(p.add(8), 4)),
                4 => nibbles(p),
                5 => _mm256_or_si256(nibbles(p), bits(p.add(16), 16)),
                6 => _mm256_or_si256(nibbles(p), _mm256_slli_epi16::<4>(pairs(p.add(16)))),
                _ => _mm256_loadu_si256(p.cast()),
            }
        }
    }

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum_ps(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `T` tokens `t0..t0 + T` against one row of `BITS`-bit levels.
    ///
    /// # Safety
    /// As for [`dot`], with `out.len() == T`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn kernel<const BITS: u8, const T: usize>(group: u16, row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
        let (bb, cb, nsub) = (block_bytes(BITS, group), chunk_bytes(BITS), group as usize / 32);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); T];
        let mut summ = [0.0f32; T];
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let scale = read_f32(blk, 0);
            // 8 bits: the stored bytes are w - 128; the 128 · Σq term joins the bias.
            let bias = if BITS == 8 {
                read_f32(blk, 4) + 128.0 * scale
            } else {
                read_f32(blk, 4)
            };
            for c in 0..nsub {
                let sub = b * nsub + c;
                // SAFETY: chunk `c` of this block lies inside `blk` (a whole block).
                let w = unsafe { levels::<BITS>(blk.as_ptr().add(HEADER + c * cb)) };
                // Unsigned levels go straight into `maddubs` (pairs ≤ 2 · 63 · 127); the
                // signed 8-bit ones as |w| · sign(w)·a (pairs ≤ 2 · 128 · 127).
                let wu = if BITS == 8 { _mm256_abs_epi8(w) } else { w };
                for j in 0..T {
                    let t = t0 + j;
                    let k = t * v.nblk + sub;
                    // SAFETY: token `t` exists and block `sub < v.nblk`, so its 32
                    // quants and its `d` / `s` entries are inside the buffers.
                    let (a, d, s) = unsafe {
                        (
                            _mm256_loadu_si256(v.qs.as_ptr().add(t * v.cols + sub * 32).cast()),
                            *v.d.get_unchecked(k),
                            *v.s.get_unchecked(k),
                        )
                    };
                    let a = if BITS == 8 { _mm256_sign_epi8(a, w) } else { a };
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, a), ones);
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale * d), acc[j]);
                    summ[j] += bias * s;
                }
            }
        }
        for ((o, a), sm) in out.iter_mut().zip(acc).zip(summ) {
            *o = hsum_ps(a) + sm;
        }
    }
}
