//! Prefill kernels on 512-bit vectors over prepared token tiles (`q8::TokenTile`): two
//! tokens per `zmm`, one in each 256-bit half.
//!
//! Each half does exactly what the 256-bit kernel of the parent module does for its
//! token — the same `i32` lanes from the same byte products, the same `f32` operations
//! in the same order, the same final lane sum — so every result is bit-identical to
//! the parent's (and hence to the AVX2 path). What changes is the instruction count:
//! one `vpdpbusd`, conversion and FMA now serve two tokens, and a weight vector is
//! decoded once and broadcast to both halves.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::{
    f16_pair, gather_f16, gather_f16_pairs, has_min, hsum_ps, k_scales, legacy_bytes, levels, load32, q45k_levels,
    q45k_pair_scales, q6k_levels, q6k_pair_scales, transpose8, View, KSUMS, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, QK, QK_K,
};
use crate::quant::affine::{assert_valid, chunk_bytes};
use crate::quant::q8::affine::x86::avx512vnni::{levels as affine_levels, per_chunk};
use crate::quant::WeightType;

/// Rows per block of the legacy kernel.
const RB: usize = 16;
/// Token pairs per block of the legacy kernel (32 tokens).
const PB: usize = 16;
/// Token pairs per call of the K-quant kernels (16 tokens).
const PK: usize = 8;

/// Both halves set to `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dup_ps(v: __m256) -> __m512 {
    let z = _mm512_castps256_ps512(v);
    _mm512_shuffle_f32x4::<0b01_00_01_00>(z, z)
}

/// Both halves set to `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dup_si(v: __m256i) -> __m512i {
    let z = _mm512_castsi256_si512(v);
    _mm512_shuffle_i32x4::<0b01_00_01_00>(z, z)
}

/// `a` in the low half, `b` in the high half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn pair_si(a: __m256i, b: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
}

/// `a` in the low half, `b` in the high half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn pair_ps(a: __m256, b: __m256) -> __m512 {
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castpd256_pd512(_mm256_castps_pd(a)),
        _mm256_castps_pd(b),
    ))
}

/// The two halves' lane sums, each exactly as [`hsum_ps`] sums one 256-bit vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn hsum_halves(v: __m512) -> (f32, f32) {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    (hsum_ps(lo), hsum_ps(hi))
}

/// Realigns the frame to 64 bytes (see `align_frame`; here the spills are `zmm`).
#[inline(always)]
fn align_frame64() {
    let mut pin = std::mem::MaybeUninit::<__m512i>::uninit();
    std::hint::black_box(pin.as_mut_ptr());
}

/// The parent's `scale2` on both halves: each `i32` lane += `sa · da + sb · db`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn scale2(si: __m512i, da: __m512i, db: __m512i, sab: __m512i) -> __m512i {
    let packed = _mm512_mask_blend_epi16(0xAAAA_AAAA, da, _mm512_slli_epi32::<16>(db));
    _mm512_dpwssd_epi32(si, packed, sab)
}

/// Lane sums of each pair's halves into `out` (the odd tail's stand-in dropped).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn store_pairs(acc: &[__m512], out: &mut [f32]) {
    for (j, &a) in acc.iter().enumerate() {
        let (lo, hi) = hsum_halves(a);
        out[2 * j] = lo;
        if 2 * j + 1 < out.len() {
            out[2 * j + 1] = hi;
        }
    }
}

// ------------------------------------------------ prepared token tiles (legacy kinds)

/// Bytes of one (token pair, 8-block chunk) record of a prepared tile: the 8 transposed
/// quant vectors, then the zero-point term, the scales `d` and (Q8_1) the sums `s`, each
/// one `zmm` with the pair's first token in the low half.
pub(in crate::quant::q8) const TILE_REC: usize = 11 * 64;

/// Bytes of one (token pair, super-block) record for the K-quants: the pair's quants
/// interleaved per 32 elements (token A's 32 bytes, then token B's), then the two
/// tokens' scales `d` (one 64-byte slot), then their 16 block sums each.
pub(in crate::quant::q8) const KTILE_REC: usize = 8 * 64 + 64 + 64;

/// Bytes of a prepared tile of `ntok` tokens of `nblk` blocks for `ty`.
pub(in crate::quant::q8) fn tile_bytes(ty: WeightType, ntok: usize, nblk: usize) -> usize {
    if is_kquant(ty) {
        ntok.div_ceil(2) * nblk * KTILE_REC
    } else {
        ntok.div_ceil(2) * nblk.div_ceil(8) * TILE_REC
    }
}

fn is_kquant(ty: WeightType) -> bool {
    matches!(ty, WeightType::Q4K | WeightType::Q5K | WeightType::Q6K)
}

/// True for the kinds [`prepare_tile`] / [`dot_rows_tile`] handle. The affine (MLX)
/// types share the Q4_1 records: their 32-element chunks dot with Q8_1 blocks as Q4_1's
/// blocks do (unsigned levels, a scale and a bias term per block).
pub(in crate::quant::q8) fn tile_kind(ty: WeightType) -> bool {
    is_kquant(ty)
        || matches!(
            ty,
            WeightType::Q4_0
                | WeightType::Q4_1
                | WeightType::Q5_0
                | WeightType::Q5_1
                | WeightType::Q8_0
                | WeightType::Affine { .. }
        )
}

/// [`prepare_tile`] for the K-quants (Q8_K activations).
///
/// # Safety
/// As for [`prepare_tile`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn prepare_ktile(v: View<'_>, t0: usize, ntok: usize, buf: &mut [u8]) {
    let out = buf.as_mut_ptr();
    for p in 0..ntok.div_ceil(2) {
        // A missing second token of an odd tail repeats the first (results dropped).
        let (ta, tb) = (t0 + 2 * p, t0 + (2 * p + 1).min(ntok - 1));
        for sb in 0..v.nblk {
            // SAFETY: both tokens and super-block `sb` exist in `v`; record (p, sb) lies
            // inside `buf` (caller).
            unsafe {
                let rec = out.add((p * v.nblk + sb) * KTILE_REC);
                for k in 0..8 {
                    let at = sb * QK_K + 32 * k;
                    let a = load32(v.qs.as_ptr().add(ta * v.cols + at));
                    let b = load32(v.qs.as_ptr().add(tb * v.cols + at));
                    _mm512_storeu_si512(rec.add(64 * k).cast(), pair_si(a, b));
                }
                let (ia, ib) = (ta * v.nblk + sb, tb * v.nblk + sb);
                let d = rec.add(512).cast::<f32>();
                d.write_unaligned(*v.d.get_unchecked(ia));
                d.add(1).write_unaligned(*v.d.get_unchecked(ib));
                let bs = pair_si(
                    load32(v.bsums.as_ptr().add(ia * KSUMS)),
                    load32(v.bsums.as_ptr().add(ib * KSUMS)),
                );
                _mm512_storeu_si512(rec.add(576).cast(), bs);
            }
        }
    }
}

/// Writes the records of tokens `t0..t0 + ntok` for weight kind `ty` into `buf`: what
/// `legacy_chunk_rt` computes per call for its tokens, computed once so that every block
/// of rows dotted against these tokens can reuse it. Lanes of blocks past the row's end
/// are zero, as there. The affine types take Q4_1's records, except that a last chunk of
/// at most 4 blocks is laid out folded ([`transpose_folded`], its first 4 vectors used).
///
/// # Safety
/// The CPU features must have been detected; `ty` is a [`tile_kind`]; `v` holds tokens
/// `t0..t0 + ntok` in `ty`'s activation format; `buf.len() >= tile_bytes(ntok, v.nblk)`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(in crate::quant::q8) unsafe fn prepare_tile(ty: WeightType, v: View<'_>, t0: usize, ntok: usize, buf: &mut [u8]) {
    assert!(buf.len() >= tile_bytes(ty, ntok, v.nblk));
    if is_kquant(ty) {
        // SAFETY: the caller's contract; the length was checked above.
        return unsafe { prepare_ktile(v, t0, ntok, buf) };
    }
    let nchunks = v.nblk.div_ceil(8);
    let shift = match ty {
        WeightType::Q4_0 => Some(3),
        WeightType::Q5_0 => Some(4),
        WeightType::Q8_0 => Some(7),
        _ => None,
    };
    let affine = matches!(ty, WeightType::Affine { .. });
    let with_s = matches!(ty, WeightType::Q4_1 | WeightType::Q5_1) || affine;
    let out = buf.as_mut_ptr();
    for p in 0..ntok.div_ceil(2) {
        for c in 0..nchunks {
            let n = 8.min(v.nblk - 8 * c);
            let lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            let mut half_x = [[_mm256_setzero_si256(); 8]; 2];
            let mut half_z = [_mm256_setzero_si256(); 2];
            let mut half_d = [_mm256_setzero_ps(); 2];
            let mut half_s = [_mm256_setzero_ps(); 2];
            for h in 0..2 {
                // A missing second token of an odd tail repeats the first (results dropped).
                let t = t0 + (2 * p + h).min(ntok - 1);
                let mut x = [_mm256_setzero_si256(); 8];
                for (k, xk) in x.iter_mut().enumerate().take(n) {
                    // SAFETY: token `t`, block `8c + k < nblk` exist (caller).
                    *xk = unsafe { load32(v.qs.as_ptr().add(t * v.cols + (8 * c + k) * QK)) };
                }
                half_x[h] = if affine && folds(n) {
                    transpose_folded(&x)
                } else {
                    transpose8(&x)
                };
                let i = t * v.nblk + 8 * c;
                // SAFETY: masked lanes are not read; the others are blocks `8c..8c + n` of
                // token `t` (caller).
                unsafe {
                    if let Some(sh) = shift {
                        let qsum = _mm256_maskload_epi32(v.qsum.as_ptr().add(i), lanes);
                        half_z[h] =
                            _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_sllv_epi32(qsum, _mm256_set1_epi32(sh)));
                    }
                    half_d[h] = _mm256_maskload_ps(v.d.as_ptr().add(i), lanes);
                    if with_s {
                        half_s[h] = _mm256_maskload_ps(v.s.as_ptr().add(i), lanes);
                    }
                }
            }
            // SAFETY: record (p, c) lies inside `buf` (length asserted above).
            unsafe {
                let rec = out.add((p * nchunks + c) * TILE_REC);
                for (m, (&a, &b)) in half_x[0].iter().zip(&half_x[1]).enumerate() {
                    _mm512_storeu_si512(rec.add(64 * m).cast(), pair_si(a, b));
                }
                _mm512_storeu_si512(rec.add(512).cast(), pair_si(half_z[0], half_z[1]));
                _mm512_storeu_ps(rec.add(576).cast(), pair_ps(half_d[0], half_d[1]));
                _mm512_storeu_ps(rec.add(640).cast(), pair_ps(half_s[0], half_s[1]));
            }
        }
    }
}

/// `out[r · ntok + j] = row r · token j` of a tile prepared by [`prepare_tile`] (for
/// the same kind, `ntok` tokens of `nblk` blocks), in blocks of up to [`RB`] rows ×
/// 32 tokens: the arithmetic of [`dot_rows_multi`] (for the affine types, of their row
/// kernel in `q8/affine.rs`), so bit-identical to it.
///
/// # Safety
/// The CPU features must have been detected; `ty` is a [`tile_kind`]; `rows` holds
/// whole rows of `rb` bytes (`nblk` blocks each); `tile` was prepared as said, and
/// `out.len() == rows × ntok`.
pub(in crate::quant::q8) unsafe fn dot_rows_tile(
    ty: WeightType,
    rows: &[u8],
    rb: usize,
    nblk: usize,
    tile: &[u8],
    ntok: usize,
    out: &mut [f32],
) {
    let nrows = rows.len() / rb;
    let pstride = nblk.div_ceil(8) * TILE_REC;
    macro_rules! blocked {
        ($k:expr) => {{
            let mut r = 0;
            while r < nrows {
                let nr = RB.min(nrows - r);
                let mut j = 0;
                while j < ntok {
                    let nt = (2 * PB).min(ntok - j);
                    // SAFETY: rows `r..r + nr`, the records of pairs `j / 2..` (j is even)
                    // and outputs `out[(r + i) · ntok + j ..][..nt]` are in bounds.
                    unsafe {
                        dot_legacy_tile::<{ $k }>(
                            &rows[r * rb..(r + nr) * rb],
                            rb,
                            nr,
                            nblk,
                            &tile[(j / 2) * pstride..],
                            pstride,
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
    macro_rules! affine_blocked {
        ($bits:expr, $shift:expr) => {{
            let mut r = 0;
            while r < nrows {
                let nr = RB.min(nrows - r);
                let mut j = 0;
                while j < ntok {
                    let nt = (2 * PB).min(ntok - j);
                    // SAFETY: as in `blocked!`; the rows are whole affine rows of `nblk`
                    // chunks in groups of `32 << shift` elements.
                    unsafe {
                        dot_affine_tile::<{ $bits }>(
                            &rows[r * rb..(r + nr) * rb],
                            rb,
                            nr,
                            nblk,
                            $shift,
                            &tile[(j / 2) * pstride..],
                            pstride,
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
    macro_rules! per_row {
        ($kern:ident [$($p:tt),*]) => {{
            let kstride = nblk * KTILE_REC;
            for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(ntok)) {
                let mut j = 0;
                while j < ntok {
                    let nt = (2 * PK).min(ntok - j);
                    let o = &mut o[j..j + nt];
                    let recs = &tile[(j / 2) * kstride..];
                    // SAFETY: this row, the records of pairs `j / 2..` (j is even) and
                    // `nt` outputs: in bounds by the caller's contract.
                    unsafe {
                        match nt.div_ceil(2) {
                            1 => $kern::<$($p,)* 1>(row, nblk, recs, kstride, o),
                            2 => $kern::<$($p,)* 2>(row, nblk, recs, kstride, o),
                            3 => $kern::<$($p,)* 3>(row, nblk, recs, kstride, o),
                            4 => $kern::<$($p,)* 4>(row, nblk, recs, kstride, o),
                            5 => $kern::<$($p,)* 5>(row, nblk, recs, kstride, o),
                            6 => $kern::<$($p,)* 6>(row, nblk, recs, kstride, o),
                            7 => $kern::<$($p,)* 7>(row, nblk, recs, kstride, o),
                            _ => $kern::<$($p,)* 8>(row, nblk, recs, kstride, o),
                        }
                    }
                    j += nt;
                }
            }
        }};
    }
    match ty {
        WeightType::Q4_0 => blocked!(Q4_0),
        WeightType::Q4_1 => blocked!(Q4_1),
        WeightType::Q5_0 => blocked!(Q5_0),
        WeightType::Q5_1 => blocked!(Q5_1),
        WeightType::Q8_0 => blocked!(Q8_0),
        WeightType::Q4K => per_row!(dot_q45k_tile[false]),
        WeightType::Q5K => per_row!(dot_q45k_tile[true]),
        WeightType::Q6K => per_row!(dot_q6k_tile[]),
        WeightType::Affine { bits, group } => {
            assert_valid(bits, group);
            // Chunks per group is 1, 2 or 4: shifts, not divisions (as the row kernel).
            let shift = (group / 32).trailing_zeros();
            match bits {
                2 => affine_blocked!(2, shift),
                3 => affine_blocked!(3, shift),
                4 => affine_blocked!(4, shift),
                5 => affine_blocked!(5, shift),
                6 => affine_blocked!(6, shift),
                _ => affine_blocked!(8, shift),
            }
        }
        _ => unreachable!("not a tile kind"),
    }
}

/// The pair-`j` record of super-block `sb`: quants, the two `d`, the paired block sums.
///
/// # Safety
/// The record must lie inside the tile.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn krec(recs: &[u8], kstride: usize, j: usize, sb: usize) -> *const u8 {
    // SAFETY: the caller's contract.
    unsafe { recs.as_ptr().add(j * kstride + sb * KTILE_REC) }
}

/// [`dot_q45k`] reading the tokens from a prepared tile (`recs`: pair 0's records,
/// pairs `kstride` bytes apart). Bit-identical to it.
///
/// # Safety
/// As for [`dot_q45k`], with the tile prepared for these tokens.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_q45k_tile<const Q5: bool, const P: usize>(
    row: &[u8],
    nblk: usize,
    recs: &[u8],
    kstride: usize,
    out: &mut [f32],
) {
    align_frame64();
    let bytes = if Q5 { 176 } else { 144 };
    let mut acc = [_mm512_setzero_ps(); P];
    for sb in 0..nblk {
        // SAFETY: super-block `sb` lies inside `row` (caller).
        let p = unsafe { row.as_ptr().add(sb * bytes) };
        // SAFETY: `d`, `dmin` and the 12 scale bytes are inside the super-block.
        let ((d, dmin), (sc, mn)) = unsafe { (f16_pair(p), k_scales(&*p.add(4).cast::<[u8; 12]>())) };
        let scv = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
        let mnb = _mm_cvtsi64_si128(mn as i64);
        let mins = dup_si(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mnb, mnb)));
        // SAFETY: Q5_K's 32 high-bit bytes are at 16..48.
        let mut qh = if Q5 {
            unsafe { load32(p.add(16)) }
        } else {
            _mm256_setzero_si256()
        };
        let mut sumi = [_mm512_setzero_si512(); P];
        for g in 0..4 {
            // SAFETY: group `g` is inside the super-block at `p`.
            let (lo, hi) = unsafe { q45k_levels::<Q5>(p, g, &mut qh) };
            let sab = dup_si(q45k_pair_scales(scv, g));
            let (lo, hi) = (dup_si(lo), dup_si(hi));
            for (j, si) in sumi.iter_mut().enumerate() {
                // SAFETY: pair `j`'s record of super-block `sb` is inside the tile.
                let (x0, x1) = unsafe {
                    let r = krec(recs, kstride, j, sb);
                    (
                        _mm512_loadu_si512(r.add(128 * g).cast()),
                        _mm512_loadu_si512(r.add(128 * g + 64).cast()),
                    )
                };
                let z = _mm512_setzero_si512();
                *si = scale2(*si, _mm512_dpbusd_epi32(z, lo, x0), _mm512_dpbusd_epi32(z, hi, x1), sab);
            }
        }
        for (j, (a, si)) in acc.iter_mut().zip(sumi).enumerate() {
            // SAFETY: as above.
            let (dxa, dxb, bs) = unsafe {
                let r = krec(recs, kstride, j, sb);
                let d = r.add(512).cast::<f32>();
                (
                    d.read_unaligned(),
                    d.add(1).read_unaligned(),
                    _mm512_loadu_si512(r.add(576).cast()),
                )
            };
            let msum = _mm512_madd_epi16(bs, mins);
            let dd = pair_ps(_mm256_set1_ps(d * dxa), _mm256_set1_ps(d * dxb));
            let dm = pair_ps(_mm256_set1_ps(dmin * dxa), _mm256_set1_ps(dmin * dxb));
            *a = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(si), *a);
            *a = _mm512_fnmadd_ps(dm, _mm512_cvtepi32_ps(msum), *a);
        }
    }
    store_pairs(&acc, out);
}

/// [`dot_q6k`] reading the tokens from a prepared tile. Bit-identical to it.
///
/// # Safety
/// As for [`dot_q6k`], with the tile prepared for these tokens.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_q6k_tile<const P: usize>(row: &[u8], nblk: usize, recs: &[u8], kstride: usize, out: &mut [f32]) {
    align_frame64();
    let mut acc = [_mm512_setzero_ps(); P];
    for sb in 0..nblk {
        // SAFETY: super-block `sb` lies inside `row` (caller).
        let p = unsafe { row.as_ptr().add(sb * 210) };
        // SAFETY: `d` at 208 and the 16 scale bytes at 192 are inside the super-block.
        let (d, sc8) = unsafe { (f16_pair(p.add(206)).1, _mm_loadu_si128(p.add(192).cast())) };
        let sc16 = _mm256_cvtepi8_epi16(sc8);
        let mut sumi = [_mm512_setzero_si512(); P];
        for n in 0..2 {
            let sch = if n == 0 {
                _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sc16))
            } else {
                _mm256_broadcastsi128_si256(_mm256_extracti128_si256::<1>(sc16))
            };
            // SAFETY: the super-block at `p` is readable (caller).
            let q = unsafe { q6k_levels(p, n) };
            let q = [dup_si(q[0]), dup_si(q[1]), dup_si(q[2]), dup_si(q[3])];
            for kp in 0..2 {
                let sab = dup_si(q6k_pair_scales(sch, kp));
                let (qa, qb) = (q[2 * kp], q[2 * kp + 1]);
                // Elements 128n + 64kp .. +64: 32-element chunks 4n + 2kp and the next.
                let k0 = 4 * n + 2 * kp;
                for (j, si) in sumi.iter_mut().enumerate() {
                    // SAFETY: pair `j`'s record of super-block `sb` is inside the tile.
                    let (xa, xb) = unsafe {
                        let r = krec(recs, kstride, j, sb);
                        (
                            _mm512_loadu_si512(r.add(64 * k0).cast()),
                            _mm512_loadu_si512(r.add(64 * k0 + 64).cast()),
                        )
                    };
                    let z = _mm512_setzero_si512();
                    *si = scale2(*si, _mm512_dpbusd_epi32(z, qa, xa), _mm512_dpbusd_epi32(z, qb, xb), sab);
                }
            }
        }
        let sc = dup_si(sc16);
        for (j, (a, si)) in acc.iter_mut().zip(sumi).enumerate() {
            // SAFETY: as above.
            let (dxa, dxb, bs) = unsafe {
                let r = krec(recs, kstride, j, sb);
                let d = r.add(512).cast::<f32>();
                (
                    d.read_unaligned(),
                    d.add(1).read_unaligned(),
                    _mm512_loadu_si512(r.add(576).cast()),
                )
            };
            let offset = _mm512_slli_epi32::<5>(_mm512_madd_epi16(sc, bs));
            let si = _mm512_sub_epi32(si, offset);
            let dd = pair_ps(_mm256_set1_ps(d * dxa), _mm256_set1_ps(d * dxb));
            *a = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(si), *a);
        }
    }
    store_pairs(&acc, out);
}

/// [`dot_legacy_rt`] reading prepared records instead of transposing the tokens.
///
/// # Safety
/// As for [`dot_rows_tile`], for `nr ≤ RB` rows, `nt ≤ 32` tokens whose records start
/// at `tile` (pairs `pstride` bytes apart), outputs `out[i · stride + j]`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_legacy_tile<const K: u8>(
    rows: &[u8],
    rb: usize,
    nr: usize,
    nblk: usize,
    tile: &[u8],
    pstride: usize,
    nt: usize,
    out: &mut [f32],
    stride: usize,
) {
    align_frame64();
    let np = nt.div_ceil(2);
    let mut acc = [[MaybeUninit::<__m512>::uninit(); PB]; RB];
    for a in acc.iter_mut().take(nr) {
        for x in a.iter_mut().take(np) {
            x.write(_mm512_setzero_ps());
        }
    }
    let mut c = 0;
    // SAFETY (all calls): chunk `c / 8`'s blocks `c..c + N` exist; the rest is the
    // caller's contract.
    unsafe {
        let rec = |c: usize| tile.as_ptr().add((c / 8) * TILE_REC);
        let bytes = legacy_bytes(K);
        while c + 8 <= nblk {
            // Ask for each row's blocks two chunks ahead: the rows are read a chunk at a
            // time in `nr` interleaved streams, which the hardware prefetchers follow
            // poorly from DRAM (a few-token step then ran at a third of its cached
            // speed). A prefetch is a hint: it never faults, and changes no result.
            let ahead = (c + 16) * bytes;
            if ahead < rb {
                for r in 0..nr {
                    let p = rows.as_ptr().wrapping_add(r * rb + ahead).cast::<i8>();
                    for off in (0..8 * bytes + 63).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off));
                    }
                }
            }
            legacy_chunk_tile::<K, 8>(rows, rb, nr, rec(c), pstride, np, c, &mut acc);
            c += 8;
        }
        match nblk - c {
            0 => {}
            1 => legacy_chunk_tile::<K, 1>(rows, rb, nr, rec(c), pstride, np, c, &mut acc),
            2 => legacy_chunk_tile::<K, 2>(rows, rb, nr, rec(c), pstride, np, c, &mut acc),
            3 => legacy_chunk_tile::<K, 3>(rows, rb, nr, rec(c), pstride, np, c, &mut acc),
            4 => legacy_chunk_tile::<K, 4>(rows, rb, nr, rec(c), pstride, np, c, &mut acc),
            5 => legacy_chunk_tile::<K, 5>(rows, rb, nr, rec(c), pstride, np, c, &mut acc),
            6 => legacy_chunk_tile::<K, 6>(rows, rb, nr, rec(c), pstride, np, c, &mut acc),
            _ => legacy_chunk_tile::<K, 7>(rows, rb, nr, rec(c), pstride, np, c, &mut acc),
        }
    }
    for (i, a) in acc.iter().enumerate().take(nr) {
        for (p, ap) in a.iter().enumerate().take(np) {
            // SAFETY: initialised above (row `i < nr`, pair `p < np`).
            let (lo, hi) = hsum_halves(unsafe { ap.assume_init() });
            out[i * stride + 2 * p] = lo;
            if 2 * p + 1 < nt {
                out[i * stride + 2 * p + 1] = hi;
            }
        }
    }
}

/// [`legacy_chunk_rt`] with the token side read from prepared records at `rec` (pair
/// `p` at `rec + p · pstride`).
///
/// # Safety
/// As for [`dot_legacy_tile`]; blocks `c..c + N` exist.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn legacy_chunk_tile<const K: u8, const N: usize>(
    rows: &[u8],
    rb: usize,
    nr: usize,
    rec: *const u8,
    pstride: usize,
    np: usize,
    c: usize,
    acc: &mut [[MaybeUninit<__m512>; PB]; RB],
) {
    let bytes = legacy_bytes(K);
    for (r, ar) in acc.iter_mut().enumerate().take(nr) {
        // SAFETY: blocks `c..c + N` of row `r < nr` lie inside `rows` (caller).
        let pw = unsafe { rows.as_ptr().add(r * rb + c * bytes) };
        // SAFETY: as above; `d` is at offset 0 of every block, `m` at 2.
        let (dw, mw) = unsafe {
            if has_min(K) {
                gather_f16_pairs::<N>(pw, bytes)
            } else {
                (gather_f16::<N>(pw, bytes), _mm256_setzero_ps())
            }
        };
        let (dw, mw) = (dup_ps(dw), dup_ps(mw));
        let mut wq = [_mm256_setzero_si256(); 8];
        for (k, wk) in wq.iter_mut().enumerate().take(N) {
            // SAFETY: block `k < N` of the chunk is readable.
            let w = unsafe { levels::<K>(pw.add(k * bytes)) };
            *wk = if K == Q8_0 {
                _mm256_xor_si256(w, _mm256_set1_epi8(0x80u8 as i8))
            } else {
                w
            };
        }
        let w8 = transpose8(&wq);
        let mut wt = [_mm512_setzero_si512(); 8];
        for (d, &w) in wt.iter_mut().zip(&w8) {
            *d = dup_si(w);
        }
        for (p, a) in ar.iter_mut().enumerate().take(np) {
            // SAFETY: pair `p < np`'s record is inside the tile (caller); accumulator
            // (`r < nr`, `p`) was initialised by the caller.
            unsafe {
                let x = rec.add(p * pstride);
                let mut s = [_mm512_loadu_si512(x.add(512).cast()), _mm512_setzero_si512()];
                for m in 0..8 {
                    s[m % 2] = _mm512_dpbusd_epi32(s[m % 2], wt[m], _mm512_loadu_si512(x.add(64 * m).cast()));
                }
                let isum = _mm512_add_epi32(s[0], s[1]);
                let scale = _mm512_mul_ps(dw, _mm512_loadu_ps(x.add(576).cast()));
                let mut acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), a.assume_init());
                if has_min(K) {
                    acc = _mm512_fmadd_ps(mw, _mm512_loadu_ps(x.add(640).cast()), acc);
                }
                a.write(acc);
            }
        }
    }
}

/// True when the affine kernels lay out a step of `n` chunks folded ([`transpose_folded`]):
/// a row's last step of at most 4 chunks, which then takes 4 `vpdpbusd` per token pair
/// instead of 8 (rows of 576 or 640 elements end in 2 or 4 chunks).
#[inline(always)]
fn folds(n: usize) -> bool {
    n <= 4
}

/// [`transpose8`] of at most 4 chunks (`a[4..]` zero) folded into 4 vectors: lane `k` of
/// `out[m]` is dword `m` of chunk `k`, lane `k + 4` its dword `m + 4`, so `vpdpbusd`
/// over `out[..4]` leaves chunk `k`'s dot split between lanes `k` and `k + 4`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn transpose_folded(a: &[__m256i; 8]) -> [__m256i; 8] {
    let swap = |v: __m256i| _mm256_permute2x128_si256::<0x01>(v, v);
    transpose8(&[a[0], a[1], a[2], a[3], swap(a[0]), swap(a[1]), swap(a[2]), swap(a[3])])
}

/// The affine row kernel (`q8/affine.rs`, 256-bit, VNNI) on blocks of `nr ≤ RB` rows ×
/// `nt ≤ 32` tokens of a prepared tile: each row's 8-chunk step decoded and transposed
/// once for all the tokens, so block `k`'s exact integer dot lands in lane `k` with no
/// horizontal sums — the same `i32` lanes as the row kernel's `sum_lanes8`, then the same
/// `f32` operations (`scale · d`, one FMA with the integer sum, one with `bias · s`) in
/// the same order, and the same final lane sum: bit-identical per (row, token).
///
/// # Safety
/// As for [`dot_rows_tile`], for `nr` affine rows of `BITS`-bit levels, `nblk` chunks
/// each, groups of `32 << shift` elements; `nt` tokens whose records start at `tile`
/// (pairs `pstride` bytes apart); outputs `out[i · stride + j]`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_affine_tile<const BITS: u8>(
    rows: &[u8],
    rb: usize,
    nr: usize,
    nblk: usize,
    shift: u32,
    tile: &[u8],
    pstride: usize,
    nt: usize,
    out: &mut [f32],
    stride: usize,
) {
    align_frame64();
    let np = nt.div_ceil(2);
    let mut acc = [[MaybeUninit::<__m512>::uninit(); PB]; RB];
    for a in acc.iter_mut().take(nr) {
        for x in a.iter_mut().take(np) {
            x.write(_mm512_setzero_ps());
        }
    }
    let mut c = 0;
    // SAFETY (all calls): chunk `c / 8`'s chunks `c..c + N` exist; the rest is the
    // caller's contract.
    unsafe {
        let rec = |c: usize| tile.as_ptr().add((c / 8) * TILE_REC);
        let geo = (rows, rb, nr, nblk >> shift, shift);
        while c + 8 <= nblk {
            affine_chunk_tile::<BITS, 8>(geo, rec(c), pstride, np, c, &mut acc);
            c += 8;
        }
        match nblk - c {
            0 => {}
            1 => affine_chunk_tile::<BITS, 1>(geo, rec(c), pstride, np, c, &mut acc),
            2 => affine_chunk_tile::<BITS, 2>(geo, rec(c), pstride, np, c, &mut acc),
            3 => affine_chunk_tile::<BITS, 3>(geo, rec(c), pstride, np, c, &mut acc),
            4 => affine_chunk_tile::<BITS, 4>(geo, rec(c), pstride, np, c, &mut acc),
            5 => affine_chunk_tile::<BITS, 5>(geo, rec(c), pstride, np, c, &mut acc),
            6 => affine_chunk_tile::<BITS, 6>(geo, rec(c), pstride, np, c, &mut acc),
            _ => affine_chunk_tile::<BITS, 7>(geo, rec(c), pstride, np, c, &mut acc),
        }
    }
    for (i, a) in acc.iter().enumerate().take(nr) {
        for (p, ap) in a.iter().enumerate().take(np) {
            // SAFETY: initialised above (row `i < nr`, pair `p < np`).
            let (lo, hi) = hsum_halves(unsafe { ap.assume_init() });
            out[i * stride + 2 * p] = lo;
            if 2 * p + 1 < nt {
                out[i * stride + 2 * p + 1] = hi;
            }
        }
    }
}

/// Chunks `c..c + N` of the rows against the prepared pairs at `rec` (pair `p` at
/// `rec + p · pstride`); `geo` = (rows, row bytes, row count, groups per row, log2 of
/// chunks per group).
///
/// # Safety
/// As for [`dot_affine_tile`]; chunks `c..c + N` exist.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn affine_chunk_tile<const BITS: u8, const N: usize>(
    (rows, rb, nr, ngroups, shift): (&[u8], usize, usize, usize, u32),
    rec: *const u8,
    pstride: usize,
    np: usize,
    c: usize,
    acc: &mut [[MaybeUninit<__m512>; PB]; RB],
) {
    let cb = chunk_bytes(BITS);
    for (r, ar) in acc.iter_mut().enumerate().take(nr) {
        // SAFETY: row `r < nr` lies inside `rows`: `ngroups` scales, `ngroups` biases,
        // then the levels (layout in `quant/affine.rs`; caller).
        let (sc, bi, qs) = unsafe {
            let p = rows.as_ptr().add(r * rb);
            (p.cast::<f32>(), p.add(4 * ngroups).cast::<f32>(), p.add(8 * ngroups))
        };
        // SAFETY: the groups of chunks `c..c + N` exist in the row.
        let (scv, biv) = unsafe { (per_chunk::<N>(sc, c, shift), per_chunk::<N>(bi, c, shift)) };
        let (scv, biv) = (dup_ps(scv), dup_ps(biv));
        let mut wq = [_mm256_setzero_si256(); 8];
        for (k, wk) in wq.iter_mut().enumerate().take(N) {
            // SAFETY: chunk `c + k < nblk` lies inside the row's levels.
            let w = unsafe { affine_levels::<BITS>(qs.add((c + k) * cb)) };
            // 8 bits: the stored `w - 128` with the top bit flipped is the unsigned level.
            *wk = if BITS == 8 {
                _mm256_xor_si256(w, _mm256_set1_epi8(-128))
            } else {
                w
            };
        }
        let fold = folds(N);
        let w8 = if fold { transpose_folded(&wq) } else { transpose8(&wq) };
        let mut wt = [_mm512_setzero_si512(); 8];
        for (d, &w) in wt.iter_mut().zip(&w8) {
            *d = dup_si(w);
        }
        let steps = if fold { 4 } else { 8 };
        for (p, a) in ar.iter_mut().enumerate().take(np) {
            // SAFETY: pair `p < np`'s record is inside the tile (caller); accumulator
            // (`r < nr`, `p`) was initialised by the caller.
            unsafe {
                let x = rec.add(p * pstride);
                let mut s = [_mm512_setzero_si512(); 2];
                for m in 0..steps {
                    s[m % 2] = _mm512_dpbusd_epi32(s[m % 2], wt[m], _mm512_loadu_si512(x.add(64 * m).cast()));
                }
                let mut isum = _mm512_add_epi32(s[0], s[1]);
                if fold {
                    // Lane k + 4 holds the second half of chunk k's dot: add it to lane k
                    // and clear lanes 4..8 of each token, as the row kernel has them.
                    isum = _mm512_maskz_add_epi32(0x0F0F, isum, _mm512_shuffle_i32x4::<0b10_11_00_01>(isum, isum));
                }
                let scale = _mm512_mul_ps(scv, _mm512_loadu_ps(x.add(576).cast()));
                let acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), a.assume_init());
                a.write(_mm512_fmadd_ps(biv, _mm512_loadu_ps(x.add(640).cast()), acc));
            }
        }
    }
}
