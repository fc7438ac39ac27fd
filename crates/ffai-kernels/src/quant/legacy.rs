//! The 32-element ("legacy") block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
//!
//! In the 4- and 5-bit formats the 16 nibble bytes `qs` hold two elements
//! each: byte `j` carries element `j` in its low nibble and element `j + 16`
//! in its high nibble. The 5-bit formats add a little-endian `u32` `qh` whose
//! bit `i` is bit 4 of element `i`. Decoded values:
//!
//! * Q4_0: `(q - 8) · d`, Q5_0: `(q - 16) · d` (symmetric, signed levels)
//! * Q4_1, Q5_1: `q · d + m` (asymmetric, min offset)
//! * Q8_0: `q · d` with `q` a signed byte
//!
//! The quantizers follow ggml's reference `quantize_row_*_ref` step for step
//! (same `f32` operations in the same order), so they produce the same bytes.

use super::{f16_bytes, read_f16, Decode, QK};

pub(super) const Q4_0_BYTES: usize = 2 + QK / 2;
pub(super) const Q4_1_BYTES: usize = 4 + QK / 2;
pub(super) const Q5_0_BYTES: usize = 6 + QK / 2;
pub(super) const Q5_1_BYTES: usize = 8 + QK / 2;
pub(super) const Q8_0_BYTES: usize = 2 + QK;

const HALF: usize = QK / 2;

/// `SPREAD[v]` has byte `k` equal to 16 when bit `k` of `v` is set, else 0:
/// one lookup turns a `qh` byte into the bit-4 contributions of 8 elements.
/// (Testing the bits one by one needs per-lane variable shifts, which SSE2
/// lacks; the compiler then falls back to slow shuffling.)
pub(crate) const SPREAD: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut v = 0;
    while v < 256 {
        let mut k = 0;
        while k < 8 {
            if (v >> k) & 1 == 1 {
                table[v] |= 0x10 << (8 * k);
            }
            k += 1;
        }
        v += 1;
    }
    table
};

/// Bit 4 of each of the 32 elements (0 or 16), from the 4 `qh` bytes
/// (element `i` is bit `i % 8` of byte `i / 8`, i.e. bit `i` of the LE u32).
#[inline(always)]
fn high_bits(qh: &[u8]) -> [u8; QK] {
    let mut hb = [0u8; QK];
    for (o, &v) in hb.chunks_exact_mut(8).zip(&qh[..4]) {
        o.copy_from_slice(&SPREAD[v as usize].to_le_bytes());
    }
    hb
}

// ---------------------------------------------------------------- decoders

pub(super) struct BlockQ4_0;

impl Decode<Q4_0_BYTES, QK> for BlockQ4_0 {
    #[inline(always)]
    fn decode(b: &[u8; Q4_0_BYTES], out: &mut [f32; QK]) {
        let d = read_f16(b, 0);
        let qs = &b[2..];
        let (lo, hi) = out.split_at_mut(HALF);
        for ((&q, l), h) in qs.iter().zip(lo).zip(hi) {
            *l = ((q & 0x0F) as i32 - 8) as f32 * d;
            *h = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub(super) struct BlockQ4_1;

impl Decode<Q4_1_BYTES, QK> for BlockQ4_1 {
    #[inline(always)]
    fn decode(b: &[u8; Q4_1_BYTES], out: &mut [f32; QK]) {
        let d = read_f16(b, 0);
        let m = read_f16(b, 2);
        let qs = &b[4..];
        let (lo, hi) = out.split_at_mut(HALF);
        for ((&q, l), h) in qs.iter().zip(lo).zip(hi) {
            *l = (q & 0x0F) as f32 * d + m;
            *h = (q >> 4) as f32 * d + m;
        }
    }
}

pub(super) struct BlockQ5_0;

impl Decode<Q5_0_BYTES, QK> for BlockQ5_0 {
    #[inline(always)]
    fn decode(b: &[u8; Q5_0_BYTES], out: &mut [f32; QK]) {
        let d = read_f16(b, 0);
        let hb = high_bits(&b[2..6]);
        let (hb_lo, hb_hi) = hb.split_at(HALF);
        let qs = &b[6..];
        let (lo, hi) = out.split_at_mut(HALF);
        for ((((&q, &bl), &bh), l), h) in qs.iter().zip(hb_lo).zip(hb_hi).zip(lo).zip(hi) {
            *l = (((q & 0x0F) | bl) as i32 - 16) as f32 * d;
            *h = (((q >> 4) | bh) as i32 - 16) as f32 * d;
        }
    }
}

pub(super) struct BlockQ5_1;

impl Decode<Q5_1_BYTES, QK> for BlockQ5_1 {
    #[inline(always)]
    fn decode(b: &[u8; Q5_1_BYTES], out: &mut [f32; QK]) {
        let d = read_f16(b, 0);
        let m = read_f16(b, 2);
        let hb = high_bits(&b[4..8]);
        let (hb_lo, hb_hi) = hb.split_at(HALF);
        let qs = &b[8..];
        let (lo, hi) = out.split_at_mut(HALF);
        for ((((&q, &bl), &bh), l), h) in qs.iter().zip(hb_lo).zip(hb_hi).zip(lo).zip(hi) {
            *l = ((q & 0x0F) | bl) as f32 * d + m;
            *h = ((q >> 4) | bh) as f32 * d + m;
        }
    }
}

pub(super) struct BlockQ8_0;

impl Decode<Q8_0_BYTES, QK> for BlockQ8_0 {
    #[inline(always)]
    fn decode(b: &[u8; Q8_0_BYTES], out: &mut [f32; QK]) {
        let d = read_f16(b, 0);
        for (o, &q) in out.iter_mut().zip(&b[2..]) {
            *o = q as i8 as f32 * d;
        }
    }
}

// -------------------------------------------------------------- quantizers

/// The element of largest magnitude (the first one on ties), `0.0` for an
/// all-zero block; the symmetric formats map it to their most negative level.
fn signed_abs_max(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let mut lo = f32::MAX;
    let mut hi = -f32::MAX;
    for &v in x {
        // Plain comparisons (not f32::min/max) so signed zeros resolve as in ggml.
        if v < lo {
            lo = v;
        }
        if v > hi {
            hi = v;
        }
    }
    (lo, hi)
}

#[inline]
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Symmetric `bits`-bit quantization: `q = trunc(x / d + 2^(bits-1) + 0.5)`
/// clamped to the level range, with `d = -max / 2^(bits-1)`.
fn quant_symmetric(x: &[f32; QK], bits: u32, q: &mut [u8; QK]) -> f32 {
    let offset = (1u32 << (bits - 1)) as f32;
    let top = (1i32 << bits) - 1;
    let d = signed_abs_max(x) / -offset;
    let id = inverse(d);
    for (qv, &v) in q.iter_mut().zip(x) {
        *qv = ((v * id + (offset + 0.5)) as i32).clamp(0, top) as u8;
    }
    d
}

/// Asymmetric `bits`-bit quantization: `q = trunc((x - min) / d + 0.5)`
/// clamped to the level range, with `d = (max - min) / (2^bits - 1)`.
fn quant_asymmetric(x: &[f32; QK], bits: u32, q: &mut [u8; QK]) -> (f32, f32) {
    let top = (1i32 << bits) - 1;
    let (lo, hi) = min_max(x);
    let d = (hi - lo) / top as f32;
    let id = inverse(d);
    for (qv, &v) in q.iter_mut().zip(x) {
        *qv = (((v - lo) * id + 0.5) as i32).clamp(0, top) as u8;
    }
    (d, lo)
}

/// Packs element `j` into the low and element `j + 16` into the high nibble
/// of byte `j` (only the low 4 bits of each level are kept).
fn pack_nibbles(q: &[u8; QK], qs: &mut [u8]) {
    for (j, o) in qs.iter_mut().enumerate() {
        *o = (q[j] & 0x0F) | ((q[j + HALF] & 0x0F) << 4);
    }
}

/// Bit 4 of every level, element `i` at bit `i`.
fn pack_high_bits(q: &[u8; QK]) -> [u8; 4] {
    let mut qh = 0u32;
    for (i, &v) in q.iter().enumerate() {
        qh |= u32::from((v >> 4) & 1) << i;
    }
    qh.to_le_bytes()
}

pub(super) fn quant_q4_0(x: &[f32; QK], out: &mut [u8; Q4_0_BYTES]) -> Result<(), String> {
    let mut q = [0u8; QK];
    let d = quant_symmetric(x, 4, &mut q);
    out[0..2].copy_from_slice(&f16_bytes(d, "scale")?);
    pack_nibbles(&q, &mut out[2..]);
    Ok(())
}

pub(super) fn quant_q4_1(x: &[f32; QK], out: &mut [u8; Q4_1_BYTES]) -> Result<(), String> {
    let mut q = [0u8; QK];
    let (d, m) = quant_asymmetric(x, 4, &mut q);
    out[0..2].copy_from_slice(&f16_bytes(d, "scale")?);
    out[2..4].copy_from_slice(&f16_bytes(m, "minimum")?);
    pack_nibbles(&q, &mut out[4..]);
    Ok(())
}

pub(super) fn quant_q5_0(x: &[f32; QK], out: &mut [u8; Q5_0_BYTES]) -> Result<(), String> {
    let mut q = [0u8; QK];
    let d = quant_symmetric(x, 5, &mut q);
    out[0..2].copy_from_slice(&f16_bytes(d, "scale")?);
    out[2..6].copy_from_slice(&pack_high_bits(&q));
    pack_nibbles(&q, &mut out[6..]);
    Ok(())
}

pub(super) fn quant_q5_1(x: &[f32; QK], out: &mut [u8; Q5_1_BYTES]) -> Result<(), String> {
    let mut q = [0u8; QK];
    let (d, m) = quant_asymmetric(x, 5, &mut q);
    out[0..2].copy_from_slice(&f16_bytes(d, "scale")?);
    out[2..4].copy_from_slice(&f16_bytes(m, "minimum")?);
    out[4..8].copy_from_slice(&pack_high_bits(&q));
    pack_nibbles(&q, &mut out[8..]);
    Ok(())
}

pub(super) fn quant_q8_0(x: &[f32; QK], out: &mut [u8; Q8_0_BYTES]) -> Result<(), String> {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    out[0..2].copy_from_slice(&f16_bytes(d, "scale")?);
    for (o, &v) in out[2..].iter_mut().zip(x) {
        *o = ((v * id).round() as i8) as u8;
    }
    Ok(())
}
