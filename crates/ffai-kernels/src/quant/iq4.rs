//! IQ4_NL and IQ4_XS: 4-bit indices into a fixed non-uniform codebook.
//!
//! Both store, per element, a 4-bit index `k` into [`KVALUES`] (16 signed
//! levels from -127 to 113, denser near zero, matching roughly normal
//! weights); the element decodes as `scale · KVALUES[k]`.
//!
//! **IQ4_NL** (32 elements, 18 bytes: `d:f16 @0`, `qs[16] @2`). Byte `j` of
//! `qs` holds element `j` in its low nibble and element `j + 16` in its high
//! nibble (the legacy Q4_0 order). Decoded: `d · KVALUES[k]`.
//!
//! **IQ4_XS** (256 elements, 136 bytes: `d:f16 @0`, `scales_h:u16 @2`,
//! `scales_l[4] @4`, `qs[128] @8`). Eight 32-element sub-blocks. Sub-block
//! `b` has a 6-bit scale `u` (offset by 32): low 4 bits from nibble `b % 2`
//! (low first) of `scales_l[b / 2]`, top 2 bits from bits `2b, 2b + 1` of the
//! little-endian `scales_h`. Its 16 index bytes are `qs[16b .. 16b + 16]`,
//! byte `j` holding element `32b + j` (low nibble) and `32b + 16 + j` (high
//! nibble). Decoded: `(d · (u - 32)) · KVALUES[k]`.

use super::kquant::{f16_at_least, units_covering};
use super::kquant_low::signed_max;
use super::{read_f16, Decode, QK, QK_K};

pub(super) const IQ4NL_BYTES: usize = 2 + QK / 2;
pub(super) const IQ4XS_BYTES: usize = 2 + 2 + QK_K / 64 + QK_K / 2;

/// The IQ4 codebook (a property of the format, shared with ggml).
pub(crate) const KVALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Decodes one 32-element group of indices `qs[..16]` with scale `d`.
#[inline(always)]
fn decode_group(d: f32, qs: &[u8], out: &mut [f32]) {
    let (lo, hi) = out.split_at_mut(16);
    for ((&q, l), h) in qs.iter().zip(lo).zip(hi) {
        *l = d * KVALUES[(q & 0x0F) as usize] as f32;
        *h = d * KVALUES[(q >> 4) as usize] as f32;
    }
}

/// IQ4_XS sub-block `b`'s stored 6-bit scale (still offset by 32).
#[inline(always)]
pub(crate) fn iq4xs_scale(b: &[u8], sub: usize) -> u8 {
    let h = u16::from_le_bytes([b[2], b[3]]);
    ((b[4 + sub / 2] >> (4 * (sub % 2))) & 0x0F) | ((((h >> (2 * sub)) & 3) as u8) << 4)
}

// ---------------------------------------------------------------- decoders

pub(super) struct BlockIQ4NL;

impl Decode<IQ4NL_BYTES, QK> for BlockIQ4NL {
    #[inline(always)]
    fn decode(b: &[u8; IQ4NL_BYTES], out: &mut [f32; QK]) {
        decode_group(read_f16(b, 0), &b[2..], out);
    }
}

pub(super) struct BlockIQ4XS;

impl Decode<IQ4XS_BYTES, QK_K> for BlockIQ4XS {
    #[inline(always)]
    fn decode(b: &[u8; IQ4XS_BYTES], out: &mut [f32; QK_K]) {
        let d = read_f16(b, 0);
        for (sub, (qs, o)) in b[8..].chunks_exact(16).zip(out.chunks_exact_mut(32)).enumerate() {
            let dl = d * (iq4xs_scale(b, sub) as i32 - 32) as f32;
            decode_group(dl, qs, o);
        }
    }
}

// -------------------------------------------------------------- quantizers
//
// Round-to-nearest on the codebook: the scale maps the group's
// largest-magnitude element onto the codebook's end value -127 (the sign of
// the scale absorbs the sign of that element; its magnitude is rounded *up*
// so every element lies within ±127 steps), then each element takes the
// index whose *decoded* value (computed exactly as the decoder does) is
// nearest, the lowest index on a tie.

/// The index whose decoded value `dl · KVALUES[k]` is nearest to `v`.
#[inline]
fn nearest(v: f32, dl: f32) -> u8 {
    let mut best = 0;
    let mut err = f32::INFINITY;
    for (k, &kv) in KVALUES.iter().enumerate() {
        let e = (v - dl * kv as f32).abs();
        if e < err {
            err = e;
            best = k;
        }
    }
    best as u8
}

/// Indices of a 32-element group, packed into 16 bytes (layout above).
fn pack_group(x: &[f32], dl: f32, qs: &mut [u8]) {
    let (lo, hi) = x.split_at(16);
    for ((o, &a), &b) in qs.iter_mut().zip(lo).zip(hi) {
        *o = nearest(a, dl) | (nearest(b, dl) << 4);
    }
}

pub(super) fn quant_iq4nl(x: &[f32; QK], out: &mut [u8; IQ4NL_BYTES]) -> Result<(), String> {
    let max = signed_max(x);
    let mag = f16_at_least(max.abs() / 127.0, "scale")?;
    let d = if max > 0.0 { -mag } else { mag };
    out[0..2].copy_from_slice(&d.to_bits().to_le_bytes());
    pack_group(x, d.to_f32(), &mut out[2..]);
    Ok(())
}

pub(super) fn quant_iq4xs(x: &[f32; QK_K], out: &mut [u8; IQ4XS_BYTES]) -> Result<(), String> {
    let mut want = [0.0f32; 8];
    for (w, xs) in want.iter_mut().zip(x.chunks_exact(32)) {
        *w = -signed_max(xs) / 127.0;
    }
    let d = f16_at_least(want.iter().fold(0.0f32, |a, &v| a.max(v.abs())) / 31.0, "scale")?;
    out.fill(0);
    out[0..2].copy_from_slice(&d.to_bits().to_le_bytes());
    let mut scales_h = 0u16;
    for (sub, (&w, xs)) in want.iter().zip(x.chunks_exact(32)).enumerate() {
        let mag = units_covering(w.abs(), d.to_f32(), 31.0) as i32;
        let ls = if w < 0.0 { -mag } else { mag };
        let u = (ls + 32) as u8;
        out[4 + sub / 2] |= (u & 0x0F) << (4 * (sub % 2));
        scales_h |= u16::from(u >> 4) << (2 * sub);
        let dl = d.to_f32() * ls as f32;
        pack_group(xs, dl, &mut out[8 + 16 * sub..8 + 16 * sub + 16]);
    }
    out[2..4].copy_from_slice(&scales_h.to_le_bytes());
    Ok(())
}
