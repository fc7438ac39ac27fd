//! MXFP4 (OCP microscaling FP4, as used by GPT-OSS): 32 elements, 17 bytes.
//!
//! Layout: `e:u8 @0`, `qs[16] @1`. Byte `j` of `qs` holds element `j` in its
//! low nibble and element `j + 16` in its high nibble. Each nibble is an E2M1
//! code: bit 3 the sign, bits 0..3 the magnitude index into
//! `0, 0.5, 1, 1.5, 2, 3, 4, 6`. `e` is a shared E8M0 exponent: the block
//! scale is `2^(e - 127)`.
//!
//! Like ggml we keep the E2M1 magnitudes doubled so they are integers
//! ([`KVALUES`]) and halve the scale instead: element = `2^(e - 128) · KVALUES[k]`.
//! For `e < 2` that power of two is an `f32` subnormal (built from its bits),
//! so every `e` in 0..=255 decodes exactly; products are exact too (small
//! integers times a power of two), overflowing to ±inf only for `e ≥ 252`.

use super::{Decode, QK};

pub(super) const MXFP4_BYTES: usize = 1 + QK / 2;

/// E2M1 values times two, indexed by the 4-bit code (sign bit = bit 3).
pub(crate) const KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `2^(e - 128)` as `f32`: half the E8M0 scale, matching the doubled [`KVALUES`].
#[inline(always)]
pub(crate) fn half_scale(e: u8) -> f32 {
    if e < 2 {
        // 2^-128 and 2^-127 are subnormal: mantissa bit 21 or 22.
        f32::from_bits(0x0020_0000 << e)
    } else {
        f32::from_bits(u32::from(e - 1) << 23)
    }
}

pub(super) struct BlockMXFP4;

impl Decode<MXFP4_BYTES, QK> for BlockMXFP4 {
    #[inline(always)]
    fn decode(b: &[u8; MXFP4_BYTES], out: &mut [f32; QK]) {
        let d = half_scale(b[0]);
        let (lo, hi) = out.split_at_mut(QK / 2);
        for ((&q, l), h) in b[1..].iter().zip(lo).zip(hi) {
            *l = d * KVALUES[(q & 0x0F) as usize] as f32;
            *h = d * KVALUES[(q >> 4) as usize] as f32;
        }
    }
}

/// `floor(log2(v))` for a finite `v > 0`, exactly (from the bits, so no
/// rounding of a logarithm can move a value just below a power of two up).
fn floor_log2(v: f32) -> i32 {
    let bits = v.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32;
    if exp > 0 {
        exp - 127
    } else {
        // Subnormal: value = mantissa · 2^-149.
        (31 - (bits & 0x7F_FFFF).leading_zeros() as i32) - 149
    }
}

/// The reference scale choice (gguf-py's / the OCP spec's): shared exponent
/// `floor(log2 amax) - 2`, i.e. `e = floor(log2 amax) + 125` (clamped to the
/// E8M0 range), so the largest element lands in `[4, 8)` E2M1 units, where
/// values above 6 are clipped to 6. Then each element takes the code whose
/// decoded value is nearest (the lowest code on a tie, so ties go toward
/// zero and zero is stored as +0). Same bytes as gguf-py's `quantize`.
pub(super) fn quant_mxfp4(x: &[f32; QK], out: &mut [u8; MXFP4_BYTES]) -> Result<(), String> {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let e = if amax > 0.0 {
        (floor_log2(amax) + 125).clamp(0, 255) as u8
    } else {
        0
    };
    let d = half_scale(e);
    let nearest = |v: f32| -> u8 {
        let mut best = 0;
        let mut err = f32::INFINITY;
        for (k, &kv) in KVALUES.iter().enumerate() {
            let diff = (d * kv as f32 - v).abs();
            if diff < err {
                err = diff;
                best = k;
            }
        }
        best as u8
    };
    out[0] = e;
    let (lo, hi) = x.split_at(QK / 2);
    for ((o, &a), &b) in out[1..].iter_mut().zip(lo).zip(hi) {
        *o = nearest(a) | (nearest(b) << 4);
    }
    Ok(())
}
