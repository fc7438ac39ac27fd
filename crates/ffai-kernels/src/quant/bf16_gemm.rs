//! BF16 weights against bf16-rounded activations: the `vdpbf16ps` GEMM (prefill) and
//! matvec (decode) for CPUs with AVX-512 BF16, and a scalar build of the same arithmetic.
//!
//! # Numerics (what one output is)
//! Activations are first rounded to bf16 by [`round_to_bf16`]: round to nearest even,
//! exactly as `vcvtne2ps2bf16` does it (a subnormal input becomes a signed zero, a NaN
//! stays a quiet NaN with its payload's upper bits). Output `(r, t)` is then, for the
//! row's 32-element chunks `c` in increasing order (the last one zero-padded), in 16 lanes
//! `i`: `acc[i] = (acc[i] + w[32c+2i+1]·x[32c+2i+1]) + w[32c+2i]·x[32c+2i]` — each
//! product exact in `f32` (8-bit × 8-bit significands), each sum rounded to nearest even:
//! what `vdpbf16ps` does per lane (odd element first; checked on Zen 4 against this
//! scalar build, bit for bit). The 16 lanes are then summed in order from `-0.0`
//! (`sum_lanes`). The instruction also treats subnormal inputs as zero and flushes
//! subnormal results; the scalar build does the former, not the latter, so the two agree
//! bit for bit whenever no product or partial sum is subnormal (below `1.2e-38`).
//!
//! Every (row, token) goes through that same sequence whatever tile it sits in (the
//! 4 × 4 register tiles of prefill, the one-row tiles of decode, the 16-output transposed
//! lane sums or the scalar ones), so prefill, chunked prefill and decode give the same
//! bits — the batch invariance the engine's tests assert — as long as both round their
//! activations here.
//!
//! Which runs: the AVX-512 BF16 kernels when [`bf16_dot_available`] (AVX-512 F/BW/BF16
//! detected, the kernel level is the AVX-512 one, see [`avx512_allowed`](super::q8::avx512_allowed),
//! and [`force_bf16_dot`] has not switched them off); otherwise the scalar build. The
//! CPU backend only takes this path when they are available (it keeps `f32` activations
//! elsewhere, where the widening GEMM in `float_gemm.rs` is faster than the scalar build).

use std::sync::atomic::{AtomicBool, Ordering};

use super::sum_lanes;

/// Elements per `vdpbf16ps` step (a 512-bit vector of bf16).
const STEP: usize = 32;

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Switches the AVX-512 BF16 kernels off (`false`) or back on (`true`, the default) for
/// every following call: tests and benchmarks use it to run the AVX-512 level as a CPU
/// without BF16 would. Global, like [`force_q8_level`](super::q8::force_q8_level).
pub fn force_bf16_dot(on: bool) {
    DISABLED.store(!on, Ordering::SeqCst);
}

/// True when the AVX-512 BF16 (`vdpbf16ps`) kernels run: the CPU has AVX-512 F, BW and
/// BF16, the kernel level in force is AVX-512 (not capped lower by `FFAI_CPU_LEVEL` or
/// `force_q8_level`), and [`force_bf16_dot`] has not switched them off.
pub fn bf16_dot_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !DISABLED.load(Ordering::Relaxed) && super::q8::avx512_allowed() && x86::detected()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `f32` → bf16 bits, rounded as `vcvtne2ps2bf16` rounds (see the module notes).
#[inline]
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return (b >> 16) as u16 | 0x0040;
    }
    if b & 0x7f80_0000 == 0 {
        // Zero or subnormal: a signed zero.
        return (b >> 16) as u16 & 0x8000;
    }
    // Round to nearest, ties to even; a carry into the exponent is the right result
    // (up to infinity for values past bf16's largest).
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Rounds `x` to bf16 into `out` (same length; panics otherwise), as [`bf16_bits`] does,
/// with `vcvtne2ps2bf16` where [`bf16_dot_available`].
pub fn round_to_bf16(x: &[f32], out: &mut [u16]) {
    assert_eq!(
        x.len(),
        out.len(),
        "round_to_bf16: {} inputs, {} outputs",
        x.len(),
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if bf16_dot_available() {
        // SAFETY: AVX-512 F/BW/BF16 detected; equal lengths checked above.
        unsafe { x86::round(x, out) };
        return;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = bf16_bits(v);
    }
}

/// `out[r · n + t]` = the bf16 dot product (module notes) of stored BF16 row `r` of
/// `rows` (`cols` little-endian bf16 each) and token `t` of `x` (`n = x.len() / cols`
/// rows of bf16 bits, as [`round_to_bf16`] writes them). Panics when `cols` is zero or
/// the lengths are not whole rows / `rows × n` outputs.
pub fn dot_rows_bf16(rows: &[u8], x: &[u16], cols: usize, out: &mut [f32]) {
    assert!(cols > 0, "dot_rows_bf16: zero columns");
    let rb = 2 * cols;
    assert!(
        rows.len().is_multiple_of(rb) && x.len().is_multiple_of(cols),
        "dot_rows_bf16: {} bytes of rows / {} activations are not whole rows of {cols} elements",
        rows.len(),
        x.len()
    );
    let n = x.len() / cols;
    assert_eq!(out.len(), rows.len() / rb * n, "output length must equal rows × tokens");
    if n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if bf16_dot_available() {
        // SAFETY: AVX-512 F/BW/BF16 detected; shapes checked above.
        unsafe { x86::gemm(rows, x, cols, out) };
        return;
    }
    for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(n)) {
        for (ov, xt) in o.iter_mut().zip(x.chunks_exact(cols)) {
            *ov = dot_scalar(row, xt);
        }
    }
}

/// bf16 bits → `f32`, subnormals as zero (the instruction's input handling).
#[inline(always)]
fn widen_daz(h: u16) -> f32 {
    if h & 0x7f80 == 0 {
        f32::from_bits(u32::from(h & 0x8000) << 16)
    } else {
        f32::from_bits(u32::from(h) << 16)
    }
}

/// One output in the scalar build: the lane arithmetic of the module notes.
fn dot_scalar(row: &[u8], x: &[u16]) -> f32 {
    let mut acc = [0.0f32; 16];
    let w = |j: usize| widen_daz(u16::from_le_bytes([row[2 * j], row[2 * j + 1]]));
    let cols = x.len();
    for c in (0..cols).step_by(STEP) {
        for (i, a) in acc.iter_mut().enumerate() {
            let (e, o) = (c + 2 * i, c + 2 * i + 1);
            // Padding past the row is +0 · +0.
            let term = |j: usize| if j < cols { w(j) * widen_daz(x[j]) } else { 0.0 };
            *a = (*a + term(o)) + term(e);
        }
    }
    sum_lanes(acc)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::float_gemm::lane_sums16;
    use super::super::{sum_lanes, LANES};
    use super::STEP;

    /// Rows × tokens of the register tile: 16 accumulators, 4 weight vectors and one
    /// activation vector (21 of 32 registers); the 16 lane sums run transposed.
    const R: usize = 4;
    const T: usize = 4;

    pub(super) fn detected() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// The mask of the first `m < 32` of 32 elements.
    #[inline(always)]
    fn tail_mask(m: usize) -> __mmask32 {
        (1u32 << m) - 1
    }

    /// # Safety
    /// AVX-512 F/BW/BF16 available; `x.len() == out.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
    pub(super) unsafe fn round(x: &[f32], out: &mut [u16]) {
        let n = x.len();
        let mut i = 0;
        while i + STEP <= n {
            // SAFETY: elements i..i+32 exist in both slices.
            unsafe {
                let lo = _mm512_loadu_ps(x.as_ptr().add(i));
                let hi = _mm512_loadu_ps(x.as_ptr().add(i + 16));
                // The second operand fills the low 16 results.
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), v);
            }
            i += STEP;
        }
        if i < n {
            let m = tail_mask(n - i);
            // SAFETY: the masked loads / store touch only the `n - i` elements left.
            unsafe {
                let lo = _mm512_maskz_loadu_ps(m as u16 as __mmask16, x.as_ptr().add(i));
                let hi = _mm512_maskz_loadu_ps((m >> 16) as u16 as __mmask16, x.as_ptr().add(i + 16).cast());
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_mask_storeu_epi16(out.as_mut_ptr().add(i).cast(), m, v);
            }
        }
    }

    /// 32 bf16 at `p` (all of them, or the first `m` with the rest zero when `TAIL`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
    unsafe fn load<const TAIL: bool>(p: *const u16, m: __mmask32) -> __m512bh {
        // SAFETY: the caller guarantees 32 readable elements at `p` (`m`'s when TAIL);
        // `__m512i` and `__m512bh` are both 64 plain bytes.
        unsafe {
            if TAIL {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(m, p.cast()))
            } else {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast()))
            }
        }
    }

    /// One `NR × NT` tile: rows at `w` (`cols` apart), tokens at `x` (`cols` apart),
    /// output `(r, t)` at `out[r · n + t]`.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16 available; `NR` rows of `cols` bf16 at `w`, `NT` token rows of
    /// `cols` bf16 at `x`, and `out[(NR-1)·n + NT-1]` inside the slice.
    // Indexing the 2-D register tile by (row, token) reads clearer than iterators.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
    unsafe fn tile<const NR: usize, const NT: usize>(
        w: *const u16,
        x: *const u16,
        cols: usize,
        out: &mut [f32],
        n: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NT]; NR];
        // SAFETY: `__m512i` and `__m512bh` are both 64 plain bytes.
        let zero: __m512bh = unsafe { std::mem::transmute(_mm512_setzero_si512()) };
        let mut k = 0;
        // One step over columns k..k+32 (the last one masked).
        macro_rules! step {
            ($tail:literal, $m:expr) => {{
                let mut wv = [zero; NR];
                for (r, v) in wv.iter_mut().enumerate() {
                    // SAFETY: row r has `cols` elements; k + 32 <= cols, or the mask
                    // covers only columns below `cols`.
                    *v = unsafe { load::<$tail>(w.add(r * cols + k), $m) };
                }
                for t in 0..NT {
                    // SAFETY: as for the rows, token t has `cols` elements.
                    let xv = unsafe { load::<$tail>(x.add(t * cols + k), $m) };
                    for r in 0..NR {
                        acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
                    }
                }
            }};
        }
        while k + STEP <= cols {
            step!(false, 0);
            k += STEP;
        }
        if k < cols {
            step!(true, tail_mask(cols - k));
        }
        if NR * NT < 8 {
            // Few outputs (decode): the lanes summed one output at a time.
            for r in 0..NR {
                for t in 0..NT {
                    let mut lanes = [0.0f32; LANES];
                    // SAFETY: `lanes` holds 16 floats.
                    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r][t]) };
                    out[r * n + t] = sum_lanes(lanes);
                }
            }
            return;
        }
        // Many outputs: the same in-order lane sums, 16 outputs at once.
        let mut g0 = 0;
        while g0 < NR * NT {
            let m = (NR * NT - g0).min(16);
            let mut v = [_mm512_setzero_ps(); 16];
            for (i, vi) in v.iter_mut().enumerate().take(m) {
                *vi = acc[(g0 + i) / NT][(g0 + i) % NT];
            }
            let mut sums = [0.0f32; 16];
            // SAFETY: the features are enabled here; `sums` holds 16 floats.
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), lane_sums16(v)) };
            for (i, &s) in sums.iter().enumerate().take(m) {
                out[((g0 + i) / NT) * n + (g0 + i) % NT] = s;
            }
            g0 += 16;
        }
    }

    /// Runs `tile::<$r, nt>` for a token count `nt` in `1..=T`.
    macro_rules! by_tokens {
        ($r:expr, $nt:expr, ($($arg:expr),*)) => {
            match $nt {
                1 => tile::<$r, 1>($($arg),*),
                2 => tile::<$r, 2>($($arg),*),
                3 => tile::<$r, 3>($($arg),*),
                _ => tile::<$r, 4>($($arg),*),
            }
        };
    }

    /// Tokens outermost in groups of `T` (a group's activations stay in L1 while every
    /// row passes), rows in groups of `R` and the last `< R` one at a time; one token
    /// (decode) takes rows one at a time, one sequential stream of weights.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16 available; shapes as `dot_rows_bf16` checks them.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
    pub(super) unsafe fn gemm(rows: &[u8], x: &[u16], cols: usize, out: &mut [f32]) {
        let n = x.len() / cols;
        let nrows = rows.len() / (2 * cols);
        assert!(rows.len() == nrows * 2 * cols && out.len() == nrows * n);
        let tile_rows = if n == 1 { 1 } else { R };
        for t0 in (0..n).step_by(T) {
            let nt = (n - t0).min(T);
            let xp = x[t0 * cols..].as_ptr();
            let mut r0 = 0;
            while r0 < nrows {
                let nr = if nrows - r0 >= tile_rows { tile_rows } else { 1 };
                // Unaligned 16-bit loads only: the byte slice need not be 2-aligned.
                let w = rows[r0 * 2 * cols..].as_ptr().cast::<u16>();
                let o = &mut out[r0 * n + t0..];
                // SAFETY: rows r0..r0+nr and tokens t0..t0+nt exist (bounds above), so
                // every element a tile reads is inside `rows` / `x` (all reads are
                // unaligned loads), and its last output `(nr-1)·n + nt-1` is inside `o`.
                unsafe {
                    if nr == R {
                        by_tokens!(R, nt, (w, xp, cols, o, n))
                    } else {
                        by_tokens!(1, nt, (w, xp, cols, o, n))
                    }
                }
                r0 += nr;
            }
        }
    }
}
