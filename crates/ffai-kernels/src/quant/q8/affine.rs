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
use crate::quant::affine::{assert_valid, block_bytes, chunk_bytes, decode_chunk, read_f32, split_row};

/// Tokens per pass over a weight row.
const TILE: usize = 8;

/// `out[i] = row i · token t` for `out.len()` rows of `rb` bytes (decode: the checks
/// and the dispatch are paid once per call, not per row).
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
    check_rows(bits, group, rows, rb, &v, t, 1);
    #[cfg(target_arch = "x86_64")]
    if level >= super::AVX2 {
        // SAFETY: `level` is the implementation detected on this CPU (each implies the
        // features its kernels enable); `check_rows` verified the row sizes and the token.
        unsafe {
            match level {
                super::AVX512VNNI => x86::avx512vnni::rows(bits, group, rows, rb, &v, t, out),
                super::AVXVNNI => x86::avxvnni::rows(bits, group, rows, rb, &v, t, out),
                _ => x86::avx2::rows(bits, group, rows, rb, &v, t, out),
            }
        }
        return;
    }
    let _ = level;
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
        portable(bits, group, row, &v, t, std::slice::from_mut(o));
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
    let nrows = rows.len() / rb.max(1);
    if nrows == 0 {
        return;
    }
    let ntok = out.len() / nrows;
    check_rows(bits, group, rows, rb, &v, t0, ntok);
    for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(ntok)) {
        #[cfg(target_arch = "x86_64")]
        if level >= super::AVX2 {
            // SAFETY: as in `dot_rows`, for tokens `t0..t0 + ntok`.
            unsafe {
                match level {
                    super::AVX512VNNI => x86::avx512vnni::dot(bits, group, row, &v, t0, o),
                    super::AVXVNNI => x86::avxvnni::dot(bits, group, row, &v, t0, o),
                    _ => x86::avx2::dot(bits, group, row, &v, t0, o),
                }
            }
            continue;
        }
        for (i, o) in o.chunks_mut(TILE).enumerate() {
            portable(bits, group, row, &v, t0 + i * TILE, o);
        }
    }
    let _ = level;
}

/// Checks what the kernels index without bounds checks: a supported format, rows of
/// `rb` bytes covering the activations' columns in whole groups, and tokens
/// `t0..t0 + ntok` inside the activation buffers. (The public entry points verified
/// all of it already through `q8::check`; this keeps the unsafe code self-contained.)
fn check_rows(bits: u8, group: u16, rows: &[u8], rb: usize, v: &View<'_>, t0: usize, ntok: usize) {
    assert_valid(bits, group);
    let g = group as usize;
    assert!(
        v.cols.is_multiple_of(g) && rb == v.cols / g * block_bytes(bits, group) && rows.len().is_multiple_of(rb),
        "affine rows of {rb} bytes do not match {} activation columns",
        v.cols
    );
    let (tok_end, blk_end) = ((t0 + ntok) * v.cols, (t0 + ntok) * v.nblk);
    assert!(
        v.nblk * 32 == v.cols
            && tok_end <= v.qs.len()
            && blk_end <= v.d.len()
            && blk_end <= v.s.len()
            && blk_end <= v.qsum.len(),
        "tokens {t0}..{} outside the activations",
        t0 + ntok
    );
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
    let (sc, bi, qs) = split_row(bits, group, row, v.cols);
    let per = group as usize / 32;
    let mut acc = [0.0f32; TILE];
    let mut summ = [0.0f32; TILE];
    let mut q = [0u8; 32];
    let mut w = [0i8; 32];
    for (sub, chunk) in qs.chunks_exact(chunk_bytes(bits)).enumerate() {
        let (scale, bias) = (read_f32(sc, 4 * (sub / per)), read_f32(bi, 4 * (sub / per)));
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
    for ((o, a), sm) in out.iter_mut().zip(acc).zip(summ) {
        *o = a + sm;
    }
}

/// The x86 kernels, one build per instruction set: `$bytedot(w, x)` is the exact
/// `u8 × i8` dot of 32 bytes into 8 `i32` lanes (`vpmaddubsw` + `vpmaddwd` on AVX2,
/// one `vpdpbusd` on the VNNI levels); `$vnni` says whether it is free of `i16`
/// saturation, which lets 8-bit levels go in unsigned.
#[cfg(target_arch = "x86_64")]
macro_rules! affine_kernels {
    ($feat:literal, $vnni:literal, $bytedot:path) => {
        use std::arch::x86_64::*;

        use super::super::{View, TILE};
        use crate::quant::affine::chunk_bytes;

        /// Dispatches on the width so each kernel is compiled for one `BITS`.
        ///
        /// # Safety
        /// The features `$feat` must be available; `row` must be whole blocks covering
        /// `v.cols` activations, and tokens `t0..t0 + out.len()` must exist in `v`.
        #[target_feature(enable = $feat)]
        pub(in crate::quant::q8) unsafe fn dot(
            bits: u8,
            group: u16,
            row: &[u8],
            v: &View<'_>,
            t0: usize,
            out: &mut [f32],
        ) {
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

        /// `out[i] = row i · token t` for the rows of `rows` (`rb` bytes each).
        ///
        /// # Safety
        /// As for [`dot`], for every row and the one token `t`.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub(in crate::quant::q8) unsafe fn rows(
            bits: u8,
            group: u16,
            rows: &[u8],
            rb: usize,
            v: &View<'_>,
            t: usize,
            out: &mut [f32],
        ) {
            // SAFETY: the caller's contract is each kernel's, row by row.
            unsafe {
                match bits {
                    2 => rows_of::<2>(group, rows, rb, v, t, out),
                    3 => rows_of::<3>(group, rows, rb, v, t, out),
                    4 => rows_of::<4>(group, rows, rb, v, t, out),
                    5 => rows_of::<5>(group, rows, rb, v, t, out),
                    6 => rows_of::<6>(group, rows, rb, v, t, out),
                    _ => rows_of::<8>(group, rows, rb, v, t, out),
                }
            }
        }

        /// [`rows`] for one width.
        ///
        /// # Safety
        /// As for [`rows`].
        #[target_feature(enable = $feat)]
        unsafe fn rows_of<const BITS: u8>(group: u16, rows: &[u8], rb: usize, v: &View<'_>, t: usize, out: &mut [f32]) {
            for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
                // SAFETY: the caller's contract, for this row.
                unsafe { kernel::<BITS, 1>(group, row, v, t, std::slice::from_mut(o)) };
            }
        }

        /// Runs the kernel over `out` in tiles of `TILE` tokens, then the rest.
        ///
        /// # Safety
        /// As for [`dot`].
        #[target_feature(enable = $feat)]
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
        #[target_feature(enable = $feat)]
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
        #[target_feature(enable = $feat)]
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
        #[target_feature(enable = $feat)]
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
        #[target_feature(enable = $feat)]
        pub(in crate::quant::q8) unsafe fn levels<const BITS: u8>(p: *const u8) -> __m256i {
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

        /// Lane `k` = the sum of the 8 lanes of `s[k]`.
        #[inline]
        #[target_feature(enable = $feat)]
        fn sum_lanes8(s: &[__m256i; 8]) -> __m256i {
            let ab = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
            let cd = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
            _mm256_add_epi32(
                _mm256_permute2x128_si256::<0x20>(ab, cd),
                _mm256_permute2x128_si256::<0x31>(ab, cd),
            )
        }

        /// `N` (≤ 8) consecutive `f32` from `p` into the low lanes, zeros above.
        ///
        /// # Safety
        /// `p..p + N` readable.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn load_n<const N: usize>(p: *const f32) -> __m256 {
            if N == 8 {
                // SAFETY: 8 readable floats (caller).
                return unsafe { _mm256_loadu_ps(p) };
            }
            let mut tmp = [0.0f32; 8];
            // SAFETY: N readable floats (caller); `tmp` holds 8.
            unsafe { std::ptr::copy_nonoverlapping(p, tmp.as_mut_ptr(), N) };
            // SAFETY: `tmp` is 8 floats.
            unsafe { _mm256_loadu_ps(tmp.as_ptr()) }
        }

        /// Sum of the 8 lanes.
        #[inline]
        #[target_feature(enable = $feat)]
        fn hsum_ps(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }

        /// The per-chunk values of chunks `c..c + N` from a per-group `f32` array at
        /// `p` (`shift` = log2 of chunks per group): lane `k` = group `(c + k) >> shift`;
        /// lanes past `N` are 0.
        ///
        /// # Safety
        /// Groups `c >> shift ..= (c + N - 1) >> shift` of `p` must be readable.
        #[inline]
        #[target_feature(enable = $feat)]
        pub(in crate::quant::q8) unsafe fn per_chunk<const N: usize>(p: *const f32, c: usize, shift: u32) -> __m256 {
            // SAFETY (every read): only the groups of chunks `c..c + N` (caller).
            unsafe {
                if N == 8 {
                    // `c` is a multiple of 8 here, so the 8 chunks start a group.
                    let g = p.add(c >> shift);
                    return match shift {
                        0 => _mm256_loadu_ps(g),
                        1 => _mm256_permutevar8x32_ps(
                            _mm256_castps128_ps256(_mm_loadu_ps(g)),
                            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
                        ),
                        _ => _mm256_permutevar8x32_ps(
                            _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(g.cast()))),
                            _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                        ),
                    };
                }
                let mut tmp = [0.0f32; 8];
                for (k, o) in tmp.iter_mut().enumerate().take(N) {
                    *o = p.add((c + k) >> shift).read_unaligned();
                }
                _mm256_loadu_ps(tmp.as_ptr())
            }
        }

        /// Chunks `c..c + N` (32 elements each) of one row against `T` tokens: each
        /// chunk decoded once; per token, the `N` byte dots reduced to one vector of
        /// per-chunk sums, then one multiply-add by `scale · d` and one by `bias · s`.
        ///
        /// # Safety
        /// As for [`dot`]; `c + N <= v.nblk`; `sc`, `bi`, `qs` are the row's parts.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn chunk<const BITS: u8, const T: usize, const N: usize>(
            (sc, bi, qs): (*const f32, *const f32, *const u8),
            shift: u32,
            v: &View<'_>,
            t0: usize,
            c: usize,
            acc: &mut [__m256; T],
        ) {
            let cb = chunk_bytes(BITS);
            let mut wq = [_mm256_setzero_si256(); 8];
            let mut ws = [_mm256_setzero_si256(); 8];
            for k in 0..N {
                // SAFETY: chunk `c + k < v.nblk` lies inside the row's levels.
                let w = unsafe { levels::<BITS>(qs.add((c + k) * cb)) };
                if BITS == 8 && $vnni {
                    // Unsigned levels: the stored `w - 128` with the top bit flipped.
                    wq[k] = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
                } else if BITS == 8 {
                    // |w - 128| · sign(w - 128)·x (pairs ≤ 2 · 128 · 127: no saturation);
                    // the 128 · Σx left out joins the bias term.
                    wq[k] = _mm256_abs_epi8(w);
                    ws[k] = w;
                } else {
                    wq[k] = w;
                }
            }
            // SAFETY: the groups of chunks `c..c + N` exist in the row.
            let (scv, mut biv) = unsafe { (per_chunk::<N>(sc, c, shift), per_chunk::<N>(bi, c, shift)) };
            if BITS == 8 && !$vnni {
                biv = _mm256_fmadd_ps(_mm256_set1_ps(128.0), scv, biv);
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let t = t0 + j;
                let mut s = [_mm256_setzero_si256(); 8];
                for k in 0..N {
                    // SAFETY: token `t` and chunk `c + k` are inside the activation quants.
                    let x = unsafe { _mm256_loadu_si256(v.qs.as_ptr().add(t * v.cols + (c + k) * 32).cast()) };
                    let x = if BITS == 8 && !$vnni {
                        _mm256_sign_epi8(x, ws[k])
                    } else {
                        x
                    };
                    s[k] = $bytedot(wq[k], x);
                }
                let isum = sum_lanes8(&s);
                let i = t * v.nblk + c;
                // SAFETY: entries `i..i + N` of `d` and `s` belong to token `t`.
                let (dv, sv) = unsafe { (load_n::<N>(v.d.as_ptr().add(i)), load_n::<N>(v.s.as_ptr().add(i))) };
                *a = _mm256_fmadd_ps(_mm256_mul_ps(scv, dv), _mm256_cvtepi32_ps(isum), *a);
                *a = _mm256_fmadd_ps(biv, sv, *a);
            }
        }

        /// `T` tokens `t0..t0 + T` against one row of `BITS`-bit levels, 8 chunks at a time.
        ///
        /// # Safety
        /// As for [`dot`], with `out.len() == T`.
        #[target_feature(enable = $feat)]
        unsafe fn kernel<const BITS: u8, const T: usize>(
            group: u16,
            row: &[u8],
            v: &View<'_>,
            t0: usize,
            out: &mut [f32],
        ) {
            let mut acc = [_mm256_setzero_ps(); T];
            let n = v.nblk;
            // Chunks per group is 1, 2 or 4: shifts, not divisions.
            let shift = (group / 32).trailing_zeros();
            let nb = n >> shift;
            // The row's scales, biases and levels (layout in `quant/affine.rs`).
            let p = row.as_ptr();
            // SAFETY: the row holds `nb` scales, `nb` biases, then the levels (caller).
            let parts = unsafe { (p.cast::<f32>(), p.add(4 * nb).cast::<f32>(), p.add(8 * nb)) };
            let mut c = 0;
            // SAFETY (every call): chunks `c..c + N` exist; the rest is the caller's.
            unsafe {
                while c + 8 <= n {
                    chunk::<BITS, T, 8>(parts, shift, v, t0, c, &mut acc);
                    c += 8;
                }
                match n - c {
                    0 => {}
                    1 => chunk::<BITS, T, 1>(parts, shift, v, t0, c, &mut acc),
                    2 => chunk::<BITS, T, 2>(parts, shift, v, t0, c, &mut acc),
                    3 => chunk::<BITS, T, 3>(parts, shift, v, t0, c, &mut acc),
                    4 => chunk::<BITS, T, 4>(parts, shift, v, t0, c, &mut acc),
                    5 => chunk::<BITS, T, 5>(parts, shift, v, t0, c, &mut acc),
                    6 => chunk::<BITS, T, 6>(parts, shift, v, t0, c, &mut acc),
                    _ => chunk::<BITS, T, 7>(parts, shift, v, t0, c, &mut acc),
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = hsum_ps(a);
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    /// AVX2: `vpmaddubsw` + `vpmaddwd`.
    pub(super) mod avx2 {
        /// Exact `u8 × i8` dot of 32 bytes into 8 `i32` lanes, for levels ≤ 63 or the
        /// 8-bit `|w|` with signed activations (no `i16` pair can saturate).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn bytedot(w: __m256i, x: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
        }
        affine_kernels!("avx2,fma,f16c", false, bytedot);
    }

    /// AVX-VNNI (VEX): one `vpdpbusd` per 32 bytes.
    pub(super) mod avxvnni {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
        fn bytedot(w: __m256i, x: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, x)
        }
        affine_kernels!("avx2,fma,f16c,avxvnni", true, bytedot);
    }

    /// AVX-512 VNNI (EVEX, 256-bit vectors); its `levels` and `per_chunk` also serve the
    /// 512-bit prefill kernel over prepared token tiles (`vnni/avx512/wide.rs`).
    pub(in crate::quant::q8) mod avx512vnni {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        fn bytedot(w: __m256i, x: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
        }
        affine_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", true, bytedot);
    }
}
