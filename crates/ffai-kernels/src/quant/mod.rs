//! GGUF / ggml weight formats.
//!
//! A stored tensor row is a whole number of *blocks* laid end to end. Float
//! types use one-element blocks; the legacy quants use 32-element blocks and
//! the K-quants 256-element super-blocks. Everything is little-endian, and
//! every scale or minimum stored as `f16` is an IEEE binary16 value.
//!
//! | type | elems | bytes | layout (byte offsets) |
//! |------|------:|------:|-----------------------|
//! | F32  | 1   | 4   | `f32` |
//! | F16  | 1   | 2   | `f16` |
//! | BF16 | 1   | 2   | upper half of an `f32` |
//! | Q4_0 | 32  | 18  | `d:f16 @0`, 16 nibble bytes `@2` |
//! | Q4_1 | 32  | 20  | `d:f16 @0`, `m:f16 @2`, 16 nibble bytes `@4` |
//! | Q5_0 | 32  | 22  | `d:f16 @0`, `qh:u32 @2`, 16 nibble bytes `@6` |
//! | Q5_1 | 32  | 24  | `d:f16 @0`, `m:f16 @2`, `qh:u32 @4`, 16 nibble bytes `@8` |
//! | Q8_0 | 32  | 34  | `d:f16 @0`, 32 × `i8 @2` |
//! | Q4_K | 256 | 144 | `d:f16 @0`, `dmin:f16 @2`, 12 packed scale bytes `@4`, 128 nibble bytes `@16` |
//! | Q5_K | 256 | 176 | `d:f16 @0`, `dmin:f16 @2`, 12 scale bytes `@4`, 32 high-bit bytes `@16`, 128 nibble bytes `@48` |
//! | Q6_K | 256 | 210 | 128 low-nibble bytes `@0`, 64 high-pair bytes `@128`, 16 × `i8` scales `@192`, `d:f16 @208` |
//! | Q2_K | 256 | 84  | 16 scale/min bytes `@0`, 64 two-bit bytes `@16`, `d:f16 @80`, `dmin:f16 @82` |
//! | Q3_K | 256 | 110 | 32 high-bit bytes `@0`, 64 two-bit bytes `@32`, 12 packed scale bytes `@96`, `d:f16 @108` |
//! | Q8_K | 256 | 292 | `d:f32 @0`, 256 × `i8 @4`, 16 × `i16` sums of 16 `@260` |
//! | IQ4_NL | 32 | 18 | `d:f16 @0`, 16 nibble bytes `@2` (codebook indices) |
//! | IQ4_XS | 256 | 136 | `d:f16 @0`, `scales_h:u16 @2`, 4 scale nibble bytes `@4`, 128 nibble bytes `@8` |
//! | MXFP4 | 32 | 17 | `e:u8 @0` (E8M0 exponent), 16 nibble bytes `@1` (E2M1 codes) |
//!
//! `Affine { bits, group }` (MLX affine group quantization, repacked at load) is not a
//! ggml type: its rows are laid out by kind (all scales, all biases, then the levels),
//! not block by block, and only whole rows are decoded; see `affine.rs`.
//!
//! Which nibble or bit belongs to which element is documented next to each
//! decoder (`legacy.rs` for the 32-element formats, `kquant.rs` for the
//! K-quants, `kquant_low.rs` for Q2_K / Q3_K / Q8_K, `iq4.rs` for the IQ4
//! codebook formats, `mxfp4.rs` for MXFP4, `float.rs` for the plain floats).
//!
//! Decoding rounds exactly like ggml's reference `dequantize_row_*` and
//! gguf-py (two separately rounded `f32` operations, never fused), so results
//! are bit-identical to theirs.

use std::fmt;

pub mod affine;
mod bf16_gemm;
mod float;
mod float_gemm;
mod iq4;
mod kquant;
mod kquant_low;
mod legacy;
mod mxfp4;
pub mod q8;

pub use bf16_gemm::{bf16_bits, bf16_dot_available, dot_rows_bf16, force_bf16_dot, round_to_bf16};
pub use q8::{
    dot_row_q8, dot_row_q8_multi, dot_rows_q8, force_portable, has_q8_path, q8_backend_name, ActFormat, ActsWriter,
    QuantizedActs,
};

/// Elements per legacy quant block.
const QK: usize = 32;
/// Elements per K-quant super-block.
const QK_K: usize = 256;

/// Independent partial sums kept by [`dot_row`]; a multiple of every SIMD
/// width the compiler may pick, and enough to hide the add latency.
const LANES: usize = 16;

/// A ggml weight storage type.
#[allow(clippy::upper_case_acronyms)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    Q2K,
    Q3K,
    Q8K,
    IQ4NL,
    IQ4XS,
    MXFP4,
    /// MLX-style affine group quantization, repacked at load (layout in `affine.rs`).
    /// Not a ggml type and not in [`WeightType::ALL`]; build it with [`WeightType::affine`].
    Affine {
        bits: u8,
        group: u16,
    },
}

impl WeightType {
    /// Every supported type, floats first.
    pub const ALL: [WeightType; 17] = [
        WeightType::F32,
        WeightType::F16,
        WeightType::BF16,
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q5_0,
        WeightType::Q5_1,
        WeightType::Q8_0,
        WeightType::Q4K,
        WeightType::Q5K,
        WeightType::Q6K,
        WeightType::Q2K,
        WeightType::Q3K,
        WeightType::Q8K,
        WeightType::IQ4NL,
        WeightType::IQ4XS,
        WeightType::MXFP4,
    ];

    /// The affine type of `bits` (2, 3, 4, 5, 6, 8) and `group` (32, 64, 128), if supported.
    pub const fn affine(bits: u8, group: u16) -> Option<WeightType> {
        if affine::valid(bits, group) {
            Some(WeightType::Affine { bits, group })
        } else {
            None
        }
    }

    /// Maps a ggml / GGUF type id to a supported type (`None` for anything else).
    pub const fn from_ggml(id: u32) -> Option<WeightType> {
        Some(match id {
            0 => WeightType::F32,
            1 => WeightType::F16,
            2 => WeightType::Q4_0,
            3 => WeightType::Q4_1,
            6 => WeightType::Q5_0,
            7 => WeightType::Q5_1,
            8 => WeightType::Q8_0,
            12 => WeightType::Q4K,
            13 => WeightType::Q5K,
            14 => WeightType::Q6K,
            10 => WeightType::Q2K,
            11 => WeightType::Q3K,
            15 => WeightType::Q8K,
            20 => WeightType::IQ4NL,
            23 => WeightType::IQ4XS,
            39 => WeightType::MXFP4,
            30 => WeightType::BF16,
            _ => return None,
        })
    }

    /// The ggml / GGUF type id.
    pub const fn ggml_id(self) -> u32 {
        match self {
            WeightType::F32 => 0,
            WeightType::F16 => 1,
            WeightType::Q4_0 => 2,
            WeightType::Q4_1 => 3,
            WeightType::Q5_0 => 6,
            WeightType::Q5_1 => 7,
            WeightType::Q8_0 => 8,
            WeightType::Q4K => 12,
            WeightType::Q5K => 13,
            WeightType::Q6K => 14,
            WeightType::Q2K => 10,
            WeightType::Q3K => 11,
            WeightType::Q8K => 15,
            WeightType::IQ4NL => 20,
            WeightType::IQ4XS => 23,
            WeightType::MXFP4 => 39,
            WeightType::BF16 => 30,
            // No ggml id: GGUF writers must refuse these (`is_ggml`).
            WeightType::Affine { .. } => u32::MAX,
        }
    }

    /// True for the types GGUF can store (everything but `Affine`).
    pub const fn is_ggml(self) -> bool {
        !matches!(self, WeightType::Affine { .. })
    }

    /// ggml's name for the type ("F32", "Q4_0", "Q4_K", ...).
    pub const fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "F32",
            WeightType::F16 => "F16",
            WeightType::BF16 => "BF16",
            WeightType::Q4_0 => "Q4_0",
            WeightType::Q4_1 => "Q4_1",
            WeightType::Q5_0 => "Q5_0",
            WeightType::Q5_1 => "Q5_1",
            WeightType::Q8_0 => "Q8_0",
            WeightType::Q4K => "Q4_K",
            WeightType::Q5K => "Q5_K",
            WeightType::Q6K => "Q6_K",
            WeightType::Q2K => "Q2_K",
            WeightType::Q3K => "Q3_K",
            WeightType::Q8K => "Q8_K",
            WeightType::IQ4NL => "IQ4_NL",
            WeightType::IQ4XS => "IQ4_XS",
            WeightType::MXFP4 => "MXFP4",
            WeightType::Affine { bits, group } => affine::name(bits, group),
        }
    }

    /// Elements per block.
    pub const fn block_len(self) -> usize {
        match self {
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => 1,
            WeightType::Q4_0 | WeightType::Q4_1 | WeightType::Q5_0 | WeightType::Q5_1 | WeightType::Q8_0 => QK,
            WeightType::IQ4NL | WeightType::MXFP4 => QK,
            WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => QK_K,
            WeightType::Q2K | WeightType::Q3K | WeightType::Q8K | WeightType::IQ4XS => QK_K,
            WeightType::Affine { group, .. } => group as usize,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            WeightType::F32 => 4,
            WeightType::F16 | WeightType::BF16 => 2,
            WeightType::Q4_0 => legacy::Q4_0_BYTES,
            WeightType::Q4_1 => legacy::Q4_1_BYTES,
            WeightType::Q5_0 => legacy::Q5_0_BYTES,
            WeightType::Q5_1 => legacy::Q5_1_BYTES,
            WeightType::Q8_0 => legacy::Q8_0_BYTES,
            WeightType::Q4K => kquant::Q4K_BYTES,
            WeightType::Q5K => kquant::Q5K_BYTES,
            WeightType::Q6K => kquant::Q6K_BYTES,
            WeightType::Q2K => kquant_low::Q2K_BYTES,
            WeightType::Q3K => kquant_low::Q3K_BYTES,
            WeightType::Q8K => kquant_low::Q8K_BYTES,
            WeightType::IQ4NL => iq4::IQ4NL_BYTES,
            WeightType::IQ4XS => iq4::IQ4XS_BYTES,
            WeightType::MXFP4 => mxfp4::MXFP4_BYTES,
            WeightType::Affine { bits, group } => affine::block_bytes(bits, group),
        }
    }

    /// Bytes taken by a row of `n` elements; `None` when `n` is not a whole
    /// number of blocks or the size overflows `usize`.
    pub const fn row_bytes(self, n: usize) -> Option<usize> {
        let len = self.block_len();
        if !n.is_multiple_of(len) {
            return None;
        }
        (n / len).checked_mul(self.block_bytes())
    }

    /// True for the block-quantized types (everything but F32, F16 and BF16).
    pub const fn is_quantized(self) -> bool {
        !matches!(self, WeightType::F32 | WeightType::F16 | WeightType::BF16)
    }
}

impl fmt::Display for WeightType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantizes one stored row into `dst` (`dst.len()` elements).
///
/// Caller contract: `src.len() == ty.row_bytes(dst.len())`. The loader checks
/// tensor sizes before any kernel runs, so a mismatch is a bug and panics.
pub fn dequantize_row(ty: WeightType, src: &[u8], dst: &mut [f32]) {
    check_row(ty, src.len(), dst.len());
    match ty {
        WeightType::F32 => float::dequant_f32(src, dst),
        WeightType::F16 => float::dequant_f16(src, dst),
        WeightType::BF16 => float::dequant_bf16(src, dst),
        WeightType::Q4_0 => dequant_blocks(src, dst, legacy::BlockQ4_0),
        WeightType::Q4_1 => dequant_blocks(src, dst, legacy::BlockQ4_1),
        WeightType::Q5_0 => dequant_blocks(src, dst, legacy::BlockQ5_0),
        WeightType::Q5_1 => dequant_blocks(src, dst, legacy::BlockQ5_1),
        WeightType::Q8_0 => dequant_blocks(src, dst, legacy::BlockQ8_0),
        WeightType::Q4K => dequant_blocks(src, dst, kquant::BlockQ4K),
        WeightType::Q5K => dequant_blocks(src, dst, kquant::BlockQ5K),
        WeightType::Q6K => dequant_blocks(src, dst, kquant::BlockQ6K),
        WeightType::Q2K => dequant_blocks(src, dst, kquant_low::BlockQ2K),
        WeightType::Q3K => dequant_blocks(src, dst, kquant_low::BlockQ3K),
        WeightType::Q8K => dequant_blocks(src, dst, kquant_low::BlockQ8K),
        WeightType::IQ4NL => dequant_blocks(src, dst, iq4::BlockIQ4NL),
        WeightType::IQ4XS => dequant_blocks(src, dst, iq4::BlockIQ4XS),
        WeightType::MXFP4 => dequant_blocks(src, dst, mxfp4::BlockMXFP4),
        WeightType::Affine { bits, group } => affine::dequant_row(bits, group, src, dst),
    }
}

/// Dot product of one stored row (`x.len()` elements) with `x`, decoding a
/// block at a time on the stack instead of materialising the row.
///
/// The sum is accumulated in `f32` over 16 independent partial sums,
/// so it differs from a sequential sum by ordinary rounding only.
///
/// Caller contract: `row.len() == ty.row_bytes(x.len())` (panics otherwise).
pub fn dot_row(ty: WeightType, row: &[u8], x: &[f32]) -> f32 {
    check_row(ty, row.len(), x.len());
    match ty {
        WeightType::F32 => float::dot_f32(row, x),
        WeightType::F16 => float::dot_f16(row, x),
        WeightType::BF16 => float::dot_bf16(row, x),
        WeightType::Q4_0 => dot_blocks(row, x, legacy::BlockQ4_0),
        WeightType::Q4_1 => dot_blocks(row, x, legacy::BlockQ4_1),
        WeightType::Q5_0 => dot_blocks(row, x, legacy::BlockQ5_0),
        WeightType::Q5_1 => dot_blocks(row, x, legacy::BlockQ5_1),
        WeightType::Q8_0 => dot_blocks(row, x, legacy::BlockQ8_0),
        WeightType::Q4K => dot_blocks(row, x, kquant::BlockQ4K),
        WeightType::Q5K => dot_blocks(row, x, kquant::BlockQ5K),
        WeightType::Q6K => dot_blocks(row, x, kquant::BlockQ6K),
        WeightType::Q2K => dot_blocks(row, x, kquant_low::BlockQ2K),
        WeightType::Q3K => dot_blocks(row, x, kquant_low::BlockQ3K),
        WeightType::Q8K => dot_blocks(row, x, kquant_low::BlockQ8K),
        WeightType::IQ4NL => dot_blocks(row, x, iq4::BlockIQ4NL),
        WeightType::IQ4XS => dot_blocks(row, x, iq4::BlockIQ4XS),
        WeightType::MXFP4 => dot_blocks(row, x, mxfp4::BlockMXFP4),
        WeightType::Affine { bits, group } => affine::dot_row(bits, group, row, x),
    }
}

/// `out[r · n + j] = dot_row(ty, row r, x[j · cols ..][.. cols])` for the consecutive
/// stored rows in `rows` (a whole number of `cols`-element rows) and the
/// `n = x.len() / cols` tokens of `x` (`out.len()` = rows × `n`, row-major): a prefill
/// GEMM tile with `f32` activations. Bit-identical to the per-(row, token) `dot_row`
/// calls on every level. The float types (F32, F16, BF16) run register-blocked AVX-512
/// / AVX2 kernels (`float_gemm.rs`: each widened weight vector serves several tokens);
/// the quantized types (whose fast path is the integer one in [`q8`]) call `dot_row`.
/// Panics on a length mismatch.
pub fn dot_rows_multi(ty: WeightType, rows: &[u8], x: &[f32], cols: usize, out: &mut [f32]) {
    let rb = ty.row_bytes(cols).filter(|&b| b > 0).unwrap_or_else(|| {
        panic!(
            "{ty}: {cols} columns are not a whole, non-zero number of {}-element blocks",
            ty.block_len()
        )
    });
    assert!(
        rows.len().is_multiple_of(rb) && x.len().is_multiple_of(cols),
        "{ty}: {} bytes of rows / {} activations are not whole rows of {cols} elements",
        rows.len(),
        x.len()
    );
    let n = x.len() / cols;
    assert_eq!(out.len(), rows.len() / rb * n, "output length must equal rows × tokens");
    if n == 0 {
        return;
    }
    if !ty.is_quantized() {
        float_gemm::dot_rows_multi(ty, rows, rb, x, cols, out);
        return;
    }
    for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(n)) {
        for (ov, xt) in o.iter_mut().zip(x.chunks_exact(cols)) {
            *ov = dot_row(ty, row, xt);
        }
    }
}

/// Quantizes one row of `src.len()` values into `dst`.
///
/// * F32 / F16 / BF16: plain round-to-nearest-even conversion (infinities and
///   NaNs are stored as such).
/// * Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: the same arithmetic as ggml's reference
///   `quantize_row_*_ref`, so the bytes match ggml's and gguf-py's.
/// * Q4_K, Q5_K, Q6_K: a simple, non-iterative scale choice (per-sub-block
///   min/max or abs-max, with the 6/8-bit sub-scales rounded *up* so every
///   input lies inside the representable range). Each element then rounds to
///   the nearest level, so the error is at most half a sub-block step. It is
///   not ggml's iterative search and gives different (valid) bytes.
/// * Q2_K, Q3_K: the same idea (sub-block scales rounded up to cover the
///   sub-block, then nearest level); see `kquant_low.rs`. Q8_K: `amax / 127`.
/// * IQ4_NL, IQ4_XS: the block's largest-magnitude element fixes the scale
///   (it maps onto the codebook's end value -127), then every element takes
///   the nearest codebook value. MXFP4: gguf-py's reference quantizer (shared
///   exponent `floor(log2 amax) - 2`, nearest E2M1 value), same bytes.
/// * Affine: per group `bias = min`, `scale = (max - min) / (2^bits - 1)` (stored as
///   `f32`), each element rounded to the nearest level (at most half a step off).
///
/// Errors: `src.len()` not a whole number of blocks, `dst.len()` not
/// `ty.row_bytes(src.len())`, a non-finite input for a quantized type, or a
/// scale that does not fit in `f16`. On error `dst` may be partly written.
pub fn quantize_row(ty: WeightType, src: &[f32], dst: &mut [u8]) -> Result<(), String> {
    let need = ty.row_bytes(src.len()).ok_or_else(|| {
        format!(
            "{ty}: a row of {} elements is not a whole number of {}-element blocks",
            src.len(),
            ty.block_len()
        )
    })?;
    if dst.len() != need {
        return Err(format!(
            "{ty}: destination holds {} bytes, a row of {} elements needs {need}",
            dst.len(),
            src.len()
        ));
    }
    if ty.is_quantized() {
        if let Some(i) = src.iter().position(|v| !v.is_finite()) {
            return Err(format!("{ty}: input element {i} is not finite ({})", src[i]));
        }
    }
    match ty {
        WeightType::F32 => {
            float::quant_f32(src, dst);
            Ok(())
        }
        WeightType::F16 => {
            float::quant_f16(src, dst);
            Ok(())
        }
        WeightType::BF16 => {
            float::quant_bf16(src, dst);
            Ok(())
        }
        WeightType::Q4_0 => quant_blocks(src, dst, legacy::quant_q4_0),
        WeightType::Q4_1 => quant_blocks(src, dst, legacy::quant_q4_1),
        WeightType::Q5_0 => quant_blocks(src, dst, legacy::quant_q5_0),
        WeightType::Q5_1 => quant_blocks(src, dst, legacy::quant_q5_1),
        WeightType::Q8_0 => quant_blocks(src, dst, legacy::quant_q8_0),
        WeightType::Q4K => quant_blocks(src, dst, kquant::quant_q4k),
        WeightType::Q5K => quant_blocks(src, dst, kquant::quant_q5k),
        WeightType::Q6K => quant_blocks(src, dst, kquant::quant_q6k),
        WeightType::Q2K => quant_blocks(src, dst, kquant_low::quant_q2k),
        WeightType::Q3K => quant_blocks(src, dst, kquant_low::quant_q3k),
        WeightType::Q8K => quant_blocks(src, dst, kquant_low::quant_q8k),
        WeightType::IQ4NL => quant_blocks(src, dst, iq4::quant_iq4nl),
        WeightType::IQ4XS => quant_blocks(src, dst, iq4::quant_iq4xs),
        WeightType::MXFP4 => quant_blocks(src, dst, mxfp4::quant_mxfp4),
        WeightType::Affine { bits, group } => affine::quantize_row(bits, group, src, dst),
    }
    .map_err(|e| format!("{ty}: {e}"))
}

#[inline]
fn check_row(ty: WeightType, bytes: usize, elems: usize) {
    assert!(
        ty.row_bytes(elems) == Some(bytes),
        "{ty} row of {elems} elements must be {:?} bytes, got {bytes}",
        ty.row_bytes(elems)
    );
}

/// Reads the little-endian `f16` at `b[at..at + 2]` as `f32`.
#[inline(always)]
fn read_f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Rounds `v` to `f16` (nearest-even) and returns its little-endian bytes,
/// or an error when it does not fit.
fn f16_bytes(v: f32, what: &str) -> Result<[u8; 2], String> {
    let h = half::f16::from_f32(v);
    if h.is_finite() {
        Ok(h.to_bits().to_le_bytes())
    } else {
        Err(format!("{what} {v} does not fit in f16"))
    }
}

/// A block format's decoder: `B` stored bytes become `N` values.
///
/// Implemented by unit marker types with an `#[inline(always)]` `decode`, so
/// the row loops below get the decoder inlined (a function item passed as
/// `impl Fn` was left as an out-of-line call per block).
trait Decode<const B: usize, const N: usize> {
    fn decode(b: &[u8; B], out: &mut [f32; N]);
}

/// Decodes a whole row of `D` blocks. Kept out of line (here and in
/// [`dot_blocks`]) so each format's loop is optimised on its own rather than
/// inside one large dispatch function.
#[inline(never)]
fn dequant_blocks<D: Decode<B, N>, const B: usize, const N: usize>(src: &[u8], dst: &mut [f32], _format: D) {
    for (b, o) in src.chunks_exact(B).zip(dst.chunks_exact_mut(N)) {
        D::decode(b.try_into().unwrap(), o.try_into().unwrap());
        // An optimisation barrier: it keeps LLVM from vectorising this loop
        // *across* blocks, which it did for Q4_0/Q4_1 with AVX-512 (per-byte
        // gathers and scatters, ~8x slower). Each block's code is still SIMD.
        std::hint::black_box(());
    }
}

/// Runs a fixed-size block quantizer over a whole row.
#[inline(always)]
fn quant_blocks<const B: usize, const N: usize>(
    src: &[f32],
    dst: &mut [u8],
    encode: impl Fn(&[f32; N], &mut [u8; B]) -> Result<(), String>,
) -> Result<(), String> {
    for (i, (x, o)) in src.chunks_exact(N).zip(dst.chunks_exact_mut(B)).enumerate() {
        encode(x.try_into().unwrap(), o.try_into().unwrap()).map_err(|e| format!("block {i}: {e}"))?;
    }
    Ok(())
}

/// Dot product over whole blocks: decode each block into a stack buffer and
/// multiply-accumulate it against `x` in `LANES` partial sums.
#[inline(never)]
fn dot_blocks<D: Decode<B, N>, const B: usize, const N: usize>(row: &[u8], x: &[f32], _format: D) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut w = [0.0f32; N];
    for (b, xs) in row.chunks_exact(B).zip(x.chunks_exact(N)) {
        D::decode(b.try_into().unwrap(), &mut w);
        fma_lanes(&w, xs.try_into().unwrap(), &mut acc);
    }
    sum_lanes(acc)
}

/// `acc[k] += Σ_j w[j·LANES + k] · x[j·LANES + k]`; `N` must be a multiple of
/// `LANES`. Plain multiply and add (no `mul_add`, which is a libm call
/// without FMA hardware), so it vectorises on every target.
#[inline(always)]
fn fma_lanes<const N: usize>(w: &[f32; N], x: &[f32; N], acc: &mut [f32; LANES]) {
    for (wc, xc) in w.chunks_exact(LANES).zip(x.chunks_exact(LANES)) {
        for ((a, &wv), &xv) in acc.iter_mut().zip(wc).zip(xc) {
            *a += wv * xv;
        }
    }
}

/// Horizontal sum of the partial sums. Deliberately sequential: a pairwise
/// tree here led LLVM's SLP vectoriser to split the accumulators into 2-wide
/// vectors for the whole loop, halving `dot_row`'s speed.
#[inline(always)]
fn sum_lanes(acc: [f32; LANES]) -> f32 {
    acc.iter().sum()
}
