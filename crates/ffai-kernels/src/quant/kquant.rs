//! K-quants: 256-element super-blocks made of sub-blocks whose small integer
//! scales are relative to `f16` super-block scales.
//!
//! **Q4_K / Q5_K** (eight 32-element sub-blocks). Sub-block `s` decodes as
//! `(d · sc[s]) · q - (dmin · mn[s])` with 6-bit `sc`, `mn` packed in 12 bytes:
//!
//! * `s < 4`: `sc` = low 6 bits of byte `s`, `mn` = low 6 bits of byte `s + 4`;
//! * `s ≥ 4`: `sc` = low nibble of byte `s + 4` with the top two bits of byte
//!   `s - 4` above it, `mn` = high nibble of byte `s + 4` with the top two bits
//!   of byte `s` above it.
//!
//! The 128 nibble bytes are four groups of 32: byte `l` of group `g` holds
//! element `64g + l` (sub-block `2g`) in its low nibble and element
//! `64g + 32 + l` (sub-block `2g + 1`) in its high nibble. Q5_K adds 32 bytes
//! `qh`: bit `s` of `qh[l]` is bit 4 of element `32s + l`.
//!
//! **Q6_K** (sixteen 16-element sub-blocks, signed 8-bit scales). Element `i`
//! decodes as `(d · scales[i / 16]) · (q - 32)` with a 6-bit `q`. The super-block
//! is two halves of 128; in half `n`, element `128n + 32k + l` (`k` in 0..4,
//! `l` in 0..32) takes its low 4 bits from `ql[64n + l + 32(k & 1)]` (low
//! nibble for `k < 2`, high nibble otherwise) and its top 2 bits from bits
//! `2k, 2k+1` of `qh[32n + l]`.

use half::f16;

use super::{read_f16, Decode, QK_K};

const SCALE_BYTES: usize = 12;

pub(super) const Q4K_BYTES: usize = 4 + SCALE_BYTES + QK_K / 2;
pub(super) const Q5K_BYTES: usize = 4 + SCALE_BYTES + QK_K / 8 + QK_K / 2;
pub(super) const Q6K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// Unpacks the 12 scale bytes of Q4_K / Q5_K into eight 6-bit scales and mins.
#[inline(always)]
fn unpack_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let s: &[u8; SCALE_BYTES] = s.try_into().unwrap();
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// Inverse of [`unpack_scales`]; every input must be below 64.
fn pack_scales(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; SCALE_BYTES] {
    let mut s = [0u8; SCALE_BYTES];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
    }
    s
}

// ---------------------------------------------------------------- decoders

pub(super) struct BlockQ4K;

impl Decode<Q4K_BYTES, QK_K> for BlockQ4K {
    #[inline(always)]
    fn decode(b: &[u8; Q4K_BYTES], out: &mut [f32; QK_K]) {
        let d = read_f16(b, 0);
        let dmin = read_f16(b, 2);
        let (sc, mn) = unpack_scales(&b[4..16]);
        let qs = &b[16..];
        for (g, (q32, o64)) in qs.chunks_exact(32).zip(out.chunks_exact_mut(64)).enumerate() {
            let d_lo = d * sc[2 * g] as f32;
            let m_lo = dmin * mn[2 * g] as f32;
            let d_hi = d * sc[2 * g + 1] as f32;
            let m_hi = dmin * mn[2 * g + 1] as f32;
            let (lo, hi) = o64.split_at_mut(32);
            for ((&q, l), h) in q32.iter().zip(lo).zip(hi) {
                *l = d_lo * (q & 0x0F) as f32 - m_lo;
                *h = d_hi * (q >> 4) as f32 - m_hi;
            }
        }
    }
}

pub(super) struct BlockQ5K;

impl Decode<Q5K_BYTES, QK_K> for BlockQ5K {
    #[inline(always)]
    fn decode(b: &[u8; Q5K_BYTES], out: &mut [f32; QK_K]) {
        let d = read_f16(b, 0);
        let dmin = read_f16(b, 2);
        let (sc, mn) = unpack_scales(&b[4..16]);
        let qh = &b[16..48];
        let qs = &b[48..];
        for (g, (q32, o64)) in qs.chunks_exact(32).zip(out.chunks_exact_mut(64)).enumerate() {
            let d_lo = d * sc[2 * g] as f32;
            let m_lo = dmin * mn[2 * g] as f32;
            let d_hi = d * sc[2 * g + 1] as f32;
            let m_hi = dmin * mn[2 * g + 1] as f32;
            let (lo, hi) = o64.split_at_mut(32);
            for (((&q, &h), l), o) in q32.iter().zip(qh).zip(lo).zip(hi) {
                let q_lo = (q & 0x0F) | (((h >> (2 * g)) & 1) << 4);
                let q_hi = (q >> 4) | (((h >> (2 * g + 1)) & 1) << 4);
                *l = d_lo * q_lo as f32 - m_lo;
                *o = d_hi * q_hi as f32 - m_hi;
            }
        }
    }
}

pub(super) struct BlockQ6K;

impl Decode<Q6K_BYTES, QK_K> for BlockQ6K {
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    fn decode(b: &[u8; Q6K_BYTES], out: &mut [f32; QK_K]) {
        let d = read_f16(b, 208);
        let (ql, rest) = b.split_at(128);
        let (qh, rest) = rest.split_at(64);
        let scales = &rest[..16];
        let halves = ql.chunks_exact(64).zip(qh.chunks_exact(32)).zip(scales.chunks_exact(8));
        for (((ql, qh), sc), o) in halves.zip(out.chunks_exact_mut(128)) {
            let ql: &[u8; 64] = ql.try_into().unwrap();
            let qh: &[u8; 32] = qh.try_into().unwrap();
            let o: &mut [f32; 128] = o.try_into().unwrap();
            // Two groups of 16 columns; each column feeds four sub-blocks.
            for g in 0..2 {
                let s0 = d * sc[g] as i8 as f32;
                let s1 = d * sc[g + 2] as i8 as f32;
                let s2 = d * sc[g + 4] as i8 as f32;
                let s3 = d * sc[g + 6] as i8 as f32;
                for l in 16 * g..16 * g + 16 {
                    let (a, c, h) = (ql[l], ql[l + 32], qh[l]);
                    let q0 = (a & 0x0F) | ((h & 0x03) << 4);
                    let q1 = (c & 0x0F) | (((h >> 2) & 0x03) << 4);
                    let q2 = (a >> 4) | (((h >> 4) & 0x03) << 4);
                    let q3 = (c >> 4) | (((h >> 6) & 0x03) << 4);
                    o[l] = s0 * (q0 as i32 - 32) as f32;
                    o[l + 32] = s1 * (q1 as i32 - 32) as f32;
                    o[l + 64] = s2 * (q2 as i32 - 32) as f32;
                    o[l + 96] = s3 * (q3 as i32 - 32) as f32;
                }
            }
        }
    }
}

// -------------------------------------------------------------- quantizers
//
// Not ggml's iterative search: sub-scales come straight from each sub-block's
// min/max (Q4_K, Q5_K) or abs-max (Q6_K), are stored rounded *up* against an
// `f16` super-scale that is itself rounded up, so the stored range always
// covers the sub-block and each element is off by at most half a step.

/// The smallest finite `f16` that is `>= v` (`v` finite and `>= 0`).
pub(super) fn f16_at_least(v: f32, what: &str) -> Result<f16, String> {
    let h = f16::from_f32(v);
    let h = if h.to_f32() < v {
        f16::from_bits(h.to_bits() + 1)
    } else {
        h
    };
    if h.is_finite() {
        Ok(h)
    } else {
        Err(format!("{what} {v} does not fit in f16"))
    }
}

/// `ceil(need / unit)` limited to `max` (`0` when `unit` is zero).
#[inline]
pub(super) fn units_covering(need: f32, unit: f32, max: f32) -> f32 {
    if unit > 0.0 {
        (need / unit).ceil().clamp(0.0, max)
    } else {
        0.0
    }
}

/// Scales for Q4_K (`levels` = 15) and Q5_K (`levels` = 31): returns
/// `(d, dmin, sc, mn)` and the per-element levels in `q`.
fn quant_asymmetric(x: &[f32; QK_K], levels: u8, q: &mut [u8; QK_K]) -> Result<(f16, f16, [u8; 8], [u8; 8]), String> {
    // Sub-block range, with the low end clamped to <= 0 (mins are stored as
    // non-negative amounts to subtract).
    let mut below = [0.0f32; 8];
    let mut top = [0.0f32; 8];
    for ((b, t), xs) in below.iter_mut().zip(&mut top).zip(x.chunks_exact(32)) {
        let mut lo = 0.0f32;
        let mut hi = xs[0];
        for &v in xs {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        *b = -lo;
        *t = hi;
    }

    let dmin = f16_at_least(below.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0, "min scale")?;
    let mut mn = [0u8; 8];
    let mut shift = [0.0f32; 8];
    for ((m, s), &b) in mn.iter_mut().zip(&mut shift).zip(&below) {
        *m = units_covering(b, dmin.to_f32(), 63.0) as u8;
        *s = dmin.to_f32() * *m as f32;
    }

    let mut need = [0.0f32; 8];
    for ((n, &t), &s) in need.iter_mut().zip(&top).zip(&shift) {
        *n = ((t + s) / levels as f32).max(0.0);
    }
    let d = f16_at_least(need.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0, "scale")?;
    let mut sc = [0u8; 8];
    for (c, &n) in sc.iter_mut().zip(&need) {
        *c = units_covering(n, d.to_f32(), 63.0) as u8;
    }

    for (((qs, xs), &c), &s) in q.chunks_exact_mut(32).zip(x.chunks_exact(32)).zip(&sc).zip(&shift) {
        let step = d.to_f32() * c as f32;
        for (qv, &v) in qs.iter_mut().zip(xs) {
            *qv = if step > 0.0 {
                ((v + s) / step).round().clamp(0.0, levels as f32) as u8
            } else {
                0
            };
        }
    }
    Ok((d, dmin, sc, mn))
}

/// Writes `d`, `dmin` and the packed scales (bytes 0..16 of Q4_K / Q5_K).
fn write_header(out: &mut [u8], d: f16, dmin: f16, sc: &[u8; 8], mn: &[u8; 8]) {
    out[0..2].copy_from_slice(&d.to_bits().to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_bits().to_le_bytes());
    out[4..16].copy_from_slice(&pack_scales(sc, mn));
}

/// Low nibbles of the levels in the Q4_K / Q5_K group order.
fn pack_group_nibbles(q: &[u8; QK_K], qs: &mut [u8]) {
    for (q64, o32) in q.chunks_exact(64).zip(qs.chunks_exact_mut(32)) {
        let (lo, hi) = q64.split_at(32);
        for ((o, &a), &b) in o32.iter_mut().zip(lo).zip(hi) {
            *o = (a & 0x0F) | ((b & 0x0F) << 4);
        }
    }
}

pub(super) fn quant_q4k(x: &[f32; QK_K], out: &mut [u8; Q4K_BYTES]) -> Result<(), String> {
    let mut q = [0u8; QK_K];
    let (d, dmin, sc, mn) = quant_asymmetric(x, 15, &mut q)?;
    write_header(out, d, dmin, &sc, &mn);
    pack_group_nibbles(&q, &mut out[16..]);
    Ok(())
}

pub(super) fn quant_q5k(x: &[f32; QK_K], out: &mut [u8; Q5K_BYTES]) -> Result<(), String> {
    let mut q = [0u8; QK_K];
    let (d, dmin, sc, mn) = quant_asymmetric(x, 31, &mut q)?;
    write_header(out, d, dmin, &sc, &mn);
    let mut qh = [0u8; 32];
    for (s, q32) in q.chunks_exact(32).enumerate() {
        for (h, &v) in qh.iter_mut().zip(q32) {
            *h |= ((v >> 4) & 1) << s;
        }
    }
    out[16..48].copy_from_slice(&qh);
    pack_group_nibbles(&q, &mut out[48..]);
    Ok(())
}

pub(super) fn quant_q6k(x: &[f32; QK_K], out: &mut [u8; Q6K_BYTES]) -> Result<(), String> {
    // Symmetric: sub-block step amax / 31 keeps every level within -31..=31.
    let mut want = [0.0f32; 16];
    for (w, xs) in want.iter_mut().zip(x.chunks_exact(16)) {
        *w = xs.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 31.0;
    }
    let d = f16_at_least(want.iter().fold(0.0f32, |a, &v| a.max(v)) / 127.0, "scale")?;
    let mut sc = [0i8; 16];
    let mut q = [0u8; QK_K];
    for ((c, &w), (qs, xs)) in sc
        .iter_mut()
        .zip(&want)
        .zip(q.chunks_exact_mut(16).zip(x.chunks_exact(16)))
    {
        *c = units_covering(w, d.to_f32(), 127.0) as i8;
        let step = d.to_f32() * *c as f32;
        for (qv, &v) in qs.iter_mut().zip(xs) {
            let level = if step > 0.0 {
                (v / step).round().clamp(-32.0, 31.0) as i32
            } else {
                0
            };
            *qv = (level + 32) as u8;
        }
    }

    let (ql, rest) = out.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    let (scales, dbytes) = rest.split_at_mut(16);
    for (o, &c) in scales.iter_mut().zip(&sc) {
        *o = c as u8;
    }
    dbytes.copy_from_slice(&d.to_bits().to_le_bytes());
    for ((q128, ql), qh) in q
        .chunks_exact(128)
        .zip(ql.chunks_exact_mut(64))
        .zip(qh.chunks_exact_mut(32))
    {
        for l in 0..32 {
            let (q0, q1, q2, q3) = (q128[l], q128[l + 32], q128[l + 64], q128[l + 96]);
            ql[l] = (q0 & 0x0F) | ((q2 & 0x0F) << 4);
            ql[l + 32] = (q1 & 0x0F) | ((q3 & 0x0F) << 4);
            qh[l] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6);
        }
    }
    Ok(())
}
