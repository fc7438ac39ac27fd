//! Plain float rows: F32 (4 bytes), F16 and BF16 (2 bytes), little-endian,
//! one element per "block", so any row length is valid.
//!
//! Rows are processed in stack chunks of `CHUNK` elements (so the F16
//! conversion can use `half`'s vectorised slice routine) plus a scalar tail.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::{dequant_blocks, dot_blocks, Decode};

/// Elements converted per stack chunk (also what `dot_row` puts through its lanes:
/// whole chunks; `float_gemm` relies on it).
pub(super) const CHUNK: usize = 64;

#[inline(always)]
fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

#[inline(always)]
fn one_f32(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

#[inline(always)]
fn one_f16(b: &[u8]) -> f32 {
    f16::from_bits(le_u16(b)).to_f32()
}

#[inline(always)]
fn one_bf16(b: &[u8]) -> f32 {
    f32::from_bits(u32::from(le_u16(b)) << 16)
}

/// `CHUNK` little-endian `f32`s.
struct ChunkF32;

impl Decode<{ 4 * CHUNK }, CHUNK> for ChunkF32 {
    #[inline(always)]
    fn decode(b: &[u8; 4 * CHUNK], out: &mut [f32; CHUNK]) {
        for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
            *o = one_f32(c);
        }
    }
}

/// `CHUNK` little-endian `f16`s, widened with `half`'s vectorised slice routine.
struct ChunkF16;

impl Decode<{ 2 * CHUNK }, CHUNK> for ChunkF16 {
    #[inline(always)]
    fn decode(b: &[u8; 2 * CHUNK], out: &mut [f32; CHUNK]) {
        let mut h = [f16::ZERO; CHUNK];
        for (hv, c) in h.iter_mut().zip(b.chunks_exact(2)) {
            *hv = f16::from_bits(le_u16(c));
        }
        h.convert_to_f32_slice(out);
    }
}

/// `CHUNK` little-endian `bf16`s. bf16 is by definition the upper half of an
/// IEEE binary32, so widening is a 16-bit shift: identical to
/// `half::bf16::to_f32` except that signalling-NaN payloads are kept as is
/// (like ggml and gguf-py) instead of being quietened — and, unlike `half`'s
/// NaN branch, it vectorises on every target (about 5x faster on baseline
/// x86-64).
struct ChunkBf16;

impl Decode<{ 2 * CHUNK }, CHUNK> for ChunkBf16 {
    #[inline(always)]
    fn decode(b: &[u8; 2 * CHUNK], out: &mut [f32; CHUNK]) {
        for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
            *o = one_bf16(c);
        }
    }
}

/// Whole chunks through `chunk`, the remaining `< CHUNK` elements through `one`.
#[inline(always)]
fn dequant_float<D: Decode<B, CHUNK>, const B: usize>(
    src: &[u8],
    dst: &mut [f32],
    chunk: D,
    one: impl Fn(&[u8]) -> f32,
) {
    let elem = B / CHUNK;
    let full = dst.len() / CHUNK * CHUNK;
    let (src_head, src_tail) = src.split_at(full * elem);
    let (dst_head, dst_tail) = dst.split_at_mut(full);
    dequant_blocks(src_head, dst_head, chunk);
    for (o, c) in dst_tail.iter_mut().zip(src_tail.chunks_exact(elem)) {
        *o = one(c);
    }
}

#[inline(always)]
fn dot_float<D: Decode<B, CHUNK>, const B: usize>(row: &[u8], x: &[f32], chunk: D, one: impl Fn(&[u8]) -> f32) -> f32 {
    let elem = B / CHUNK;
    let full = x.len() / CHUNK * CHUNK;
    let (row_head, row_tail) = row.split_at(full * elem);
    let (x_head, x_tail) = x.split_at(full);
    let mut sum = dot_blocks(row_head, x_head, chunk);
    for (&xv, c) in x_tail.iter().zip(row_tail.chunks_exact(elem)) {
        sum += one(c) * xv;
    }
    sum
}

pub(super) fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    dequant_float(src, dst, ChunkF32, one_f32);
}

pub(super) fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    dequant_float(src, dst, ChunkF16, one_f16);
}

pub(super) fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    dequant_float(src, dst, ChunkBf16, one_bf16);
}

pub(super) fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    dot_float(row, x, ChunkF32, one_f32)
}

pub(super) fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    dot_float(row, x, ChunkF16, one_f16)
}

pub(super) fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    dot_float(row, x, ChunkBf16, one_bf16)
}

/// `sum` plus the products of the elements past the last whole chunk, added one by
/// one exactly as [`dot_float`] adds them (`float_gemm` finishes its outputs with it).
#[cfg(target_arch = "x86_64")]
pub(super) fn dot_tail(ty: super::WeightType, mut sum: f32, row_tail: &[u8], x_tail: &[f32]) -> f32 {
    let one = match ty {
        super::WeightType::F32 => one_f32,
        super::WeightType::F16 => one_f16,
        _ => one_bf16,
    };
    let elem = if ty == super::WeightType::F32 { 4 } else { 2 };
    for (&xv, c) in x_tail.iter().zip(row_tail.chunks_exact(elem)) {
        sum += one(c) * xv;
    }
    sum
}

pub(super) fn quant_f32(src: &[f32], dst: &mut [u8]) {
    for (o, v) in dst.chunks_exact_mut(4).zip(src) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

pub(super) fn quant_f16(src: &[f32], dst: &mut [u8]) {
    for (o, &v) in dst.chunks_exact_mut(2).zip(src) {
        o.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
    }
}

pub(super) fn quant_bf16(src: &[f32], dst: &mut [u8]) {
    for (o, &v) in dst.chunks_exact_mut(2).zip(src) {
        o.copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
    }
}
