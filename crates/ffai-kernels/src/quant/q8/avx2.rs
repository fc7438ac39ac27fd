//! The x86-64 implementation: AVX2 integer dots (`vpmaddubsw` / `vpmaddwd`), FMA for
//! the per-block `f32` scaling, F16C for the weights' `f16` scales.
//!
//! Every function is `#[target_feature(enable = "avx2,fma,f16c")]` and may only be
//! called after [`detected`] returned true (the callers in `q8.rs` do so).
//!
//! `vpmaddubsw` multiplies *unsigned* bytes by *signed* bytes and adds adjacent pairs
//! into `i16` with saturation. Activation quants are in `[-127, 127]`, so:
//! * unsigned weight levels (the 4/5-bit legacy levels before their zero point, ≤ 31;
//!   K-quant levels ≤ 63) go in as is: a pair is at most `2 · 63 · 127 = 16002`; the
//!   Q4_0 / Q5_0 zero points (8, 16) are then removed exactly as `z · Σx`;
//! * Q8_0's signed levels use `|w| · (sign(w) · x)`: at most `2 · 128 · 127 = 32512`;
//!   so do the codebook kinds IQ4_NL (`±127`) and MXFP4 (doubled E2M1, `±12`), which run
//!   the legacy kernels with their levels looked up by `vpshufb`.
//!
//! No saturation can happen, so each block's integer dot is exact and equal to the
//! portable one.
//!
//! Tokens are processed in tiles of up to [`TILE`]; each token keeps its own
//! accumulators and sees the same operations in the same order whatever the tile
//! size, which makes multi-token results bit-identical to single-token ones.

use std::arch::x86_64::*;

use super::{k_scales, Step, View, KSUMS};
use crate::quant::{WeightType, QK, QK_K};

/// Kernels for the low-bit types (Q2_K, Q3_K, Q8_K, IQ4_NL, IQ4_XS, MXFP4).
pub(super) mod lowbit;

/// Makes the calling kernel realign its stack frame to 32 bytes. Most kernels spill
/// some `ymm` registers; without a realigned frame LLVM puts those
/// spills in slots that are only 16-byte aligned, and a 32-byte spill that straddles
/// a cache line defeats store-to-load forwarding. How often that happened depended
/// on the caller's stack depth: the same kernel ran up to 2x slower from some call
/// sites. An escaping 32-byte-aligned local forces the realignment (a few
/// instructions per call).
#[inline(always)]
fn align_frame() {
    let mut pin = std::mem::MaybeUninit::<__m256i>::uninit();
    std::hint::black_box(pin.as_mut_ptr());
}

/// Tokens per pass over a weight row.
const TILE: usize = 8;

/// True when this CPU has what the kernels use.
#[inline]
pub(super) fn detected() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

// ------------------------------------------------------------------ helpers

/// The two `f16` at `p` and `p + 2`, widened exactly (lanes 0 and 1). One 4-byte load,
/// which LLVM keeps as a zero-extending `vmovd`: a lone 2-byte `f16` became a
/// `vpinsrw` into whatever register was free, often the accumulator, which chained
/// every super-block's scales to the previous one's FMAs (one-token Q4_K ran 1.4x
/// slower for it).
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_pair(p: *const u8) -> (f32, f32) {
    // SAFETY: 4 readable bytes (caller); no alignment requirement.
    let v = _mm_cvtph_ps(unsafe { _mm_loadu_si32(p.cast()) });
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// 32 bytes at `p`.
///
/// # Safety
/// `p..p + 32` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32<T>(p: *const T) -> __m256i {
    // SAFETY: guaranteed by the caller; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(p.cast()) }
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

/// Sum of the 8 `i32` lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Largest of the 8 lanes (all non-negative).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hmax_epi32(v: __m256i) -> i32 {
    let m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let m = _mm_max_epi32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
    let m = _mm_max_epi32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
    _mm_cvtsi128_si32(m)
}

// ------------------------------------------------------------- quantization

/// `max |x|` over `len` floats at `x` (a multiple of 32), ordered by bit pattern like
/// the portable `amax` (NaN > inf > finite), so the result is bit-identical.
///
/// # Safety
/// `x..x + len` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn amax(x: *const f32, len: usize) -> f32 {
    let mask = _mm256_set1_epi32(0x7FFF_FFFF);
    let mut m = [_mm256_setzero_si256(); 4];
    for c in (0..len).step_by(32) {
        for (k, mk) in m.iter_mut().enumerate() {
            // SAFETY: `c + 8k + 8 <= len` floats are readable (caller).
            let v = unsafe { _mm256_loadu_si256(x.add(c + 8 * k).cast()) };
            *mk = _mm256_max_epi32(*mk, _mm256_and_si256(v, mask));
        }
    }
    let m = _mm256_max_epi32(_mm256_max_epi32(m[0], m[1]), _mm256_max_epi32(m[2], m[3]));
    f32::from_bits(hmax_epi32(m) as u32)
}

/// Quantizes 32 floats at `x` with `st` into 32 bytes at `q`; returns the four
/// `i32` vectors of quants (elements 0–7, 8–15, 16–23, 24–31) for the sums.
///
/// # Safety
/// `x..x + 32` readable, `q..q + 32` writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quant32(x: *const f32, st: Step, q: *mut i8) -> [__m256i; 4] {
    let (m1, m2) = (_mm256_set1_ps(st.m1), _mm256_set1_ps(st.m2));
    let mut i = [_mm256_setzero_si256(); 4];
    for (k, ik) in i.iter_mut().enumerate() {
        // SAFETY: `x + 8k .. x + 8k + 8` lies inside the 32 readable floats.
        let v = unsafe { _mm256_loadu_ps(x.add(8 * k)) };
        // (x · m1) · m2, rounded to nearest-even: the portable arithmetic exactly.
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            _mm256_mul_ps(v, m1),
            m2,
        ));
        *ik = _mm256_cvtps_epi32(r);
    }
    // Narrow to bytes (values are within ±127, no saturation); the packs interleave
    // 128-bit lanes, the permute restores element order.
    let p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: 32 writable bytes at `q` (caller).
    unsafe { _mm256_storeu_si256(q.cast(), p) };
    i
}

/// See `portable::quantize_q8_row`; identical bytes and scales.
///
/// # Safety
/// The CPU features must have been detected.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_q8_row(
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    qsum: &mut [i32],
    mut s: Option<&mut [f32]>,
) {
    let nb = x.len() / QK;
    assert!(q.len() >= nb * QK && d.len() >= nb && qsum.len() >= nb && s.as_ref().is_none_or(|s| s.len() >= nb));
    for b in 0..nb {
        // SAFETY: block `b` of `x` and `q` is in bounds (asserted above).
        let (xp, qp) = unsafe { (x.as_ptr().add(b * QK), q.as_mut_ptr().add(b * QK)) };
        // SAFETY: 32 readable floats at `xp`.
        let st = Step::new(unsafe { amax(xp, QK) });
        let (db, sum) = match st {
            None => {
                q[b * QK..(b + 1) * QK].fill(0);
                (f32::NAN, 0)
            }
            Some(st) => {
                // SAFETY: 32 floats readable at `xp`, 32 bytes writable at `qp`.
                let i = unsafe { quant32(xp, st, qp) };
                let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
                (st.d, hsum_epi32(sum))
            }
        };
        d[b] = db;
        qsum[b] = sum;
        if let Some(s) = s.as_deref_mut() {
            s[b] = db * sum as f32;
        }
    }
}

/// See `portable::quantize_q8k_row`; identical bytes, scales and sums.
///
/// # Safety
/// The CPU features must have been detected.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_q8k_row(x: &[f32], q: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    let nb = x.len() / QK_K;
    assert!(q.len() >= nb * QK_K && d.len() >= nb && bsums.len() >= nb * KSUMS);
    for b in 0..nb {
        // SAFETY: super-block `b` of `x` is in bounds (asserted above).
        let xp = unsafe { x.as_ptr().add(b * QK_K) };
        // SAFETY: 256 readable floats at `xp`.
        let Some(st) = Step::new(unsafe { amax(xp, QK_K) }) else {
            q[b * QK_K..(b + 1) * QK_K].fill(0);
            bsums[b * KSUMS..(b + 1) * KSUMS].fill(0);
            d[b] = f32::NAN;
            continue;
        };
        d[b] = st.d;
        for c in 0..QK_K / 32 {
            // SAFETY: chunk `c` of super-block `b`: 32 floats readable, 32 bytes writable.
            let i = unsafe { quant32(xp.add(32 * c), st, q.as_mut_ptr().add(b * QK_K + 32 * c)) };
            // Two sums of 16: lanes of (i0 + i1) and of (i2 + i3), folded by two hadds.
            let h = _mm256_hadd_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let h = _mm256_hadd_epi32(h, h);
            let h = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
            bsums[b * KSUMS + 2 * c] = _mm_cvtsi128_si32(h) as i16;
            bsums[b * KSUMS + 2 * c + 1] = _mm_extract_epi32::<1>(h) as i16;
        }
    }
}

// --------------------------------------------------------------------- dots

use super::{legacy_bytes, signed_levels, FP4, NL4, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use crate::quant::iq4::KVALUES as IQ4_VALUES;
use crate::quant::mxfp4::KVALUES as E2M1_VALUES;

const fn has_min(k: u8) -> bool {
    k == Q4_1 || k == Q5_1
}

/// Runs `$kern::<$params.., T>` over `$out` in tiles of `TILE` tokens, then the
/// remaining 1..TILE-1 tokens with a smaller `T`.
macro_rules! tiles {
    ($kern:ident [$($p:tt),*], $row:expr, $v:expr, $t0:expr, $out:expr) => {{
        let mut t = $t0;
        let mut chunks = $out.chunks_exact_mut(TILE);
        for o in &mut chunks {
            $kern::<$($p,)* TILE>($row, $v, t, o);
            t += TILE;
        }
        let rest = chunks.into_remainder();
        match rest.len() {
            0 => {}
            1 => $kern::<$($p,)* 1>($row, $v, t, rest),
            2 => $kern::<$($p,)* 2>($row, $v, t, rest),
            3 => $kern::<$($p,)* 3>($row, $v, t, rest),
            4 => $kern::<$($p,)* 4>($row, $v, t, rest),
            5 => $kern::<$($p,)* 5>($row, $v, t, rest),
            6 => $kern::<$($p,)* 6>($row, $v, t, rest),
            7 => $kern::<$($p,)* 7>($row, $v, t, rest),
            _ => unreachable!(),
        }
    }};
}

/// `out[j] = row · token (t0 + j)` for every `j`.
///
/// # Safety
/// The CPU features must have been detected; `row` must hold `v.nblk` blocks of `ty`,
/// `v` must be quantized in `ty`'s activation format and hold tokens
/// `t0..t0 + out.len()` (what `q8::check` verifies).
pub(super) unsafe fn dot_multi(ty: WeightType, row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
    let v = &v;
    // SAFETY (every arm): the caller's contract is exactly each kernel's.
    unsafe {
        match ty {
            WeightType::Q4_0 => tiles!(dot_legacy[Q4_0], row, v, t0, out),
            WeightType::Q4_1 => tiles!(dot_legacy[Q4_1], row, v, t0, out),
            WeightType::Q5_0 => tiles!(dot_legacy[Q5_0], row, v, t0, out),
            WeightType::Q5_1 => tiles!(dot_legacy[Q5_1], row, v, t0, out),
            WeightType::Q8_0 => tiles!(dot_legacy[Q8_0], row, v, t0, out),
            WeightType::IQ4NL => tiles!(dot_legacy[NL4], row, v, t0, out),
            WeightType::MXFP4 => tiles!(dot_legacy[FP4], row, v, t0, out),
            WeightType::Q4K => tiles!(dot_q45k[false], row, v, t0, out),
            WeightType::Q5K => tiles!(dot_q45k[true], row, v, t0, out),
            WeightType::Q6K => tiles!(dot_q6k[], row, v, t0, out),
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => unreachable!("float types have no q8 path"),
            WeightType::Affine { .. } => unreachable!("affine rows run quant::q8::affine"),
            _ => lowbit::dot_multi(ty, row, v, t0, out),
        }
    }
}

/// `out[i] = row i · token t` for `out.len()` rows of `rb` bytes stored back to back.
///
/// # Safety
/// As for [`dot_multi`], for every row (`rows.len() == out.len() · rb`) and the one
/// token `t`.
pub(super) unsafe fn dot_rows(ty: WeightType, rows: &[u8], rb: usize, v: View<'_>, t: usize, out: &mut [f32]) {
    let v = &v;
    macro_rules! each_row {
        ($kern:ident [$($p:tt),*]) => {
            for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
                $kern::<$($p,)* 1>(row, v, t, std::slice::from_mut(o));
            }
        };
    }
    // SAFETY (every arm): the caller's contract is exactly each kernel's, row by row.
    unsafe {
        match ty {
            WeightType::Q4_0 => each_row!(dot_legacy[Q4_0]),
            WeightType::Q4_1 => each_row!(dot_legacy[Q4_1]),
            WeightType::Q5_0 => each_row!(dot_legacy[Q5_0]),
            WeightType::Q5_1 => each_row!(dot_legacy[Q5_1]),
            WeightType::Q8_0 => each_row!(dot_legacy[Q8_0]),
            WeightType::IQ4NL => each_row!(dot_legacy[NL4]),
            WeightType::MXFP4 => each_row!(dot_legacy[FP4]),
            WeightType::Q4K => each_row!(dot_q45k[false]),
            WeightType::Q5K => each_row!(dot_q45k[true]),
            WeightType::Q6K => each_row!(dot_q6k[]),
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => unreachable!("float types have no q8 path"),
            WeightType::Affine { .. } => unreachable!("affine rows run quant::q8::affine"),
            _ => {
                for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
                    lowbit::dot_multi(ty, row, v, t, std::slice::from_mut(o));
                }
            }
        }
    }
}

/// 16 nibble bytes at `p` as 32 bytes `0..=15`: the low nibbles (elements 0–15),
/// then the high nibbles (elements 16–31).
///
/// # Safety
/// `p..p + 16` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: 16 readable bytes (caller); no alignment requirement.
    let x = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p.cast()) });
    // Shift the upper copy right by 4 (32-bit lanes; the mask drops what crosses bytes).
    let x = _mm256_srlv_epi32(x, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    _mm256_and_si256(x, _mm256_set1_epi8(0x0F))
}

/// Byte `i` = 0xFF when bit `i` of the little-endian `u32` at `p` is set, else 0.
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bit_bytes(p: *const u8) -> __m256i {
    // SAFETY: 4 readable bytes (caller).
    let qh = unsafe { p.cast::<i32>().read_unaligned() };
    // Byte i gets a copy of qh's byte i / 8, then keeps only bit i % 8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh),
        _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
}

/// A codebook as a `vpshufb` table (the same 16 bytes in both 128-bit halves).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codebook(values: &[i8; 16]) -> __m256i {
    // SAFETY: 16 readable bytes.
    _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(values.as_ptr().cast()) })
}

/// A legacy block's 32 stored levels, *before* any zero point: unsigned `0..=15` /
/// `0..=31` for the 4- and 5-bit kinds, signed for Q8_0 and for the codebook kinds
/// (IQ4_NL's values, MXFP4's doubled E2M1 values). Scales are read separately.
///
/// # Safety
/// One whole block of kind `K` must be readable at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn levels<const K: u8>(p: *const u8) -> __m256i {
    // SAFETY (all reads): the offsets are inside the block (layouts in `legacy.rs`,
    // `iq4.rs`, `mxfp4.rs`).
    unsafe {
        match K {
            NL4 => _mm256_shuffle_epi8(codebook(&IQ4_VALUES), nibbles(p.add(2))),
            FP4 => _mm256_shuffle_epi8(codebook(&E2M1_VALUES), nibbles(p.add(1))),
            Q4_0 => nibbles(p.add(2)),
            Q4_1 => nibbles(p.add(4)),
            Q5_0 => _mm256_or_si256(
                nibbles(p.add(6)),
                _mm256_and_si256(bit_bytes(p.add(2)), _mm256_set1_epi8(0x10)),
            ),
            Q5_1 => _mm256_or_si256(
                nibbles(p.add(8)),
                _mm256_and_si256(bit_bytes(p.add(4)), _mm256_set1_epi8(0x10)),
            ),
            _ => load32(p.add(2)),
        }
    }
}

/// The `f16` at `p + k · stride` for each of `N ≤ 8` blocks, widened to `f32`
/// (lanes past `N` are 0). The gather runs on the scalar units, which the
/// vector-bound loop leaves idle.
///
/// # Safety
/// The `N` blocks must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gather_f16<const N: usize>(p: *const u8, stride: usize) -> __m256 {
    let mut h = [0u64; 2];
    for k in 0..N {
        // SAFETY: block `k < N` is readable (caller).
        let v = unsafe { p.add(k * stride).cast::<u16>().read_unaligned() };
        h[k / 4] |= u64::from(v) << (16 * (k % 4));
    }
    _mm256_cvtph_ps(_mm_set_epi64x(h[1] as i64, h[0] as i64))
}

/// MXFP4's scale `2^(e - 128)` (`mxfp4::half_scale`, exactly) for the E8M0 byte at
/// `p + k · stride` of each of `N ≤ 8` blocks (lanes past `N` are 0). The bytes are
/// gathered on the scalar units; the powers of two are built as bit patterns.
///
/// # Safety
/// The `N` blocks must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gather_e8m0<const N: usize>(p: *const u8, stride: usize) -> __m256 {
    let mut h = 0u64;
    for k in 0..N {
        // SAFETY: block `k < N` is readable (caller).
        h |= u64::from(unsafe { *p.add(k * stride) }) << (8 * k);
    }
    let e = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(h as i64));
    // e ≥ 2: the normal 2^(e - 128), exponent field e - 1; e < 2: the subnormals 2^-128
    // and 2^-127, mantissa bit 21 + e. Lanes past `N` (e = 0) are masked to 0.
    let normal = _mm256_slli_epi32::<23>(_mm256_sub_epi32(e, _mm256_set1_epi32(1)));
    let tiny = _mm256_sllv_epi32(_mm256_set1_epi32(0x0020_0000), e);
    let bits = _mm256_blendv_epi8(normal, tiny, _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e));
    _mm256_and_ps(_mm256_castsi256_ps(bits), _mm256_castsi256_ps(first_lanes::<N>()))
}

/// The adjacent `f16` pair `(d, m)` at `p + k · stride` for each of `N ≤ 8` blocks,
/// widened to two `f32` vectors (lanes past `N` are 0): one `u32` load per block.
///
/// # Safety
/// The `N` blocks must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gather_f16_pairs<const N: usize>(p: *const u8, stride: usize) -> (__m256, __m256) {
    let mut h = [0u64; 4];
    for k in 0..N {
        // SAFETY: block `k < N` is readable (caller).
        let v = unsafe { p.add(k * stride).cast::<u32>().read_unaligned() };
        h[k / 2] |= u64::from(v) << (32 * (k % 2));
    }
    // [d0 m0 d1 m1 d2 m2 d3 m3] -> [d0 d1 d2 d3 m0 m1 m2 m3], likewise for blocks 4..8.
    let split = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    let lo = _mm_shuffle_epi8(_mm_set_epi64x(h[1] as i64, h[0] as i64), split);
    let hi = _mm_shuffle_epi8(_mm_set_epi64x(h[3] as i64, h[2] as i64), split);
    (
        _mm256_cvtph_ps(_mm_unpacklo_epi64(lo, hi)),
        _mm256_cvtph_ps(_mm_unpackhi_epi64(lo, hi)),
    )
}

/// `N ≤ 8` consecutive `f32` of an activation side array from index `i` (lanes past
/// `N` are 0, and nothing past `N` is read).
///
/// # Safety
/// `a[i..i + N]` must be in bounds.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f32s<const N: usize>(a: &[f32], i: usize) -> __m256 {
    if N == 8 {
        // SAFETY: `i + 8 <= a.len()` (caller).
        unsafe { _mm256_loadu_ps(a.as_ptr().add(i)) }
    } else {
        // SAFETY: the masked-out lanes are not accessed (no fault), the others are
        // `a[i..i + N]`, in bounds (caller).
        unsafe { _mm256_maskload_ps(a.as_ptr().add(i), first_lanes::<N>()) }
    }
}

/// As [`load_f32s`], for `i32`.
///
/// # Safety
/// `a[i..i + N]` must be in bounds.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_i32s<const N: usize>(a: &[i32], i: usize) -> __m256i {
    if N == 8 {
        // SAFETY: `i + 8 <= a.len()` (caller).
        unsafe { load32(a.as_ptr().add(i)) }
    } else {
        // SAFETY: as for `load_f32s`.
        unsafe { _mm256_maskload_epi32(a.as_ptr().add(i), first_lanes::<N>()) }
    }
}

/// All-ones in the first `N` 32-bit lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn first_lanes<const N: usize>() -> __m256i {
    _mm256_cmpgt_epi32(_mm256_set1_epi32(N as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// Lane `k` of the result = the sum of the 8 lanes of `s[k]` (exact `i32`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn sum_lanes8(s: &[__m256i; 8]) -> __m256i {
    // Per 128-bit half: [s0 02, s1 02, s0 13, s1 13], then [s0 0123, s1 .., s2 .., s3 ..].
    // Unpacks and adds, not `vphaddd` (slower on Zen 4); the same exact `i32` sums.
    let h = |x: __m256i, y: __m256i| _mm256_add_epi32(_mm256_unpacklo_epi32(x, y), _mm256_unpackhi_epi32(x, y));
    let q = |x: __m256i, y: __m256i| _mm256_add_epi32(_mm256_unpacklo_epi64(x, y), _mm256_unpackhi_epi64(x, y));
    let a = q(h(s[0], s[1]), h(s[2], s[3]));
    let b = q(h(s[4], s[5]), h(s[6], s[7]));
    // Low halves hold lanes 0–3 of each input, high halves lanes 4–7.
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(a, b),
        _mm256_permute2x128_si256::<0x31>(a, b),
    )
}

/// Blocks `c..c + N` (`N ≤ 8`) against tokens `t0..t0 + T`, one FMA per token.
///
/// Each block's byte dot is widened to 8 `i32` lanes (`vpmaddubsw` + `vpmaddwd`);
/// [`sum_lanes8`] folds the chunk's blocks into one vector whose lane `k` is block
/// `k`'s exact integer dot (zero points removed exactly, as `8 · Σq` / `16 · Σq`);
/// it is converted and multiplied by the chunk's `d_w · d_x` lanes into `acc`.
///
/// # Safety
/// As for [`dot_legacy`]; `c + N <= v.nblk`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy_chunk<const K: u8, const T: usize, const N: usize>(
    row: &[u8],
    v: &View<'_>,
    t0: usize,
    c: usize,
    acc: &mut [__m256; T],
) {
    let bytes = legacy_bytes(K);
    // SAFETY: blocks `c..c + N` lie inside `row` (caller).
    let p = unsafe { row.as_ptr().add(c * bytes) };
    // SAFETY: as above; the scale is at offset 0 of every block (`m` at 2).
    let (dw, mw) = unsafe {
        if has_min(K) {
            gather_f16_pairs::<N>(p, bytes)
        } else if K == FP4 {
            (gather_e8m0::<N>(p, bytes), _mm256_setzero_ps())
        } else {
            (gather_f16::<N>(p, bytes), _mm256_setzero_ps())
        }
    };
    // Decode the chunk once for all tokens. Q8_0 and the codebook kinds are signed: |w|
    // and the signs.
    let mut wq = [_mm256_setzero_si256(); 8];
    let mut ws = [_mm256_setzero_si256(); 8];
    for k in 0..N {
        // SAFETY: block `k < N` of the chunk is readable.
        let w = unsafe { levels::<K>(p.add(k * bytes)) };
        if signed_levels(K) {
            wq[k] = _mm256_abs_epi8(w);
            ws[k] = w;
        } else {
            wq[k] = w;
        }
    }
    let ones = _mm256_set1_epi16(1);
    for (j, a) in acc.iter_mut().enumerate() {
        let t = t0 + j;
        let mut s = [_mm256_setzero_si256(); 8];
        for k in 0..N {
            // SAFETY: token `t`, block `c + k` are inside the activation quants (caller).
            let x = unsafe { load32(v.qs.as_ptr().add(t * v.cols + (c + k) * QK)) };
            let prod = if signed_levels(K) {
                _mm256_maddubs_epi16(wq[k], _mm256_sign_epi8(x, ws[k]))
            } else {
                _mm256_maddubs_epi16(wq[k], x)
            };
            s[k] = _mm256_madd_epi16(prod, ones);
        }
        let mut isum = sum_lanes8(&s);
        let i = t * v.nblk + c;
        if K == Q4_0 || K == Q5_0 {
            // Σ (q - z) x = Σ q x - z Σ x with z = 8 or 16.
            // SAFETY: token `t`'s blocks `c..c + N` exist (caller).
            let qsum = unsafe { load_i32s::<N>(v.qsum, i) };
            let z = if K == Q4_0 {
                _mm256_slli_epi32::<3>(qsum)
            } else {
                _mm256_slli_epi32::<4>(qsum)
            };
            isum = _mm256_sub_epi32(isum, z);
        }
        // SAFETY: as above.
        let scale = _mm256_mul_ps(dw, unsafe { load_f32s::<N>(v.d, i) });
        *a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), *a);
        if has_min(K) {
            // The min terms m_b · s_b of the chunk's blocks.
            // SAFETY: as above (Q8_1 activations carry `s`).
            *a = _mm256_fmadd_ps(mw, unsafe { load_f32s::<N>(v.s, i) }, *a);
        }
    }
}

/// `T` tokens against one legacy row, in chunks of 8 blocks.
///
/// # Safety
/// `row` holds `v.nblk` blocks of kind `K`; tokens `t0..t0 + T` exist in `v`, which is
/// in the kind's activation format; `out.len() >= T`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_legacy<const K: u8, const T: usize>(row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
    align_frame();
    let mut acc = [_mm256_setzero_ps(); T];
    let nb = v.nblk;
    let mut c = 0;
    // SAFETY (all calls): blocks `c..c + N` exist; the rest is the caller's contract.
    unsafe {
        while c + 8 <= nb {
            legacy_chunk::<K, T, 8>(row, v, t0, c, &mut acc);
            c += 8;
        }
        match nb - c {
            0 => {}
            1 => legacy_chunk::<K, T, 1>(row, v, t0, c, &mut acc),
            2 => legacy_chunk::<K, T, 2>(row, v, t0, c, &mut acc),
            3 => legacy_chunk::<K, T, 3>(row, v, t0, c, &mut acc),
            4 => legacy_chunk::<K, T, 4>(row, v, t0, c, &mut acc),
            5 => legacy_chunk::<K, T, 5>(row, v, t0, c, &mut acc),
            6 => legacy_chunk::<K, T, 6>(row, v, t0, c, &mut acc),
            _ => legacy_chunk::<K, T, 7>(row, v, t0, c, &mut acc),
        }
    }
    for (o, a) in out[..T].iter_mut().zip(acc) {
        *o = hsum_ps(a);
    }
}

/// `T` tokens against one Q4_K (`Q5 = false`) or Q5_K row.
///
/// Per 64-element group: the 32 nibble bytes give sub-block `2g` (low nibbles) and
/// `2g + 1` (high nibbles); each sub-block's byte dot is scaled by its 6-bit scale in
/// `i16 × i16 → i32` (`vpmaddwd`) and summed exactly per super-block. The mins term,
/// `Σ mn[s] · (sum of sub-block s's activation quants)`, comes from the precomputed
/// sums of 16.
///
/// # Safety
/// As for [`dot_legacy`], for Q4_K / Q5_K rows and Q8_K activations.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q45k<const Q5: bool, const T: usize>(row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
    align_frame();
    let bytes = if Q5 { 176 } else { 144 };
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let mut acc = [_mm256_setzero_ps(); T];
    for sb in 0..v.nblk {
        // SAFETY: super-block `sb` lies inside `row` (caller).
        let p = unsafe { row.as_ptr().add(sb * bytes) };
        // SAFETY: `d`, `dmin` and the 12 scale bytes are inside the super-block.
        let ((d, dmin), (sc, mn)) = unsafe { (f16_pair(p), k_scales(&*p.add(4).cast::<[u8; 12]>())) };
        let scv = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
        let mnb = _mm_cvtsi64_si128(mn as i64);
        // mn0, mn0, mn1, mn1, ...: pairs with the 16 sums of 16.
        let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mnb, mnb));
        // SAFETY: Q5_K's 32 high-bit bytes are at 16..48.
        let mut qh = if Q5 {
            unsafe { load32(p.add(16)) }
        } else {
            _mm256_setzero_si256()
        };
        let qs = if Q5 { 48 } else { 16 };
        let mut sumi = [_mm256_setzero_si256(); T];
        for g in 0..4 {
            // SAFETY: nibble group `g` is inside the super-block.
            let raw = unsafe { load32(p.add(qs + 32 * g)) };
            let mut lo = _mm256_and_si256(raw, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4);
            if Q5 {
                // Bit s of each qh byte is bit 4 of sub-block s; consume two bits per group
                // (16-bit shifts are safe: only bit 0 of each byte is kept).
                lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(_mm256_and_si256(qh, one)));
                qh = _mm256_srli_epi16::<1>(qh);
                hi = _mm256_or_si256(hi, _mm256_slli_epi16::<4>(_mm256_and_si256(qh, one)));
                qh = _mm256_srli_epi16::<1>(qh);
            }
            // Broadcast i16 scale 2g (bytes 4g, 4g+1) and 2g + 1 to every lane.
            let s_lo = _mm256_shuffle_epi8(scv, _mm256_set1_epi16((((4 * g + 1) << 8) | (4 * g)) as i16));
            let s_hi = _mm256_shuffle_epi8(scv, _mm256_set1_epi16((((4 * g + 3) << 8) | (4 * g + 2)) as i16));
            for (j, si) in sumi.iter_mut().enumerate() {
                // SAFETY: token `t0 + j`, elements 64g..64g+64 of super-block `sb`.
                let (x0, x1) = unsafe {
                    let xp = v.qs.as_ptr().add((t0 + j) * v.cols + sb * QK_K + 64 * g);
                    (load32(xp), load32(xp.add(32)))
                };
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), s_lo);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), s_hi);
                *si = _mm256_add_epi32(*si, _mm256_add_epi32(p0, p1));
            }
        }
        for (j, (a, si)) in acc.iter_mut().zip(sumi).enumerate() {
            let i = (t0 + j) * v.nblk + sb;
            // SAFETY: token `t0 + j`, super-block `sb` exist in the Q8_K buffers.
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

/// `T` tokens against one Q6_K row.
///
/// The 6-bit levels `q ∈ 0..=63` go into `vpmaddubsw` unsigned; the `-32` offset is
/// removed exactly afterwards as `32 · Σ_s scale[s] · (sum of sub-block s's quants)`.
///
/// # Safety
/// As for [`dot_legacy`], for Q6_K rows and Q8_K activations.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6k<const T: usize>(row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
    align_frame();
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); T];
    for sb in 0..v.nblk {
        // SAFETY: super-block `sb` lies inside `row` (caller).
        let p = unsafe { row.as_ptr().add(sb * 210) };
        // SAFETY: `d` at 208 and the 16 scale bytes at 192 are inside the super-block.
        let (d, sc8) = unsafe { (f16_pair(p.add(206)).1, _mm_loadu_si128(p.add(192).cast())) };
        let sc16 = _mm256_cvtepi8_epi16(sc8);
        let mut sumi = [_mm256_setzero_si256(); T];
        for n in 0..2 {
            let sch = if n == 0 {
                _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sc16))
            } else {
                _mm256_broadcastsi128_si256(_mm256_extracti128_si256::<1>(sc16))
            };
            // SAFETY: half `n`'s 64 low bytes at 64n and 32 high bytes at 128 + 32n.
            let (l0, l1, h) = unsafe {
                (
                    load32(p.add(64 * n)),
                    load32(p.add(64 * n + 32)),
                    load32(p.add(128 + 32 * n)),
                )
            };
            // Element 32k + l of the half: low 4 bits from l0 (k = 0, 2) or l1 (k = 1, 3),
            // low or high nibble; top 2 bits from bits 2k, 2k+1 of h, moved to bits 4, 5.
            let q = [
                _mm256_or_si256(
                    _mm256_and_si256(l0, m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(h, _mm256_set1_epi8(0x03))),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(l1, m4),
                    _mm256_slli_epi16::<2>(_mm256_and_si256(h, _mm256_set1_epi8(0x0C))),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4),
                    _mm256_and_si256(h, _mm256_set1_epi8(0x30)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                    _mm256_srli_epi16::<2>(_mm256_and_si256(h, _mm256_set1_epi8(0xC0u8 as i8))),
                ),
            ];
            for (k, &qk) in q.iter().enumerate() {
                // Sub-block 2k of the half in the low 128 bits, 2k + 1 in the high ones.
                let pick = _mm256_set_m128i(
                    _mm_set1_epi16((((4 * k + 3) << 8) | (4 * k + 2)) as i16),
                    _mm_set1_epi16((((4 * k + 1) << 8) | (4 * k)) as i16),
                );
                let s = _mm256_shuffle_epi8(sch, pick);
                for (j, si) in sumi.iter_mut().enumerate() {
                    // SAFETY: token `t0 + j`, elements 128n + 32k .. +32 of super-block `sb`.
                    let x = unsafe { load32(v.qs.as_ptr().add((t0 + j) * v.cols + sb * QK_K + 128 * n + 32 * k)) };
                    *si = _mm256_add_epi32(*si, _mm256_madd_epi16(_mm256_maddubs_epi16(qk, x), s));
                }
            }
        }
        for (j, (a, si)) in acc.iter_mut().zip(sumi).enumerate() {
            let i = (t0 + j) * v.nblk + sb;
            // SAFETY: token `t0 + j`, super-block `sb` exist in the Q8_K buffers.
            let (dx, bs) = unsafe { (*v.d.get_unchecked(i), load32(v.bsums.as_ptr().add(i * KSUMS))) };
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, bs));
            let si = _mm256_sub_epi32(si, offset);
            *a = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(si), *a);
        }
    }
    for (o, a) in out[..T].iter_mut().zip(acc) {
        *o = hsum_ps(a);
    }
}

// ------------------------------------------------ several rows × several tokens

/// Rows per block of [`dot_rows_multi`].
const RB: usize = 16;
/// Tokens per block of [`dot_rows_multi`].
const TB: usize = 16;

/// `out[r · ntok + j] = row r · token (t0 + j)` for every row of `rows` (`rb` bytes
/// each) and `ntok = out.len() / (rows.len() / rb)` tokens. Q4_0, Q4_1, Q5_0 and
/// Q5_1 run [`dot_legacy_rt`] on blocks of up to [`RB`] rows × [`TB`] tokens; Q8_0
/// and the K-quants run [`dot_multi`] row by row. Bit-identical to [`dot_multi`] per row.
///
/// # Safety
/// As for [`dot_multi`], for every row (`rows.len()` a multiple of `rb`, `out.len()` =
/// rows × `ntok`) and tokens `t0..t0 + ntok`.
pub(super) unsafe fn dot_rows_multi(ty: WeightType, rows: &[u8], rb: usize, v: View<'_>, t0: usize, out: &mut [f32]) {
    let nrows = rows.len() / rb;
    let ntok = out.len() / nrows;
    macro_rules! blocked {
        ($k:expr) => {{
            let mut r = 0;
            while r < nrows {
                let nr = RB.min(nrows - r);
                let mut j = 0;
                while j < ntok {
                    let nt = TB.min(ntok - j);
                    // SAFETY: rows `r..r + nr` and tokens `t0 + j ..+ nt` are inside what
                    // the caller vouched for; the outputs written are
                    // `out[(r + i) · ntok + j ..][..nt]`, `i < nr`, in bounds.
                    unsafe {
                        dot_legacy_rt::<{ $k }>(
                            &rows[r * rb..(r + nr) * rb],
                            rb,
                            nr,
                            &v,
                            t0 + j,
                            nt,
                            &mut out[r * ntok + j..],
                            ntok,
                        )
                    };
                    j += nt;
                }
                r += nr;
            }
        }};
    }
    match ty {
        WeightType::Q4_0 => blocked!(Q4_0),
        WeightType::Q4_1 => blocked!(Q4_1),
        WeightType::Q5_0 => blocked!(Q5_0),
        WeightType::Q5_1 => blocked!(Q5_1),
        // Q8_0 (which needs |w| and the signs here) and the K-quants: row by row. The
        // blocked Q8_0 kernel measured no faster than `dot_multi` on AVX2.
        _ => {
            for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(ntok)) {
                // SAFETY: the caller's contract, for this one row.
                unsafe { dot_multi(ty, row, v, t0, o) };
            }
        }
    }
}

/// Transposes 8 vectors of 8 `i32`: lane `k` of `out[m]` is lane `m` of `a[k]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose8(a: &[__m256i; 8]) -> [__m256i; 8] {
    let t0 = _mm256_unpacklo_epi32(a[0], a[1]);
    let t1 = _mm256_unpackhi_epi32(a[0], a[1]);
    let t2 = _mm256_unpacklo_epi32(a[2], a[3]);
    let t3 = _mm256_unpackhi_epi32(a[2], a[3]);
    let t4 = _mm256_unpacklo_epi32(a[4], a[5]);
    let t5 = _mm256_unpackhi_epi32(a[4], a[5]);
    let t6 = _mm256_unpacklo_epi32(a[6], a[7]);
    let t7 = _mm256_unpackhi_epi32(a[6], a[7]);
    // Per 128-bit half h: u_i = lane 4h + i of a[0..4] (u0..u3), of a[4..8] (u4..u7).
    let u0 = _mm256_unpacklo_epi64(t0, t2);
    let u1 = _mm256_unpackhi_epi64(t0, t2);
    let u2 = _mm256_unpacklo_epi64(t1, t3);
    let u3 = _mm256_unpackhi_epi64(t1, t3);
    let u4 = _mm256_unpacklo_epi64(t4, t6);
    let u5 = _mm256_unpackhi_epi64(t4, t6);
    let u6 = _mm256_unpacklo_epi64(t5, t7);
    let u7 = _mm256_unpackhi_epi64(t5, t7);
    [
        _mm256_permute2x128_si256::<0x20>(u0, u4),
        _mm256_permute2x128_si256::<0x20>(u1, u5),
        _mm256_permute2x128_si256::<0x20>(u2, u6),
        _mm256_permute2x128_si256::<0x20>(u3, u7),
        _mm256_permute2x128_si256::<0x31>(u0, u4),
        _mm256_permute2x128_si256::<0x31>(u1, u5),
        _mm256_permute2x128_si256::<0x31>(u2, u6),
        _mm256_permute2x128_si256::<0x31>(u3, u7),
    ]
}

/// `nr ≤ RB` rows × `nt ≤ TB` tokens of kind `K`: `out[i · stride + j]` = row `i` ·
/// token `t0 + j`.
///
/// # Safety
/// `rows` holds `nr` rows of `rb` bytes (`v.nblk` blocks of kind `K` each); tokens
/// `t0..t0 + nt` exist in `v`, in the kind's activation format;
/// `out.len() >= (nr - 1) · stride + nt`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_legacy_rt<const K: u8>(
    rows: &[u8],
    rb: usize,
    nr: usize,
    v: &View<'_>,
    t0: usize,
    nt: usize,
    out: &mut [f32],
    stride: usize,
) {
    align_frame();
    let mut acc = [[_mm256_setzero_ps(); TB]; RB];
    let nb = v.nblk;
    let mut c = 0;
    // SAFETY (all calls): blocks `c..c + N` exist; the rest is the caller's contract.
    unsafe {
        while c + 8 <= nb {
            legacy_chunk_rt::<K, 8>(rows, rb, nr, v, t0, nt, c, &mut acc);
            c += 8;
        }
        match nb - c {
            0 => {}
            1 => legacy_chunk_rt::<K, 1>(rows, rb, nr, v, t0, nt, c, &mut acc),
            2 => legacy_chunk_rt::<K, 2>(rows, rb, nr, v, t0, nt, c, &mut acc),
            3 => legacy_chunk_rt::<K, 3>(rows, rb, nr, v, t0, nt, c, &mut acc),
            4 => legacy_chunk_rt::<K, 4>(rows, rb, nr, v, t0, nt, c, &mut acc),
            5 => legacy_chunk_rt::<K, 5>(rows, rb, nr, v, t0, nt, c, &mut acc),
            6 => legacy_chunk_rt::<K, 6>(rows, rb, nr, v, t0, nt, c, &mut acc),
            _ => legacy_chunk_rt::<K, 7>(rows, rb, nr, v, t0, nt, c, &mut acc),
        }
    }
    for (i, a) in acc.iter().enumerate().take(nr) {
        for (j, &aj) in a.iter().enumerate().take(nt) {
            out[i * stride + j] = hsum_ps(aj);
        }
    }
}

/// Blocks `c..c + N` of `nr` rows against `nt` tokens. Each token's 8 blocks are
/// transposed once (shared by the rows), each row's decoded blocks once (shared by
/// the tokens), so the byte dots of the 8 transposed vectors leave block `k`'s exact
/// integer dot in lane `k` with no horizontal sums: the same `i32` lanes as
/// [`legacy_chunk`]'s [`sum_lanes8`], and the same `f32` operations after them, so
/// every (row, token) result is bit-identical to [`dot_legacy`].
///
/// For the 4- and 5-bit kinds four `vpmaddubsw` results are added in `i16` before
/// the widening `vpmaddwd`: 8 products of levels ≤ 31 and quants ≤ 127 in magnitude
/// are at most `8 · 31 · 127 = 31496`, so nothing saturates or wraps.
///
/// # Safety
/// As for [`dot_legacy_rt`]; `c + N <= v.nblk`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy_chunk_rt<const K: u8, const N: usize>(
    rows: &[u8],
    rb: usize,
    nr: usize,
    v: &View<'_>,
    t0: usize,
    nt: usize,
    c: usize,
    acc: &mut [[__m256; TB]; RB],
) {
    let bytes = legacy_bytes(K);
    // Per token: transposed quants, zero-point term, scales (and Q8_1 sums).
    let mut xt = [[_mm256_setzero_si256(); 8]; TB];
    let mut zt = [_mm256_setzero_si256(); TB];
    let mut dx = [_mm256_setzero_ps(); TB];
    let mut sx = [_mm256_setzero_ps(); TB];
    for j in 0..nt {
        let t = t0 + j;
        let mut x = [_mm256_setzero_si256(); 8];
        for (k, xk) in x.iter_mut().enumerate().take(N) {
            // SAFETY: token `t`, block `c + k` are inside the activation quants (caller).
            *xk = unsafe { load32(v.qs.as_ptr().add(t * v.cols + (c + k) * QK)) };
        }
        xt[j] = transpose8(&x);
        let i = t * v.nblk + c;
        if K == Q4_0 || K == Q5_0 {
            // SAFETY: token `t`'s blocks `c..c + N` exist (caller).
            let qsum = unsafe { load_i32s::<N>(v.qsum, i) };
            // The token's sums start at `-z · Σq`.
            zt[j] = _mm256_sub_epi32(
                _mm256_setzero_si256(),
                if K == Q4_0 {
                    _mm256_slli_epi32::<3>(qsum)
                } else {
                    _mm256_slli_epi32::<4>(qsum)
                },
            );
        }
        // SAFETY: as above.
        dx[j] = unsafe { load_f32s::<N>(v.d, i) };
        if has_min(K) {
            // SAFETY: as above (Q8_1 activations carry `s`).
            sx[j] = unsafe { load_f32s::<N>(v.s, i) };
        }
    }
    let ones = _mm256_set1_epi16(1);
    for (r, ar) in acc.iter_mut().enumerate().take(nr) {
        // SAFETY: blocks `c..c + N` of row `r < nr` lie inside `rows` (caller).
        let p = unsafe { rows.as_ptr().add(r * rb + c * bytes) };
        // SAFETY: as above; `d` is at offset 0 of every block, `m` at 2.
        let (dw, mw) = unsafe {
            if has_min(K) {
                gather_f16_pairs::<N>(p, bytes)
            } else {
                (gather_f16::<N>(p, bytes), _mm256_setzero_ps())
            }
        };
        let mut wq = [_mm256_setzero_si256(); 8];
        for (k, wk) in wq.iter_mut().enumerate().take(N) {
            // SAFETY: block `k < N` of the chunk is readable.
            *wk = unsafe { levels::<K>(p.add(k * bytes)) };
        }
        // Q8_0 is signed: |w| and the signs, transposed alike.
        let ws = transpose8(&wq);
        let wt = if K == Q8_0 {
            let mut wa = wq;
            for w in wa.iter_mut() {
                *w = _mm256_abs_epi8(*w);
            }
            transpose8(&wa)
        } else {
            ws
        };
        for (j, a) in ar.iter_mut().enumerate().take(nt) {
            let x = &xt[j];
            // Starts at `-z · Σq` (zero for the kinds without a zero point): exact `i32`
            // sums, in any order.
            let mut isum = zt[j];
            if K == Q8_0 {
                for m in 0..8 {
                    let prod = _mm256_maddubs_epi16(wt[m], _mm256_sign_epi8(x[m], ws[m]));
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(prod, ones));
                }
            } else {
                for h in 0..2 {
                    let m = 4 * h;
                    let p01 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(wt[m], x[m]),
                        _mm256_maddubs_epi16(wt[m + 1], x[m + 1]),
                    );
                    let p23 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(wt[m + 2], x[m + 2]),
                        _mm256_maddubs_epi16(wt[m + 3], x[m + 3]),
                    );
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_add_epi16(p01, p23), ones));
                }
            }
            let scale = _mm256_mul_ps(dw, dx[j]);
            *a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), *a);
            if has_min(K) {
                *a = _mm256_fmadd_ps(mw, sx[j], *a);
            }
        }
    }
}
