//! The low-bit K-quants Q2_K and Q3_K, and Q8_K as a weight format.
//!
//! All three use 256-element super-blocks. Element `i` is written as
//! `i = 128n + 32j + l` (`n` in 0..2 selects a half, `j` in 0..4 a 32-element
//! group inside it, `l` in 0..32 the position in the group).
//!
//! **Q2_K** (84 bytes: `scales[16] @0`, `qs[64] @16`, `d:f16 @80`,
//! `dmin:f16 @82`). Sixteen 16-element sub-blocks; sub-block `s = i / 16` has
//! a 4-bit scale in the low nibble and a 4-bit min in the high nibble of
//! `scales[s]`. The 2-bit level `q` of element `i` is bits `2j, 2j+1` of
//! `qs[32n + l]`. Decoded: `(d · sc) · q - (dmin · mn)`.
//!
//! **Q3_K** (110 bytes: `hmask[32] @0`, `qs[64] @32`, `scales[12] @96`,
//! `d:f16 @108`). The low 2 bits of element `i` are bits `2j, 2j+1` of
//! `qs[32n + l]`; its third bit is bit `4n + j` of `hmask[l]`, and a *clear*
//! bit means "subtract 4", so the level is `q = low2 - 4·(1 - bit)` in -4..=3.
//! Sub-block `s = i / 16` has a 6-bit scale `u` stored with an offset of 32:
//! its low 4 bits are the low nibble of `scales[s]` (`s < 8`) or the high
//! nibble of `scales[s - 8]` (`s ≥ 8`), its top 2 bits are bits
//! `2(s / 4), 2(s / 4) + 1` of `scales[8 + s % 4]`. Decoded:
//! `(d · (u - 32)) · q`.
//!
//! **Q8_K** (292 bytes: `d:f32 @0`, `qs[256]:i8 @4`, `bsums[16]:i16 @260`).
//! Element `i` is `d · qs[i]`; `bsums[k]` is the sum of `qs[16k .. 16k + 16]`
//! (kept for integer dots that need it; decoding ignores it).

use super::kquant::{f16_at_least, units_covering};
use super::{read_f16, Decode, QK_K};

pub(super) const Q2K_BYTES: usize = QK_K / 16 + QK_K / 4 + 4;
pub(super) const Q3K_BYTES: usize = QK_K / 8 + QK_K / 4 + 12 + 2;
pub(super) const Q8K_BYTES: usize = 4 + QK_K + 2 * (QK_K / 16);

/// Q3_K's 16 six-bit scales (still offset by 32) from its 12 packed bytes.
#[inline(always)]
pub(crate) fn q3k_scales(s: &[u8; 12]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        *o = low | (high << 4);
    }
    out
}

/// Inverse of [`q3k_scales`]; every input must be below 64.
fn pack_q3k_scales(u: &[u8; 16]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for (i, &v) in u.iter().enumerate() {
        if i < 8 {
            s[i] |= v & 0x0F;
        } else {
            s[i - 8] |= (v & 0x0F) << 4;
        }
        s[8 + i % 4] |= (v >> 4) << (2 * (i / 4));
    }
    s
}

// ---------------------------------------------------------------- decoders

pub(super) struct BlockQ2K;

impl Decode<Q2K_BYTES, QK_K> for BlockQ2K {
    #[inline(always)]
    fn decode(b: &[u8; Q2K_BYTES], out: &mut [f32; QK_K]) {
        let d = read_f16(b, 80);
        let dmin = read_f16(b, 82);
        let (scales, rest) = b.split_at(16);
        let qs = &rest[..64];
        for (n, (q32, o128)) in qs.chunks_exact(32).zip(out.chunks_exact_mut(128)).enumerate() {
            for (j, o32) in o128.chunks_exact_mut(32).enumerate() {
                for (h, o16) in o32.chunks_exact_mut(16).enumerate() {
                    let sc = scales[8 * n + 2 * j + h];
                    let dl = d * (sc & 0x0F) as f32;
                    let ml = dmin * (sc >> 4) as f32;
                    for (o, &q) in o16.iter_mut().zip(&q32[16 * h..16 * h + 16]) {
                        *o = dl * ((q >> (2 * j)) & 3) as f32 - ml;
                    }
                }
            }
        }
    }
}

pub(super) struct BlockQ3K;

impl Decode<Q3K_BYTES, QK_K> for BlockQ3K {
    #[inline(always)]
    fn decode(b: &[u8; Q3K_BYTES], out: &mut [f32; QK_K]) {
        let d = read_f16(b, 108);
        let hmask = &b[..32];
        let qs = &b[32..96];
        let u = q3k_scales(b[96..108].try_into().unwrap());
        for (n, (q32, o128)) in qs.chunks_exact(32).zip(out.chunks_exact_mut(128)).enumerate() {
            for (j, o32) in o128.chunks_exact_mut(32).enumerate() {
                let bit = 4 * n + j;
                for (h, o16) in o32.chunks_exact_mut(16).enumerate() {
                    let dl = d * (u[8 * n + 2 * j + h] as i32 - 32) as f32;
                    for (l, o) in (16 * h..16 * h + 16).zip(o16.iter_mut()) {
                        let low = ((q32[l] >> (2 * j)) & 3) as i32;
                        let sub = if (hmask[l] >> bit) & 1 == 1 { 0 } else { 4 };
                        *o = dl * (low - sub) as f32;
                    }
                }
            }
        }
    }
}

pub(super) struct BlockQ8K;

impl Decode<Q8K_BYTES, QK_K> for BlockQ8K {
    #[inline(always)]
    fn decode(b: &[u8; Q8K_BYTES], out: &mut [f32; QK_K]) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (o, &q) in out.iter_mut().zip(&b[4..4 + QK_K]) {
            *o = d * q as i8 as f32;
        }
    }
}

// -------------------------------------------------------------- quantizers
//
// As in `kquant.rs`: not ggml's iterative search. Each sub-block's scale is
// chosen from its own range and stored rounded *up* (away from zero) against
// an `f16` super-scale that is itself rounded up, so the stored range always
// covers the sub-block; each element then takes the nearest level.

pub(super) fn quant_q2k(x: &[f32; QK_K], out: &mut [u8; Q2K_BYTES]) -> Result<(), String> {
    // Per 16-element sub-block: the range [lo, hi] with lo clamped to <= 0
    // (mins are non-negative amounts to subtract).
    let mut below = [0.0f32; 16];
    let mut top = [0.0f32; 16];
    for ((b, t), xs) in below.iter_mut().zip(&mut top).zip(x.chunks_exact(16)) {
        *b = -xs.iter().fold(0.0f32, |a, &v| a.min(v));
        *t = xs.iter().fold(xs[0], |a, &v| a.max(v));
    }
    let dmin = f16_at_least(below.iter().fold(0.0f32, |a, &v| a.max(v)) / 15.0, "min scale")?;
    let mut mn = [0u8; 16];
    let mut shift = [0.0f32; 16];
    for ((m, s), &b) in mn.iter_mut().zip(&mut shift).zip(&below) {
        *m = units_covering(b, dmin.to_f32(), 15.0) as u8;
        *s = dmin.to_f32() * *m as f32;
    }
    let mut need = [0.0f32; 16];
    for ((n, &t), &s) in need.iter_mut().zip(&top).zip(&shift) {
        *n = ((t + s) / 3.0).max(0.0);
    }
    let d = f16_at_least(need.iter().fold(0.0f32, |a, &v| a.max(v)) / 15.0, "scale")?;
    let mut sc = [0u8; 16];
    for (c, &n) in sc.iter_mut().zip(&need) {
        *c = units_covering(n, d.to_f32(), 15.0) as u8;
    }

    let mut q = [0u8; QK_K];
    for (s, (qs, xs)) in q.chunks_exact_mut(16).zip(x.chunks_exact(16)).enumerate() {
        let step = d.to_f32() * sc[s] as f32;
        for (qv, &v) in qs.iter_mut().zip(xs) {
            *qv = if step > 0.0 {
                ((v + shift[s]) / step).round().clamp(0.0, 3.0) as u8
            } else {
                0
            };
        }
    }

    let (scales, rest) = out.split_at_mut(16);
    let (qs, tail) = rest.split_at_mut(64);
    for ((o, &c), &m) in scales.iter_mut().zip(&sc).zip(&mn) {
        *o = c | (m << 4);
    }
    pack_two_bit(&q, qs);
    tail[0..2].copy_from_slice(&d.to_bits().to_le_bytes());
    tail[2..4].copy_from_slice(&dmin.to_bits().to_le_bytes());
    Ok(())
}

/// Low 2 bits of each level into the 64 `qs` bytes (layout in the module docs).
fn pack_two_bit(q: &[u8; QK_K], qs: &mut [u8]) {
    qs.fill(0);
    for (i, &v) in q.iter().enumerate() {
        let (n, j, l) = (i / 128, (i % 128) / 32, i % 32);
        qs[32 * n + l] |= (v & 3) << (2 * j);
    }
}

/// The first element of largest magnitude (0 for an all-zero slice): its sign
/// decides which end of an asymmetric level range it is mapped to.
pub(super) fn signed_max(xs: &[f32]) -> f32 {
    let mut best = 0.0f32;
    for &v in xs {
        if v.abs() > best.abs() {
            best = v;
        }
    }
    best
}

pub(super) fn quant_q3k(x: &[f32; QK_K], out: &mut [u8; Q3K_BYTES]) -> Result<(), String> {
    // Levels run -4..=3: the sub-block's largest-magnitude element goes to -4
    // (the signed step is -max/4), so a same-signed range uses all 8 levels.
    let mut want = [0.0f32; 16];
    for (w, xs) in want.iter_mut().zip(x.chunks_exact(16)) {
        *w = -signed_max(xs) / 4.0;
    }
    let d = f16_at_least(want.iter().fold(0.0f32, |a, &v| a.max(v.abs())) / 31.0, "scale")?;
    let mut sc = [0i32; 16];
    for (c, &w) in sc.iter_mut().zip(&want) {
        let mag = units_covering(w.abs(), d.to_f32(), 31.0) as i32;
        *c = if w < 0.0 { -mag } else { mag };
    }
    let mut q = [0u8; QK_K];
    for (s, (qs, xs)) in q.chunks_exact_mut(16).zip(x.chunks_exact(16)).enumerate() {
        // The decoder's step, computed the same way.
        let step = d.to_f32() * sc[s] as f32;
        for (qv, &v) in qs.iter_mut().zip(xs) {
            let level = if step != 0.0 {
                (v / step).round().clamp(-4.0, 3.0) as i32
            } else {
                0
            };
            *qv = (level + 4) as u8;
        }
    }

    out.fill(0);
    let (hmask, rest) = out.split_at_mut(32);
    let (qs, rest) = rest.split_at_mut(64);
    let (scales, dbytes) = rest.split_at_mut(12);
    for (i, &v) in q.iter().enumerate() {
        let (n, j, l) = (i / 128, (i % 128) / 32, i % 32);
        hmask[l] |= (v >> 2) << (4 * n + j);
    }
    pack_two_bit(&q, qs);
    let mut u = [0u8; 16];
    for (o, &c) in u.iter_mut().zip(&sc) {
        *o = (c + 32) as u8;
    }
    scales.copy_from_slice(&pack_q3k_scales(&u));
    dbytes.copy_from_slice(&d.to_bits().to_le_bytes());
    Ok(())
}

pub(super) fn quant_q8k(x: &[f32; QK_K], out: &mut [u8; Q8K_BYTES]) -> Result<(), String> {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let mut q = [0i8; QK_K];
    if d > 0.0 {
        for (o, &v) in q.iter_mut().zip(x) {
            *o = (v / d).round().clamp(-127.0, 127.0) as i8;
        }
    }
    out[0..4].copy_from_slice(&d.to_le_bytes());
    for (o, &v) in out[4..4 + QK_K].iter_mut().zip(&q) {
        *o = v as u8;
    }
    for (k, q16) in q.chunks_exact(16).enumerate() {
        let sum: i16 = q16.iter().map(|&v| v as i16).sum();
        out[4 + QK_K + 2 * k..][..2].copy_from_slice(&sum.to_le_bytes());
    }
    Ok(())
}
