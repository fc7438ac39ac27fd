//! Affine group quantization (the MLX scheme): every group of `group` consecutive
//! elements of a row has its own `scale` and `bias`, and element `i` is
//! `scale · q_i + bias` with an unsigned `bits`-bit level `q_i`.
//!
//! MLX stores a quantized matrix as three tensors: `weight` (`u32` words holding a
//! little-endian bit stream of the levels, `bits` per element, row by row), and
//! `scales` / `biases` (`f16`, `bf16` or `f32`, one per group). [`repack_mlx`] turns
//! that triple into the row layout below, losslessly (every `f16` and `bf16` value
//! is exact in `f32`), so the rest of the engine sees one matrix.
//!
//! # Row layout
//!
//! A row of `n` elements has `nb = n / group` groups and takes `nb` "blocks" of
//! `8 + group · bits / 8` bytes, as `WeightType::row_bytes` says, but laid out by
//! kind rather than block by block, so the kernels load the scales of 8 consecutive
//! 32-element chunks with one vector load:
//!
//! | bytes | content |
//! |-------|---------|
//! | `0..4·nb` | `scale: f32` of each group |
//! | `4·nb..8·nb` | `bias: f32` of each group |
//! | `8·nb..` | `n / 32` chunks of `4 · bits` bytes, one per 32 elements |
//!
//! Unlike the GGUF types, only whole rows can be decoded (every caller passes whole
//! rows: matrices are split by rows only).
//!
//! Within a chunk of 32 elements (levels `q_0..q_31`), the levels are split into
//! planes so that every bit width decodes with a few shifts and masks:
//! * 8 bits: 32 bytes, byte `i` = `q_i - 128` as `i8` (a signed byte keeps the
//!   integer dot free of `u8 · i8` pair overflow; the offset is added back exactly);
//! * 4, 5, 6 bits: a nibble plane of 16 bytes, byte `j` = `q_j & 15` (low nibble) and
//!   `q_{j+16} & 15` (high nibble); then for 5 bits a 1-bit plane (`u32`, bit `i` =
//!   bit 4 of `q_i`), for 6 bits a 2-bit plane (8 bytes, bits `2k..2k+2` of byte `j`
//!   = bits 4..6 of `q_{j+8k}`);
//! * 2, 3 bits: a 2-bit plane of 8 bytes (bits `2k..2k+2` of byte `j` = `q_{j+8k} & 3`);
//!   then for 3 bits a 1-bit plane (`u32`, bit `i` = bit 2 of `q_i`).
//!
//! Dequantization is `scale · q + bias`, two separately rounded `f32` operations.

use super::{fma_lanes, sum_lanes, LANES};

/// Supported level widths.
pub const BITS: [u8; 6] = [2, 3, 4, 5, 6, 8];
/// Supported group sizes.
pub const GROUPS: [u16; 3] = [32, 64, 128];

/// True for a supported `(bits, group)` pair.
pub const fn valid(bits: u8, group: u16) -> bool {
    matches!(bits, 2 | 3 | 4 | 5 | 6 | 8) && matches!(group, 32 | 64 | 128)
}

/// Bytes one group of `group` elements takes in a row (scale, bias, levels).
pub const fn block_bytes(bits: u8, group: u16) -> usize {
    8 + group as usize / 32 * chunk_bytes(bits)
}

/// Bytes of one 32-element chunk.
pub(crate) const fn chunk_bytes(bits: u8) -> usize {
    4 * bits as usize
}

/// Names by width (`BITS` order) and group (`GROUPS` order).
const NAMES: [[&str; 3]; 6] = [
    ["AFFINE2_G32", "AFFINE2_G64", "AFFINE2_G128"],
    ["AFFINE3_G32", "AFFINE3_G64", "AFFINE3_G128"],
    ["AFFINE4_G32", "AFFINE4_G64", "AFFINE4_G128"],
    ["AFFINE5_G32", "AFFINE5_G64", "AFFINE5_G128"],
    ["AFFINE6_G32", "AFFINE6_G64", "AFFINE6_G128"],
    ["AFFINE8_G32", "AFFINE8_G64", "AFFINE8_G128"],
];

/// The type's name, e.g. `"AFFINE4_G64"`.
pub const fn name(bits: u8, group: u16) -> &'static str {
    let b = match bits {
        2..=6 => bits as usize - 2,
        8 => 5,
        _ => return "AFFINE?",
    };
    let g = match group {
        32 => 0,
        64 => 1,
        128 => 2,
        _ => return "AFFINE?",
    };
    NAMES[b][g]
}

/// Panics unless `(bits, group)` is supported (a `WeightType::Affine` built by hand
/// with other values is a caller bug).
#[inline]
pub(crate) fn assert_valid(bits: u8, group: u16) {
    assert!(
        valid(bits, group),
        "unsupported affine format: {bits} bits, group {group}"
    );
}

/// Reads the little-endian `f32` at `b[at..at + 4]`.
#[inline(always)]
pub(crate) fn read_f32(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decodes one chunk (`4 · bits` bytes) into its 32 levels `q_i` (0..2^bits).
#[inline(always)]
pub(crate) fn decode_chunk(bits: u8, c: &[u8], q: &mut [u8; 32]) {
    match bits {
        8 => {
            for (o, &b) in q.iter_mut().zip(&c[..32]) {
                *o = b ^ 0x80;
            }
        }
        4..=6 => {
            for j in 0..16 {
                q[j] = c[j] & 0x0F;
                q[j + 16] = c[j] >> 4;
            }
            match bits {
                5 => or_bit_plane(&c[16..20], 4, q),
                6 => or_pair_plane(&c[16..24], 4, q),
                _ => {}
            }
        }
        _ => {
            q.fill(0);
            or_pair_plane(&c[..8], 0, q);
            if bits == 3 {
                or_bit_plane(&c[8..12], 2, q);
            }
        }
    }
}

/// `q_{j+8k} |= ((p[j] >> 2k) & 3) << shift`.
#[inline(always)]
fn or_pair_plane(p: &[u8], shift: u32, q: &mut [u8; 32]) {
    for k in 0..4 {
        for j in 0..8 {
            q[j + 8 * k] |= ((p[j] >> (2 * k)) & 3) << shift;
        }
    }
}

/// `q_i |= (bit i of the little-endian u32 p) << shift`.
#[inline(always)]
fn or_bit_plane(p: &[u8], shift: u32, q: &mut [u8; 32]) {
    let w = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
    for (i, v) in q.iter_mut().enumerate() {
        *v |= (((w >> i) & 1) as u8) << shift;
    }
}

/// Encodes 32 levels (each `< 2^bits`) into one chunk (`4 · bits` bytes).
pub(crate) fn encode_chunk(bits: u8, q: &[u8; 32], c: &mut [u8]) {
    let c = &mut c[..chunk_bytes(bits)];
    c.fill(0);
    match bits {
        8 => {
            for (o, &v) in c.iter_mut().zip(q) {
                *o = v ^ 0x80;
            }
        }
        4..=6 => {
            for j in 0..16 {
                c[j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4);
            }
            match bits {
                5 => put_bit_plane(q, 4, &mut c[16..20]),
                6 => put_pair_plane(q, 4, &mut c[16..24]),
                _ => {}
            }
        }
        _ => {
            put_pair_plane(q, 0, &mut c[..8]);
            if bits == 3 {
                put_bit_plane(q, 2, &mut c[8..12]);
            }
        }
    }
}

fn put_pair_plane(q: &[u8; 32], shift: u32, p: &mut [u8]) {
    for k in 0..4 {
        for j in 0..8 {
            p[j] |= ((q[j + 8 * k] >> shift) & 3) << (2 * k);
        }
    }
}

fn put_bit_plane(q: &[u8; 32], shift: u32, p: &mut [u8]) {
    let mut w = 0u32;
    for (i, &v) in q.iter().enumerate() {
        w |= u32::from((v >> shift) & 1) << i;
    }
    p[..4].copy_from_slice(&w.to_le_bytes());
}

/// The parts of a row of `n` elements: (scales, biases, chunks).
#[inline(always)]
pub(crate) fn split_row(bits: u8, group: u16, row: &[u8], n: usize) -> (&[u8], &[u8], &[u8]) {
    let nb = n / group as usize;
    debug_assert_eq!(row.len(), nb * block_bytes(bits, group));
    let (sc, rest) = row.split_at(4 * nb);
    let (bi, qs) = rest.split_at(4 * nb);
    (sc, bi, qs)
}

/// Dequantizes a whole row.
pub(crate) fn dequant_row(bits: u8, group: u16, src: &[u8], dst: &mut [f32]) {
    assert_valid(bits, group);
    let (sc, bi, qs) = split_row(bits, group, src, dst.len());
    let per = group as usize / 32;
    let mut q = [0u8; 32];
    for (k, (c, o)) in qs
        .chunks_exact(chunk_bytes(bits))
        .zip(dst.chunks_exact_mut(32))
        .enumerate()
    {
        let (scale, bias) = (read_f32(sc, 4 * (k / per)), read_f32(bi, 4 * (k / per)));
        decode_chunk(bits, c, &mut q);
        for (v, &l) in o.iter_mut().zip(&q) {
            *v = scale * f32::from(l) + bias;
        }
    }
}

/// Dot product of a whole row with `x`: each chunk decoded to `f32` on the stack,
/// then multiplied into `LANES` partial sums (as `dot_row` does for the GGUF types).
pub(crate) fn dot_row(bits: u8, group: u16, row: &[u8], x: &[f32]) -> f32 {
    assert_valid(bits, group);
    let (sc, bi, qs) = split_row(bits, group, row, x.len());
    let per = group as usize / 32;
    let mut acc = [0.0f32; LANES];
    let mut q = [0u8; 32];
    let mut w = [0.0f32; 32];
    for (k, (c, x32)) in qs.chunks_exact(chunk_bytes(bits)).zip(x.chunks_exact(32)).enumerate() {
        let (scale, bias) = (read_f32(sc, 4 * (k / per)), read_f32(bi, 4 * (k / per)));
        decode_chunk(bits, c, &mut q);
        for (v, &l) in w.iter_mut().zip(&q) {
            *v = scale * f32::from(l) + bias;
        }
        fma_lanes(&w, x32.try_into().unwrap(), &mut acc);
    }
    sum_lanes(acc)
}

/// Quantizes a whole row: per group `bias = min`, `scale = (max - min) / (2^bits - 1)`,
/// `q = round((x - bias) / scale)` clamped to the level range. A constant group gets
/// `scale = 0`, `q = 0`, so it decodes exactly.
pub(crate) fn quantize_row(bits: u8, group: u16, src: &[f32], dst: &mut [u8]) -> Result<(), String> {
    if !valid(bits, group) {
        return Err(format!("unsupported affine format: {bits} bits, group {group}"));
    }
    let g = group as usize;
    let nb = src.len() / g;
    let top = ((1u32 << bits) - 1) as f32;
    let (head, qs) = dst.split_at_mut(8 * nb);
    let (sc, bi) = head.split_at_mut(4 * nb);
    let mut q = [0u8; 32];
    for (gi, xs) in src.chunks_exact(g).enumerate() {
        let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let scale = (max - min) / top;
        if !scale.is_finite() {
            return Err(format!("group {gi}: range {min}..{max} overflows f32"));
        }
        sc[4 * gi..4 * gi + 4].copy_from_slice(&scale.to_le_bytes());
        bi[4 * gi..4 * gi + 4].copy_from_slice(&min.to_le_bytes());
        let chunks = qs[gi * g / 32 * chunk_bytes(bits)..].chunks_exact_mut(chunk_bytes(bits));
        for (x32, c) in xs.chunks_exact(32).zip(chunks) {
            for (l, &v) in q.iter_mut().zip(x32) {
                *l = if scale > 0.0 {
                    ((v - min) / scale).round().clamp(0.0, top) as u8
                } else {
                    0
                };
            }
            encode_chunk(bits, &q, c);
        }
    }
    Ok(())
}

/// The element type of MLX `scales` / `biases` tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleType {
    F16,
    BF16,
    F32,
}

impl ScaleType {
    /// Bytes per value.
    pub const fn size(self) -> usize {
        match self {
            ScaleType::F16 | ScaleType::BF16 => 2,
            ScaleType::F32 => 4,
        }
    }

    /// Value `i` of the little-endian array `b`, exactly as `f32`.
    #[inline]
    fn get(self, b: &[u8], i: usize) -> f32 {
        match self {
            ScaleType::F16 => half::f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32(),
            ScaleType::BF16 => f32::from_bits(u32::from(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])) << 16),
            ScaleType::F32 => read_f32(b, 4 * i),
        }
    }
}

/// An MLX quantized matrix as stored: the three tensors' bytes.
#[derive(Clone, Copy, Debug)]
pub struct MlxTriple<'a> {
    /// The packed `u32` words, little-endian.
    pub weight: &'a [u8],
    pub scales: &'a [u8],
    pub biases: &'a [u8],
    /// The element type of `scales` and `biases`.
    pub scale_type: ScaleType,
}

/// Repacks an MLX quantized matrix (`rows × cols` logical elements) into this
/// module's row layout, `rows · row_bytes(cols)` bytes.
///
/// `m.weight` holds `rows · cols · bits / 8` bytes, `m.scales` and `m.biases`
/// `rows · cols / group` values. Errors (as text, for the loader to put the tensor
/// name on) on an unsupported format, `cols` not a multiple of `group`, or any length
/// that disagrees.
pub fn repack_mlx(bits: u8, group: u16, rows: usize, cols: usize, m: &MlxTriple<'_>) -> Result<Vec<u8>, String> {
    let (weight, scales, biases, st) = (m.weight, m.scales, m.biases, m.scale_type);
    if !valid(bits, group) {
        return Err(format!("unsupported affine format: {bits} bits, group size {group}"));
    }
    let g = group as usize;
    if cols == 0 || !cols.is_multiple_of(g) {
        return Err(format!("{cols} columns are not a whole number of {g}-element groups"));
    }
    let ngroups = rows
        .checked_mul(cols / g)
        .ok_or_else(|| format!("{rows} x {cols} overflows"))?;
    let row_in = cols * bits as usize / 8;
    let need_w = rows
        .checked_mul(row_in)
        .ok_or_else(|| format!("{rows} x {cols} overflows"))?;
    if weight.len() != need_w {
        return Err(format!(
            "packed weight holds {} bytes, {rows} rows of {cols} {bits}-bit values need {need_w}",
            weight.len()
        ));
    }
    for (what, t) in [("scales", scales), ("biases", biases)] {
        if t.len() != ngroups * st.size() {
            return Err(format!(
                "{what} hold {} bytes, {ngroups} groups of {st:?} need {}",
                t.len(),
                ngroups * st.size()
            ));
        }
    }
    let rb = cols / g * block_bytes(bits, group);
    let out_len = rows
        .checked_mul(rb)
        .ok_or_else(|| format!("{rows} x {cols} overflows"))?;
    let mut out = vec![0u8; out_len];
    let mask = (1u32 << bits) - 1;
    let nb = cols / g;
    let mut q = [0u8; 32];
    for (r, (src, dst)) in weight.chunks_exact(row_in).zip(out.chunks_exact_mut(rb)).enumerate() {
        let (head, qs) = dst.split_at_mut(8 * nb);
        let (sc, bi) = head.split_at_mut(4 * nb);
        for gi in 0..nb {
            let k = r * nb + gi;
            sc[4 * gi..4 * gi + 4].copy_from_slice(&st.get(scales, k).to_le_bytes());
            bi[4 * gi..4 * gi + 4].copy_from_slice(&st.get(biases, k).to_le_bytes());
        }
        for (ci, c) in qs.chunks_exact_mut(chunk_bytes(bits)).enumerate() {
            for (i, l) in q.iter_mut().enumerate() {
                // Element e's bits start at bit e·bits of the row's little-endian
                // stream and span at most two bytes (bits ≤ 8).
                let bit = (ci * 32 + i) * bits as usize;
                let lo = u32::from(src[bit / 8]);
                let hi = u32::from(*src.get(bit / 8 + 1).unwrap_or(&0));
                *l = (((lo | (hi << 8)) >> (bit % 8)) & mask) as u8;
            }
            encode_chunk(bits, &q, c);
        }
    }
    Ok(out)
}
