//! The VNNI implementation: the AVX2 kernels with `vpdpbusd` (u8 × i8 products of 4
//! adjacent bytes added into `i32`) for the byte dots and `vpdpwssd` for the
//! K-quants' sub-block scales, on 256-bit vectors.
//!
//! Two builds of the same source (the [`kernels`] macro) exist:
//! * [`avx512`]: the EVEX forms (`avx512vnni` + `avx512vl`), which may also use
//!   the 32 vector registers of AVX-512;
//! * [`avx`]: the VEX forms of AVX-VNNI (`avxvnni`), for CPUs without AVX-512.
//!
//! Both also need AVX2, FMA and F16C; activations are quantized by the AVX2 code. The
//! AVX-512 build exists twice: `avx512::gfni` (with GFNI: packed nibbles split by one
//! `vgf2p8affineqb`) runs where the CPU has GFNI, `avx512` elsewhere; they produce the
//! same bytes, hence the same results. The AVX-512 builds also pack `i16` pairs by one
//! merge-masked `vpshufb` and scale MXFP4 blocks by `vscalefps` (see [`kernels`]).
//!
//! The codebook kinds (IQ4_NL, MXFP4) run the legacy kernels with their signed values
//! offset by 128 in the lookup table (so unsigned for `vpdpbusd`); the offset comes out
//! exactly as `128 · Σq`, as for Q8_0.
//!
//! Every per-lane `i32` sum equals the AVX2 kernel's (the same products grouped into
//! the same lanes), and the `f32` code after it is the AVX2 kernel's, so the results
//! are **bit-identical** to the AVX2 path. No intermediate can saturate: `vpdpbusd`
//! adds four `u8 · i8` products into `i32` without saturation, and every value fed
//! to `vpdpwssd` as `i16` is a 4-product sum of at most `4 · 63 · 127 = 32004`.

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

/// One-token kernel `$kern::<$params.., 1>` over every row of `$rows` (`$rb` bytes each).
macro_rules! each_row {
    ($out:expr, $rows:expr, $rb:expr, $v:expr, $t:expr, $kern:ident [$($p:tt),*]) => {
        for (o, row) in $out.iter_mut().zip($rows.chunks_exact($rb)) {
            $kern::<$($p,)* 1>(row, $v, $t, std::slice::from_mut(o));
        }
    };
}

/// The kernels, compiled for the target features `$feat` with the byte-dot
/// intrinsic `$dpbusd` and the word-dot intrinsic `$dpwssd`. `$split` and `$hi` split
/// packed 4-bit levels: `$split(x)` keeps the low nibbles of the low 128 bits of `x` and
/// moves the high nibbles of its high 128 bits down; `$hi(x)` moves every byte's high
/// nibble down. [`split_plain`] / [`hi_plain`] do it with a shift and a mask, the
/// GFNI build (`avx512::gfni`) with one `vgf2p8affineqb`. `$e8m0` turns MXFP4's
/// exponent bytes into an operand and `$e8m0_scale(operand, d_x)` gives
/// `half_scale(e) · d_x`, exactly: [`e8m0_pow`] / [`e8m0_mul`] build the power of two and
/// multiply, as the AVX2 kernel does; the AVX-512 builds use `vscalefps`, which rounds
/// the same exact product once, as the multiply does. `$pack(da, db)` puts the low
/// `i16` of `da`'s and `db`'s lanes side by side ([`pack_plain`]: a shift and a blend;
/// the AVX-512 builds: one merge-masked `vpshufb`).
macro_rules! kernels {
    ($feat:literal, $dpbusd:ident, $dpwssd:ident, $split:ident, $hi:ident, $e8m0:ident, $e8m0_scale:ident, $pack:ident) => {
        use std::arch::x86_64::*;

        use crate::quant::q8::{k_scales, View, KSUMS};
        use crate::quant::{WeightType, QK, QK_K};

        /// Tokens per pass over a weight row.
        const TILE: usize = 8;


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


        /// The two `f16` at `p` and `p + 2`, widened exactly (lanes 0 and 1). One 4-byte load,
        /// which LLVM keeps as a zero-extending `vmovd`: a lone 2-byte `f16` became a
        /// `vpinsrw` into whatever register was free, often the accumulator, which chained
        /// every super-block's scales to the previous one's FMAs (one-token Q4_K ran 1.4x
        /// slower for it).
        ///
        /// # Safety
        /// `p..p + 4` must be readable.
        #[inline]
        #[target_feature(enable = $feat)]
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
        #[target_feature(enable = $feat)]
        unsafe fn load32<T>(p: *const T) -> __m256i {
            // SAFETY: guaranteed by the caller; `loadu` has no alignment requirement.
            unsafe { _mm256_loadu_si256(p.cast()) }
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


        use crate::quant::q8::{legacy_bytes, signed_levels, FP4, NL4, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
        use crate::quant::iq4::KVALUES as IQ4_VALUES;
        use crate::quant::mxfp4::KVALUES as E2M1_VALUES;

        const fn has_min(k: u8) -> bool {
            k == Q4_1 || k == Q5_1
        }


        /// `out[j] = row · token (t0 + j)` for every `j`.
        ///
        /// # Safety
        /// The CPU features must have been detected; `row` must hold `v.nblk` blocks of `ty`,
        /// `v` must be quantized in `ty`'s activation format and hold tokens
        /// `t0..t0 + out.len()` (what `q8::check` verifies).
        pub(in crate::quant::q8) unsafe fn dot_multi(ty: WeightType, row: &[u8], v: View<'_>, t0: usize, out: &mut [f32]) {
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
                    // The low-bit types run the AVX2 kernels at every x86 level (`q8::level_for`).
                    _ => unreachable!("{ty}: no VNNI kernel"),
                }
            }
        }

        /// `out[i] = row i · token t` for `out.len()` rows of `rb` bytes stored back to back.
        ///
        /// # Safety
        /// As for [`dot_multi`], for every row (`rows.len() == out.len() · rb`) and the one
        /// token `t`.
        pub(in crate::quant::q8) unsafe fn dot_rows(ty: WeightType, rows: &[u8], rb: usize, v: View<'_>, t: usize, out: &mut [f32]) {
            let v = &v;
            // SAFETY (every arm): the caller's contract is exactly each kernel's, row by row.
            unsafe {
                match ty {
                    WeightType::Q4_0 => each_row!(out, rows, rb, v, t, dot_legacy[Q4_0]),
                    WeightType::Q4_1 => each_row!(out, rows, rb, v, t, dot_legacy[Q4_1]),
                    WeightType::Q5_0 => each_row!(out, rows, rb, v, t, dot_legacy[Q5_0]),
                    WeightType::Q5_1 => each_row!(out, rows, rb, v, t, dot_legacy[Q5_1]),
                    WeightType::Q8_0 => each_row!(out, rows, rb, v, t, dot_legacy[Q8_0]),
                    WeightType::IQ4NL => each_row!(out, rows, rb, v, t, dot_legacy[NL4]),
                    WeightType::MXFP4 => each_row!(out, rows, rb, v, t, dot_legacy[FP4]),
                    WeightType::Q4K => each_row!(out, rows, rb, v, t, dot_q45k[false]),
                    WeightType::Q5K => each_row!(out, rows, rb, v, t, dot_q45k[true]),
                    WeightType::Q6K => each_row!(out, rows, rb, v, t, dot_q6k[]),
                    WeightType::F32 | WeightType::F16 | WeightType::BF16 => unreachable!("float types have no q8 path"),
                    WeightType::Affine { .. } => unreachable!("affine rows run quant::q8::affine"),
                    // The low-bit types run the AVX2 kernels at every x86 level (`q8::level_for`).
                    _ => unreachable!("{ty}: no VNNI kernel"),
                }
            }
        }


        /// 16 nibble bytes at `p` as 32 bytes `0..=15`: the low nibbles (elements 0–15),
        /// then the high nibbles (elements 16–31).
        ///
        /// # Safety
        /// `p..p + 16` must be readable.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn nibbles(p: *const u8) -> __m256i {
            // SAFETY: 16 readable bytes (caller); no alignment requirement.
            let x = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p.cast()) });
            $split(x)
        }

        /// `$split` without GFNI: the upper copy shifted right by 4 (32-bit lanes; the
        /// mask drops what crosses bytes), then both masked to 4 bits.
        #[allow(dead_code)]
        #[inline]
        #[target_feature(enable = $feat)]
        fn split_plain(x: __m256i) -> __m256i {
            let x = _mm256_srlv_epi32(x, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
            _mm256_and_si256(x, _mm256_set1_epi8(0x0F))
        }

        /// `$hi` without GFNI: every byte's high nibble, shifted down.
        #[allow(dead_code)]
        #[inline]
        #[target_feature(enable = $feat)]
        fn hi_plain(x: __m256i) -> __m256i {
            _mm256_and_si256(_mm256_srli_epi16::<4>(x), _mm256_set1_epi8(0x0F))
        }

        /// Byte `i` = 0xFF when bit `i` of the little-endian `u32` at `p` is set, else 0.
        ///
        /// # Safety
        /// `p..p + 4` must be readable.
        #[inline]
        #[target_feature(enable = $feat)]
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

        /// A codebook offset by 128 (`v ^ 0x80`, so unsigned) as a `vpshufb` table (the
        /// same 16 bytes in both 128-bit halves).
        #[inline]
        #[target_feature(enable = $feat)]
        fn codebook_u(values: &[i8; 16]) -> __m256i {
            // SAFETY: 16 readable bytes.
            let t = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(values.as_ptr().cast()) });
            _mm256_xor_si256(t, _mm256_set1_epi8(0x80u8 as i8))
        }

        /// A legacy block's 32 stored levels, *before* any zero point: unsigned `0..=15` /
        /// `0..=31` for the 4- and 5-bit kinds, signed for Q8_0; for the codebook kinds
        /// (IQ4_NL's values, MXFP4's doubled E2M1 values) the signed values offset by 128
        /// (`v ^ 0x80`), which [`legacy_chunk`] gives Q8_0's levels too. Scales are read
        /// separately.
        ///
        /// # Safety
        /// One whole block of kind `K` must be readable at `p`.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn levels<const K: u8>(p: *const u8) -> __m256i {
            // SAFETY (all reads): the offsets are inside the block (layouts in `legacy.rs`,
            // `iq4.rs`, `mxfp4.rs`).
            unsafe {
                match K {
                    NL4 => _mm256_shuffle_epi8(codebook_u(&IQ4_VALUES), nibbles(p.add(2))),
                    FP4 => _mm256_shuffle_epi8(codebook_u(&E2M1_VALUES), nibbles(p.add(1))),
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
        #[target_feature(enable = $feat)]
        unsafe fn gather_f16<const N: usize>(p: *const u8, stride: usize) -> __m256 {
            let mut h = [0u64; 2];
            for k in 0..N {
                // SAFETY: block `k < N` is readable (caller).
                let v = unsafe { p.add(k * stride).cast::<u16>().read_unaligned() };
                h[k / 4] |= u64::from(v) << (16 * (k % 4));
            }
            _mm256_cvtph_ps(_mm_set_epi64x(h[1] as i64, h[0] as i64))
        }

        /// The E8M0 bytes at `p + k · stride` of each of `N ≤ 8` MXFP4 blocks as `i32`
        /// lanes (lanes past `N` are 0), gathered on the scalar units; `$e8m0` makes them
        /// the operand of `$e8m0_scale`.
        ///
        /// # Safety
        /// The `N` blocks must be readable.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn gather_e8m0<const N: usize>(p: *const u8, stride: usize) -> __m256i {
            let mut h = 0u64;
            for k in 0..N {
                // SAFETY: block `k < N` is readable (caller).
                h |= u64::from(unsafe { *p.add(k * stride) }) << (8 * k);
            }
            _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(h as i64))
        }

        /// `$e8m0` without AVX-512: MXFP4's scale `2^(e - 128)` (`mxfp4::half_scale`,
        /// exactly; 0 where `e` is the 0 of a lane past the chunk, given `N`) as the AVX2
        /// kernel builds it.
        #[allow(dead_code)]
        #[inline]
        #[target_feature(enable = $feat)]
        fn e8m0_pow<const N: usize>(e: __m256i) -> __m256 {
            let normal = _mm256_slli_epi32::<23>(_mm256_sub_epi32(e, _mm256_set1_epi32(1)));
            let tiny = _mm256_sllv_epi32(_mm256_set1_epi32(0x0020_0000), e);
            let bits = _mm256_blendv_epi8(normal, tiny, _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e));
            _mm256_and_ps(_mm256_castsi256_ps(bits), _mm256_castsi256_ps(first_lanes::<N>()))
        }

        /// `$e8m0_scale` without AVX-512: `d_w · d_x` with `d_w` from [`e8m0_pow`].
        #[allow(dead_code)]
        #[inline]
        #[target_feature(enable = $feat)]
        fn e8m0_mul(dw: __m256, dx: __m256) -> __m256 {
            _mm256_mul_ps(dw, dx)
        }

        /// The adjacent `f16` pair `(d, m)` at `p + k · stride` for each of `N ≤ 8` blocks,
        /// widened to two `f32` vectors (lanes past `N` are 0): one `u32` load per block.
        ///
        /// # Safety
        /// The `N` blocks must be readable.
        #[inline]
        #[target_feature(enable = $feat)]
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
        #[target_feature(enable = $feat)]
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
        #[target_feature(enable = $feat)]
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
        #[target_feature(enable = $feat)]
        fn first_lanes<const N: usize>() -> __m256i {
            _mm256_cmpgt_epi32(_mm256_set1_epi32(N as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
        }

        /// Lane `k` of the result = the sum of the 8 lanes of `s[k]` (exact `i32`).
        #[inline]
        #[target_feature(enable = $feat)]
        fn sum_lanes8(s: &[__m256i; 8]) -> __m256i {
            // Per 128-bit half: [s0 02, s1 02, s0 13, s1 13], then [s0 0123, s1 .., s2 .., s3 ..].
            // Unpacks and adds, not `vphaddd` (slower on Zen 4: the one-token Q8_0
            // kernel ran 20 % faster this way); the same exact `i32` sums.
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
        /// Each block's byte dot is one `vpdpbusd` into 8 `i32` lanes (the AVX2 kernel
        /// needs `vpmaddubsw` + `vpmaddwd`); [`sum_lanes8`] folds the chunk's blocks into
        /// one vector whose lane `k` is block `k`'s exact integer dot. Zero points come out
        /// exactly as `z · Σq`; Q8_0's signed levels go in offset by 128 (`w ^ 0x80`, so
        /// unsigned) and the offset comes out as `128 · Σq`. The integers, and everything
        /// after them, are the AVX2 kernel's, so the results are bit-identical to it.
        ///
        /// # Safety
        /// As for [`dot_legacy`]; `c + N <= v.nblk`.
        #[inline]
        #[target_feature(enable = $feat)]
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
                    ($e8m0::<N>(gather_e8m0::<N>(p, bytes)), _mm256_setzero_ps())
                } else {
                    (gather_f16::<N>(p, bytes), _mm256_setzero_ps())
                }
            };
            // Decode the chunk once for all tokens (the codebook kinds come offset already).
            let mut wq = [_mm256_setzero_si256(); 8];
            for (k, wk) in wq.iter_mut().enumerate().take(N) {
                // SAFETY: block `k < N` of the chunk is readable.
                let w = unsafe { levels::<K>(p.add(k * bytes)) };
                *wk = if K == Q8_0 {
                    _mm256_xor_si256(w, _mm256_set1_epi8(0x80u8 as i8))
                } else {
                    w
                };
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let t = t0 + j;
                let mut s = [_mm256_setzero_si256(); 8];
                for k in 0..N {
                    // SAFETY: token `t`, block `c + k` are inside the activation quants (caller).
                    let x = unsafe { load32(v.qs.as_ptr().add(t * v.cols + (c + k) * QK)) };
                    s[k] = $dpbusd(_mm256_setzero_si256(), wq[k], x);
                }
                let mut isum = sum_lanes8(&s);
                let i = t * v.nblk + c;
                if K == Q4_0 || K == Q5_0 || signed_levels(K) {
                    // Σ (q - z) x = Σ q x - z Σ x with z = 8, 16 or 128.
                    // SAFETY: token `t`'s blocks `c..c + N` exist (caller).
                    let qsum = unsafe { load_i32s::<N>(v.qsum, i) };
                    let z = match K {
                        Q4_0 => _mm256_slli_epi32::<3>(qsum),
                        Q5_0 => _mm256_slli_epi32::<4>(qsum),
                        _ => _mm256_slli_epi32::<7>(qsum),
                    };
                    isum = _mm256_sub_epi32(isum, z);
                }
                // SAFETY: as above.
                // SAFETY: as above.
                let dx = unsafe { load_f32s::<N>(v.d, i) };
                let scale = if K == FP4 { $e8m0_scale(dw, dx) } else { _mm256_mul_ps(dw, dx) };
                *a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), *a);
                if has_min(K) {
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
        #[target_feature(enable = $feat)]
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

        /// `si + Σ_lanes (da · sa + db · sb)` lane by lane, where `da`, `db` are `vpdpbusd`
        /// results whose lanes fit `i16` (at most `4 · 63 · 127 = 32004` in magnitude) and
        /// `sab` holds the scale pair `(sa, sb)` as the low and high `i16` of every lane:
        /// `db` is moved into the high half of `da`'s lanes and one `vpdpwssd` applies both
        /// scales. Exactly the AVX2 kernel's `madd(maddubs(..), scale)` sums, lane by lane.
        #[inline]
        #[target_feature(enable = $feat)]
        fn scale2(si: __m256i, da: __m256i, db: __m256i, sab: __m256i) -> __m256i {
            $dpwssd(si, $pack(da, db), sab)
        }

        /// `$pack` without AVX-512: `da`'s low `i16` in the low half of each lane, `db`'s
        /// in the high half, by a shift and a blend.
        #[allow(dead_code)]
        #[inline]
        #[target_feature(enable = $feat)]
        fn pack_plain(da: __m256i, db: __m256i) -> __m256i {
            _mm256_blend_epi16::<0b1010_1010>(da, _mm256_slli_epi32::<16>(db))
        }

        /// Levels of 64-element group `g` of the Q4_K (`Q5 = false`) or Q5_K super-block at
        /// `p`: sub-block 2g's 32 in `lo`, 2g + 1's in `hi`. For Q5_K, `qh` starts as the
        /// 32 high-bit bytes and is shifted past the two bits used (call with g = 0, 1, 2, 3).
        ///
        /// # Safety
        /// The super-block at `p` must be readable.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn q45k_levels<const Q5: bool>(p: *const u8, g: usize, qh: &mut __m256i) -> (__m256i, __m256i) {
            let (m4, one) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
            // SAFETY: nibble group `g` is inside the super-block (caller).
            let raw = unsafe { load32(p.add(if Q5 { 48 } else { 16 } + 32 * g)) };
            let mut lo = _mm256_and_si256(raw, m4);
            let mut hi = $hi(raw);
            if Q5 {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(_mm256_and_si256(*qh, one)));
                *qh = _mm256_srli_epi16::<1>(*qh);
                hi = _mm256_or_si256(hi, _mm256_slli_epi16::<4>(_mm256_and_si256(*qh, one)));
                *qh = _mm256_srli_epi16::<1>(*qh);
            }
            (lo, hi)
        }

        /// The [`scale2`] operand for group `g` of a Q4_K/Q5_K super-block whose 8 scales
        /// are the i16 lanes of `scv` (both halves): every 32-bit lane holds scale 2g, then
        /// scale 2g + 1.
        #[inline]
        #[target_feature(enable = $feat)]
        fn q45k_pair_scales(scv: __m256i, g: usize) -> __m256i {
            _mm256_shuffle_epi8(scv, _mm256_set1_epi32(0x0302_0100 + 0x0404_0404 * g as i32))
        }

        /// The four 32-byte vectors of 6-bit levels (`0..=63`) of half `n` of the Q6_K
        /// super-block at `p`; vector `k` holds sub-block 2k of the half in its low 128 bits
        /// and 2k + 1 in its high ones.
        ///
        /// # Safety
        /// The super-block at `p` must be readable.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn q6k_levels(p: *const u8, n: usize) -> [__m256i; 4] {
            let m4 = _mm256_set1_epi8(0x0F);
            // SAFETY: half `n`'s 64 low bytes at 64n and 32 high bytes at 128 + 32n.
            let (l0, l1, h) = unsafe { (load32(p.add(64 * n)), load32(p.add(64 * n + 32)), load32(p.add(128 + 32 * n))) };
            [
                _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16::<4>(_mm256_and_si256(h, _mm256_set1_epi8(0x03)))),
                _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16::<2>(_mm256_and_si256(h, _mm256_set1_epi8(0x0C)))),
                _mm256_or_si256($hi(l0), _mm256_and_si256(h, _mm256_set1_epi8(0x30))),
                _mm256_or_si256(
                    $hi(l1),
                    _mm256_srli_epi16::<2>(_mm256_and_si256(h, _mm256_set1_epi8(0xC0u8 as i8))),
                ),
            ]
        }

        /// The [`scale2`] operand for vectors 2kp (low i16 of each lane) and 2kp + 1 (high
        /// i16) of a Q6_K half whose 8 scales are the i16 lanes of `sch` (both halves):
        /// vector k holds sub-blocks 2k and 2k + 1, one per 128-bit half.
        #[inline]
        #[target_feature(enable = $feat)]
        fn q6k_pair_scales(sch: __m256i, kp: usize) -> __m256i {
            let (ka, kb) = (4 * kp, 4 * kp + 2);
            let lo_sel = (((2 * kb + 1) << 24) | ((2 * kb) << 16) | ((2 * ka + 1) << 8) | (2 * ka)) as i32;
            let hi_sel = lo_sel + 0x0202_0202;
            _mm256_shuffle_epi8(sch, _mm256_set_m128i(_mm_set1_epi32(hi_sel), _mm_set1_epi32(lo_sel)))
        }

        /// `T` tokens against one Q4_K (`Q5 = false`) or Q5_K row; see the AVX2 kernel.
        /// Per 64-element group, the two sub-blocks' byte dots are one `vpdpbusd` each,
        /// scaled and accumulated by one [`scale2`]; the `i32` lanes equal the AVX2
        /// kernel's, so the results are bit-identical to it.
        ///
        /// # Safety
        /// As for [`dot_legacy`], for Q4_K / Q5_K rows and Q8_K activations.
        #[target_feature(enable = $feat)]
        unsafe fn dot_q45k<const Q5: bool, const T: usize>(row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
            align_frame();
            let bytes = if Q5 { 176 } else { 144 };
            let mut acc = [_mm256_setzero_ps(); T];
            for sb in 0..v.nblk {
                // SAFETY: super-block `sb` lies inside `row` (caller).
                let p = unsafe { row.as_ptr().add(sb * bytes) };
                // SAFETY: `d`, `dmin` and the 12 scale bytes are inside the super-block.
                let ((d, dmin), (sc, mn)) = unsafe { (f16_pair(p), k_scales(&*p.add(4).cast::<[u8; 12]>())) };
                // Scales as i16: sc0, sc1, ..., sc7, broadcast to both 128-bit halves.
                let scv = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
                let mnb = _mm_cvtsi64_si128(mn as i64);
                let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mnb, mnb));
                // SAFETY: Q5_K's 32 high-bit bytes are at 16..48.
                let mut qh = if Q5 {
                    unsafe { load32(p.add(16)) }
                } else {
                    _mm256_setzero_si256()
                };
                let mut sumi = [_mm256_setzero_si256(); T];
                for g in 0..4 {
                    // SAFETY: group `g` is inside the super-block at `p`.
                    let (lo, hi) = unsafe { q45k_levels::<Q5>(p, g, &mut qh) };
                    let sab = q45k_pair_scales(scv, g);
                    for (j, si) in sumi.iter_mut().enumerate() {
                        // SAFETY: token `t0 + j`, elements 64g..64g+64 of super-block `sb`.
                        let (x0, x1) = unsafe {
                            let xp = v.qs.as_ptr().add((t0 + j) * v.cols + sb * QK_K + 64 * g);
                            (load32(xp), load32(xp.add(32)))
                        };
                        let z = _mm256_setzero_si256();
                        *si = scale2(*si, $dpbusd(z, lo, x0), $dpbusd(z, hi, x1), sab);
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

        /// `T` tokens against one Q6_K row; see the AVX2 kernel. Each 32-byte vector holds
        /// two 16-element sub-blocks (one per 128-bit half); vectors `k` and `k + 1` of a
        /// half are scaled together by one [`scale2`]. Same `i32` lanes as the AVX2 kernel,
        /// so bit-identical results.
        ///
        /// # Safety
        /// As for [`dot_legacy`], for Q6_K rows and Q8_K activations.
        #[target_feature(enable = $feat)]
        unsafe fn dot_q6k<const T: usize>(row: &[u8], v: &View<'_>, t0: usize, out: &mut [f32]) {
            align_frame();
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
                    // SAFETY: the super-block at `p` is readable (caller).
                    let q = unsafe { q6k_levels(p, n) };
                    for kp in 0..2 {
                        // Vectors k = 2kp (low i16 of each lane) and 2kp + 1 (high i16). Vector
                        // k holds sub-block 2k of the half in its low 128 bits, 2k + 1 in the
                        // high ones: i16 scales 2k (bytes 4k, 4k+1) and 2k + 1 (bytes 4k+2, +3).
                        let sab = q6k_pair_scales(sch, kp);
                        let (qa, qb) = (q[2 * kp], q[2 * kp + 1]);
                        for (j, si) in sumi.iter_mut().enumerate() {
                            // SAFETY: token `t0 + j`, elements 128n + 64kp .. +64 of super-block `sb`.
                            let (xa, xb) = unsafe {
                                let xp = v.qs.as_ptr().add((t0 + j) * v.cols + sb * QK_K + 128 * n + 64 * kp);
                                (load32(xp), load32(xp.add(32)))
                            };
                            let z = _mm256_setzero_si256();
                            *si = scale2(*si, $dpbusd(z, qa, xa), $dpbusd(z, qb, xb), sab);
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

        // ------------------------------------------ several rows × several tokens

        /// Rows per block of [`dot_rows_multi`].
        const RB: usize = 16;
        /// Tokens per block of [`dot_rows_multi`].
        const TB: usize = 16;

        /// `out[r · ntok + j] = row r · token (t0 + j)` for every row of `rows` (`rb` bytes
        /// each) and `ntok = out.len() / (rows.len() / rb)` tokens. Legacy kinds run
        /// [`dot_legacy_rt`] on blocks of up to [`RB`] rows × [`TB`] tokens; the
        /// K-quants run [`dot_multi`] row by row. Bit-identical to [`dot_multi`] per row.
        ///
        /// # Safety
        /// As for [`dot_multi`], for every row (`rows.len()` a multiple of `rb`, `out.len()`
        /// = rows × `ntok`) and tokens `t0..t0 + ntok`.
        pub(in crate::quant::q8) unsafe fn dot_rows_multi(ty: WeightType, rows: &[u8], rb: usize, v: View<'_>, t0: usize, out: &mut [f32]) {
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
                            // SAFETY: rows `r..r + nr` and tokens `t0 + j ..+ nt` are inside
                            // what the caller vouched for; the outputs written are
                            // `out[(r + i) · ntok + j ..][..nt]`, `i < nr`, in bounds.
                            unsafe {
                                dot_legacy_rt::<{ $k }>(&rows[r * rb..(r + nr) * rb], rb, nr, &v, t0 + j, nt, &mut out[r * ntok + j..], ntok)
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
                WeightType::Q8_0 => blocked!(Q8_0),
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
        #[target_feature(enable = $feat)]
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

        /// `nr ≤ RB` rows × `nt ≤ TB` tokens of kind `K`: `out[i · stride + j]` =
        /// row `i` · token `t0 + j`.
        ///
        /// # Safety
        /// `rows` holds `nr` rows of `rb` bytes (`v.nblk` blocks of kind `K` each); tokens
        /// `t0..t0 + nt` exist in `v`, in the kind's activation format;
        /// `out.len() >= (nr - 1) · stride + nt`.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $feat)]
        unsafe fn dot_legacy_rt<const K: u8>(rows: &[u8], rb: usize, nr: usize, v: &View<'_>, t0: usize, nt: usize, out: &mut [f32], stride: usize) {
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
        /// transposed once (shared by the rows), each row's decoded blocks once (shared
        /// by the tokens), so that `vpdpbusd` over the 8 transposed vectors leaves block
        /// `k`'s exact integer dot in lane `k` with no horizontal sums: the same `i32`
        /// lanes as [`legacy_chunk`]'s [`sum_lanes8`], and the same `f32` operations
        /// after them, so every (row, token) result is bit-identical to [`dot_legacy`].
        ///
        /// # Safety
        /// As for [`dot_legacy_rt`]; `c + N <= v.nblk`.
        #[allow(clippy::too_many_arguments)]
        #[inline]
        #[target_feature(enable = $feat)]
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
                if K == Q4_0 || K == Q5_0 || K == Q8_0 {
                    // SAFETY: token `t`'s blocks `c..c + N` exist (caller).
                    let qsum = unsafe { load_i32s::<N>(v.qsum, i) };
                    // The chain for this token starts at `-z · Σq`.
                    zt[j] = _mm256_sub_epi32(
                        _mm256_setzero_si256(),
                        match K {
                            Q4_0 => _mm256_slli_epi32::<3>(qsum),
                            Q5_0 => _mm256_slli_epi32::<4>(qsum),
                            _ => _mm256_slli_epi32::<7>(qsum),
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
                    let w = unsafe { levels::<K>(p.add(k * bytes)) };
                    *wk = if K == Q8_0 {
                        _mm256_xor_si256(w, _mm256_set1_epi8(0x80u8 as i8))
                    } else {
                        w
                    };
                }
                let wt = transpose8(&wq);
                for (j, a) in ar.iter_mut().enumerate().take(nt) {
                    // Two chains, one starting at `-z · Σq` (zero for the kinds without
                    // a zero point): exact `i32` sums, in any order.
                    let mut s = [zt[j], _mm256_setzero_si256()];
                    for m in 0..8 {
                        s[m % 2] = $dpbusd(s[m % 2], wt[m], xt[j][m]);
                    }
                    let isum = _mm256_add_epi32(s[0], s[1]);
                    let scale = _mm256_mul_ps(dw, dx[j]);
                    *a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), *a);
                    if has_min(K) {
                        *a = _mm256_fmadd_ps(mw, sx[j], *a);
                    }
                }
            }
        }

    };
}

/// AVX-512 VNNI (EVEX encoding, 256-bit vectors).
pub(super) mod avx512 {
    /// True when this CPU has what these kernels use.
    #[inline]
    pub(in crate::quant::q8) fn detected() -> bool {
        super::super::avx2::detected()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }

    kernels!(
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        _mm256_dpbusd_epi32,
        _mm256_dpwssd_epi32,
        split_plain,
        hi_plain,
        e8m0_exp,
        e8m0_scalef,
        pack_mask
    );

    /// `$pack` on AVX-512: `da` with bytes 2 and 3 of every lane replaced by `db`'s bytes
    /// 0 and 1 (a merge-masked `vpshufb`): the same vector as the shift and blend.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn pack_mask(da: __m256i, db: __m256i) -> __m256i {
        let idx = _mm256_setr_epi8(
            0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13, 0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13,
        );
        _mm256_mask_shuffle_epi8(da, 0xCCCC_CCCC, db, idx)
    }

    /// `$e8m0` on AVX-512: the exponents `e - 128` as `f32` (lanes past `N`, `e = 0`,
    /// give -128: their `d_x` is 0, and `0 · 2^-128 = 0`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn e8m0_exp<const N: usize>(e: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_sub_epi32(e, _mm256_set1_epi32(128)))
    }

    /// `$e8m0_scale` on AVX-512: `d_x · 2^(e - 128)` in one `vscalefps`. The product of
    /// `d_x` and a power of two is rounded once (subnormal results included, no DAZ or
    /// FTZ in Rust code), exactly as `_mm256_mul_ps(half_scale(e), d_x)` rounds it, and a
    /// NaN `d_x` comes back as itself (quieted) either way, so the bits are the same.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn e8m0_scalef(exp: __m256, dx: __m256) -> __m256 {
        _mm256_scalef_ps(dx, exp)
    }

    /// The same kernels built with GFNI as well (Ice Lake, Zen 4 and later), which splits
    /// packed nibbles in one `vgf2p8affineqb` instead of a shift and a mask. The levels
    /// that come out are the same bytes, so the results are bit-identical to the plain
    /// build's. `q8` runs these when [`enabled`](gfni::enabled).
    pub(in crate::quant::q8) mod gfni {
        use std::sync::atomic::{AtomicBool, Ordering};

        /// Cleared by `q8::allow_gfni(false)`, for tests of the plain build.
        static ALLOWED: AtomicBool = AtomicBool::new(true);

        /// Allows (the default) or forbids the GFNI build.
        pub(in crate::quant::q8) fn allow(on: bool) {
            ALLOWED.store(on, Ordering::SeqCst);
        }

        /// True when the GFNI build may run: the CPU has GFNI besides the AVX-512
        /// level's features, and it is allowed.
        #[inline]
        pub(in crate::quant::q8) fn enabled() -> bool {
            ALLOWED.load(Ordering::Relaxed) && is_x86_feature_detected!("gfni") && super::detected()
        }

        /// The affine transform (one 8×8 bit matrix per 64-bit lane) that keeps a
        /// byte's low nibble: result bit `i` is source bit `i` for `i < 4`, else 0.
        const LOW: i64 = 0x0102_0408_0000_0000;
        /// The one that moves the high nibble down: result bit `i` is source bit `i + 4`.
        const HIGH: i64 = 0x1020_4080_0000_0000;

        /// [`split_plain`](super::split_plain) in one affine transform.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,gfni")]
        fn split_gfni(x: __m256i) -> __m256i {
            _mm256_gf2p8affine_epi64_epi8::<0>(x, _mm256_setr_epi64x(LOW, LOW, HIGH, HIGH))
        }

        /// [`hi_plain`](super::hi_plain) in one affine transform.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,gfni")]
        fn hi_gfni(x: __m256i) -> __m256i {
            _mm256_gf2p8affine_epi64_epi8::<0>(x, _mm256_set1_epi64x(HIGH))
        }

        kernels!(
            "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,gfni",
            _mm256_dpbusd_epi32,
            _mm256_dpwssd_epi32,
            split_gfni,
            hi_gfni,
            e8m0_exp,
            e8m0_scalef,
            pack_mask
        );

        use super::{e8m0_exp, e8m0_scalef, pack_mask};
    }

    /// The prefill kernels on 512-bit vectors (two tokens per vector).
    pub(in crate::quant::q8) mod wide;
}

/// AVX-VNNI (VEX encoding, 256-bit vectors).
pub(super) mod avx {
    /// True when this CPU has what these kernels use.
    #[inline]
    pub(in crate::quant::q8) fn detected() -> bool {
        super::super::avx2::detected() && is_x86_feature_detected!("avxvnni")
    }

    kernels!(
        "avx2,fma,f16c,avxvnni",
        _mm256_dpbusd_avx_epi32,
        _mm256_dpwssd_avx_epi32,
        split_plain,
        hi_plain,
        e8m0_pow,
        e8m0_mul,
        pack_plain
    );
}
