//! Quantized-weight kernels (`quant.cu`): for every [`WeightType`] a matrix-vector product
//! (decode), its gathered form for mixtures of experts, a dequantization to bf16 (prefill
//! GEMMs) and an embedding lookup.
//!
//! Kernel names are `matvec_<tag>`, `matvec4_<tag>`, `moe_matvec_<tag>`,
//! `dequant_bf16_<tag>` and `embed_<tag>`, with the tag from [`kernel_tag`] (`"q4_k"`,
//! `"affine_b4_g64"`, ...). Signatures (C types) and launch contracts:
//!
//! * `matvec_<tag>(const unsigned char* w, unsigned long long row_bytes, const float* x,
//!   float* y, unsigned int rows, unsigned int cols, unsigned int n)`:
//!   `y[t * rows + r] = Σ_c W[r, c] · x[t * cols + c]` for `t < n`, `1 <= n <=`
//!   [`MATVEC_MAX_N`]. Launch with [`matvec_config`]: [`MATVEC_BLOCK`] threads (4 warps,
//!   one output row each), `ceil(rows / 4)` blocks. A row's result is bit-identical
//!   whatever `n` is (the per-row arithmetic does not depend on it), so batching decode
//!   tokens never changes a token's output. Accumulation is `f32` (FMA), so the result
//!   differs from an exact dot product by ordinary rounding only.
//! * `moe_matvec_<tag>(const unsigned long long* table, const float* ids,
//!   unsigned int n_experts, unsigned int k, unsigned int per_slot,
//!   unsigned long long row_bytes, const float* x, float* y, unsigned int rows,
//!   unsigned int cols)`: the gathered product of a mixture of experts, for slot
//!   `s = blockIdx.y`: `y[s * rows + r] = W_e[r] · x[xr]` with `e = ids[s]` (f32), `W_e` at
//!   `table[e]`, `xr = s` when `per_slot`, else `s / k`; each (slot, row) is `matvec`'s row
//!   body with one activation row (the same bits). Grid `(ceil(rows / 4), slots)`,
//!   [`MATVEC_BLOCK`] threads. An id outside `0..n_experts` writes NaN.
//! * `dequant_bf16_<tag>(const unsigned char* w, unsigned long long row_bytes,
//!   unsigned short* out, unsigned int rows, unsigned int cols)`:
//!   `out[r * cols + c] = bf16(W[r, c])`, rounded to nearest even (NaN stays NaN). Launch
//!   with [`dequant_bf16_config`]: one thread per 32-element run, 256 threads a block,
//!   a 1-D grid (64-bit indexing inside, so matrices of billions of elements work).
//! * `embed_<tag>(const unsigned char* w, unsigned long long row_bytes,
//!   const unsigned int* ids, float* out, unsigned int n, unsigned int cols)`:
//!   `out[t * cols + c] = W[ids[t], c]`, bit-identical to [`crate::quant::dequantize_row`].
//!   Launch with [`embed_config`]: grid `(ceil(runs / 128), n)`, 128 threads, one thread
//!   per run; `ids` must already be checked `< rows`, and `n <= 65535` (the grid's `y`
//!   limit: split longer batches).
//!
//! Shapes: row `r` starts at `w + r * row_bytes` with `row_bytes == ty.row_bytes(cols)`.
//! Quantized types need `cols` a multiple of their block length (and so of 32); the float
//! types take any `cols`. No alignment is assumed for `w` (most block sizes leave fields
//! at odd offsets anyway); `x`, `y` and `out` need only their element type's alignment,
//! though 16-byte aligned activation rows take the vector-load path.

use cudarc::driver::LaunchConfig;

use crate::quant::affine::{BITS, GROUPS};
use crate::quant::WeightType;

/// The kernel source.
pub const QUANT_SOURCE: &str = include_str!("quant.cu");

/// The most activation rows (tokens) one `matvec_<tag>` launch takes; each lane keeps one
/// accumulator pair per row in registers, so this bounds register use.
pub const MATVEC_MAX_N: usize = 8;

/// Output rows one warp of `matvec4_<tag>` computes (one activation row only:
/// `matvec4_<tag>(w, row_bytes, x, y, rows, cols)`, [`MATVEC_BLOCK`] threads,
/// `ceil(rows / 16)` blocks; each row's bits equal `matvec_<tag>`'s).
pub const MATVEC4_ROWS: u32 = 4;

/// Threads per `matvec_<tag>` block: 4 warps, one output row per warp.
pub const MATVEC_BLOCK: u32 = 128;
/// Output rows per `matvec_<tag>` block.
pub const MATVEC_ROWS_PER_BLOCK: u32 = MATVEC_BLOCK / 32;
/// Threads per `dequant_bf16_<tag>` block.
pub const DEQUANT_BLOCK: u32 = 256;
/// Threads per `embed_<tag>` block.
pub const EMBED_BLOCK: u32 = 128;

/// The largest `gridDim.x` CUDA accepts.
const MAX_GRID_X: u64 = (1 << 31) - 1;
/// The largest `gridDim.y` CUDA accepts.
const MAX_GRID_Y: u32 = 65_535;

/// The tag in `ty`'s kernel names: `"f32"`, `"q4_0"`, `"q4_k"`, `"iq4_xs"`, `"mxfp4"`,
/// `"affine_b4_g64"`, ...
pub fn kernel_tag(ty: WeightType) -> String {
    match ty {
        WeightType::Affine { bits, group } => format!("affine_b{bits}_g{group}"),
        other => other.name().to_ascii_lowercase(),
    }
}

/// Every type with kernels: [`WeightType::ALL`], then every affine `(bits, group)`.
pub fn kernel_types() -> Vec<WeightType> {
    let mut types = WeightType::ALL.to_vec();
    for bits in BITS {
        for group in GROUPS {
            types.push(WeightType::Affine { bits, group });
        }
    }
    types
}

/// The types whose device copy may take the split row layout ([`split_rows`]).
pub const SPLIT_TYPES: [WeightType; 2] = [WeightType::Q4_0, WeightType::Q8_0];

/// The levels' bytes of one block of `ty` in the split row layout, when a row of `cols`
/// elements of that type takes it: Q4_0 (16) and Q8_0 (32) with `cols` a multiple of 256,
/// so a row of `nb` blocks (`nb % 8 == 0`) stays a multiple of 16 bytes long.
pub fn split_levels(ty: WeightType, cols: usize) -> Option<usize> {
    let levels = match ty {
        WeightType::Q4_0 => 16,
        WeightType::Q8_0 => 32,
        _ => return None,
    };
    (cols > 0 && cols.is_multiple_of(256)).then_some(levels)
}

/// The tag of `ty`'s kernels for its split row layout (`"q4_0s"`, `"q8_0s"`).
pub fn split_tag(ty: WeightType) -> String {
    format!("{}s", kernel_tag(ty))
}

/// `data` (whole rows of `cols` elements of `ty`, as stored: blocks of an f16 scale and
/// then the levels) in the split row layout the device copy uses: each row's levels in
/// block order, then the row's scales in block order. The row length is unchanged; the
/// levels of a warp's 32 consecutive blocks become one contiguous run that 16-byte loads
/// read whole (a stored 18-byte Q4_0 block leaves every field unaligned). None when the
/// type or width has no split layout ([`split_levels`]). Rows are spread over up to
/// `threads` threads.
pub fn split_rows(ty: WeightType, cols: usize, data: &[u8], threads: usize) -> Option<Vec<u8>> {
    let levels = split_levels(ty, cols)?;
    let block = levels + 2;
    let nb = cols / 32;
    let row_bytes = nb * block;
    if !data.len().is_multiple_of(row_bytes) {
        return None;
    }
    let mut out = vec![0u8; data.len()];
    let split = |src: &[u8], dst: &mut [u8]| {
        for (s, d) in src.chunks_exact(row_bytes).zip(dst.chunks_exact_mut(row_bytes)) {
            let (lv, sc) = d.split_at_mut(nb * levels);
            for ((b, l), c) in s
                .chunks_exact(block)
                .zip(lv.chunks_exact_mut(levels))
                .zip(sc.chunks_exact_mut(2))
            {
                c.copy_from_slice(&b[..2]);
                l.copy_from_slice(&b[2..]);
            }
        }
    };
    let rows = data.len() / row_bytes;
    let per = rows.div_ceil(threads.clamp(1, 64)).max(1024);
    if rows <= per {
        split(data, &mut out);
    } else {
        std::thread::scope(|scope| {
            for (s, d) in data.chunks(per * row_bytes).zip(out.chunks_mut(per * row_bytes)) {
                scope.spawn(move || split(s, d));
            }
        });
    }
    Some(out)
}

/// Every `extern "C"` kernel defined in [`QUANT_SOURCE`].
pub fn kernel_names() -> Vec<String> {
    let split = SPLIT_TYPES.iter().map(|&ty| split_tag(ty));
    kernel_types()
        .into_iter()
        .map(kernel_tag)
        .chain(split)
        .flat_map(|tag| {
            [
                format!("matvec_{tag}"),
                format!("matvec4_{tag}"),
                format!("moe_matvec_{tag}"),
                format!("dequant_bf16_{tag}"),
                format!("embed_{tag}"),
            ]
        })
        .collect()
}

/// 32-element runs in a row of `cols` elements (the last one partial for float types).
pub const fn runs(cols: u32) -> u32 {
    cols.div_ceil(32)
}

/// `matvec_<tag>`'s grid for `rows` output rows: `ceil(rows / 4)` blocks.
pub const fn matvec_grid(rows: u32) -> (u32, u32, u32) {
    (rows.div_ceil(MATVEC_ROWS_PER_BLOCK), 1, 1)
}

/// `matvec_<tag>`'s launch configuration.
pub const fn matvec_config(rows: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: matvec_grid(rows),
        block_dim: (MATVEC_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `dequant_bf16_<tag>`'s grid: one thread per run of every row. Panics past CUDA's grid
/// limit (over 10^13 elements, far beyond any GPU's memory).
pub fn dequant_bf16_grid(rows: u32, cols: u32) -> (u32, u32, u32) {
    let blocks = (u64::from(rows) * u64::from(runs(cols))).div_ceil(u64::from(DEQUANT_BLOCK));
    assert!(blocks <= MAX_GRID_X, "{rows} x {cols}: too many blocks for one launch");
    (blocks as u32, 1, 1)
}

/// `dequant_bf16_<tag>`'s launch configuration.
pub fn dequant_bf16_config(rows: u32, cols: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: dequant_bf16_grid(rows, cols),
        block_dim: (DEQUANT_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `embed_<tag>`'s grid for `n` tokens of `cols` elements. Panics when `n` exceeds the
/// grid's `y` limit (65535): the caller splits such a batch.
pub fn embed_grid(cols: u32, n: u32) -> (u32, u32, u32) {
    assert!(
        n <= MAX_GRID_Y,
        "{n} tokens: embed takes at most {MAX_GRID_Y} per launch"
    );
    (runs(cols).div_ceil(EMBED_BLOCK), n, 1)
}

/// `embed_<tag>`'s launch configuration.
pub fn embed_config(cols: u32, n: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: embed_grid(cols, n),
        block_dim: (EMBED_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}
