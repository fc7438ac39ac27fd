//! Float weights (F32, F16, BF16) against several tokens of `f32` activations: the
//! prefill GEMM, bit-identical to [`dot_row`](super::dot_row) for every (row, token).
//!
//! `dot_row` (`float.rs` through `dot_blocks`) fixes the arithmetic of one output: lane
//! `k` of 16 starts at `0.0` and adds the separately rounded products `w[j]·x[j]` for
//! `j ≡ k (mod 16)` in increasing `j` over the whole 64-element chunks; the 16 lanes are
//! then summed in order (`sum_lanes`), and the `< 64` remaining elements are added one
//! by one. The x86 kernels here keep exactly that arithmetic per output (a multiply
//! and an add, never a fused multiply-add; on Zen 4 the two issue to different pipes,
//! so this costs no throughput against FMA) and only change what is shared: a tile of
//! `R` weight rows × `T` tokens is walked 16 columns at a time, each weight vector
//! widened to `f32` once per step and multiplied with the `T` tokens' vectors, so the
//! `R·T` lane accumulators stay in registers and every widened weight serves `T`
//! outputs instead of one. On AVX-512 the in-order lane sums of a tile's 16 outputs
//! run side by side after a register transpose (`lane_sums16`).
//!
//! F16 / BF16 rows against more tokens than one register tile are first widened to `f32`
//! (`dequantize_row`, exact, per call into a thread-local buffer) and run through the F32
//! kernel: the conversion is paid once per call (a block of rows × up to 48 tokens in
//! the CPU backend) instead of once per 4 (AVX-512) or 3 (AVX2) tokens. Same bits.
//!
//! BF16 weights can instead take bf16-rounded activations (`bf16_gemm.rs`, AVX-512 BF16,
//! an option of the CPU backend); that changes the arithmetic, this module does not.
//!
//! Levels follow the `q8` switch: AVX-512 F when [`avx512_allowed`](super::q8::avx512_allowed),
//! AVX2 (+F16C) when [`avx2_allowed`](super::q8::avx2_allowed), else `dot_row` per
//! output. All three give the same bits (the widening is exact; only a NaN weight's
//! payload could differ between F16C and `half`'s conversion).

use super::{dot_row, WeightType};

/// The in-order lane sums of 16 accumulators at once (shared with `bf16_gemm`).
#[cfg(target_arch = "x86_64")]
pub(super) use x86::lane_sums16;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's 16-bit weight rows widened to f32 (see `dot_rows_multi`).
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out[r · n + j] = dot_row(ty, row r, x[j · cols ..][.. cols])` for the `rows.len() /
/// rb` rows of `rb` bytes in `rows` and the `n = x.len() / cols` tokens of `x`. The
/// caller has checked that `ty` is a float type, `rb == ty.row_bytes(cols)`, the
/// lengths, and that `cols > 0`.
pub(super) fn dot_rows_multi(ty: WeightType, rows: &[u8], rb: usize, x: &[f32], cols: usize, out: &mut [f32]) {
    debug_assert!(!ty.is_quantized() && ty.row_bytes(cols) == Some(rb));
    let n = x.len() / cols;
    debug_assert_eq!(out.len(), rows.len() / rb * n);
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = super::q8::avx512_allowed();
        let tile_tokens = if avx512 { x86::T512 } else { x86::T256 };
        if ty != WeightType::F32 && n > tile_tokens && (avx512 || super::q8::avx2_allowed()) {
            // 16-bit weights against more than one register tile of tokens: widen the
            // rows to f32 once here instead of once per token tile inside the kernel,
            // then run the F32 kernel. Same bits: the widening is `dot_row`'s own
            // (`dequantize_row`, exact), and the F32 kernel's arithmetic is the same.
            WIDE.with(|wide| {
                let mut wide = wide.borrow_mut();
                let nrows = rows.len() / rb;
                wide.resize(nrows * cols, 0.0);
                for (src, dst) in rows.chunks_exact(rb).zip(wide.chunks_exact_mut(cols)) {
                    super::dequantize_row(ty, src, dst);
                }
                // SAFETY: a `u8` view of initialised `f32`s (any bytes are valid `u8`s,
                // alignment 1), read only while `wide` is borrowed here.
                let bytes = unsafe { std::slice::from_raw_parts(wide.as_ptr().cast::<u8>(), nrows * cols * 4) };
                if avx512 {
                    // SAFETY: AVX-512 F (and AVX2/FMA/F16C) detected; `bytes` holds
                    // `nrows` F32 rows of `cols`, the shapes checked by the caller.
                    unsafe { x86::gemm512(WeightType::F32, bytes, cols * 4, x, cols, out) };
                } else {
                    // SAFETY: AVX2, FMA and F16C detected; shapes as above.
                    unsafe { x86::gemm256(WeightType::F32, bytes, cols * 4, x, cols, out) };
                }
            });
            return;
        }
        if avx512 {
            // SAFETY: AVX-512 F (and AVX2/FMA/F16C, implied by the level) was detected at
            // run time; the shapes were checked by the caller as documented above.
            unsafe { x86::gemm512(ty, rows, rb, x, cols, out) };
            return;
        }
        if super::q8::avx2_allowed() {
            // SAFETY: AVX2, FMA and F16C were detected at run time; shapes as above.
            unsafe { x86::gemm256(ty, rows, rb, x, cols, out) };
            return;
        }
    }
    for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(n)) {
        for (ov, xt) in o.iter_mut().zip(x.chunks_exact(cols)) {
            *ov = dot_row(ty, row, xt);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::{float, sum_lanes, WeightType, LANES};

    /// Weight kinds, the const-generic parameter of the kernels.
    const F32: u8 = 0;
    const F16: u8 = 1;
    const BF16: u8 = 2;

    /// Rows × tokens of the AVX-512 register tile: 16 accumulators (one transposed
    /// lane sum at the end), 4 weight vectors, activations and products in 32
    /// registers. (Measured on Zen 4: 4 × 4 beat 4 × 6 and 2 × 8 by 10-15 % on
    /// 576-column rows, where the lane sums weigh most.)
    const R512: usize = 4;
    pub(super) const T512: usize = 4;
    /// The AVX2 tile: 2 rows × 3 tokens, each output two 8-lane halves (12 of 16 registers).
    const R256: usize = 2;
    pub(super) const T256: usize = 3;

    /// Elements of a row that `dot_row` puts through its 16 lanes (whole 64-chunks).
    #[inline(always)]
    fn lane_part(cols: usize) -> usize {
        cols / float::CHUNK * float::CHUNK
    }

    const fn bytes(k: u8) -> usize {
        if k == F32 {
            4
        } else {
            2
        }
    }

    fn kind(ty: WeightType) -> u8 {
        match ty {
            WeightType::F32 => F32,
            WeightType::F16 => F16,
            _ => BF16,
        }
    }

    /// Finishes one output as `dot_row` does: the lanes summed in order, then the
    /// elements past the last whole 64-chunk one by one.
    #[inline(always)]
    fn finish(ty: WeightType, lanes: [f32; LANES], row_tail: &[u8], x_tail: &[f32]) -> f32 {
        float::dot_tail(ty, sum_lanes(lanes), row_tail, x_tail)
    }

    /// 16 weights of kind `K` at `p`, widened to `f32` (exactly).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load16<const K: u8>(p: *const u8) -> __m512 {
        // SAFETY (all arms): the caller guarantees 16 elements of kind K at `p`.
        unsafe {
            match K {
                F32 => _mm512_loadu_ps(p.cast()),
                F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
                // bf16 is the upper half of an f32.
                _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                    p.cast(),
                )))),
            }
        }
    }

    /// 8 weights of kind `K` at `p`, widened to `f32`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8<const K: u8>(p: *const u8) -> __m256 {
        // SAFETY (all arms): the caller guarantees 8 elements of kind K at `p`.
        unsafe {
            match K {
                F32 => _mm256_loadu_ps(p.cast()),
                F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                    p.cast(),
                )))),
            }
        }
    }

    /// One `R × T` tile on AVX-512: rows at `w` (`rb` bytes apart), tokens at `x` (`cols`
    /// apart), output `(r, t)` at `out[r · n + t]`.
    ///
    /// # Safety
    /// AVX-512 F, AVX2, FMA and F16C available; `R` rows of `rb = cols · bytes(K)`
    /// bytes at `w`, `T` token rows of `cols` floats at `x`, and `out[(R-1)·n + T-1]`
    /// inside the slice.
    // Indexing the 2-D register tile by (row, token) reads clearer than iterators.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn tile512<const K: u8, const R: usize, const T: usize>(
        ty: WeightType,
        w: *const u8,
        rb: usize,
        x: *const f32,
        cols: usize,
        out: &mut [f32],
        n: usize,
    ) {
        let main = lane_part(cols);
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut k = 0;
        while k < main {
            let mut wv = [_mm512_setzero_ps(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                // SAFETY: row r has `cols` elements and k + 16 <= main <= cols.
                *v = unsafe { load16::<K>(w.add(r * rb + k * bytes(K))) };
            }
            for t in 0..T {
                // SAFETY: token t has `cols` floats and k + 16 <= cols.
                let xv = unsafe { _mm512_loadu_ps(x.add(t * cols + k)) };
                for r in 0..R {
                    // Rounded product, then rounded sum: `dot_row`'s arithmetic.
                    acc[r][t] = _mm512_add_ps(acc[r][t], _mm512_mul_ps(wv[r], xv));
                }
            }
            k += 16;
        }
        // SAFETY: row r / token t lie inside the caller's rows / tokens (the contract).
        let row_tail =
            |r: usize| unsafe { std::slice::from_raw_parts(w.add(r * rb + main * bytes(K)), rb - main * bytes(K)) };
        // SAFETY: as above.
        let x_tail = |t: usize| unsafe { std::slice::from_raw_parts(x.add(t * cols + main), cols - main) };
        if R * T < 8 {
            // Few outputs (decode): lane sums one output at a time.
            for (r, acc_r) in acc.iter().enumerate() {
                for (t, &a) in acc_r.iter().enumerate() {
                    let mut lanes = [0.0f32; LANES];
                    // SAFETY: `lanes` holds 16 floats.
                    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), a) };
                    out[r * n + t] = finish(ty, lanes, row_tail(r), x_tail(t));
                }
            }
            return;
        }
        // Many outputs: the in-order lane sums of 16 outputs at once (transposed).
        let mut g0 = 0;
        while g0 < R * T {
            let m = (R * T - g0).min(16);
            let mut v = [_mm512_setzero_ps(); 16];
            for (i, vi) in v.iter_mut().enumerate().take(m) {
                *vi = acc[(g0 + i) / T][(g0 + i) % T];
            }
            let mut sums = [0.0f32; 16];
            // SAFETY: the features are enabled here; `sums` holds 16 floats.
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), lane_sums16(v)) };
            for (i, &sum) in sums.iter().enumerate().take(m) {
                let (r, t) = ((g0 + i) / T, (g0 + i) % T);
                out[r * n + t] = float::dot_tail(ty, sum, row_tail(r), x_tail(t));
            }
            g0 += 16;
        }
    }

    /// `s[g] = sum_lanes(v[g])` for 16 vectors at once: `v` is transposed (`c[k][g] =
    /// v[g][k]`), then `s = start + c[0] + c[1] + … + c[15]` left to right, the same
    /// additions in the same order as `sum_lanes`' fold, 16 outputs per instruction.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(in crate::quant) fn lane_sums16(v: [__m512; 16]) -> __m512 {
        // 32-bit interleave: t[2i] lane L = [v2i[4L], v2i+1[4L], v2i[4L+1], v2i+1[4L+1]].
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
        }
        // 64-bit: u[4i + j] lane L = [v4i[4L+j], v4i+1[4L+j], v4i+2[4L+j], v4i+3[4L+j]].
        let mut u = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            let b = 4 * i;
            u[b] = _mm512_shuffle_ps::<0x44>(t[b], t[b + 2]);
            u[b + 1] = _mm512_shuffle_ps::<0xEE>(t[b], t[b + 2]);
            u[b + 2] = _mm512_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
            u[b + 3] = _mm512_shuffle_ps::<0xEE>(t[b + 1], t[b + 3]);
        }
        // 128-bit blocks: c[4L + j] = [u[j] block L, u[4+j] block L, u[8+j] block L, u[12+j] block L].
        let mut c = [_mm512_setzero_ps(); 16];
        for j in 0..4 {
            let p0 = _mm512_shuffle_f32x4::<0x44>(u[j], u[4 + j]);
            let p1 = _mm512_shuffle_f32x4::<0xEE>(u[j], u[4 + j]);
            let q0 = _mm512_shuffle_f32x4::<0x44>(u[8 + j], u[12 + j]);
            let q1 = _mm512_shuffle_f32x4::<0xEE>(u[8 + j], u[12 + j]);
            c[j] = _mm512_shuffle_f32x4::<0x88>(p0, q0);
            c[4 + j] = _mm512_shuffle_f32x4::<0xDD>(p0, q0);
            c[8 + j] = _mm512_shuffle_f32x4::<0x88>(p1, q1);
            c[12 + j] = _mm512_shuffle_f32x4::<0xDD>(p1, q1);
        }
        // The fold's starting value, taken from `sum_lanes` itself (an empty sum).
        let mut s = _mm512_set1_ps(sum_lanes_start());
        for ck in c {
            s = _mm512_add_ps(s, ck);
        }
        s
    }

    /// What `sum_lanes` starts its fold from (`-0.0` in today's `core`): the empty sum.
    #[inline(always)]
    fn sum_lanes_start() -> f32 {
        [0.0f32; 0].iter().sum()
    }

    /// One `R × T` tile on AVX2 (each output's 16 lanes as two 8-lane halves).
    ///
    /// # Safety
    /// As [`tile512`], with AVX2, FMA and F16C.
    // Indexing the 2-D register tile by (row, token) reads clearer than iterators.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile256<const K: u8, const R: usize, const T: usize>(
        ty: WeightType,
        w: *const u8,
        rb: usize,
        x: *const f32,
        cols: usize,
        out: &mut [f32],
        n: usize,
    ) {
        let main = lane_part(cols);
        let mut lo = [[_mm256_setzero_ps(); T]; R];
        let mut hi = [[_mm256_setzero_ps(); T]; R];
        let mut k = 0;
        while k < main {
            for (half, acc) in [(0, &mut lo), (8, &mut hi)] {
                let mut wv = [_mm256_setzero_ps(); R];
                for (r, v) in wv.iter_mut().enumerate() {
                    // SAFETY: row r has `cols` elements and k + 16 <= main <= cols.
                    *v = unsafe { load8::<K>(w.add(r * rb + (k + half) * bytes(K))) };
                }
                for t in 0..T {
                    // SAFETY: token t has `cols` floats and k + 16 <= cols.
                    let xv = unsafe { _mm256_loadu_ps(x.add(t * cols + k + half)) };
                    for r in 0..R {
                        acc[r][t] = _mm256_add_ps(acc[r][t], _mm256_mul_ps(wv[r], xv));
                    }
                }
            }
            k += 16;
        }
        for r in 0..R {
            // SAFETY: row r lies inside the caller's rows (see the contract).
            let row_tail = unsafe { std::slice::from_raw_parts(w.add(r * rb + main * bytes(K)), rb - main * bytes(K)) };
            for t in 0..T {
                let mut lanes = [0.0f32; LANES];
                // SAFETY: `lanes` holds 16 floats: lanes 0..8 from `lo`, 8..16 from `hi`.
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), lo[r][t]);
                    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi[r][t]);
                }
                // SAFETY: token t lies inside the caller's tokens.
                let x_tail = unsafe { std::slice::from_raw_parts(x.add(t * cols + main), cols - main) };
                out[r * n + t] = finish(ty, lanes, row_tail, x_tail);
            }
        }
    }

    /// Runs `$tile::<K, R, nt>` for a token count `nt` in `1..=T512`.
    macro_rules! by_tokens {
        ($tile:ident, $k:expr, $r:expr, $nt:expr, ($($arg:expr),*)) => {
            match $nt {
                1 => $tile::<$k, $r, 1>($($arg),*),
                2 => $tile::<$k, $r, 2>($($arg),*),
                3 => $tile::<$k, $r, 3>($($arg),*),
                _ => $tile::<$k, $r, 4>($($arg),*),
            }
        };
    }

    /// Tokens outermost in groups of `T512`, so a group's activations stay in L1 while
    /// every row passes; rows in groups of `R512`, the last `< R512` rows one at a time.
    ///
    /// # Safety
    /// AVX-512 F, AVX2, FMA and F16C available; shapes as `dot_rows_multi` documents.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn gemm512(ty: WeightType, rows: &[u8], rb: usize, x: &[f32], cols: usize, out: &mut [f32]) {
        match kind(ty) {
            // SAFETY: forwarded contract.
            F32 => unsafe { gemm512_k::<F32>(ty, rows, rb, x, cols, out) },
            // SAFETY: forwarded contract.
            F16 => unsafe { gemm512_k::<F16>(ty, rows, rb, x, cols, out) },
            // SAFETY: forwarded contract.
            _ => unsafe { gemm512_k::<BF16>(ty, rows, rb, x, cols, out) },
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn gemm512_k<const K: u8>(ty: WeightType, rows: &[u8], rb: usize, x: &[f32], cols: usize, out: &mut [f32]) {
        let n = x.len() / cols;
        let nrows = rows.len() / rb;
        assert!(rb == cols * bytes(K) && out.len() == nrows * n);
        for t0 in (0..n).step_by(T512) {
            let nt = (n - t0).min(T512);
            let xp = x[t0 * cols..].as_ptr();
            // One token (decode, memory-bound): rows one at a time, so the weights are
            // read as one sequential stream (four interleaved row streams measured
            // ~30 % slower from DRAM).
            let tile_rows = if n == 1 { 1 } else { R512 };
            let mut r0 = 0;
            while r0 < nrows {
                let nr = if nrows - r0 >= tile_rows { tile_rows } else { 1 };
                let w = rows[r0 * rb..].as_ptr();
                let o = &mut out[r0 * n + t0..];
                // SAFETY: rows r0..r0+nr and tokens t0..t0+nt exist (bounds above), so
                // every element the tile reads is inside `rows` / `x`, and its last
                // output `(nr-1)·n + nt-1` is inside `o` (indexing is checked anyway).
                unsafe {
                    if nr == R512 {
                        by_tokens!(tile512, K, R512, nt, (ty, w, rb, xp, cols, o, n))
                    } else {
                        by_tokens!(tile512, K, 1, nt, (ty, w, rb, xp, cols, o, n))
                    }
                }
                r0 += nr;
            }
        }
    }

    /// The AVX2 version of [`gemm512`] (tiles of `R256 × T256`).
    ///
    /// # Safety
    /// AVX2, FMA and F16C available; shapes as `dot_rows_multi` documents.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemm256(ty: WeightType, rows: &[u8], rb: usize, x: &[f32], cols: usize, out: &mut [f32]) {
        match kind(ty) {
            // SAFETY: forwarded contract.
            F32 => unsafe { gemm256_k::<F32>(ty, rows, rb, x, cols, out) },
            // SAFETY: forwarded contract.
            F16 => unsafe { gemm256_k::<F16>(ty, rows, rb, x, cols, out) },
            // SAFETY: forwarded contract.
            _ => unsafe { gemm256_k::<BF16>(ty, rows, rb, x, cols, out) },
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn gemm256_k<const K: u8>(ty: WeightType, rows: &[u8], rb: usize, x: &[f32], cols: usize, out: &mut [f32]) {
        let n = x.len() / cols;
        let nrows = rows.len() / rb;
        assert!(rb == cols * bytes(K) && out.len() == nrows * n);
        for t0 in (0..n).step_by(T256) {
            let nt = (n - t0).min(T256);
            let xp = x[t0 * cols..].as_ptr();
            let mut r0 = 0;
            while r0 < nrows {
                let nr = if nrows - r0 >= R256 { R256 } else { 1 };
                let w = rows[r0 * rb..].as_ptr();
                let o = &mut out[r0 * n + t0..];
                // SAFETY: as in `gemm512_k`.
                unsafe {
                    match (nr, nt) {
                        (R256, 1) => tile256::<K, R256, 1>(ty, w, rb, xp, cols, o, n),
                        (R256, 2) => tile256::<K, R256, 2>(ty, w, rb, xp, cols, o, n),
                        (R256, _) => tile256::<K, R256, T256>(ty, w, rb, xp, cols, o, n),
                        (_, 1) => tile256::<K, 1, 1>(ty, w, rb, xp, cols, o, n),
                        (_, 2) => tile256::<K, 1, 2>(ty, w, rb, xp, cols, o, n),
                        _ => tile256::<K, 1, T256>(ty, w, rb, xp, cols, o, n),
                    }
                }
                r0 += nr;
            }
        }
    }
}
