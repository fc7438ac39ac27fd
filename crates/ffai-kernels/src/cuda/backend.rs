//! `CudaBackend`: the [`Backend`] ops on an NVIDIA GPU.
//!
//! Weights are uploaded once, in their stored format; activations are f32, the KV pools
//! f16 (as the CPU's). Kernels come from the `.cu` sources beside this file, compiled by
//! NVRTC for the device's architecture at start-up (PTX cached on disk, see
//! [`super::load_ptx`]). Every op is enqueued on one stream; nothing waits for the GPU
//! until a result is downloaded.
//!
//! Matrix products: below [`GEMM_MIN_ROWS`] rows the stored weights are read directly
//! (`matvec4_<type>` for one row: four output rows per warp; `matvec_<type>` for up to
//! [`quant::MATVEC_MAX_N`] rows a pass: one output row per warp; the same bits per row
//! either way); from [`GEMM_MIN_ROWS`] rows cuBLAS multiplies on the tensor cores:
//! quantized weights dequantized to bf16 with bf16 activations, f16/bf16 weights widened
//! to f32 in TF32, f32 weights in f32.
//!
//! Errors: the [`Backend`] ops return nothing, so a failed launch or allocation is kept
//! (the first one) and every later op does nothing; [`Backend::check`] reports it, and the
//! model calls it after loading, allocating and each forward. A buffer whose allocation
//! failed is empty and never touched.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    sys as drv_sys, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig,
};
use cudarc::driver::{PushKernelArg, ValidAsZeroBits};

use super::quant;
use crate::backend::{AttnShape, Backend, GraphMode, HeadNorms, HostBytes, RopeParams, StepCaps, StepLayout};
use crate::quant::WeightType;

/// From this many rows a product goes to cuBLAS; below it, passes of the matrix-vector
/// kernel (whose per-row result does not depend on how many rows share the pass, so a
/// decode batch of up to this many sequences gives each the bits it gets alone).
pub const GEMM_MIN_ROWS: usize = 33;

/// Most token rows whose mixture-of-experts products run as gathered decode products
/// (`moe_q8x_*`, `moe_half_*`, `moe_matvec_<tag>`: one warp per (slot, output row), the
/// expert read from the device `ids`, so the step needs no host round trip and can be
/// recorded; the decoder records steps of up to 64 rows). More rows (prefill) are grouped
/// by expert on the device and multiplied on the int8 tensor cores (`moe.cu`'s
/// `moe_group`, then q8x.cu's `mmq_moe_*`: no host round trip) where the experts' type
/// has such a product; other types take the host grouping (`backend::host_moe`), where
/// each expert's rows share one product (a GEMM once an expert has [`GEMM_MIN_ROWS`]).
pub const MOE_GATHER_MAX_ROWS: usize = 64;

/// Token rows from which a decode-sized MoE step is grouped by expert on the device (as a
/// prefill step is) rather than gathered: with k experts a token, 16 rows are 16·k slots,
/// enough that experts repeat and reading each once a tile wins (see `moe_matmuls`).
pub const MOE_GROUP_MIN_ROWS: usize = 16;

/// Threads of an attention block (`ATTN_THREADS` in attention.cu).
const ATTN_THREADS: usize = 256;
/// Threads of a `rope_kv_write_step` block (`ROPE_THREADS` in attention.cu).
const ROPE_THREADS: u32 = 128;
/// Positions per attention part (a warp's) of the `attn_dec_*` kernels.
const ATTN_SPAN: usize = 32;
/// Parts (warps) of an `attn_dec_*` block (`DEC_WARPS` in attention.cu).
const DEC_WARPS: usize = 4;
/// Query heads of one KV head an `attn_dec_*` block takes (`DEC_G` in attention.cu).
const DEC_G: usize = 4;

/// F32 matrices with fewer rows take one row a warp (`matvec_f32`) rather than four
/// (`matvec4_f32`) for a one-row product: below this, four rows a warp leave most SMs idle.
const MATVEC4_MIN_F32_ROWS: usize = 4096;

/// Rows of one sequence an `attn_prefill_*` block takes (`PF_ROWS` in attention.cu).
const PF_ROWS: usize = 64;
/// Threads of an `attn_prefill_*` block (`PF_THREADS` in attention.cu).
const PF_THREADS: u32 = 128;
/// Fewest rows a sequence brings to a step for the step's attention to run on the tensor
/// cores (`attn_prefill_*`): every sequence must have this many, so decode rows (one a
/// sequence) and mixed steps keep `attn_dec`, which splits a row over its positions.
const PF_MIN_SEQ_ROWS: usize = 16;

/// The prefill attention's blocks for a step of `n` rows: up to [`PF_ROWS`] consecutive
/// rows of one sequence each, as (sequence, first row, rows) in `tiles`. False (and
/// `tiles` empty) when the step does not take that kernel: fewer than [`GEMM_MIN_ROWS`]
/// rows (so steps that small keep bit-for-bit batch invariance with decode steps, as
/// the products do), a sequence with fewer than [`PF_MIN_SEQ_ROWS`], or padding rows.
fn prefill_tiles(seqs: &[crate::backend::SeqRows], n: usize, tiles: &mut Vec<u32>) -> bool {
    tiles.clear();
    let rows: usize = seqs.iter().map(|s| s.n_rows as usize).sum();
    if n < GEMM_MIN_ROWS || rows != n || seqs.iter().any(|s| (s.n_rows as usize) < PF_MIN_SEQ_ROWS) {
        return false;
    }
    for (i, s) in seqs.iter().enumerate() {
        for r in (0..s.n_rows).step_by(PF_ROWS) {
            tiles.extend_from_slice(&[i as u32, s.first_row + r, (s.n_rows - r).min(PF_ROWS as u32)]);
        }
    }
    true
}

/// The attention kernel (`FFAI_CUDA_ATTN`: `dec`, the default, or `64`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum AttnKernel {
    /// `attn_spans64`: 64-position parts, a block each (head sizes other than 64 / 128
    /// take it under `Dec` too).
    Spans64,
    /// `attn_dec_h64/h128`: a warp a 32-position part, four a block. Passed the attention
    /// test on an H100 (session 13) and took the 8B Q4_0 decode from 283 to 320 tok/s.
    Dec,
}

/// Query heads of one KV head an attention block takes (`ATTN_GROUP` in attention.cu).
const ATTN_GROUP: usize = 8;
/// Rows up to which products take the tensor-core kernels by default: batched decode.
/// Measured on the H100 (session 12, Nsight Compute, Llama-3-8B shapes): at 64 sequences
/// they beat the dequantize + cuBLAS path (aggregate decode 2162 vs 1990 tok/s), but a
/// 512-token prefill's products took 3.7 ms a layer against ~1 ms for that path (the
/// kernel stages nothing in shared memory: every warp reloads its activation fragments
/// and the weights are re-read per 64 tokens).
pub const MMQ_DEFAULT_MAX_ROWS: usize = 64;

/// q8x.cu's tensor-core products: tokens and weight rows a block covers, its threads.
const MMQ_TOK: usize = 64;
const MMQ_ROWS: usize = 32;
/// Weight rows of a staged tensor-core product's block (q8x.cu `MMQS_ROWS`; its tokens
/// are [`MMQ_TOK`] too).
const MMQS_ROWS: usize = 64;
const MMQ_THREADS: u32 = 256;

/// A weight type's tensor-core product (q8x.cu `mmq_*`) and the block length its
/// activations are quantized in (`quantize_q8x32` / `quantize_q8x256`).
/// and the weight rows one of its blocks takes. `split`: the matrix's device copy has the
/// split row layout (`quant::split_rows`), whose products stage both operands through
/// shared memory (`mmqs_*`) unless `staged` is off (`FFAI_CUDA_MMQ_STAGED=0`); Q4_K's
/// staged product (`mmqs_q4_k`) where `staged_k` (unless `FFAI_CUDA_MMQ_STAGED_K=0`).
fn mmq_kernel(ty: WeightType, split: bool, staged: bool, staged_k: bool) -> Option<(&'static str, usize, usize)> {
    Some(match ty {
        WeightType::Q4K if staged_k => ("mmqs_q4_k", 256, MMQS_ROWS),
        WeightType::Q4_0 if split && staged => ("mmqs_q4_0s", 32, MMQS_ROWS),
        WeightType::Q8_0 if split && staged => ("mmqs_q8_0s", 32, MMQS_ROWS),
        WeightType::Q4_0 if split => ("mmq_q4_0s", 32, MMQ_ROWS),
        WeightType::Q8_0 if split => ("mmq_q8_0s", 32, MMQ_ROWS),
        WeightType::Q4_0 => ("mmq_q4_0", 32, MMQ_ROWS),
        WeightType::Q4_1 => ("mmq_q4_1", 32, MMQ_ROWS),
        WeightType::Q5_0 => ("mmq_q5_0", 32, MMQ_ROWS),
        WeightType::Q5_1 => ("mmq_q5_1", 32, MMQ_ROWS),
        WeightType::Q8_0 => ("mmq_q8_0", 32, MMQ_ROWS),
        WeightType::MXFP4 => ("mmq_mxfp4", 32, MMQ_ROWS),
        WeightType::Q4K => ("mmq_q4_k", 256, MMQ_ROWS),
        _ => return None,
    })
}

/// A weight type's grouped mixture-of-experts product (q8x.cu `mmq_moe_*` / `mmqs_moe_*`:
/// the dense `mmq_*` / `mmqs_*` bodies over a tile of one expert's slots), the block
/// length its activations are quantized in and the weight rows one of its blocks takes.
/// The split layouts take the staged bodies as the dense products do (`staged`: unless
/// `FFAI_CUDA_MMQ_STAGED=0`); Q4_K's as its dense product (`staged_k`).
fn mmq_moe_kernel(ty: WeightType, split: bool, staged: bool, staged_k: bool) -> Option<(&'static str, usize, usize)> {
    Some(match ty {
        WeightType::Q4K if staged_k => ("mmqs_moe_q4_k", 256, MMQS_ROWS),
        WeightType::Q4_0 if split && staged => ("mmqs_moe_q4_0s", 32, MMQS_ROWS),
        WeightType::Q8_0 if split && staged => ("mmqs_moe_q8_0s", 32, MMQS_ROWS),
        WeightType::Q4_0 if split => ("mmq_moe_q4_0s", 32, MMQ_ROWS),
        WeightType::Q8_0 if split => ("mmq_moe_q8_0s", 32, MMQ_ROWS),
        WeightType::Q4_0 => ("mmq_moe_q4_0", 32, MMQ_ROWS),
        WeightType::Q4_1 => ("mmq_moe_q4_1", 32, MMQ_ROWS),
        WeightType::Q5_0 => ("mmq_moe_q5_0", 32, MMQ_ROWS),
        WeightType::Q5_1 => ("mmq_moe_q5_1", 32, MMQ_ROWS),
        WeightType::Q8_0 => ("mmq_moe_q8_0", 32, MMQ_ROWS),
        WeightType::MXFP4 => ("mmq_moe_mxfp4", 32, MMQ_ROWS),
        WeightType::Q4K => ("mmq_moe_q4_k", 256, MMQ_ROWS),
        _ => return None,
    })
}

/// Slots one block of the grouped MoE products takes (moe.cu `MOE_TILE`, q8x.cu
/// `MMQ_TOK`) and the threads of the grouping kernel (`MOE_GROUP_THREADS`).
const MOE_TILE: usize = MMQ_TOK;
const MOE_GROUP_THREADS: u32 = 1024;

/// Activation rows one q8x.cu product launch takes (`Q8X_MAX_N`).
const Q8X_MAX_N: usize = 8;
/// Largest head dimension the attention kernel holds (8 floats a lane).
pub const MAX_HEAD_DIM: usize = 256;
/// Bytes of attention parts one launch may use; more rows go in several launches.
const ATTN_PART_BYTES: usize = 256 << 20;

/// A device allocation and its address (kernels take raw addresses, so a step's
/// launches can later be captured and replayed reading the same buffers).
pub struct DevMem<T> {
    mem: Option<CudaSlice<T>>,
    ptr: u64,
    len: usize,
}

impl<T> DevMem<T> {
    fn empty() -> Self {
        DevMem {
            mem: None,
            ptr: 0,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

pub type CudaBuf = DevMem<f32>;

/// A weight matrix on the device, in its stored format.
pub struct CudaMat {
    data: DevMem<u8>,
    ty: WeightType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// Its type's kernels, named once here rather than at every launch.
    kernels: MatKernels,
    /// The decode product kernel of q8x.cu, where the type has one.
    fast: Option<Fast>,
    /// The device copy holds each row's levels and then its scales
    /// (`quant::split_rows`): Q4_0 / Q8_0 rows of whole 256-element runs.
    split: bool,
}

/// The q8x.cu decode kernels a matrix uses for fewer than [`GEMM_MIN_ROWS`] rows.
#[derive(Clone, Copy)]
enum Fast {
    /// Activations quantized by `quantizer` in blocks of `block`, then `kernel`.
    Q8x {
        kernel: &'static str,
        /// The same product for one activation row (fewer registers: more warps).
        kernel1: &'static str,
        quantizer: &'static str,
        block: usize,
    },
    /// 16-bit floats read 128 bits at a time (any rows, one row).
    Half(&'static str, &'static str),
}

impl Fast {
    fn kernel(&self) -> &'static str {
        match *self {
            Fast::Q8x { kernel, .. } | Fast::Half(kernel, _) => kernel,
        }
    }

    /// The kernel for a launch of `rows` activation rows.
    fn kernel_for(&self, rows: usize) -> &'static str {
        match *self {
            Fast::Q8x { kernel1, .. } | Fast::Half(_, kernel1) if rows == 1 => kernel1,
            _ => self.kernel(),
        }
    }

    /// The gathered (mixture-of-experts) kernel over the same row body: `mv_q8x_<t>` →
    /// `moe_q8x_<t>`, `mv_half_<t>` → `moe_half_<t>` (q8x.cu).
    fn moe_kernel(&self) -> String {
        let k = self.kernel();
        format!("moe_{}", k.strip_prefix("mv_").unwrap_or(k))
    }

    /// Whether the two kernels read the same input (one quantization serves both).
    fn same_input(&self, other: &Fast) -> bool {
        match (self, other) {
            (Fast::Q8x { quantizer: a, .. }, Fast::Q8x { quantizer: b, .. }) => a == b,
            (Fast::Half(..), Fast::Half(..)) => true,
            _ => false,
        }
    }

    /// The decode kernel for `ty`. Q4_0 and F16/BF16 were checked on an H100 against the
    /// CPU in session 7, the other types in session 10 (every product test passed; MXFP4,
    /// added later without a GPU, is held to the CPU by the same tests); with
    /// `older` (`FFAI_CUDA_OLDER_KERNELS=1`, for A/B timing) only the first three take them
    /// and the others `quant.cu`'s f32-activation kernels.
    fn for_matrix(ty: WeightType, cols: usize, older: bool, split: bool) -> Option<Fast> {
        let q8 = |kernel, kernel1, k: bool| {
            let (quantizer, block) = if k {
                ("quantize_q8x256", 256)
            } else {
                ("quantize_q8x32", 32)
            };
            cols.is_multiple_of(block).then_some(Fast::Q8x {
                kernel,
                kernel1,
                quantizer,
                block,
            })
        };
        match ty {
            WeightType::Q4_0 if split => q8("mv_q8x_q4_0s", "mv_q8x_q4_0s_n1", false),
            WeightType::Q8_0 if split => q8("mv_q8x_q8_0s", "mv_q8x_q8_0s_n1", false),
            WeightType::Q4_0 => q8("mv_q8x_q4_0", "mv_q8x_q4_0_n1", false),
            _ if older && !matches!(ty, WeightType::F16 | WeightType::BF16) => None,
            WeightType::Q4_1 => q8("mv_q8x_q4_1", "mv_q8x_q4_1_n1", false),
            WeightType::Q5_0 => q8("mv_q8x_q5_0", "mv_q8x_q5_0_n1", false),
            WeightType::Q5_1 => q8("mv_q8x_q5_1", "mv_q8x_q5_1_n1", false),
            WeightType::Q8_0 => q8("mv_q8x_q8_0", "mv_q8x_q8_0_n1", false),
            WeightType::MXFP4 => q8("mv_q8x_mxfp4", "mv_q8x_mxfp4_n1", false),
            WeightType::Q4K => q8("mv_q8x_q4_k", "mv_q8x_q4_k_n1", true),
            WeightType::Q6K => q8("mv_q8x_q6_k", "mv_q8x_q6_k_n1", true),
            WeightType::F16 if cols.is_multiple_of(8) => Some(Fast::Half("mv_half_f16", "mv_half_f16_n1")),
            WeightType::BF16 if cols.is_multiple_of(8) => Some(Fast::Half("mv_half_bf16", "mv_half_bf16_n1")),
            _ => None,
        }
    }
}

/// The names of a weight type's kernels in quant.cu.
struct MatKernels {
    matvec4: String,
    matvec: String,
    moe_matvec: String,
    dequant_bf16: String,
    embed: String,
}

impl MatKernels {
    fn new(ty: WeightType, split: bool) -> MatKernels {
        let tag = if split {
            quant::split_tag(ty)
        } else {
            quant::kernel_tag(ty)
        };
        MatKernels {
            matvec4: format!("matvec4_{tag}"),
            matvec: format!("matvec_{tag}"),
            moe_matvec: format!("moe_matvec_{tag}"),
            dequant_bf16: format!("dequant_bf16_{tag}"),
            embed: format!("embed_{tag}"),
        }
    }
}

/// One layer's K or V pool: f16, `[block][kv_head][offset][head_dim]`.
pub struct CudaKv {
    data: DevMem<u16>,
}

struct DevGroup {
    block_size: u32,
    n_blocks: u32,
    window: u32,
    slots: DevMem<u32>,
    seqs: DevMem<u32>,
    tables: DevMem<u32>,
    /// Most attention parts any row of the step has in this group (parts of the
    /// configured kernel's span; a power of two).
    max_spans: usize,
    /// The same for 32-position parts (`attn_dec_*`).
    max_parts32: usize,
}

/// A recorded step and the scratch generation it was recorded against.
struct Recorded {
    graph: CudaGraph,
    generation: u64,
}

/// The step's recordings, by key.
#[derive(Default)]
struct Graphs {
    recorded: HashMap<u64, Recorded>,
    /// Keys run once eagerly (the second run of a key is recorded: the first sizes the
    /// scratch buffers, so a capture never allocates).
    seen: std::collections::HashSet<u64>,
    /// The key being captured or replayed (between `begin_graph` and `end_graph`).
    current: Option<u64>,
}

// SAFETY: a `CudaGraph` holds raw driver handles that must not be used from two threads
// at once; `Graphs` lives inside a `CudaStep`, which the model only touches through
// `&mut` (one thread at a time), so its graphs are never used concurrently.
unsafe impl Send for Graphs {}
// SAFETY: as above: shared references to a step never reach the graphs (they are only
// used by `begin_graph`/`end_graph`, which take the step by `&mut`).
unsafe impl Sync for Graphs {}

/// A step's metadata in device memory (see [`StepLayout`]).
pub struct CudaStep {
    caps: StepCaps,
    /// Rows of the step written last; 0 when the last write was refused.
    n_rows: usize,
    /// The step's token ids (`write_step_tokens`).
    ids: DevMem<u32>,
    graphs: Graphs,
    positions: DevMem<u32>,
    row_seq: DevMem<u32>,
    groups: Vec<DevGroup>,
    host_row_seq: Vec<u32>,
    host_sort: Vec<u32>,
    host_seqs: Vec<u32>,
    /// Per sequence its recurrent-state slot, and how many sequences the step has and
    /// how many slots the layout named (the recurrent ops' grids and checks).
    state_slots: DevMem<u32>,
    n_seqs: usize,
    has_state_slots: bool,
    n_state_slots: usize,
    /// The prefill attention's blocks (`attn_prefill_*`: sequence, first row, rows; at
    /// most [`PF_ROWS`] rows of one sequence each) when the step takes it, and how many;
    /// 0 when it does not (see [`prefill_tiles`]).
    pf_tiles: DevMem<u32>,
    pf_n_tiles: usize,
    host_tiles: Vec<u32>,
}

/// The experts' matrix addresses a device table holds, and the table.
type ExpertTable = (Vec<u64>, DevMem<u64>);

/// Where `moe_group` (moe.cu) writes in the scratch's `moe_group` (u32 indices): the
/// tile count, per group (the experts, then the bad ids) its slots and its first sorted
/// index, the sorted slots, and the tile table (three u32 a tile).
struct MoeGroupLayout {
    n_tiles: usize,
    counts: usize,
    offsets: usize,
    sorted: usize,
    tiles: usize,
    /// The most tiles a step can have: each group's run of slots in tiles of
    /// [`MOE_TILE`], the last one of each possibly partial.
    max_tiles: usize,
    len: usize,
}

impl MoeGroupLayout {
    fn new(slots: usize, n_experts: usize) -> MoeGroupLayout {
        let groups = n_experts + 1;
        let max_tiles = slots.div_ceil(MOE_TILE) + groups;
        let (n_tiles, counts) = (0, 4);
        let offsets = counts + groups;
        let sorted = offsets + groups;
        let tiles = sorted + slots;
        MoeGroupLayout {
            n_tiles,
            counts,
            offsets,
            sorted,
            tiles,
            max_tiles,
            len: tiles + 3 * max_tiles,
        }
    }
}

/// A gathered MoE product's inputs besides the matrices (see `Backend::moe_matmuls`).
struct Gather {
    ids: u64,
    n_experts: usize,
    k: usize,
    per_slot: bool,
    slots: usize,
    x: u64,
    /// Activation rows: `slots` when per slot, else the tokens.
    x_rows: usize,
}

#[derive(Clone, Copy)]
enum Arg {
    U(u32),
    P(u64),
    F(f32),
    I(i32),
}

/// Scratch the products need, grown to the largest seen (never by untrusted sizes: by the
/// loaded matrices and allocated batches).
struct Scratch {
    /// A dequantized weight matrix (bf16).
    weight: DevMem<u16>,
    /// A widened f16 / bf16 weight matrix (f32), and row ids 0, 1, 2, ... to widen it
    /// with the embedding kernel.
    weight32: DevMem<f32>,
    iota: DevMem<u32>,
    /// Activations in bf16.
    acts: DevMem<u16>,
    /// Token ids of an embedding lookup.
    ids: DevMem<u32>,
    /// Attention parts and their (max, sum) pairs.
    part_o: DevMem<f32>,
    part_ml: DevMem<f32>,
    /// Per (row of a pass, KV head and chunk) the parts finished so far (attn_spans64's
    /// fused combine; zero between launches).
    attn_done: DevMem<u32>,
    /// Row argmax results.
    argmax: DevMem<u32>,
    /// The sampler's candidates (ids, value bits, f64 tails as u32 pairs) and the rows'
    /// inverse temperatures (`top_candidates_rows`).
    cands: DevMem<u32>,
    cand_inv_t: DevMem<f32>,
    /// The rows' allowed-token bitmasks (a grammar's), when a step has them: grown to the
    /// largest seen and kept, so a constrained step allocates nothing once sized.
    cand_mask: DevMem<u32>,
    /// Activations quantized to 8 bits (q8x.cu): levels, per-block scales and sums, in
    /// blocks of 32 (`xq` ...) and of 256 (`xq256` ...).
    xq: DevMem<u8>,
    xd: DevMem<f32>,
    xs: DevMem<u32>,
    xq256: DevMem<u8>,
    xd256: DevMem<f32>,
    xs256: DevMem<u32>,
    /// A step's slots grouped by expert (moe.cu `moe_group`, see `MoeGroupLayout`).
    moe_group: DevMem<u32>,
}

/// The scratch's 8-bit sets hold the quantization of the `len` floats at `ptr` (written
/// by the op that produced them, q8x.cu's `norm_q8` / `glu_q8`): in blocks of 32, and
/// of 256 too when `q256`. Forgotten at the next launch of anything but a decode
/// product, and at every copy into device memory or cuBLAS call.
#[derive(Clone, Copy)]
struct PreQuant {
    ptr: u64,
    len: usize,
    q256: bool,
}

/// Kernels that leave the 8-bit sets of the last producer standing (see `PreQuant`;
/// only with `FFAI_CUDA_KEEP_SETS=1` for now)
/// because they write only what their caller checks with `forget_prequant_if_written`:
/// a MoE router's product (f32, one row), its bias and the routing between a norm and the
/// experts that read the norm's 8-bit sets (a separate quantization a layer otherwise).
const KEEPS_PREQUANT: &[&str] = &["matvec_f32", "matvec4_f32", "moe_route", "add_bias"];

/// The most floats an op quantizes beside its output (decode batches; prefill products
/// take the GEMM path and need no 8-bit activations).
const PREQUANT_MAX: usize = 1 << 20;

/// The widest row `norm_q8` takes (`NORM_PER` elements for each of 1024 threads); wider
/// rows take `rms_norm`.
const NORM_Q8_MAX_WIDTH: usize = 8 * 1024;
/// Threads of a `norm_q8_cl` block (`NORM_CL_THREADS` in q8x.cu).
const NORM_CL_THREADS: usize = 128;

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: HashMap<String, CudaFunction>,
    device_name: String,
    ordinal: usize,
    error: Mutex<Option<String>>,
    scratch: Mutex<Scratch>,
    /// Device tables of expert matrices' addresses for the gathered MoE products, keyed
    /// by the first expert's address: the addresses they hold (checked at every use) and
    /// the table. Built on an eager run, never during a capture.
    moe_tables: Mutex<HashMap<u64, ExpertTable>>,
    /// Largest weight matrix loaded (elements): the size of the dequantization scratch.
    max_mat_elems: Mutex<usize>,
    /// Bumped whenever a scratch buffer is reallocated: recordings that point into the
    /// old one are dropped.
    generation: AtomicU64,
    /// A stream capture is under way: nothing may allocate or copy from the host.
    capturing: AtomicBool,
    /// Something was not capturable during the capture under way.
    capture_broken: AtomicBool,
    /// Record and replay steps as graphs (on unless `FFAI_CUDA_GRAPHS=0`).
    graphs: AtomicBool,
    /// Per-launch timing (`--profile`): (kernel, start, end) events, read by
    /// [`CudaBackend::take_profile`]. Steps then run eagerly (no graphs).
    profile: Option<Mutex<Vec<(String, CudaEvent, CudaEvent)>>>,
    /// Run the first-generation kernels (`FFAI_CUDA_OLDER_KERNELS=1`, kept for A/B timing):
    /// `quant.cu`'s f32-activation decode kernels for the types other than Q4_0 / F16 /
    /// BF16 (`Fast::for_matrix`), 256-position attention parts, separate RoPE / K/V-write
    /// and add / RMSNorm launches, F16 GEMMs widened to bf16. Off (the default since every
    /// newer kernel passed its GPU test and the parity fixtures on an H100 in session 10),
    /// the q8 decode kernels of every type, 64-position parts, the fused
    /// `rope_kv_write_step` / `add_rms_norm` and F16 GEMMs on f16 tensor cores.
    older: bool,
    /// What the 8-bit activation scratch holds, when an op wrote it beside its output.
    prequant: Mutex<Option<PreQuant>>,
    /// The host side of `top_candidates_rows`' copy back, kept between steps.
    cand_host: Mutex<Vec<u32>>,
    /// The attention kernel of non-`older` steps (`FFAI_CUDA_ATTN`).
    attn: AttnKernel,
    /// Kernels not launched at all (`FFAI_CUDA_SKIP_KERNELS`, comma-separated names): a
    /// measuring tool. A step's time without a kernel, against its time with it, is what
    /// that kernel costs inside a replayed graph (with the overlap programmatic launch
    /// gives), which per-kernel events and Nsight Compute's serialized runs do not show.
    /// The outputs are wrong then; never set outside such a measurement.
    skip: Vec<String>,
    /// Norms over a cluster of blocks a row (`norm_q8_cl`) where the width splits into 2,
    /// 4 or 8 slices of whole 256-element blocks of at most 1024 (compute capability 9.0,
    /// `FFAI_CUDA_NORM=cl`); otherwise `norm_q8`'s block a row. Passed the norm tests on
    /// an H100 (session 13), where it took the 8B Q4_0's decode from 283 to 295 tok/s;
    /// with session 16's kernels around it the block a row is faster on an H100: decode
    /// after 64 positions 347.0 -> 355.3 tok/s (8B Q4_0), 647.3 -> 685.1 (Qwen3-30B-A3B
    /// shape, 16 layers, Q4_K), 594.4 -> 600.8 (gpt-oss-20b shape, 12 layers), so the
    /// cluster form is opt-in.
    norm_cl: bool,
    /// `attn_dec` writes its output's 8-bit sets for the next decode product (one pass
    /// over the step's rows; `FFAI_CUDA_ATTN_Q8=1`). Correct on an H100 (the product
    /// after it equals the product on a copy, bit for bit; session 13) but no faster
    /// there (4-layer 8B-shaped Q4_0: 1535 / 1535 tok/s off, 1545 / 1533 on): the
    /// quantization it saves moves onto the attention's own chain. Off by default.
    attn_q8: bool,
    /// `moe_route` picks experts from keys in registers, one butterfly a pick
    /// (`FFAI_CUDA_ROUTE_REGS=1`; otherwise a pass over shared memory a pick). Written in
    /// session 16 after the device time ran out: compiled, not yet run on a GPU, so
    /// opt-in until `cuda_backend`'s routing test passes with it.
    route_regs: bool,
    /// The [`KEEPS_PREQUANT`] kernels leave the 8-bit sets standing
    /// (`FFAI_CUDA_KEEP_SETS=1`), so a MoE layer's experts read its norm's sets instead of
    /// quantizing again. Session 16, not yet run on a GPU (`cuda_backend`'s
    /// `moe_experts_after_the_router_read_the_right_sets` checks it): opt-in.
    keep_sets: bool,
    /// Steps of prompts (see [`prefill_tiles`]) run their attention on the tensor cores
    /// (`attn_prefill_h64/h128`) unless `FFAI_CUDA_ATTN_TC=0` or
    /// [`CudaBackend::set_attn_tc`] turns it off.
    attn_tc: AtomicBool,
    /// The most activation rows a product runs on the int8 tensor cores (q8x.cu's `mmq_*`,
    /// from [`GEMM_MIN_ROWS`]; [`MMQ_DEFAULT_MAX_ROWS`] unless `FFAI_CUDA_MMQ_MAX` sets it);
    /// above it, or with `FFAI_CUDA_MMQ=0`, cuBLAS on a bf16 copy of the weights.
    mmq_max: usize,
    /// Launch kernels with programmatic dependent launch (compute capability 9.0 and up;
    /// `FFAI_CUDA_PDL=0` turns it off): see `launch_pdl` and prelude.cuh.
    pdl: bool,
    /// Q4_0 / Q8_0 matrices whose rows are whole 256-element runs are uploaded in the split
    /// row layout (`quant::split_rows`: a row's levels, then its scales), which the decode
    /// products read with aligned 16-byte loads; every kernel that reads such a matrix
    /// has a split variant (`*_q4_0s`, `*_q8_0s`) giving the same bits.
    /// `FFAI_CUDA_SPLIT=0` (or the older kernels) keeps the stored layout.
    split: bool,
    /// The split layouts' tensor-core products stage both operands through shared memory
    /// (`mmqs_*`; `FFAI_CUDA_MMQ_STAGED=0` takes the unstaged `mmq_*s`): on an H100, 64
    /// sequences of the 8B Q4_0 decode at 4068 tok/s staged, 2313 unstaged (session 14).
    mmq_staged: bool,
    /// Q4_K's tensor-core products staged the same way (`mmqs_q4_k`) unless
    /// `FFAI_CUDA_MMQ_STAGED_K=0`: on an H100, 64 sequences of the 8B Q4_K_M decode at
    /// 3331 tok/s staged, 2337 unstaged (session 15).
    mmq_staged_k: bool,
    /// MoE steps of `moe_group_min_rows` rows or more (and every prefill-sized one) of the
    /// types with an int8 tensor-core product are grouped by expert on the device
    /// (`moe_grouped`); `FFAI_CUDA_MOE_GROUPED=0` (or
    /// [`CudaBackend::set_moe_grouped`]) keeps the host grouping, for A/B timing. Needs
    /// the tensor-core products (`mmq_max` > 0: compute capability 8.0, not the older
    /// kernels, `FFAI_CUDA_MMQ` not 0).
    moe_grouped: AtomicBool,
    /// Fewest token rows of a step whose MoE products are grouped rather than gathered
    /// (`FFAI_CUDA_MOE_GROUP_MIN`, default [`MOE_GROUP_MIN_ROWS`]; steps past
    /// [`MOE_GATHER_MAX_ROWS`] are grouped whatever it says).
    moe_group_min_rows: usize,
}

fn grid1(n: usize, block: usize) -> (u32, u32, u32) {
    (n.div_ceil(block).max(1) as u32, 1, 1)
}

impl CudaBackend {
    /// A backend on GPU `ordinal`: context, stream, cuBLAS and every kernel compiled.
    /// Errors say what is missing (driver, GPU, NVRTC, cuBLAS) or what failed.
    pub fn new(ordinal: usize) -> Result<CudaBackend, String> {
        Self::with_options(ordinal, false)
    }

    /// As [`new`](Self::new); `profile`: time every kernel with CUDA events (see
    /// [`take_profile`](Self::take_profile)).
    pub fn with_options(ordinal: usize, profile: bool) -> Result<CudaBackend, String> {
        let count = super::device_count()?;
        if ordinal >= count {
            return Err(format!(
                "there is no CUDA device {ordinal}: this machine has {count} (cuda:0..cuda:{})",
                count - 1
            ));
        }
        // SAFETY: only tries to open the library by its candidate names.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err("cuBLAS (libcublas.so.13) was not found: install the CUDA toolkit or the nvidia-cublas wheel and put its library folder on LD_LIBRARY_PATH".into());
        }
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| "the CUDA driver failed to create a context (panic in the binding)".to_string())?
            .map_err(|e| format!("cannot create a CUDA context on device {ordinal}: {e}"))?;
        // One stream: ordering is the stream's, no per-buffer events needed.
        // SAFETY: no buffer has been created on this context yet.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| format!("cannot read the GPU's compute capability: {e}"))?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let stream = ctx
            .new_stream()
            .map_err(|e| format!("cannot create a CUDA stream: {e}"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cannot start cuBLAS: {e}"))?;
        let mut kernels = HashMap::new();
        for (name, src, names) in super::all_sources() {
            let ptx = super::load_ptx(&name, &src, major, minor)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(|e| format!("loading the {name} kernels on the GPU: {e}"))?;
            for k in names {
                let f = module
                    .load_function(&k)
                    .map_err(|e| format!("kernel {k} of {name}: {e}"))?;
                kernels.insert(k, f);
            }
        }
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            kernels,
            device_name,
            ordinal,
            error: Mutex::new(None),
            scratch: Mutex::new(Scratch {
                weight: DevMem::empty(),
                weight32: DevMem::empty(),
                iota: DevMem::empty(),
                acts: DevMem::empty(),
                ids: DevMem::empty(),
                part_o: DevMem::empty(),
                part_ml: DevMem::empty(),
                attn_done: DevMem::empty(),
                argmax: DevMem::empty(),
                cands: DevMem::empty(),
                cand_inv_t: DevMem::empty(),
                cand_mask: DevMem::empty(),
                xq: DevMem::empty(),
                xd: DevMem::empty(),
                xs: DevMem::empty(),
                xq256: DevMem::empty(),
                xd256: DevMem::empty(),
                xs256: DevMem::empty(),
                moe_group: DevMem::empty(),
            }),
            prequant: Mutex::new(None),
            cand_host: Mutex::new(Vec::new()),
            moe_tables: Mutex::new(HashMap::new()),
            max_mat_elems: Mutex::new(0),
            generation: AtomicU64::new(0),
            capturing: AtomicBool::new(false),
            capture_broken: AtomicBool::new(false),
            graphs: AtomicBool::new(std::env::var_os("FFAI_CUDA_GRAPHS").is_none_or(|v| v != "0")),
            profile: profile.then(|| Mutex::new(Vec::new())),
            older: std::env::var_os("FFAI_CUDA_OLDER_KERNELS").is_some_and(|v| v == "1"),
            attn: match std::env::var("FFAI_CUDA_ATTN").as_deref() {
                Ok("64") => AttnKernel::Spans64,
                _ => AttnKernel::Dec,
            },
            norm_cl: std::env::var_os("FFAI_CUDA_NORM").is_some_and(|v| v == "cl") && major >= 9,
            attn_q8: std::env::var_os("FFAI_CUDA_ATTN_Q8").is_some_and(|v| v == "1"),
            route_regs: std::env::var_os("FFAI_CUDA_ROUTE_REGS").is_some_and(|v| v == "1"),
            keep_sets: std::env::var_os("FFAI_CUDA_KEEP_SETS").is_some_and(|v| v == "1"),
            attn_tc: AtomicBool::new(std::env::var_os("FFAI_CUDA_ATTN_TC").is_none_or(|v| v != "0")),
            skip: std::env::var("FFAI_CUDA_SKIP_KERNELS")
                .map(|v| v.split(',').filter(|s| !s.is_empty()).map(String::from).collect())
                .unwrap_or_default(),
            mmq_max: if std::env::var_os("FFAI_CUDA_MMQ").is_some_and(|v| v == "0")
                || std::env::var_os("FFAI_CUDA_OLDER_KERNELS").is_some_and(|v| v == "1")
                || major < 8
            {
                0
            } else {
                std::env::var("FFAI_CUDA_MMQ_MAX")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(MMQ_DEFAULT_MAX_ROWS)
            },
            pdl: major >= 9 && std::env::var_os("FFAI_CUDA_PDL").is_none_or(|v| v != "0"),
            split: std::env::var_os("FFAI_CUDA_SPLIT").is_none_or(|v| v != "0")
                && std::env::var_os("FFAI_CUDA_OLDER_KERNELS").is_none_or(|v| v != "1"),
            mmq_staged: std::env::var_os("FFAI_CUDA_MMQ_STAGED").is_none_or(|v| v != "0"),
            mmq_staged_k: std::env::var_os("FFAI_CUDA_MMQ_STAGED_K").is_none_or(|v| v != "0"),
            moe_grouped: AtomicBool::new(std::env::var_os("FFAI_CUDA_MOE_GROUPED").is_none_or(|v| v != "0")),
            moe_group_min_rows: std::env::var("FFAI_CUDA_MOE_GROUP_MIN")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(MOE_GROUP_MIN_ROWS),
        })
    }

    /// Turns step recording (CUDA graphs) on or off; off, every step is enqueued op by
    /// op (the reference a recording must reproduce bit for bit).
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on, Ordering::Relaxed);
    }

    /// Turns the device grouping of MoE steps on or off (the initial state is
    /// `FFAI_CUDA_MOE_GROUPED`'s); off, decode-sized steps are gathered and prefill-sized
    /// ones take the host grouping (`backend::host_moe`).
    /// On takes effect only where the int8 tensor-core products run (see `moe_grouped`).
    pub fn set_moe_grouped(&self, on: bool) {
        self.moe_grouped.store(on, Ordering::Relaxed);
    }

    /// Turns the prompts' tensor-core attention (`attn_prefill_*`) on or off (the default
    /// is on unless `FFAI_CUDA_ATTN_TC=0`); off, every step takes `attn_dec`.
    pub fn set_attn_tc(&self, on: bool) {
        self.attn_tc.store(on, Ordering::Relaxed);
    }

    /// (free, total) bytes of device memory now.
    pub fn mem_info(&self) -> Result<(usize, usize), String> {
        self.ctx
            .mem_get_info()
            .map_err(|e| format!("cannot read the GPU's memory: {e}"))
    }

    fn failed(&self) -> bool {
        self.error.lock().map(|e| e.is_some()).unwrap_or(true)
    }

    fn fail(&self, msg: String) {
        if let Ok(mut e) = self.error.lock() {
            if e.is_none() {
                *e = Some(msg);
            }
        }
    }

    /// The 8-bit activation scratch no longer matches any buffer (see [`PreQuant`]).
    fn forget_prequant(&self) {
        if let Ok(mut p) = self.prequant.lock() {
            *p = None;
        }
    }

    /// Forgets the 8-bit sets when `bytes` at `ptr` overlap the buffer they were made
    /// from: what the callers of the [`KEEPS_PREQUANT`] kernels do for what they write.
    fn forget_prequant_if_written(&self, ptr: u64, bytes: usize) {
        if !self.keep_sets {
            return; // those kernels' launches forget the sets anyway
        }
        if let Ok(mut p) = self.prequant.lock() {
            if p.is_some_and(|q| ptr < q.ptr + 4 * q.len as u64 && q.ptr < ptr + bytes as u64) {
                *p = None;
            }
        }
    }

    /// Runs `norm_q8` / `glu_q8` (`kernel`, with `args` before the 8-bit sets) writing
    /// `len` floats at `out`, and with them their 8-bit sets when `len` is a decode
    /// batch's and a multiple of 32; remembers that the scratch holds them.
    /// `row` is the width the kernel quantizes within (a norm's row; the whole length for
    /// the element-wise `glu_q8`): 32-blocks need it a multiple of 32, 256-blocks of 256.
    #[allow(clippy::too_many_arguments)]
    fn launch_q8_producer(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
        out: u64,
        len: usize,
        row: usize,
    ) {
        self.launch_q8_producer_cluster(kernel, grid, block, 1, args, out, len, row, false);
    }

    /// [`Self::launch_q8_producer`] in clusters of `cluster` blocks along x; `only32`: the
    /// kernel writes the 32-element sets only (never the 256-element ones).
    #[allow(clippy::too_many_arguments)]
    fn launch_q8_producer_cluster(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: u32,
        cluster: u32,
        args: &[Arg],
        out: u64,
        len: usize,
        row: usize,
        only32: bool,
    ) {
        let quant = len <= PREQUANT_MAX && row.is_multiple_of(32);
        let q256 = quant && !only32 && row.is_multiple_of(256);
        let mut all = args.to_vec();
        let Ok(mut sc) = self.scratch.lock() else { return };
        if quant {
            self.grow(&mut sc.xq, len);
            self.grow(&mut sc.xd, len / 32);
            self.grow(&mut sc.xs, len / 32);
            if q256 {
                self.grow(&mut sc.xq256, len);
                self.grow(&mut sc.xd256, len / 256);
                self.grow(&mut sc.xs256, len / 32);
            }
        }
        let ok = quant
            && sc.xq.len >= len
            && sc.xd.len >= len / 32
            && sc.xs.len >= len / 32
            && (!q256 || (sc.xq256.len >= len && sc.xd256.len >= len / 256 && sc.xs256.len >= len / 32));
        all.push(Arg::U(ok as u32));
        for p in [sc.xq.ptr, sc.xd.ptr, sc.xs.ptr] {
            all.push(Arg::P(if ok { p } else { 0 }));
        }
        for p in [sc.xq256.ptr, sc.xd256.ptr, sc.xs256.ptr] {
            all.push(Arg::P(if ok && q256 { p } else { 0 }));
        }
        self.launch_cluster(kernel, grid, block, cluster, &all);
        drop(sc);
        if ok && !self.failed() {
            if let Ok(mut p) = self.prequant.lock() {
                *p = Some(PreQuant { ptr: out, len, q256 });
            }
        }
    }

    /// `out = rmsnorm(x (+ y when y != 0, stored back into x)) * w` over `n` rows (q8x.cu's
    /// `norm_q8`), with the 8-bit forms of `out` for the decode products.
    fn norm_q8(&self, x: u64, y: u64, w: &CudaBuf, eps: f32, n: usize, out: &mut CudaBuf) {
        let width = w.len;
        // The cluster form: the fewest blocks a row whose slices are whole 256-element
        // blocks of at most NORM_CL_THREADS * 8 elements.
        let cluster = [2usize, 4, 8]
            .into_iter()
            .find(|&cl| width.is_multiple_of(cl * 256) && width / cl <= NORM_CL_THREADS * 8)
            .filter(|_| self.norm_cl && n <= u16::MAX as usize);
        // Both kernels take the same arguments.
        let (kernel, grid, threads, cl) = match cluster {
            Some(cl) => (
                "norm_q8_cl",
                (cl as u32, n as u32, 1),
                NORM_CL_THREADS as u32,
                cl as u32,
            ),
            None => ("norm_q8", (n as u32, 1, 1), norm_threads(width), 1),
        };
        self.launch_q8_producer_cluster(
            kernel,
            grid,
            threads,
            cl,
            &[
                Arg::P(x),
                Arg::P(y),
                Arg::P(w.ptr),
                Arg::F(eps),
                Arg::U(width as u32),
                Arg::U((y != 0) as u32),
                Arg::P(out.ptr),
            ],
            out.ptr,
            n * width,
            width,
            false,
        );
    }

    /// `gate = act(gate) * up` (act 0: SiLU, 1: tanh GELU; q8x.cu's `glu_q8`), with the
    /// result's 8-bit forms for the decode products.
    fn glu_q8(&self, gate: &mut CudaBuf, up: &CudaBuf, len: usize, act: u32) {
        assert!(len <= gate.len && len <= up.len && len <= u32::MAX as usize);
        if len == 0 {
            return;
        }
        self.launch_q8_producer(
            "glu_q8",
            grid1(len, 256),
            256,
            &[Arg::P(gate.ptr), Arg::P(up.ptr), Arg::U(len as u32), Arg::U(act)],
            gate.ptr,
            len,
            len,
        );
    }

    fn dev_alloc<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> DevMem<T> {
        self.forget_prequant();
        if self.failed() {
            return DevMem::empty();
        }
        match self.stream.alloc_zeros::<T>(len.max(1)) {
            Ok(mem) => {
                let ptr = {
                    let (ptr, _sync) = mem.device_ptr(&self.stream);
                    ptr
                };
                DevMem {
                    ptr,
                    len,
                    mem: Some(mem),
                }
            }
            Err(e) => {
                let bytes = len * std::mem::size_of::<T>();
                self.fail(format!(
                    "the GPU could not allocate {:.2} GiB ({e}); free: {}",
                    bytes as f64 / (1u64 << 30) as f64,
                    self.mem_info()
                        .map(|(f, _)| format!("{:.2} GiB", f as f64 / (1u64 << 30) as f64))
                        .unwrap_or_else(|e| e)
                ));
                DevMem::empty()
            }
        }
    }

    fn dev_upload<T: DeviceRepr + ValidAsZeroBits>(&self, data: &[T]) -> DevMem<T> {
        let mut m = self.dev_alloc::<T>(data.len());
        if let Some(mem) = m.mem.as_mut() {
            if data.is_empty() {
                return m;
            }
            if let Err(e) = self.stream.memcpy_htod(data, &mut mem.slice_mut(..data.len())) {
                self.fail(format!("copy to the GPU failed: {e}"));
                return DevMem::empty();
            }
        }
        m
    }

    /// `dst[..src.len()] = src` (dst allocated for at least that many).
    fn write<T: DeviceRepr>(&self, src: &[T], dst: &mut DevMem<T>) {
        self.forget_prequant();
        if self.failed() || src.is_empty() {
            return;
        }
        if self.capturing.load(Ordering::Relaxed) {
            self.capture_broken.store(true, Ordering::Relaxed);
            return;
        }
        let Some(mem) = dst.mem.as_mut() else { return };
        if let Err(e) = self.stream.memcpy_htod(src, &mut mem.slice_mut(..src.len())) {
            self.fail(format!("copy to the GPU failed: {e}"));
        }
    }

    fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg]) {
        self.launch_cluster(name, grid, block, 1, args);
    }

    /// [`Self::launch`] with clusters of `cluster` blocks along x (1: none; more needs
    /// compute capability 9.0, and goes through `cuLaunchKernelEx` even without PDL).
    fn launch_cluster(&self, name: &str, grid: (u32, u32, u32), block: u32, cluster: u32, args: &[Arg]) {
        if self.failed() {
            return;
        }
        let Some(f) = self.kernels.get(name) else {
            self.fail(format!("no CUDA kernel named {name}"));
            return;
        };
        // (`moe_group` writes only its own scratch: a grouped product after it may still
        // read the 8-bit sets of its input.)
        let keeps = name.starts_with("mv_q8x_")
            || name.starts_with("mmq_")
            || name == "moe_group"
            || (self.keep_sets && KEEPS_PREQUANT.contains(&name));
        if !keeps {
            self.forget_prequant();
        }
        if self.skip.iter().any(|s| s == name) {
            return;
        }
        let start = self.profile_event();
        if self.pdl || cluster > 1 {
            self.launch_pdl(name, f, grid, block, cluster, args);
            self.profile_record(name, start);
            return;
        }
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::U(v) => b.arg(v),
                Arg::P(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every kernel's arguments are listed at its call site in the order and
        // types of its signature in the .cu source (u32 = unsigned int, u64 = a device
        // address or unsigned long long, f32 = float, i32 = int), and every address is of
        // a live allocation at least as large as the launch's indices reach (the callers
        // check the sizes against the buffers' lengths).
        if let Err(e) = unsafe { b.launch(cfg) } {
            self.fail(format!("CUDA kernel {name} failed to launch: {e}"));
        }
        self.profile_record(name, start);
    }

    /// `launch` with programmatic dependent launch allowed (prelude.cuh: every kernel
    /// waits for its predecessor at entry, so only launching and start-up overlap).
    /// cudarc's launch builder has no launch attributes, hence the driver call.
    fn launch_pdl(&self, name: &str, f: &CudaFunction, grid: (u32, u32, u32), block: u32, cluster: u32, args: &[Arg]) {
        use cudarc::driver::sys;
        if let Err(e) = self.stream.context().bind_to_thread() {
            self.fail(format!("CUDA kernel {name}: cannot bind the context: {e}"));
            return;
        }
        let mut params: Vec<*mut std::ffi::c_void> = args
            .iter()
            .map(|a| match a {
                Arg::U(v) => v as *const u32 as *mut std::ffi::c_void,
                Arg::P(v) => v as *const u64 as *mut std::ffi::c_void,
                Arg::F(v) => v as *const f32 as *mut std::ffi::c_void,
                Arg::I(v) => v as *const i32 as *mut std::ffi::c_void,
            })
            .collect();
        // SAFETY: the attribute unions are plain data; zeroed then their fields set.
        let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
        let mut n_attrs = 0;
        if self.pdl {
            attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[n_attrs].value.programmaticStreamSerializationAllowed = 1;
            n_attrs += 1;
        }
        if cluster > 1 {
            attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attrs[n_attrs].value.clusterDim.x = cluster;
            attrs[n_attrs].value.clusterDim.y = 1;
            attrs[n_attrs].value.clusterDim.z = 1;
            n_attrs += 1;
        }
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: 0,
            hStream: self.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: n_attrs as u32,
        };
        // SAFETY: as in `launch` for the arguments (each `params` entry points at an
        // argument value in `args`, alive for the call, of the type the kernel's
        // signature has at that position); `cfg` and `attrs` live on this frame, the
        // function belongs to this context and the stream to this backend.
        let r = unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            self.fail(format!("CUDA kernel {name} failed to launch: {r:?}"));
        }
    }

    /// With profiling on, an event recorded now (the start of a timed op).
    fn profile_event(&self) -> Option<CudaEvent> {
        self.profile.as_ref()?;
        self.stream
            .record_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ok()
    }

    /// With profiling on, closes the op `name` that began at `start`.
    fn profile_record(&self, name: &str, start: Option<CudaEvent>) {
        let (Some(p), Some(start)) = (self.profile.as_ref(), start) else {
            return;
        };
        if let (Some(end), Ok(mut v)) = (self.profile_event(), p.lock()) {
            v.push((name.to_string(), start, end));
        }
    }

    /// Per-kernel (name, seconds, launches) since the last call, slowest first (empty
    /// unless profiling). Waits for the GPU.
    pub fn take_profile(&self) -> Vec<(String, f64, u64)> {
        let Some(p) = self.profile.as_ref() else {
            return Vec::new();
        };
        let _ = self.stream.synchronize();
        let Ok(mut v) = p.lock() else { return Vec::new() };
        let mut by: HashMap<String, (f64, u64)> = HashMap::new();
        for (name, a, b) in v.drain(..) {
            let ms = a.elapsed_ms(&b).unwrap_or(0.0) as f64;
            let e = by.entry(name).or_default();
            e.0 += ms / 1e3;
            e.1 += 1;
        }
        let mut out: Vec<(String, f64, u64)> = by.into_iter().map(|(k, (s, c))| (k, s, c)).collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }

    /// Grows a scratch buffer to `len` elements (never shrinks).
    fn grow<T: DeviceRepr + ValidAsZeroBits>(&self, slot: &mut DevMem<T>, len: usize) {
        if slot.len < len {
            if self.capturing.load(Ordering::Relaxed) {
                // Not during a capture: the step runs eagerly instead (and grows then).
                self.capture_broken.store(true, Ordering::Relaxed);
                return;
            }
            self.generation.fetch_add(1, Ordering::Relaxed);
            *slot = DevMem::empty();
            *slot = self.dev_alloc(len);
        }
    }

    fn elementwise(&self, name: &str, len: usize, args: &[Arg]) {
        if len == 0 {
            return;
        }
        self.launch(name, grid1(len, 256), 256, args);
    }

    /// `out[n, rows] = x[n, cols] · Wᵀ` (the buffers checked by the caller).
    fn product(&self, w: &CudaMat, x: u64, n: usize, out: u64) {
        self.forget_prequant_if_written(out, 4 * n * w.rows);
        if self.fast_products(&[(w, out)], x, n) {
            return;
        }
        // A small f32 matrix (a MoE router: 128 x 2048 is 8 blocks of matvec4) takes a
        // row a warp instead, four times the warps in flight (the same bits per row).
        if n == 1 && !(w.ty == WeightType::F32 && w.rows < MATVEC4_MIN_F32_ROWS) {
            // Four rows per warp: x read once for four rows (same bits per row).
            let (rows, cols) = (w.rows, w.cols);
            self.launch(
                &w.kernels.matvec4,
                grid1(rows, (quant::MATVEC4_ROWS * quant::MATVEC_ROWS_PER_BLOCK) as usize),
                quant::MATVEC_BLOCK,
                &[
                    Arg::P(w.data.ptr),
                    Arg::P(w.row_bytes as u64),
                    Arg::P(x),
                    Arg::P(out),
                    Arg::U(rows as u32),
                    Arg::U(cols as u32),
                ],
            );
            return;
        }
        if n < GEMM_MIN_ROWS {
            let (rows, cols) = (w.rows, w.cols);
            for t0 in (0..n).step_by(quant::MATVEC_MAX_N) {
                let m = quant::MATVEC_MAX_N.min(n - t0);
                self.launch(
                    &w.kernels.matvec,
                    quant::matvec_grid(rows as u32),
                    quant::MATVEC_BLOCK,
                    &[
                        Arg::P(w.data.ptr),
                        Arg::P(w.row_bytes as u64),
                        Arg::P(x + (t0 * cols * 4) as u64),
                        Arg::P(out + (t0 * rows * 4) as u64),
                        Arg::U(rows as u32),
                        Arg::U(cols as u32),
                        Arg::U(m as u32),
                    ],
                );
            }
            return;
        }
        if self.mmq_products(&[(w, out)], x, n).is_empty() {
            return;
        }
        self.gemm(w, x, n, out);
    }

    /// x (`[n][cols]`) quantized to 8 bits in blocks of `block` (32 or 256: q8x.cu's
    /// `quantize_q8x32` / `quantize_q8x256`) in the scratch's set of that length, launched
    /// now unless the op that wrote x wrote that set already (`PreQuant`). The set's
    /// (levels, scales, sums) addresses; None when the scratch could not grow (the error
    /// is kept).
    fn quantize_acts(&self, sc: &mut Scratch, x: u64, n: usize, cols: usize, block: usize) -> Option<(u64, u64, u64)> {
        let (nb, nd) = (cols / 32, cols / block);
        let pre = self.prequant.lock().ok().and_then(|p| *p);
        let ready = pre.is_some_and(|p| p.ptr == x && p.len == n * cols && (block == 32 || p.q256));
        let big = block == 256;
        if !ready {
            if big {
                self.grow(&mut sc.xq256, n * cols);
                self.grow(&mut sc.xd256, n * nd);
                self.grow(&mut sc.xs256, n * nb);
            } else {
                self.grow(&mut sc.xq, n * cols);
                self.grow(&mut sc.xd, n * nd);
                self.grow(&mut sc.xs, n * nb);
            }
        }
        let (xq, xd, xs) = if big {
            (&sc.xq256, &sc.xd256, &sc.xs256)
        } else {
            (&sc.xq, &sc.xd, &sc.xs)
        };
        if self.failed() || xq.len < n * cols || xd.len < n * nd || xs.len < n * nb {
            return None;
        }
        let ptrs = (xq.ptr, xd.ptr, xs.ptr);
        if !ready {
            self.launch(
                if big { "quantize_q8x256" } else { "quantize_q8x32" },
                (cols.div_ceil(256) as u32, n as u32, 1),
                256,
                &[
                    Arg::P(x),
                    Arg::P(ptrs.0),
                    Arg::P(ptrs.1),
                    Arg::P(ptrs.2),
                    Arg::U(cols as u32),
                ],
            );
        }
        Some(ptrs)
    }

    /// Products of [`GEMM_MIN_ROWS`] to `mmq_max` activation rows on the int8 tensor
    /// cores (q8x.cu's `mmq_*`: the stored blocks' levels against x quantized once per
    /// block length, as the decode kernels quantize it); returns the parts it could not
    /// take (types without such a kernel, or other row counts), untouched.
    fn mmq_products<'a>(&self, parts: &[(&'a CudaMat, u64)], x: u64, n: usize) -> Vec<(&'a CudaMat, u64)> {
        if n < GEMM_MIN_ROWS || n > self.mmq_max || n > u32::MAX as usize {
            return parts.to_vec();
        }
        let (mine, rest): (Vec<_>, Vec<_>) = parts.iter().partition(|(w, _)| {
            mmq_kernel(w.ty, w.split, self.mmq_staged, self.mmq_staged_k)
                .is_some_and(|(_, block, _)| w.cols.is_multiple_of(block) && w.cols == parts[0].0.cols)
        });
        if mine.is_empty() {
            return rest;
        }
        let cols = mine[0].0.cols;
        let Ok(mut sc) = self.scratch.lock() else {
            return Vec::new();
        };
        // Quantize x once per block length the parts need (unless the op that wrote x
        // wrote its 8-bit sets too), then launch every part.
        for block in [32usize, 256] {
            if !mine.iter().any(|(w, _)| {
                mmq_kernel(w.ty, w.split, self.mmq_staged, self.mmq_staged_k).is_some_and(|(_, b, _)| b == block)
            }) {
                continue;
            }
            let Some((xq, xd, xs)) = self.quantize_acts(&mut sc, x, n, cols, block) else {
                return Vec::new();
            };
            for (w, out) in &mine {
                let Some((kernel, b, rows_per_block)) = mmq_kernel(w.ty, w.split, self.mmq_staged, self.mmq_staged_k)
                else {
                    continue;
                };
                if b != block {
                    continue;
                }
                self.launch(
                    kernel,
                    (n.div_ceil(MMQ_TOK) as u32, w.rows.div_ceil(rows_per_block) as u32, 1),
                    MMQ_THREADS,
                    &[
                        Arg::P(w.data.ptr),
                        Arg::P(w.row_bytes as u64),
                        Arg::P(xq),
                        Arg::P(xd),
                        Arg::P(xs),
                        Arg::P(*out),
                        Arg::U(w.rows as u32),
                        Arg::U(cols as u32),
                        Arg::U(n as u32),
                    ],
                );
            }
        }
        rest
    }

    /// The decode products (n < [`GEMM_MIN_ROWS`]) of matrices over the same x with
    /// q8x.cu's kernels: the legacy types, MXFP4, Q4_K / Q6_K against activations quantized once
    /// to 8 bits (the CPU's q8 scheme, per activation row, so a row's result does not
    /// depend on n), F16 / BF16 with 128-bit loads; consecutive matrices of one type
    /// share a launch (up to three). False (nothing done) when the matrices have no such
    /// kernel or take different inputs.
    fn fast_products(&self, parts: &[(&CudaMat, u64)], x: u64, n: usize) -> bool {
        let Some((first, _)) = parts.first() else { return true };
        let (Some(f0), cols) = (first.fast, first.cols) else {
            return false;
        };
        if n >= GEMM_MIN_ROWS
            || parts
                .iter()
                .any(|(w, _)| w.cols != cols || !w.fast.is_some_and(|f| f.same_input(&f0)))
        {
            return false;
        }
        let mut sc_guard = None;
        let acts = match f0 {
            Fast::Q8x { block, .. } => {
                let Ok(mut sc) = self.scratch.lock() else { return true };
                let Some((xq, xd, xs)) = self.quantize_acts(&mut sc, x, n, cols, block) else {
                    return true;
                };
                sc_guard = Some(sc);
                Some((xq, xd, xs, cols / block, cols / 32))
            }
            Fast::Half(..) => None,
        };
        let mut i = 0;
        while i < parts.len() {
            let kernel = parts[i].0.fast.map_or("", |f| f.kernel());
            let mut j = i + 1;
            while j < parts.len() && j - i < 3 && parts[j].0.fast.is_some_and(|f| f.kernel() == kernel) {
                j += 1;
            }
            let group = &parts[i..j];
            let total: usize = group.iter().map(|(w, _)| w.rows).sum();
            for t0 in (0..n).step_by(Q8X_MAX_N) {
                let m = Q8X_MAX_N.min(n - t0);
                let mut args = Vec::with_capacity(16);
                for p in 0..3 {
                    args.push(Arg::P(group.get(p).map_or(0, |(w, _)| w.data.ptr)));
                }
                for p in 0..3 {
                    args.push(Arg::P(
                        group.get(p).map_or(0, |(w, out)| out + (4 * t0 * w.rows) as u64),
                    ));
                }
                for p in 0..3 {
                    args.push(Arg::U(group.get(p).map_or(0, |(w, _)| w.rows as u32)));
                }
                args.push(Arg::P(group[0].0.row_bytes as u64));
                match acts {
                    Some((xq, xd, xs, nd, nb)) => {
                        args.push(Arg::P(xq + (t0 * cols) as u64));
                        args.push(Arg::P(xd + (4 * t0 * nd) as u64));
                        args.push(Arg::P(xs + (4 * t0 * nb) as u64));
                    }
                    None => args.push(Arg::P(x + (4 * t0 * cols) as u64)),
                }
                args.push(Arg::U(cols as u32));
                args.push(Arg::U(m as u32));
                let name = parts[i].0.fast.map_or(kernel, |f| f.kernel_for(m));
                self.launch(name, grid1(total, 4), 128, &args);
            }
            i = j;
        }
        drop(sc_guard);
        true
    }

    /// During a capture, marks it broken (the step then reruns eagerly) and returns false:
    /// for the paths that read back to the host or upload. True otherwise.
    fn can_sync(&self) -> bool {
        if self.capturing.load(Ordering::Relaxed) {
            self.capture_broken.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// The device table of `mats`' addresses (see `moe_tables`), uploaded on first use
    /// (and again if the matrices under that key changed). None after a failure, or during
    /// a capture that would need a new table (the capture is then marked broken).
    fn expert_table(&self, mats: &[CudaMat]) -> Option<u64> {
        let key = mats.first()?.data.ptr;
        let mut tables = self.moe_tables.lock().ok()?;
        if let Some((ptrs, dev)) = tables.get(&key) {
            if ptrs.len() == mats.len() && ptrs.iter().copied().eq(mats.iter().map(|m| m.data.ptr)) {
                return (!dev.is_empty()).then_some(dev.ptr);
            }
        }
        if !self.can_sync() {
            return None;
        }
        let ptrs: Vec<u64> = mats.iter().map(|m| m.data.ptr).collect();
        let dev = self.dev_upload(&ptrs);
        if self.failed() || dev.is_empty() {
            return None;
        }
        let ptr = dev.ptr;
        if tables.insert(key, (ptrs, dev)).is_some() {
            // The table it replaces may be read by a recording: retire those.
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        Some(ptr)
    }

    /// The gathered MoE products of `parts` (each: its first expert's matrix, standing for
    /// the type and shape of all, its expert table, its output) with q8x.cu's kernels:
    /// the activation rows quantized once, then consecutive parts of one kernel share a
    /// launch (up to three). False (nothing done) when a part has no such kernel or they
    /// take different inputs.
    fn moe_fast(&self, parts: &[(&CudaMat, u64, u64)], g: &Gather) -> bool {
        let Some(&(first, _, _)) = parts.first() else {
            return true;
        };
        let (Some(f0), cols) = (first.fast, first.cols) else {
            return false;
        };
        if parts
            .iter()
            .any(|(w, _, _)| w.cols != cols || !w.fast.is_some_and(|f| f.same_input(&f0)))
        {
            return false;
        }
        let rows = g.x_rows;
        let mut sc_guard = None;
        let acts = match f0 {
            Fast::Q8x { quantizer, block, .. } => {
                let (nb, nd) = (cols / 32, cols / block);
                let Ok(mut sc) = self.scratch.lock() else { return true };
                self.grow(&mut sc.xq, rows * cols);
                self.grow(&mut sc.xd, rows * nd);
                self.grow(&mut sc.xs, rows * nb);
                if self.failed() || sc.xq.len < rows * cols || sc.xd.len < rows * nd || sc.xs.len < rows * nb {
                    return true;
                }
                self.launch(
                    quantizer,
                    (cols.div_ceil(256) as u32, rows as u32, 1),
                    256,
                    &[
                        Arg::P(g.x),
                        Arg::P(sc.xq.ptr),
                        Arg::P(sc.xd.ptr),
                        Arg::P(sc.xs.ptr),
                        Arg::U(cols as u32),
                    ],
                );
                let a = Some((sc.xq.ptr, sc.xd.ptr, sc.xs.ptr));
                sc_guard = Some(sc);
                a
            }
            Fast::Half(..) => None,
        };
        let mut i = 0;
        while i < parts.len() {
            let kernel = parts[i].0.fast.map_or("", |f| f.kernel());
            let mut j = i + 1;
            while j < parts.len() && j - i < 3 && parts[j].0.fast.is_some_and(|f| f.kernel() == kernel) {
                j += 1;
            }
            let group = &parts[i..j];
            let total: usize = group.iter().map(|(w, _, _)| w.rows).sum();
            let mut args = Vec::with_capacity(20);
            for p in 0..3 {
                args.push(Arg::P(group.get(p).map_or(0, |&(_, tab, _)| tab)));
            }
            for p in 0..3 {
                args.push(Arg::P(group.get(p).map_or(0, |&(_, _, out)| out)));
            }
            for p in 0..3 {
                args.push(Arg::U(group.get(p).map_or(0, |(w, _, _)| w.rows as u32)));
            }
            args.extend([
                Arg::P(g.ids),
                Arg::U(g.n_experts as u32),
                Arg::U(g.k as u32),
                Arg::U(g.per_slot as u32),
                Arg::P(group[0].0.row_bytes as u64),
            ]);
            match acts {
                Some((xq, xd, xs)) => args.extend([Arg::P(xq), Arg::P(xd), Arg::P(xs)]),
                None => args.push(Arg::P(g.x)),
            }
            args.push(Arg::U(cols as u32));
            let name = group[0].0.fast.map_or_else(String::new, |f| f.moe_kernel());
            self.launch(&name, (total.div_ceil(4) as u32, g.slots as u32, 1), 128, &args);
            i = j;
        }
        drop(sc_guard);
        true
    }

    /// The grouped MoE products (steps of `moe_group_min_rows` rows or more) of `parts` (each: its first expert's
    /// matrix, standing for the type and shape of all, its expert table, its output): the
    /// activation rows quantized once per block length, the slots grouped by expert on the
    /// device (moe.cu `moe_group`), then one launch a part of q8x.cu's `mmq_moe_*`, a block
    /// a (tile of at most 64 of one expert's slots, 32 or 64 weight rows). Nothing is read back,
    /// so such a step can be recorded. The caller has checked `moe_grouped_takes`.
    fn moe_grouped(&self, parts: &[(&CudaMat, u64, u64)], g: &Gather) {
        let Some(&(first, _, _)) = parts.first() else { return };
        let cols = first.cols;
        let kernel = |w: &CudaMat| mmq_moe_kernel(w.ty, w.split, self.mmq_staged, self.mmq_staged_k);
        let layout = MoeGroupLayout::new(g.slots, g.n_experts);
        let Ok(mut sc) = self.scratch.lock() else { return };
        // The 8-bit activations first: the op that wrote x may have written them already
        // (`PreQuant`), which the grouping launch keeps.
        let mut acts = [None, None];
        for (i, block) in [32usize, 256].into_iter().enumerate() {
            if parts
                .iter()
                .any(|(w, _, _)| kernel(w).is_some_and(|(_, b, _)| b == block))
            {
                let Some(a) = self.quantize_acts(&mut sc, g.x, g.x_rows, cols, block) else {
                    return;
                };
                acts[i] = Some(a);
            }
        }
        self.grow(&mut sc.moe_group, layout.len);
        if self.failed() || sc.moe_group.len < layout.len {
            return;
        }
        let at = |i: usize| sc.moe_group.ptr + 4 * i as u64;
        let (n_tiles, counts, offsets, sorted, tiles) = (
            at(layout.n_tiles),
            at(layout.counts),
            at(layout.offsets),
            at(layout.sorted),
            at(layout.tiles),
        );
        self.launch(
            "moe_group",
            (1, 1, 1),
            MOE_GROUP_THREADS,
            &[
                Arg::P(g.ids),
                Arg::U(g.slots as u32),
                Arg::U(g.n_experts as u32),
                Arg::P(counts),
                Arg::P(offsets),
                Arg::P(sorted),
                Arg::P(tiles),
                Arg::P(n_tiles),
            ],
        );
        for &(w, tab, out) in parts {
            let Some((name, block, rows_per_block)) = kernel(w) else {
                continue;
            };
            let Some((xq, xd, xs)) = acts[(block == 256) as usize] else {
                continue;
            };
            self.launch(
                name,
                (layout.max_tiles as u32, w.rows.div_ceil(rows_per_block) as u32, 1),
                MMQ_THREADS,
                &[
                    Arg::P(tab),
                    Arg::P(w.row_bytes as u64),
                    Arg::P(xq),
                    Arg::P(xd),
                    Arg::P(xs),
                    Arg::P(out),
                    Arg::U(w.rows as u32),
                    Arg::U(cols as u32),
                    Arg::P(n_tiles),
                    Arg::P(tiles),
                    Arg::P(sorted),
                    Arg::U(g.n_experts as u32),
                    Arg::U(g.k as u32),
                    Arg::U(g.per_slot as u32),
                ],
            );
        }
    }

    /// Whether a step of `slots` slots and `x_rows` activation rows over `n_experts`
    /// experts whose matrices are like `mats` (one a part, of the same width) takes the
    /// grouped products: the switch on, the tensor-core products running, every part of a
    /// type that has one, and the activations within one quantizer launch (a block row a
    /// row: at most 65535; larger steps take the host grouping).
    fn moe_grouped_takes<'a>(
        &self,
        mut mats: impl Iterator<Item = &'a CudaMat>,
        n_experts: usize,
        slots: usize,
        x_rows: usize,
    ) -> bool {
        let mut cols = None;
        self.moe_grouped.load(Ordering::Relaxed)
            && self.mmq_max > 0
            && n_experts <= crate::ops::MAX_EXPERTS
            && slots <= u32::MAX as usize / 4
            && x_rows <= 65_535
            && mats.all(|w| {
                *cols.get_or_insert(w.cols) == w.cols
                    && mmq_moe_kernel(w.ty, w.split, self.mmq_staged, self.mmq_staged_k)
                        .is_some_and(|(_, b, _)| w.cols.is_multiple_of(b))
            })
    }

    fn gemm(&self, w: &CudaMat, x: u64, n: usize, out: u64) {
        self.forget_prequant();
        if self.failed() {
            return;
        }
        let (rows, cols) = (w.rows, w.cols);
        let Ok(mut sc) = self.scratch.lock() else { return };
        // Column-major view: W is cols×rows (lda = cols), X is cols×n, OUT is rows×n, so
        // OUT = Wᵀ·X with A transposed.
        let compute_f32 = blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let (a, b, ty, compute) = match w.ty {
            // f32 weights: an exact f32 GEMM.
            WeightType::F32 => (w.data.ptr, x, blas_sys::cudaDataType_t::CUDA_R_32F, compute_f32),
            // f16 weights as they are, against the activations rounded to f16 (10 mantissa
            // bits, as TF32 keeps; values past f16's range saturate): f16 tensor cores at
            // twice TF32's rate, and no widened copy of the weights.
            WeightType::F16 if !self.older => {
                self.grow(&mut sc.acts, n * cols);
                if self.failed() {
                    return;
                }
                self.elementwise(
                    "to_f16",
                    n * cols,
                    &[Arg::P(x), Arg::P(sc.acts.ptr), Arg::P((n * cols) as u64)],
                );
                (
                    w.data.ptr,
                    sc.acts.ptr,
                    blas_sys::cudaDataType_t::CUDA_R_16F,
                    compute_f32,
                )
            }
            // bf16 (and, with `older`, f16) weights: widened to f32 (exactly, by the
            // embedding kernel over row ids 0..rows), multiplied with TF32 tensor cores:
            // both fit TF32's 10 mantissa bits, and the activations keep 10 bits instead of
            // bf16's 7.
            WeightType::BF16 | WeightType::F16 => {
                let max = (*self.max_mat_elems.lock().unwrap_or_else(|e| e.into_inner())).max(rows * cols);
                if sc.weight32.len < max {
                    self.grow(&mut sc.weight32, max);
                }
                if sc.iota.len < rows {
                    self.grow(&mut sc.iota, rows);
                    let ids: Vec<u32> = (0..sc.iota.len as u32).collect();
                    self.write(&ids, &mut sc.iota);
                }
                if self.failed() {
                    return;
                }
                let mut view = DevMem::<f32> {
                    mem: None,
                    ptr: sc.weight32.ptr,
                    len: rows * cols,
                };
                self.embed_ids(w, sc.iota.ptr, rows, &mut view);
                (
                    sc.weight32.ptr,
                    x,
                    blas_sys::cudaDataType_t::CUDA_R_32F,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
                )
            }
            // Quantized weights: dequantized to bf16, bf16 activations.
            _ => {
                let max = (*self.max_mat_elems.lock().unwrap_or_else(|e| e.into_inner())).max(rows * cols);
                self.grow(&mut sc.weight, max);
                self.grow(&mut sc.acts, n * cols);
                if self.failed() {
                    return;
                }
                self.launch(
                    &w.kernels.dequant_bf16,
                    quant::dequant_bf16_grid(rows as u32, cols as u32),
                    quant::DEQUANT_BLOCK,
                    &[
                        Arg::P(w.data.ptr),
                        Arg::P(w.row_bytes as u64),
                        Arg::P(sc.weight.ptr),
                        Arg::U(rows as u32),
                        Arg::U(cols as u32),
                    ],
                );
                self.elementwise(
                    "to_bf16",
                    n * cols,
                    &[Arg::P(x), Arg::P(sc.acts.ptr), Arg::P((n * cols) as u64)],
                );
                (
                    sc.weight.ptr,
                    sc.acts.ptr,
                    blas_sys::cudaDataType_t::CUDA_R_16BF,
                    compute_f32,
                )
            }
        };
        if self.failed() {
            return;
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let start = self.profile_event();
        // SAFETY: a (rows×cols), b (n×cols) and out (n×rows) are live device allocations of
        // those sizes in the given types; alpha and beta are host f32 (the handle's default
        // pointer mode); the handle runs on this backend's stream.
        let r = unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                rows as i32,
                n as i32,
                cols as i32,
                &alpha as *const f32 as *const _,
                a as *const _,
                ty,
                cols as i32,
                b as *const _,
                ty,
                cols as i32,
                &beta as *const f32 as *const _,
                out as *mut _,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                rows as i32,
                compute,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        };
        if let Err(e) = r {
            self.fail(format!("cuBLAS GEMM ({rows}×{cols} by {n} rows) failed: {e:?}"));
        }
        let name = match w.ty {
            WeightType::F32 => "gemm_f32",
            WeightType::F16 if !self.older => "gemm_f16",
            WeightType::F16 | WeightType::BF16 => "gemm_tf32",
            _ => "gemm_bf16",
        };
        self.profile_record(name, start);
    }

    /// `out[t] = table[ids[t]]` for the `n` ids at device address `ids`.
    fn embed_ids(&self, table: &CudaMat, ids: u64, n: usize, out: &mut CudaBuf) {
        let cols = table.cols;
        // The grid's y dimension takes at most 65535 tokens a launch.
        for t0 in (0..n).step_by(65_535) {
            let m = (n - t0).min(65_535);
            self.launch(
                &table.kernels.embed,
                quant::embed_grid(cols as u32, m as u32),
                quant::EMBED_BLOCK,
                &[
                    Arg::P(table.data.ptr),
                    Arg::P(table.row_bytes as u64),
                    Arg::P(ids + 4 * t0 as u64),
                    Arg::P(out.ptr + 4 * (t0 * cols) as u64),
                    Arg::U(m as u32),
                    Arg::U(cols as u32),
                ],
            );
        }
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Mat = CudaMat;
    type Kv = CudaKv;
    type Step = CudaStep;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.device_name)
    }

    fn check(&self) -> Result<(), String> {
        if let Some(e) = self
            .error
            .lock()
            .map_err(|_| "CUDA backend state poisoned".to_string())?
            .clone()
        {
            return Err(e);
        }
        Ok(())
    }

    fn memory_bytes(&self) -> u64 {
        // What is free now, less room for the products' scratch (a dequantized matrix).
        let scratch = 4 * *self.max_mat_elems.lock().unwrap_or_else(|e| e.into_inner()) as u64;
        self.mem_info()
            .map(|(free, _)| (free as u64).saturating_sub(scratch + (256 << 20)))
            .unwrap_or(0)
    }

    fn kv_elem_bytes(&self) -> usize {
        2
    }

    fn matrix(&self, ty: WeightType, rows: usize, cols: usize, data: HostBytes) -> CudaMat {
        let row_bytes = ty.row_bytes(cols).expect("matrix row length validated by the loader");
        assert_eq!(data.len(), row_bytes * rows, "matrix byte size validated by the loader");
        if let Ok(mut m) = self.max_mat_elems.lock() {
            *m = (*m).max(rows * cols);
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let split = if self.split {
            quant::split_rows(ty, cols, data.as_slice(), threads)
        } else {
            None
        };
        CudaMat {
            data: self.dev_upload(split.as_deref().unwrap_or(data.as_slice())),
            ty,
            rows,
            cols,
            row_bytes,
            kernels: MatKernels::new(ty, split.is_some()),
            fast: Fast::for_matrix(ty, cols, self.older, split.is_some()),
            split: split.is_some(),
        }
    }

    fn mat_shape(&self, m: &CudaMat) -> (usize, usize) {
        (m.rows, m.cols)
    }

    fn mat_type(&self, m: &CudaMat) -> WeightType {
        m.ty
    }

    fn alloc(&self, len: usize) -> CudaBuf {
        self.dev_alloc(len)
    }

    fn upload(&self, data: &[f32]) -> CudaBuf {
        self.dev_upload(data)
    }

    fn download(&self, buf: &CudaBuf, range: Range<usize>, out: &mut [f32]) {
        assert!(
            range.end <= buf.len && out.len() == range.len(),
            "download out of range"
        );
        if self.failed() || range.is_empty() {
            return;
        }
        let Some(mem) = buf.mem.as_ref() else { return };
        if let Err(e) = self.stream.memcpy_dtoh(&mem.slice(range), out) {
            self.fail(format!("copy from the GPU failed: {e}"));
        }
    }

    fn buf_len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn copy(&self, src: &CudaBuf, src_off: usize, dst: &mut CudaBuf, dst_off: usize, len: usize) {
        assert!(
            src_off + len <= src.len && dst_off + len <= dst.len,
            "copy out of range"
        );
        self.forget_prequant();
        if self.failed() || len == 0 {
            return;
        }
        let (Some(s), Some(d)) = (src.mem.as_ref(), dst.mem.as_mut()) else {
            return;
        };
        if let Err(e) = self.stream.memcpy_dtod(
            &s.slice(src_off..src_off + len),
            &mut d.slice_mut(dst_off..dst_off + len),
        ) {
            self.fail(format!("copy on the GPU failed: {e}"));
        }
    }

    fn copy_rows(
        &self,
        src: &CudaBuf,
        src_stride: usize,
        src_off: usize,
        dst: &mut CudaBuf,
        dst_stride: usize,
        dst_off: usize,
        width: usize,
        rows: usize,
    ) {
        if rows == 0 || width == 0 {
            return;
        }
        assert!(
            src_off + width <= src_stride.max(width) && dst_off + width <= dst_stride.max(width),
            "copy_rows: columns outside the rows"
        );
        assert!(
            (rows - 1) * src_stride + src_off + width <= src.len
                && (rows - 1) * dst_stride + dst_off + width <= dst.len,
            "copy_rows: buffers too small"
        );
        assert!(rows * width <= u32::MAX as usize, "copy_rows: too many elements");
        self.elementwise(
            "copy_rows",
            rows * width,
            &[
                Arg::P(src.ptr),
                Arg::U(src_stride as u32),
                Arg::U(src_off as u32),
                Arg::P(dst.ptr),
                Arg::U(dst_stride as u32),
                Arg::U(dst_off as u32),
                Arg::U(width as u32),
                Arg::U(rows as u32),
            ],
        );
    }

    fn embed(&self, table: &CudaMat, ids: &[u32], out: &mut CudaBuf) {
        let (n, cols) = (ids.len(), table.cols);
        assert!(n * cols <= out.len, "embed output too small");
        assert!(
            ids.iter().all(|&i| (i as usize) < table.rows),
            "token id outside the table"
        );
        if n == 0 {
            return;
        }
        let Ok(mut sc) = self.scratch.lock() else { return };
        self.grow(&mut sc.ids, n);
        self.write(ids, &mut sc.ids);
        self.embed_ids(table, sc.ids.ptr, n, out);
    }

    fn matmul(&self, w: &CudaMat, x: &CudaBuf, n: usize, out: &mut CudaBuf) {
        assert!(n * w.cols <= x.len && n * w.rows <= out.len, "matmul buffers too small");
        self.product(w, x.ptr, n, out.ptr);
    }

    fn matmuls(&self, ws: &[&CudaMat], x: &CudaBuf, n: usize, outs: &mut [&mut CudaBuf]) {
        assert_eq!(ws.len(), outs.len(), "matmuls: one output per matrix");
        for (w, out) in ws.iter().zip(outs.iter()) {
            assert!(n * w.cols <= x.len && n * w.rows <= out.len, "matmul buffers too small");
        }
        let parts: Vec<(&CudaMat, u64)> = ws.iter().zip(outs.iter()).map(|(w, o)| (*w, o.ptr)).collect();
        if self.fast_products(&parts, x.ptr, n) {
            return;
        }
        for (w, out) in self.mmq_products(&parts, x.ptr, n) {
            self.product(w, x.ptr, n, out);
        }
    }

    fn add_bias(&self, x: &mut CudaBuf, bias: &CudaBuf, n: usize) {
        let w = bias.len;
        assert!(n * w <= x.len, "add_bias out of range");
        self.forget_prequant_if_written(x.ptr, 4 * n * w);
        self.elementwise(
            "add_bias",
            n * w,
            &[
                Arg::P(x.ptr),
                Arg::P(bias.ptr),
                Arg::U(w as u32),
                Arg::U((n * w) as u32),
            ],
        );
    }

    fn rms_norm(&self, x: &CudaBuf, w: &CudaBuf, eps: f32, n: usize, out: &mut CudaBuf) {
        let width = w.len;
        assert!(n * width <= x.len && n * width <= out.len, "rms_norm out of range");
        if n == 0 {
            return;
        }
        if !self.older && width <= NORM_Q8_MAX_WIDTH {
            self.norm_q8(x.ptr, 0, w, eps, n, out);
            return;
        }
        self.launch(
            "rms_norm",
            (n as u32, 1, 1),
            norm_threads(width),
            &[
                Arg::P(x.ptr),
                Arg::P(w.ptr),
                Arg::F(eps),
                Arg::U(width as u32),
                Arg::P(out.ptr),
            ],
        );
    }

    fn add_rms_norm(&self, x: &mut CudaBuf, y: &CudaBuf, w: &CudaBuf, eps: f32, n: usize, out: &mut CudaBuf) {
        let width = w.len;
        if self.older || width > NORM_Q8_MAX_WIDTH {
            self.add(x, y, n * width);
            self.rms_norm(x, w, eps, n, out);
            return;
        }
        assert!(
            n * width <= x.len && n * width <= y.len && n * width <= out.len,
            "add_rms_norm out of range"
        );
        if n == 0 {
            return;
        }
        self.norm_q8(x.ptr, y.ptr, w, eps, n, out);
    }

    fn layer_norm(&self, x: &CudaBuf, w: &CudaBuf, b: &CudaBuf, eps: f32, n: usize, out: &mut CudaBuf) {
        let width = w.len;
        assert!(
            n * width <= x.len && n * width <= out.len && b.len == width,
            "layer_norm out of range"
        );
        if n == 0 {
            return;
        }
        self.launch(
            "layer_norm",
            (n as u32, 1, 1),
            norm_threads(width),
            &[
                Arg::P(x.ptr),
                Arg::P(w.ptr),
                Arg::P(b.ptr),
                Arg::F(eps),
                Arg::U(width as u32),
                Arg::P(out.ptr),
            ],
        );
    }

    fn gelu(&self, x: &mut CudaBuf, len: usize) {
        assert!(len <= x.len);
        self.elementwise("gelu", len, &[Arg::P(x.ptr), Arg::U(len as u32)]);
    }

    fn scale(&self, x: &mut CudaBuf, s: f32, len: usize) {
        assert!(len <= x.len);
        self.elementwise("scale", len, &[Arg::P(x.ptr), Arg::F(s), Arg::U(len as u32)]);
    }

    fn add_scaled(&self, x: &mut CudaBuf, y: &CudaBuf, alpha: f32, len: usize) {
        assert!(len <= x.len && len <= y.len);
        self.elementwise(
            "add_scaled",
            len,
            &[Arg::P(x.ptr), Arg::P(y.ptr), Arg::F(alpha), Arg::U(len as u32)],
        );
    }

    fn softcap(&self, x: &mut CudaBuf, cap: f32, len: usize) {
        assert!(len <= x.len);
        self.elementwise("softcap", len, &[Arg::P(x.ptr), Arg::F(cap), Arg::U(len as u32)]);
    }

    fn silu_mul(&self, gate: &mut CudaBuf, up: &CudaBuf, len: usize) {
        assert!(len <= gate.len && len <= up.len);
        if !self.older {
            self.glu_q8(gate, up, len, 0);
            return;
        }
        self.elementwise("silu_mul", len, &[Arg::P(gate.ptr), Arg::P(up.ptr), Arg::U(len as u32)]);
    }

    fn swiglu_clamped(&self, gate: &mut CudaBuf, up: &CudaBuf, alpha: f32, limit: f32, len: usize) {
        assert!(len <= gate.len && len <= up.len);
        self.elementwise(
            "swiglu_clamped",
            len,
            &[
                Arg::P(gate.ptr),
                Arg::P(up.ptr),
                Arg::F(alpha),
                Arg::F(limit),
                Arg::U(len as u32),
            ],
        );
    }

    fn gelu_mul(&self, gate: &mut CudaBuf, up: &CudaBuf, len: usize) {
        assert!(len <= gate.len && len <= up.len);
        if !self.older {
            self.glu_q8(gate, up, len, 1);
            return;
        }
        self.elementwise("gelu_mul", len, &[Arg::P(gate.ptr), Arg::P(up.ptr), Arg::U(len as u32)]);
    }

    fn add(&self, x: &mut CudaBuf, y: &CudaBuf, len: usize) {
        assert!(len <= x.len && len <= y.len);
        self.elementwise("add_inplace", len, &[Arg::P(x.ptr), Arg::P(y.ptr), Arg::U(len as u32)]);
    }

    fn argmax_rows(&self, buf: &CudaBuf, n: usize, width: usize, out: &mut [u32]) {
        assert!(n * width <= buf.len && out.len() >= n, "argmax_rows out of range");
        let Ok(mut sc) = self.scratch.lock() else { return };
        self.grow(&mut sc.argmax, n);
        self.launch(
            "argmax_rows",
            (n as u32, 1, 1),
            1024,
            &[Arg::P(buf.ptr), Arg::U(width as u32), Arg::P(sc.argmax.ptr)],
        );
        if self.failed() {
            return;
        }
        if let Some(mem) = sc.argmax.mem.as_ref() {
            if let Err(e) = self.stream.memcpy_dtoh(&mem.slice(..n), &mut out[..n]) {
                self.fail(format!("copy from the GPU failed: {e}"));
            }
        }
    }

    fn top_candidates_rows(
        &self,
        buf: &CudaBuf,
        n: usize,
        width: usize,
        k: usize,
        inv_t: &[f32],
        mask: Option<&[u32]>,
        ids: &mut [u32],
        vals: &mut [f32],
        tail: &mut [f64],
    ) {
        let wpr = width.div_ceil(32);
        crate::backend::check_candidate_args(buf.len, n, width, k, inv_t, mask, ids, vals, tail);
        if n == 0 {
            return;
        }
        // ids, value bits, then one f64 (two u32) a row: at most 2050 words a row, for
        // rows of a buffer that exists.
        let words = n * (2 * k + 2);
        let Ok(mut sc) = self.scratch.lock() else { return };
        self.grow(&mut sc.cands, words);
        self.grow(&mut sc.cand_inv_t, n);
        self.write(&inv_t[..n], &mut sc.cand_inv_t);
        // The masks (if any) into their kept device buffer; a null pointer is no mask.
        let mask_ptr = match mask {
            Some(m) => {
                self.grow(&mut sc.cand_mask, n * wpr);
                if sc.cand_mask.len < n * wpr {
                    // Not grown (a capture under way, which then reruns eagerly): the
                    // kernel must not read past the buffer.
                    return;
                }
                self.write(&m[..n * wpr], &mut sc.cand_mask);
                sc.cand_mask.ptr
            }
            None => 0,
        };
        // One block of TOPC_MAX (1024) threads a row: the kernel's sort holds a slot per thread.
        self.launch(
            "top_candidates_rows",
            (n as u32, 1, 1),
            crate::ops::MAX_CANDIDATES as u32,
            &[
                Arg::P(buf.ptr),
                Arg::U(width as u32),
                Arg::U(k as u32),
                Arg::P(sc.cand_inv_t.ptr),
                Arg::P(mask_ptr),
                Arg::P(sc.cands.ptr),
            ],
        );
        if self.failed() {
            return;
        }
        let Some(mem) = sc.cands.mem.as_ref() else { return };
        let Ok(mut host) = self.cand_host.lock() else { return };
        host.resize(words, 0);
        if let Err(e) = self.stream.memcpy_dtoh(&mem.slice(..words), &mut host[..]) {
            self.fail(format!("copy from the GPU failed: {e}"));
            return;
        }
        let (id_part, rest) = host.split_at(n * k);
        let (val_part, tail_part) = rest.split_at(n * k);
        ids[..n * k].copy_from_slice(id_part);
        for (v, &b) in vals[..n * k].iter_mut().zip(val_part) {
            *v = f32::from_bits(b);
        }
        // Each tail was stored as a little-endian f64 (low word first), as the GPU lays it out.
        for (t, w) in tail[..n].iter_mut().zip(tail_part.chunks_exact(2)) {
            *t = f64::from_bits(w[0] as u64 | (w[1] as u64) << 32);
        }
    }

    // The recurrent mixers' ops (ssm.cu).
    fn mul(&self, x: &mut CudaBuf, y: &CudaBuf, len: usize) {
        assert!(len <= x.len && len <= y.len, "mul out of range");
        self.elementwise("mul_inplace", len, &[Arg::P(x.ptr), Arg::P(y.ptr), Arg::U(len as u32)]);
    }

    fn relu_sq(&self, x: &mut CudaBuf, len: usize) {
        assert!(len <= x.len, "relu_sq out of range");
        self.elementwise("relu_sq", len, &[Arg::P(x.ptr), Arg::U(len as u32)]);
    }

    fn conv_step(
        &self,
        x: &CudaBuf,
        n: usize,
        channels: usize,
        kernel: usize,
        w: &CudaBuf,
        bias: Option<&CudaBuf>,
        silu: bool,
        state: &mut CudaBuf,
        step: &CudaStep,
        out: &mut CudaBuf,
    ) {
        assert_eq!(n, step.n_rows, "conv_step over {n} rows of a {}-row step", step.n_rows);
        assert!(
            (1..=crate::ssm::MAX_CONV_KERNEL).contains(&kernel) && w.len == kernel * channels,
            "conv_step weight shape"
        );
        assert!(bias.is_none_or(|b| b.len == channels), "conv_step bias shape");
        assert!(x.len >= n * channels && out.len >= n * channels, "conv_step rows");
        assert!(step.has_state_slots, "conv_step without state slots");
        assert!(
            step.n_state_slots * (kernel - 1) * channels <= state.len,
            "conv_step: the layout's state slots exceed the state array"
        );
        if step.n_seqs == 0 || channels == 0 {
            return;
        }
        let g = &step.groups[0];
        self.launch(
            "conv_step",
            (channels.div_ceil(128) as u32, step.n_seqs as u32, 1),
            128,
            &[
                Arg::P(x.ptr),
                Arg::U(channels as u32),
                Arg::U(kernel as u32),
                Arg::P(w.ptr),
                Arg::P(bias.map_or(w.ptr, |b| b.ptr)),
                Arg::U(bias.is_some() as u32),
                Arg::U(silu as u32),
                Arg::P(state.ptr),
                Arg::P(step.positions.ptr),
                Arg::P(g.seqs.ptr),
                Arg::P(step.state_slots.ptr),
                Arg::P(out.ptr),
            ],
        );
    }

    fn ssm_scan_step(
        &self,
        xbc: &CudaBuf,
        dt: &CudaBuf,
        a: &CudaBuf,
        d: &CudaBuf,
        dt_bias: &CudaBuf,
        n: usize,
        shape: &crate::ssm::SsmShape,
        state: &mut CudaBuf,
        step: &CudaStep,
        out: &mut CudaBuf,
    ) {
        let sh = shape;
        assert_eq!(
            n, step.n_rows,
            "ssm_scan_step over {n} rows of a {}-row step",
            step.n_rows
        );
        assert!(
            sh.heads > 0
                && sh.groups > 0
                && sh.heads.is_multiple_of(sh.groups)
                && a.len == sh.heads
                && d.len == sh.heads
                && dt_bias.len == sh.heads,
            "ssm_scan_step parameter shapes"
        );
        assert!(
            xbc.len >= n * sh.row_width() && dt.len >= n * sh.heads && out.len >= n * sh.heads * sh.head_dim,
            "ssm_scan_step rows"
        );
        assert!(step.has_state_slots, "ssm_scan_step without state slots");
        assert!(
            step.n_state_slots * sh.slot_len() <= state.len,
            "ssm_scan_step: the layout's state slots exceed the state array"
        );
        if step.n_seqs == 0 {
            return;
        }
        let g = &step.groups[0];
        self.launch(
            "ssm_scan",
            (sh.heads as u32, step.n_seqs as u32, 1),
            sh.head_dim.next_power_of_two().clamp(32, 256) as u32,
            &[
                Arg::P(xbc.ptr),
                Arg::P(dt.ptr),
                Arg::P(a.ptr),
                Arg::P(d.ptr),
                Arg::P(dt_bias.ptr),
                Arg::U(sh.heads as u32),
                Arg::U(sh.head_dim as u32),
                Arg::U(sh.groups as u32),
                Arg::U(sh.state as u32),
                Arg::F(sh.dt_min),
                Arg::F(sh.dt_max),
                Arg::P(state.ptr),
                Arg::P(step.positions.ptr),
                Arg::P(g.seqs.ptr),
                Arg::P(step.state_slots.ptr),
                Arg::P(out.ptr),
            ],
        );
    }

    fn sigmoid_mul(&self, x: &mut CudaBuf, g: &CudaBuf, len: usize) {
        assert!(len <= x.len && len <= g.len, "sigmoid_mul out of range");
        self.elementwise("sigmoid_mul", len, &[Arg::P(x.ptr), Arg::P(g.ptr), Arg::U(len as u32)]);
    }

    fn gdn_step(
        &self,
        qkv: &CudaBuf,
        b: &CudaBuf,
        a: &CudaBuf,
        a_neg: &CudaBuf,
        dt_bias: &CudaBuf,
        n: usize,
        shape: &crate::ssm::GdnShape,
        state: &mut CudaBuf,
        step: &CudaStep,
        out: &mut CudaBuf,
    ) {
        let sh = shape;
        assert_eq!(n, step.n_rows, "gdn_step over {n} rows of a {}-row step", step.n_rows);
        assert!(
            sh.k_heads > 0
                && sh.v_heads.is_multiple_of(sh.k_heads)
                && (1..=crate::ssm::MAX_GDN_KEY_DIM).contains(&sh.k_dim)
                && a_neg.len == sh.v_heads
                && dt_bias.len == sh.v_heads,
            "gdn_step parameter shapes"
        );
        assert!(
            qkv.len >= n * sh.row_width()
                && b.len >= n * sh.v_heads
                && a.len >= n * sh.v_heads
                && out.len >= n * sh.v_heads * sh.v_dim,
            "gdn_step rows"
        );
        assert!(step.has_state_slots, "gdn_step without state slots");
        assert!(
            step.n_state_slots * sh.slot_len() <= state.len,
            "gdn_step: the layout's state slots exceed the state array"
        );
        if step.n_seqs == 0 {
            return;
        }
        let g = &step.groups[0];
        self.launch(
            "gdn_step",
            (sh.v_heads as u32, step.n_seqs as u32, 1),
            sh.v_dim.next_power_of_two().clamp(32, 256) as u32,
            &[
                Arg::P(qkv.ptr),
                Arg::P(b.ptr),
                Arg::P(a.ptr),
                Arg::P(a_neg.ptr),
                Arg::P(dt_bias.ptr),
                Arg::U(sh.k_heads as u32),
                Arg::U(sh.v_heads as u32),
                Arg::U(sh.k_dim as u32),
                Arg::U(sh.v_dim as u32),
                Arg::P(state.ptr),
                Arg::P(step.positions.ptr),
                Arg::P(g.seqs.ptr),
                Arg::P(step.state_slots.ptr),
                Arg::P(out.ptr),
            ],
        );
    }

    fn rms_norm_gated(
        &self,
        x: &mut CudaBuf,
        z: &CudaBuf,
        w: &CudaBuf,
        eps: f32,
        n: usize,
        group: usize,
        norm_first: bool,
    ) {
        let width = w.len;
        assert!(group > 0 && width.is_multiple_of(group), "rms_norm_gated group");
        assert!(n * width <= x.len && n * width <= z.len, "rms_norm_gated rows");
        if n == 0 || width == 0 {
            return;
        }
        self.launch(
            "rms_norm_gated",
            (n as u32, (width / group) as u32, 1),
            norm_threads(group),
            &[
                Arg::P(x.ptr),
                Arg::P(z.ptr),
                Arg::P(w.ptr),
                Arg::F(eps),
                Arg::U(width as u32),
                Arg::U(group as u32),
                Arg::U(norm_first as u32),
            ],
        );
    }

    fn copy_slot(&self, state: &mut CudaBuf, slot_len: usize, src: usize, dst: usize) {
        let (s, d) = (src * slot_len, dst * slot_len);
        assert!(
            s + slot_len <= state.len && d + slot_len <= state.len,
            "copy_slot out of range"
        );
        if src == dst {
            return;
        }
        self.elementwise(
            "copy_floats",
            slot_len,
            &[
                Arg::P(state.ptr + 4 * s as u64),
                Arg::P(state.ptr + 4 * d as u64),
                Arg::U(slot_len as u32),
            ],
        );
    }

    // Clamp and the mixture-of-experts ops: kernels of moe.cu (routing, biases, combine)
    // and the gathered decode products of q8x.cu / quant.cu; `moe_matmuls` of 16+ rows
    // groups on the device (`moe_grouped`) or, prefill-sized for the types without a
    // grouped product, reads the ids back (`backend::host_moe`). The `moe_*` and
    // `grouped_moe_*` tests of tests/cuda_backend.rs hold them to the CPU (passed on an
    // H100 in session 15).
    fn clamp(&self, x: &mut CudaBuf, lo: f32, hi: f32, len: usize) {
        assert!(len <= x.len, "clamp out of range");
        assert!(len <= u32::MAX as usize, "clamp: too many elements");
        self.elementwise(
            "clamp_inplace",
            len,
            &[Arg::P(x.ptr), Arg::F(lo), Arg::F(hi), Arg::U(len as u32)],
        );
    }

    fn moe_route(
        &self,
        logits: &CudaBuf,
        n: usize,
        n_experts: usize,
        k: usize,
        routing: &crate::ops::MoeRouting,
        bias: Option<&CudaBuf>,
        expert_scale: Option<&CudaBuf>,
        ids: &mut CudaBuf,
        weights: &mut CudaBuf,
    ) {
        if let Err(e) = routing.check(n_experts, k) {
            panic!("moe_route: {e}");
        }
        if n == 0 {
            return;
        }
        assert!(
            n * n_experts <= logits.len && n * k <= ids.len && n * k <= weights.len,
            "moe_route: buffers too small"
        );
        assert!(
            bias.is_none_or(|b| b.len >= n_experts) && expert_scale.is_none_or(|s| s.len >= n_experts),
            "moe_route: bias or expert scale shorter than the experts"
        );
        assert!(n < (1 << 31), "moe_route: too many rows");
        self.forget_prequant_if_written(ids.ptr, 4 * n * k);
        self.forget_prequant_if_written(weights.ptr, 4 * n * k);
        use crate::ops::{GroupScore, MoeScoring};
        self.launch(
            "moe_route",
            (n as u32, 1, 1),
            32,
            &[
                Arg::P(logits.ptr),
                Arg::U(n_experts as u32),
                Arg::U(k as u32),
                Arg::U(match routing.scoring {
                    MoeScoring::Softmax => 0,
                    MoeScoring::Sigmoid => 1,
                }),
                Arg::U(routing.renormalize as u32),
                Arg::F(routing.scale),
                Arg::U(routing.n_groups as u32),
                Arg::U(routing.topk_groups as u32),
                Arg::U(match routing.group_score {
                    GroupScore::Max => 0,
                    GroupScore::TopTwoSum => 1,
                }),
                Arg::P(bias.map_or(0, |b| b.ptr)),
                Arg::P(expert_scale.map_or(0, |s| s.ptr)),
                Arg::P(ids.ptr),
                Arg::P(weights.ptr),
                Arg::U(self.route_regs as u32),
            ],
        );
    }

    fn moe_matmuls(
        &self,
        experts: &[&[CudaMat]],
        x: &CudaBuf,
        x_per_slot: bool,
        ids: &CudaBuf,
        n: usize,
        k: usize,
        outs: &mut [&mut CudaBuf],
    ) {
        assert_eq!(experts.len(), outs.len(), "moe_matmuls: one output per matrix");
        let slots = n * k;
        if slots == 0 || experts.is_empty() || self.failed() {
            return;
        }
        let n_experts = experts[0].len();
        assert!(
            n_experts > 0 && experts.iter().all(|m| m.len() == n_experts),
            "moe_matmuls: every matrix needs one per expert"
        );
        let cols = experts[0][0].cols;
        let x_rows = if x_per_slot { slots } else { n };
        assert!(
            slots <= ids.len && x_rows * cols <= x.len,
            "moe_matmuls: ids or input too small"
        );
        for (m, out) in experts.iter().zip(outs.iter()) {
            assert!(slots * m[0].rows <= out.len, "moe_matmuls: output too small");
        }
        let uniform = experts.iter().all(|m| {
            m.iter()
                .all(|e| e.ty == m[0].ty && e.rows == m[0].rows && e.cols == cols)
        });
        let g = Gather {
            ids: ids.ptr,
            n_experts,
            k,
            per_slot: x_per_slot,
            slots,
            x: x.ptr,
            x_rows,
        };
        // Decode-sized steps take the gathered products (a warp per slot and output row) up
        // to `moe_group_min_rows` rows: past that, slots share experts and the grouped
        // products read each used expert's rows once a tile instead of once a slot.
        let small = n <= MOE_GATHER_MAX_ROWS && slots <= 65_535;
        let grouped = uniform
            && (n >= self.moe_group_min_rows || !small)
            && self.moe_grouped_takes(experts.iter().map(|m| &m[0]), n_experts, slots, x_rows);
        let gathered = small && !grouped;
        if !gathered && !grouped || !uniform {
            // Prefill-sized steps of the other types (or experts of different shapes): the
            // host grouping, one product per used expert over its rows (a GEMM once it has
            // GEMM_MIN_ROWS), which reads the ids back: such a step is never recorded.
            if self.can_sync() {
                crate::backend::host_moe::moe_matmuls(self, experts, x, x_per_slot, ids, n, k, outs);
            }
            return;
        }
        let mut parts = Vec::with_capacity(experts.len());
        for (m, out) in experts.iter().zip(outs.iter()) {
            let Some(tab) = self.expert_table(m) else { return };
            parts.push((&m[0], tab, out.ptr));
        }
        if grouped {
            self.moe_grouped(&parts, &g);
            return;
        }
        if self.moe_fast(&parts, &g) {
            return;
        }
        for part in &parts {
            if self.moe_fast(std::slice::from_ref(part), &g) {
                continue;
            }
            // The types without a q8x.cu kernel: quant.cu's f32-activation row body.
            let &(w, tab, out) = part;
            self.launch(
                &w.kernels.moe_matvec,
                ((w.rows as u32).div_ceil(quant::MATVEC_ROWS_PER_BLOCK), slots as u32, 1),
                quant::MATVEC_BLOCK,
                &[
                    Arg::P(tab),
                    Arg::P(ids.ptr),
                    Arg::U(n_experts as u32),
                    Arg::U(k as u32),
                    Arg::U(x_per_slot as u32),
                    Arg::P(w.row_bytes as u64),
                    Arg::P(x.ptr),
                    Arg::P(out),
                    Arg::U(w.rows as u32),
                    Arg::U(cols as u32),
                ],
            );
        }
    }

    fn moe_combine(&self, ys: &CudaBuf, weights: &CudaBuf, n: usize, k: usize, d: usize, out: &mut CudaBuf) {
        assert!(
            n * k * d <= ys.len && n * k <= weights.len && n * d <= out.len,
            "moe_combine: buffers too small"
        );
        assert!(n * k * d <= u32::MAX as usize, "moe_combine: too many elements");
        self.elementwise(
            "moe_combine",
            n * d,
            &[
                Arg::P(ys.ptr),
                Arg::P(weights.ptr),
                Arg::P(out.ptr),
                Arg::U(n as u32),
                Arg::U(k as u32),
                Arg::U(d as u32),
            ],
        );
    }

    fn moe_add_bias(&self, x: &mut CudaBuf, biases: &CudaBuf, ids: &CudaBuf, slots: usize, d: usize) {
        if slots == 0 || d == 0 {
            return;
        }
        assert!(
            slots * d <= x.len && slots <= ids.len && d <= biases.len,
            "moe_add_bias: buffers too small"
        );
        assert!(slots * d <= u32::MAX as usize, "moe_add_bias: too many elements");
        self.elementwise(
            "moe_add_bias",
            slots * d,
            &[
                Arg::P(x.ptr),
                Arg::P(biases.ptr),
                Arg::P(ids.ptr),
                Arg::U(slots as u32),
                Arg::U(d as u32),
                Arg::U((biases.len / d) as u32),
            ],
        );
    }

    fn argmax(&self, buf: &CudaBuf, range: Range<usize>) -> u32 {
        assert!(range.end <= buf.len && !range.is_empty(), "argmax out of range");
        let view = DevMem::<f32> {
            mem: None,
            ptr: buf.ptr + (range.start * 4) as u64,
            len: range.len(),
        };
        let mut out = [0u32];
        self.argmax_rows(&view, 1, range.len(), &mut out);
        out[0]
    }

    fn new_step(&self, max_rows: usize, max_seqs: usize, max_table: usize, n_groups: usize) -> CudaStep {
        CudaStep {
            caps: StepCaps {
                max_rows,
                max_seqs,
                max_table,
                n_groups,
            },
            n_rows: 0,
            ids: self.dev_alloc(max_rows),
            graphs: Graphs::default(),
            positions: self.dev_alloc(max_rows),
            row_seq: self.dev_alloc(max_rows),
            groups: (0..n_groups)
                .map(|_| DevGroup {
                    block_size: 0,
                    n_blocks: 0,
                    window: 0,
                    slots: self.dev_alloc(max_rows),
                    seqs: self.dev_alloc(4 * max_seqs),
                    tables: self.dev_alloc(max_table),
                    max_spans: 0,
                    max_parts32: 0,
                })
                .collect(),
            host_row_seq: Vec::with_capacity(max_rows),
            host_sort: Vec::with_capacity(max_rows),
            host_seqs: Vec::with_capacity(4 * max_seqs),
            state_slots: self.dev_alloc(max_seqs),
            n_seqs: 0,
            has_state_slots: false,
            n_state_slots: 0,
            pf_tiles: self.dev_alloc(3 * (max_rows / PF_ROWS + max_seqs + 1)),
            pf_n_tiles: 0,
            host_tiles: Vec::with_capacity(3 * (max_rows / PF_ROWS + max_seqs + 1)),
        }
    }

    fn write_step(&self, layout: &StepLayout, step: &mut CudaStep) -> Result<(), String> {
        step.n_rows = 0;
        layout.validate(&step.caps, &mut step.host_row_seq, &mut step.host_sort)?;
        self.write(&layout.positions, &mut step.positions);
        self.write(&step.host_row_seq, &mut step.row_seq);
        for (dst, src) in step.groups.iter_mut().zip(&layout.groups) {
            dst.block_size = src.block_size;
            dst.n_blocks = src.n_blocks;
            dst.window = src.window;
            self.write(&src.slots, &mut dst.slots);
            step.host_seqs.clear();
            for s in &src.seqs {
                step.host_seqs
                    .extend_from_slice(&[s.first_row, s.n_rows, s.table_start, s.table_len]);
            }
            self.write(&step.host_seqs, &mut dst.seqs);
            self.write(&src.block_tables, &mut dst.tables);
            let w = src.window as usize;
            // Positions per attention part (`SPAN` of the kernel `attention_step` takes).
            let span = if self.older { 256 } else { 64 };
            // The most parts of `span` positions any row has: a power of two, so decode
            // steps share a recording over many positions (parts past a row's last one
            // are empty and cost one early exit).
            let most_parts = |span: usize| {
                layout
                    .positions
                    .iter()
                    .zip(&step.host_row_seq)
                    .filter(|(_, &s)| s != u32::MAX)
                    .map(|(&p, _)| {
                        let p = p as usize;
                        let first = if w == 0 { 0 } else { (p + 1).saturating_sub(w) };
                        p / span - first / span + 1
                    })
                    .max()
                    .unwrap_or(1)
                    .next_power_of_two()
            };
            dst.max_spans = most_parts(span);
            dst.max_parts32 = if self.attn == AttnKernel::Dec {
                most_parts(ATTN_SPAN)
            } else {
                0
            };
        }
        step.n_seqs = layout.groups.first().map_or(0, |g| g.seqs.len());
        step.pf_n_tiles = 0;
        if let Some(g) = layout.groups.first() {
            if prefill_tiles(&g.seqs, layout.positions.len(), &mut step.host_tiles) {
                self.write(&step.host_tiles, &mut step.pf_tiles);
                step.pf_n_tiles = step.host_tiles.len() / 3;
            }
        }
        step.has_state_slots = !layout.state_slots.is_empty();
        step.n_state_slots = layout.n_state_slots as usize;
        self.write(&layout.state_slots, &mut step.state_slots);
        self.check()?;
        step.n_rows = layout.positions.len();
        Ok(())
    }

    fn write_step_tokens(&self, ids: &[u32], step: &mut CudaStep) -> Result<(), String> {
        if ids.len() != step.n_rows {
            return Err(format!("{} token ids for a step of {} rows", ids.len(), step.n_rows));
        }
        self.write(ids, &mut step.ids);
        self.check()
    }

    fn embed_step(&self, table: &CudaMat, ids: &[u32], step: &CudaStep, out: &mut CudaBuf) {
        let n = ids.len();
        assert!(n == step.n_rows && n * table.cols <= out.len, "embed_step out of range");
        self.embed_ids(table, step.ids.ptr, n, out);
    }

    fn begin_graph(&self, step: &mut CudaStep, key: Option<u64>) -> GraphMode {
        let Some(key) = key else { return GraphMode::Eager };
        if self.failed() || !self.graphs.load(Ordering::Relaxed) || self.profile.is_some() {
            return GraphMode::Eager;
        }
        // The attention's grid depends on the parts per row of each group.
        let key = step.groups.iter().fold(key, |k, g| {
            (k.wrapping_mul(0x100_0000_01b3) ^ g.max_spans as u64).wrapping_mul(0x100_0000_01b3) ^ g.max_parts32 as u64
        });
        // And the prefill attention's grid on its tiles.
        let key = key.wrapping_mul(0x100_0000_01b3) ^ step.pf_n_tiles as u64;
        let generation = self.generation.load(Ordering::Relaxed);
        let g = &mut step.graphs;
        match g.recorded.get(&key) {
            Some(r) if r.generation == generation => {
                g.current = Some(key);
                return GraphMode::Replay;
            }
            Some(_) => {
                // Recorded against scratch buffers since replaced.
                g.recorded.remove(&key);
                g.seen.remove(&key);
            }
            None => {}
        }
        if g.seen.insert(key) {
            return GraphMode::Eager;
        }
        self.capture_broken.store(false, Ordering::Relaxed);
        if let Err(e) = self
            .stream
            .begin_capture(drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        {
            self.fail(format!("CUDA graph capture failed to start: {e}"));
            return GraphMode::Eager;
        }
        self.capturing.store(true, Ordering::Relaxed);
        g.current = Some(key);
        GraphMode::Capture
    }

    fn end_graph(&self, step: &mut CudaStep, mode: GraphMode) -> bool {
        let g = &mut step.graphs;
        match mode {
            GraphMode::Eager => true,
            GraphMode::Replay => {
                let key = g.current.take().expect("a replay under way");
                if self.failed() {
                    return true;
                }
                if let Some(r) = g.recorded.get(&key) {
                    if let Err(e) = r.graph.launch() {
                        self.fail(format!("CUDA graph launch failed: {e}"));
                    }
                }
                true
            }
            GraphMode::Capture => {
                self.capturing.store(false, Ordering::Relaxed);
                let key = g.current.take().expect("a capture under way");
                let r = self.stream.end_capture(drv_sys::CUgraphInstantiate_flags(0));
                let broken = self.capture_broken.swap(false, Ordering::Relaxed);
                match r {
                    Ok(Some(graph)) if !broken && !self.failed() => {
                        if let Err(e) = graph.launch() {
                            self.fail(format!("CUDA graph launch failed: {e}"));
                        }
                        let generation = self.generation.load(Ordering::Relaxed);
                        g.recorded.insert(key, Recorded { graph, generation });
                        true
                    }
                    Ok(_) => false,
                    Err(e) => {
                        // A failed capture leaves the stream usable; run eagerly.
                        if !broken {
                            eprintln!("warning: CUDA graph capture failed ({e}); running the step eagerly");
                        }
                        false
                    }
                }
            }
        }
    }

    fn alloc_kv_pages(&self, n_blocks: usize, block_size: usize, kv_heads: usize, head_dim: usize) -> CudaKv {
        let len = n_blocks
            .checked_mul(block_size)
            .and_then(|x| x.checked_mul(kv_heads))
            .and_then(|x| x.checked_mul(head_dim))
            .expect("KV pool size overflows");
        CudaKv {
            data: self.dev_alloc(len),
        }
    }

    fn rope_step(
        &self,
        x: &mut CudaBuf,
        n: usize,
        n_heads: usize,
        head_dim: usize,
        step: &CudaStep,
        rope: &RopeParams<'_, Self>,
    ) {
        assert_eq!(n, step.n_rows, "rope_step over {n} rows of a {}-row step", step.n_rows);
        assert!(n * n_heads * head_dim <= x.len, "rope_step input too small");
        let half = rope.inv_freq.len;
        assert!(2 * half <= head_dim, "RoPE table wider than the head");
        self.launch(
            "rope_step",
            (n as u32, 1, 1),
            128,
            &[
                Arg::P(x.ptr),
                Arg::P(step.positions.ptr),
                Arg::P(rope.inv_freq.ptr),
                Arg::U(half as u32),
                Arg::U(n_heads as u32),
                Arg::U(head_dim as u32),
                Arg::I(rope.neox as i32),
            ],
        );
    }

    fn kv_write_step(
        &self,
        cache: &mut CudaKv,
        src: &CudaBuf,
        n: usize,
        step: &CudaStep,
        group: usize,
        shape: &AttnShape,
    ) {
        assert_eq!(
            n, step.n_rows,
            "kv_write_step over {n} rows of a {}-row step",
            step.n_rows
        );
        let g = &step.groups[group];
        let (kvh, hd, bs) = (shape.n_kv_heads, shape.head_dim, g.block_size as usize);
        assert!(n * kvh * hd <= src.len, "kv_write_step input too small");
        assert!(
            g.n_blocks as usize * bs * kvh * hd <= cache.data.len,
            "KV pool smaller than the step's group"
        );
        self.launch(
            "kv_write_step",
            (n as u32, 1, 1),
            128,
            &[
                Arg::P(cache.data.ptr),
                Arg::P(src.ptr),
                Arg::P(g.slots.ptr),
                Arg::U(kvh as u32),
                Arg::U(hd as u32),
                Arg::U(bs as u32),
            ],
        );
    }

    fn rope_kv_write_step(
        &self,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        n: usize,
        step: &CudaStep,
        rope: &RopeParams<'_, Self>,
        k_cache: &mut CudaKv,
        v_cache: &mut CudaKv,
        group: usize,
        shape: &AttnShape,
    ) {
        self.rope_kv_launch(q, k, v, None, n, step, rope, k_cache, v_cache, group, shape);
    }

    fn qk_norm_rope_kv_write_step(
        &self,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        norms: &HeadNorms<'_, Self>,
        scratch: (&mut CudaBuf, &mut CudaBuf),
        n: usize,
        step: &CudaStep,
        rope: &RopeParams<'_, Self>,
        k_cache: &mut CudaKv,
        v_cache: &mut CudaKv,
        group: usize,
        shape: &AttnShape,
    ) {
        let hd = shape.head_dim;
        // The fused norm mirrors norm_q8 (rms_norm's kernel at widths up to
        // NORM_Q8_MAX_WIDTH) with a thread an element: heads up to ROPE_THREADS wide.
        if self.older || hd > ROPE_THREADS as usize || norms.q.len != hd || norms.k.len != hd {
            crate::backend::qk_norm_then_rope(
                self, q, k, v, norms, scratch, n, step, rope, k_cache, v_cache, group, shape,
            );
            return;
        }
        self.rope_kv_launch(q, k, v, Some(norms), n, step, rope, k_cache, v_cache, group, shape);
    }

    fn attention_step(
        &self,
        q: &CudaBuf,
        k: &CudaKv,
        v: &CudaKv,
        n: usize,
        step: &CudaStep,
        group: usize,
        shape: &AttnShape,
        sinks: Option<&CudaBuf>,
        out: &mut CudaBuf,
    ) {
        assert_eq!(
            n, step.n_rows,
            "attention_step over {n} rows of a {}-row step",
            step.n_rows
        );
        let g = &step.groups[group];
        assert_eq!(
            g.window as usize, shape.window,
            "attention window differs from the group's"
        );
        let (nh, kvh, hd) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
        assert!(
            hd <= MAX_HEAD_DIM && kvh > 0 && nh % kvh == 0,
            "attention shape unsupported"
        );
        assert!(
            n * nh * hd <= q.len && n * nh * hd <= out.len,
            "attention buffers too small"
        );
        assert!(
            sinks.is_none_or(|x| x.len >= nh),
            "attention sinks shorter than the {nh} heads"
        );
        let bs = g.block_size as usize;
        assert!(
            g.n_blocks as usize * bs * kvh * hd <= k.data.len && k.data.len == v.data.len,
            "KV pools smaller than the step's group"
        );
        // By default a warp a part (attn_dec_*, head_dim 64 / 128), the grid's z its
        // blocks; otherwise attn_spans64 (chunks of up to eight query heads).
        let dec = self.attn == AttnKernel::Dec && !self.older && (hd == 64 || hd == 128);
        // Prompts: 64 rows of a sequence a block on the tensor cores.
        if dec && step.pf_n_tiles > 0 && self.attn_tc.load(Ordering::Relaxed) {
            self.launch(
                if hd == 64 {
                    "attn_prefill_h64"
                } else {
                    "attn_prefill_h128"
                },
                (step.pf_n_tiles as u32, nh as u32, 1),
                PF_THREADS,
                &[
                    Arg::P(q.ptr),
                    Arg::P(k.data.ptr),
                    Arg::P(v.data.ptr),
                    Arg::P(step.positions.ptr),
                    Arg::P(g.seqs.ptr),
                    Arg::P(g.tables.ptr),
                    Arg::P(step.pf_tiles.ptr),
                    Arg::U(nh as u32),
                    Arg::U(kvh as u32),
                    Arg::U(g.block_size),
                    Arg::U(g.window),
                    Arg::F(shape.scale),
                    Arg::F(shape.softcap),
                    Arg::P(sinks.map_or(0, |x| x.ptr)),
                    Arg::U(sinks.is_some() as u32),
                    Arg::P(out.ptr),
                ],
            );
            return;
        }
        let (kernel, group) = match (dec, hd) {
            (true, 64) => ("attn_dec_h64", DEC_G),
            (true, _) => ("attn_dec_h128", DEC_G),
            _ => ("attn_spans64", ATTN_GROUP),
        };
        let spans = if dec {
            g.max_parts32.max(1).div_ceil(DEC_WARPS)
        } else {
            g.max_spans.max(1)
        };
        let per_row = nh * spans * (hd + 2) * 4;
        let rows_per_pass = (ATTN_PART_BYTES / per_row).clamp(1, n);
        let Ok(mut sc) = self.scratch.lock() else { return };
        self.grow(&mut sc.part_o, rows_per_pass * nh * spans * hd);
        self.grow(&mut sc.part_ml, rows_per_pass * nh * spans * 2);
        let chunks = (nh / kvh).div_ceil(if self.older { ATTN_GROUP } else { group });
        if !self.older {
            self.grow(&mut sc.attn_done, rows_per_pass * kvh * chunks);
        }
        if self.failed()
            || sc.part_o.len < rows_per_pass * nh * spans * hd
            || sc.part_ml.len < rows_per_pass * nh * spans * 2
            || (!self.older && sc.attn_done.len < rows_per_pass * kvh * chunks)
        {
            return;
        }
        for row0 in (0..n).step_by(rows_per_pass) {
            let m = rows_per_pass.min(n - row0);
            let mut args = vec![
                Arg::P(q.ptr),
                Arg::P(k.data.ptr),
                Arg::P(v.data.ptr),
                Arg::P(step.positions.ptr),
                Arg::P(step.row_seq.ptr),
                Arg::P(g.seqs.ptr),
                Arg::P(g.tables.ptr),
                Arg::U(row0 as u32),
                Arg::U(nh as u32),
                Arg::U(kvh as u32),
                Arg::U(hd as u32),
                Arg::U(g.block_size),
                Arg::U(g.window),
                Arg::F(shape.scale),
                Arg::F(shape.softcap),
                Arg::U(spans as u32),
                Arg::P(sc.part_o.ptr),
                Arg::P(sc.part_ml.ptr),
            ];
            let grid = (m as u32, (kvh * chunks) as u32, spans as u32);
            let out_rows = out.ptr + (row0 * nh * hd * 4) as u64;
            if !self.older {
                // The parts and their fold in one launch (the last part's block folds).
                args.extend([
                    Arg::P(sc.attn_done.ptr),
                    Arg::P(sinks.map_or(0, |x| x.ptr)),
                    Arg::U(sinks.is_some() as u32),
                    Arg::P(out_rows),
                ]);
                let threads = if dec { DEC_WARPS * 32 } else { ATTN_THREADS };
                if dec && m == n && self.attn_q8 {
                    // One pass: the kernel also writes its output's 8-bit sets (32-element
                    // blocks) for the o projection's decode product.
                    drop(sc);
                    self.launch_q8_producer_cluster(
                        kernel,
                        grid,
                        threads as u32,
                        1,
                        &args,
                        out.ptr,
                        n * nh * hd,
                        nh * hd,
                        true,
                    );
                    return;
                }
                if dec {
                    args.push(Arg::U(0));
                    args.extend([Arg::P(0); 6]);
                }
                self.launch(kernel, grid, threads as u32, &args);
                continue;
            }
            self.launch("attn_spans", grid, ATTN_THREADS as u32, &args);
            self.launch(
                "attn_combine",
                (m as u32, nh as u32, 1),
                hd.next_power_of_two().clamp(32, 256) as u32,
                &[
                    Arg::P(sc.part_o.ptr),
                    Arg::P(sc.part_ml.ptr),
                    Arg::U(row0 as u32),
                    Arg::U(nh as u32),
                    Arg::U(hd as u32),
                    Arg::U(spans as u32),
                    Arg::P(sinks.map_or(0, |x| x.ptr)),
                    Arg::U(sinks.is_some() as u32),
                    Arg::P(out.ptr),
                ],
            );
        }
    }

    fn attention_mla_step(
        &self,
        q: &CudaBuf,
        kv: &CudaKv,
        n: usize,
        step: &CudaStep,
        group: usize,
        shape: &AttnShape,
        v_dim: usize,
        out: &mut CudaBuf,
    ) {
        assert_eq!(
            n, step.n_rows,
            "attention_mla_step over {n} rows of a {}-row step",
            step.n_rows
        );
        let g = &step.groups[group];
        assert_eq!(
            g.window as usize, shape.window,
            "attention window differs from the group's"
        );
        let (nh, hd) = (shape.n_heads, shape.head_dim);
        assert!(
            shape.n_kv_heads == 1 && v_dim >= 1 && v_dim <= hd && v_dim <= MLA_THREADS * MLA_PER_THREAD,
            "latent attention shape unsupported"
        );
        assert!(
            n * nh * hd <= q.len && n * nh * v_dim <= out.len,
            "attention buffers too small"
        );
        assert!(
            g.n_blocks as usize * g.block_size as usize * hd <= kv.data.len,
            "KV pool smaller than the step's group"
        );
        if n == 0 {
            return;
        }
        self.launch(
            "attn_mla",
            (n as u32, nh as u32, 1),
            MLA_THREADS as u32,
            &[
                Arg::P(q.ptr),
                Arg::P(kv.data.ptr),
                Arg::P(step.positions.ptr),
                Arg::P(step.row_seq.ptr),
                Arg::P(g.seqs.ptr),
                Arg::P(g.tables.ptr),
                Arg::U(nh as u32),
                Arg::U(hd as u32),
                Arg::U(v_dim as u32),
                Arg::U(g.block_size),
                Arg::U(g.window),
                Arg::F(shape.scale),
                Arg::F(shape.softcap),
                Arg::P(out.ptr),
            ],
        );
    }
}

/// Threads of an `attn_mla` block and the value elements each accumulates (attention.cu's
/// `MLA_THREADS`, `MLA_PER_THREAD`).
const MLA_THREADS: usize = 128;
const MLA_PER_THREAD: usize = 8;

/// Threads of a row-norm block: a power of two, enough for the row, at most 1024.
fn norm_threads(width: usize) -> u32 {
    width.next_power_of_two().clamp(32, 1024) as u32
}

impl CudaBackend {
    /// `rope_kv_write_step` (attention.cu), with the per-head q/k norms first when
    /// `norms` is given (heads up to `ROPE_THREADS` wide).
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_launch(
        &self,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        norms: Option<&HeadNorms<'_, Self>>,
        n: usize,
        step: &CudaStep,
        rope: &RopeParams<'_, Self>,
        k_cache: &mut CudaKv,
        v_cache: &mut CudaKv,
        group: usize,
        shape: &AttnShape,
    ) {
        assert_eq!(
            n, step.n_rows,
            "rope_kv_write_step over {n} rows of a {}-row step",
            step.n_rows
        );
        if self.older {
            self.rope_step(q, n, shape.n_heads, shape.head_dim, step, rope);
            self.rope_step(k, n, shape.n_kv_heads, shape.head_dim, step, rope);
            self.kv_write_step(k_cache, k, n, step, group, shape);
            self.kv_write_step(v_cache, v, n, step, group, shape);
            return;
        }
        let g = &step.groups[group];
        let (nh, kvh, hd, bs) = (shape.n_heads, shape.n_kv_heads, shape.head_dim, g.block_size as usize);
        let half = rope.inv_freq.len;
        assert!(2 * half <= hd, "RoPE table wider than the head");
        assert!(
            n * nh * hd <= q.len && n * kvh * hd <= k.len && n * kvh * hd <= v.len,
            "rope_kv_write_step inputs too small"
        );
        assert!(
            g.n_blocks as usize * bs * kvh * hd <= k_cache.data.len
                && g.n_blocks as usize * bs * kvh * hd <= v_cache.data.len,
            "KV pools smaller than the step's group"
        );
        if n == 0 {
            return;
        }
        self.launch(
            "rope_kv_write_step",
            (n as u32, (nh + kvh) as u32, 1),
            ROPE_THREADS,
            &[
                Arg::P(q.ptr),
                Arg::P(k.ptr),
                Arg::P(v.ptr),
                Arg::P(k_cache.data.ptr),
                Arg::P(v_cache.data.ptr),
                Arg::P(step.positions.ptr),
                Arg::P(g.slots.ptr),
                Arg::P(rope.inv_freq.ptr),
                Arg::U(half as u32),
                Arg::U(nh as u32),
                Arg::U(kvh as u32),
                Arg::U(hd as u32),
                Arg::U(bs as u32),
                Arg::I(rope.neox as i32),
                Arg::P(norms.map_or(0, |x| x.q.ptr)),
                Arg::P(norms.map_or(0, |x| x.k.ptr)),
                Arg::F(norms.map_or(0.0, |x| x.eps)),
            ],
        );
    }
}
