//! The model registry and the trait every family implements.
//!
//! Dispatch: GGUF `general.architecture`, else config.json `architectures[0]`, then
//! `model_type` → family; the family then picks its variant from the config. One file
//! per family; a new family adds its file here and one entry to `FAMILIES`.

use std::any::Any;
use std::sync::Arc;

use ffai_kernels::cpu::CpuBackend;
use ffai_kernels::cuda::backend::CudaBackend;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::GenerationParameters;
use crate::inspect::Tap;
use crate::weights::Weights;
use ffai_kernels::backend::StepLayout;

pub mod decoder;
pub mod deepseek;
pub mod falcon_h1;
pub mod gemma;
pub mod gemma4;
pub mod gpt_oss;
pub mod granite;
pub mod granite4;
pub mod hybrid_gguf;
pub mod jamba;
pub mod lfm2;
pub mod llama;
pub mod mamba2;
pub mod mixtral;
pub mod mla;
pub mod moe;
pub mod nemotron_h;
pub mod olmo2;
pub mod olmoe;
pub mod phi3;
pub mod qwen3;
pub mod qwen3_5;
pub mod qwen3_moe;
pub mod qwen3_next;
pub mod recurrent;
pub mod starcoder2;

/// Where a model's tensors live and its ops run.
#[derive(Clone)]
pub enum Device {
    Cpu(Arc<CpuBackend>),
    Cuda(Arc<CudaBackend>),
}

impl Device {
    /// GPU `ordinal`, its kernels compiled; an error (never a panic) without a driver, a
    /// GPU of that number, NVRTC or cuBLAS.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Self::cuda_with(ordinal, false)
    }

    /// As [`cuda`](Self::cuda); `profile`: time every kernel (see `take_profile`).
    pub fn cuda_with(ordinal: usize, profile: bool) -> Result<Device> {
        CudaBackend::with_options(ordinal, profile)
            .map(|b| Device::Cuda(Arc::new(b)))
            .map_err(Error::new)
    }

    /// (free, total) device memory of a GPU device; None on the CPU.
    pub fn gpu_memory(&self) -> Option<(usize, usize)> {
        match self {
            Device::Cpu(_) => None,
            Device::Cuda(b) => b.mem_info().ok(),
        }
    }

    pub fn cpu(threads: usize) -> Device {
        Device::Cpu(Arc::new(CpuBackend::new(threads)))
    }

    /// `profile`: time every op; `kv_f32`: keep the KV cache in f32 instead of f16.
    pub fn cpu_with(threads: usize, profile: bool, kv_f32: bool) -> Device {
        Device::Cpu(Arc::new(CpuBackend::with_options(threads, profile, kv_f32)))
    }

    /// As [`cpu_with`](Self::cpu_with); `f32_activations`: every matmul dots the
    /// (dequantized) weights with f32 activations instead of 8-bit ones.
    pub fn cpu_configured(threads: usize, profile: bool, kv_f32: bool, f32_activations: bool) -> Device {
        Device::Cpu(Arc::new(
            CpuBackend::with_options(threads, profile, kv_f32).with_f32_activations(f32_activations),
        ))
    }

    /// Per-op (name, seconds, calls) since the last call, when loaded with profiling.
    pub fn take_profile(&self) -> Vec<(String, f64, u64)> {
        match self {
            Device::Cpu(b) => b.take_profile(),
            Device::Cuda(b) => b.take_profile(),
        }
    }

    /// Fixed cost of one parallel region on this device, in seconds.
    pub fn region_overhead_seconds(&self) -> f64 {
        match self {
            Device::Cpu(b) => b.region_overhead_seconds(20_000),
            Device::Cuda(_) => 0.0,
        }
    }

    pub fn name(&self) -> String {
        use ffai_kernels::backend::Backend;
        match self {
            Device::Cpu(b) => b.name(),
            Device::Cuda(b) => b.name(),
        }
    }
}

/// A one-sequence state for `forward`: the position, the context it was sized for, the
/// prefill chunk and the tap, over a one-sequence [`BatchState`] (see [`one_seq`]).
/// Families that run on the paged batch (all of them today) get it from the default
/// [`LanguageModel::new_state`]; the boxed part keeps the trait object-safe.
pub struct InferenceState {
    /// Tokens already in the cache (the position of the next token).
    pub pos: usize,
    /// Cache capacity in tokens.
    pub max_seq: usize,
    /// Largest number of tokens one forward pass processes at once (prefill step).
    pub chunk: usize,
    pub tap: Tap,
    pub(crate) inner: Box<dyn Any + Send>,
}

/// What a [`BatchState`] is allocated for: nothing grows afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchShape {
    /// Most token rows in one step (the scheduler's token budget).
    pub max_rows: usize,
    /// Most sequences in one step.
    pub max_seqs: usize,
    /// Most block-table entries of one KV group in one step (all sequences together).
    pub max_table: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Blocks of each KV group's pools, one entry per [`LanguageModel::kv_windows`] group
    /// (the engine gives every group the whole shared pool; a one-sequence state gives a
    /// sliding-window group only the ring of blocks its window needs).
    pub group_blocks: Vec<usize>,
    /// Longest sequence (decides LongRoPE's table choice, as a state's context does).
    pub max_seq_len: usize,
    /// Rows whose logits one LM-head pass computes (more are done in several passes).
    pub max_logit_rows: usize,
    /// Recurrent-state slots (models with recurrent layers: at least one; others: 0).
    pub state_slots: usize,
}

/// What a model with recurrent layers keeps per sequence ([`LanguageModel::recurrent_state`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecurrentInfo {
    /// Bytes of one sequence's state over all recurrent layers.
    pub slot_bytes: u64,
    /// Rows of the chunked scan (0: none). A sequence's results are the same bits however
    /// its rows are cut into steps as long as the cuts fall on multiples of this (or at
    /// the ends of its token runs); the engine cuts prefill chunks there.
    pub scan_chunk: usize,
}

/// A model's activations for up to `max_rows` rows, its paged K/V pools and its step
/// metadata, allocated once ([`LanguageModel::new_batch`]).
pub struct BatchState {
    pub shape: BatchShape,
    pub(crate) inner: Box<dyn Any + Send>,
}

pub mod one_seq;

/// What a step hands back for its `logit_rows`, in their order.
pub enum StepOut<'a> {
    /// The rows' logits, `vocab` each.
    Logits(&'a mut [f32]),
    /// Each row's argmax (lowest id on ties), for rows sampled greedily with nothing
    /// that changes the logits first: on a GPU 4 bytes a row come back, not the rows.
    Argmax(&'a mut [u32]),
    /// Each row's top candidates, for rows whose samplers can decide from them
    /// ([`crate::generate::Sampler::candidate_plan`]): on a GPU `k * 8 + 8` bytes a row
    /// come back, and the whole row only where the candidates do not decide.
    Candidates(CandidateOut<'a>),
}

/// [`StepOut::Candidates`]: per logit row `r` its plan, and what the step writes back.
pub struct CandidateOut<'a> {
    /// Candidates a row (1 ..= `ffai_kernels::ops::MAX_CANDIDATES`).
    pub k: usize,
    /// Each row's sampler's plan (its `inv_t` scales the row).
    pub plans: &'a [crate::generate::CandidatePlan],
    /// `ids[r * k..]`, `vals[r * k..]`, `tail[r]`: `Backend::top_candidates_rows`.
    pub ids: &'a mut [u32],
    pub vals: &'a mut [f32],
    pub tail: &'a mut [f64],
    /// `full[r]`: the candidates did not decide row `r` (`CandidatePlan::decides`), so its
    /// logits were written to `rows[r * vocab..]`; other rows of `rows` are left as they were.
    pub full: &'a mut [bool],
    pub rows: &'a mut [f32],
    /// The allowed-token masks of the rows whose plan is `masked` (a grammar), asked for
    /// when their LM-head pass is about to select the candidates (so a mask computed
    /// beside the forward is waited for only then). None: a masked row gets its whole
    /// row back (`full`), to be masked on the host.
    pub masks: Option<RowMasks<'a>>,
}

/// [`CandidateOut::masks`]: where the masked rows' allowed tokens come from.
pub struct RowMasks<'a> {
    /// Writes logit row `r`'s mask into `words` (`vocab.div_ceil(32)` of them, zero when
    /// called): bit `t % 32` of word `t / 32` set when token `t` is allowed
    /// (`Backend::top_candidates_rows`). All zero: nothing is allowed (the row's
    /// candidates are then empty, and the sampler knows why).
    pub fill: &'a mut dyn FnMut(usize, &mut [u32]),
    /// Working space for a pass's masks, kept by the caller between steps.
    pub words: &'a mut Vec<u32>,
}

impl CandidateOut<'_> {
    /// Writes the candidates of the `m` rows from logit row `first` on, whose logits are
    /// the first `m` rows of `logits`, and the whole rows the candidates do not decide.
    pub(crate) fn write_pass<B: ffai_kernels::backend::Backend>(
        &mut self,
        b: &B,
        logits: &B::Buf,
        first: usize,
        m: usize,
        vocab: usize,
    ) {
        let k = self.k;
        let (r0, r1) = (first, first + m);
        let inv_t: Vec<f32> = self.plans[r0..r1].iter().map(|p| p.inv_t).collect();
        // The pass's masks when any of its rows has one (the others allow every token).
        let wpr = vocab.div_ceil(32);
        let any_masked = self.plans[r0..r1].iter().any(|p| p.masked);
        let mask = match &mut self.masks {
            Some(rm) if any_masked => {
                rm.words.clear();
                rm.words.resize(m * wpr, u32::MAX);
                for r in r0..r1 {
                    if self.plans[r].masked {
                        let w = &mut rm.words[(r - r0) * wpr..(r - r0 + 1) * wpr];
                        w.fill(0);
                        (rm.fill)(r, w);
                    }
                }
                Some(&rm.words[..m * wpr])
            }
            _ => None,
        };
        b.top_candidates_rows(
            logits,
            m,
            vocab,
            k,
            &inv_t,
            mask,
            &mut self.ids[r0 * k..r1 * k],
            &mut self.vals[r0 * k..r1 * k],
            &mut self.tail[r0..r1],
        );
        let unmasked = mask.is_none();
        let mut scratch = Vec::new();
        for r in r0..r1 {
            let (ids, vals) = (&self.ids[r * k..(r + 1) * k], &self.vals[r * k..(r + 1) * k]);
            // A masked row whose mask never came is decided on the host, from its whole row.
            self.full[r] =
                (self.plans[r].masked && unmasked) || !self.plans[r].decides(k, ids, vals, self.tail[r], &mut scratch);
            if self.full[r] {
                let j = r - r0;
                b.download(
                    logits,
                    j * vocab..(j + 1) * vocab,
                    &mut self.rows[r * vocab..(r + 1) * vocab],
                );
            }
        }
    }
}

pub trait LanguageModel: Send + Sync {
    fn config(&self) -> &ModelConfig;
    fn family(&self) -> &'static str;
    fn variant(&self) -> &'static str;
    /// The generation parameters this family/variant ships with.
    fn default_parameters(&self) -> GenerationParameters;
    fn device_name(&self) -> String;
    /// KV-cache memory by layer kind for a context of `max_seq` tokens and prefill chunk
    /// `chunk`: (kind, layers, bytes).
    fn kv_bytes_by_kind(&self, max_seq: usize, chunk: usize) -> Vec<(String, usize, usize)>;
    /// The KV groups: one per distinct attention window (0 = global), in the order of
    /// their first layer. A step's layout has one `GroupLayout` per group, in this order.
    fn kv_windows(&self) -> Vec<usize>;
    /// Bytes of memory the model's device can give to states (see `Backend::memory_bytes`).
    fn memory_bytes(&self) -> u64;
    /// Bytes of K and V of one block of `block_size` positions in every layer of a group,
    /// per group (what a block id costs in each group's pools).
    fn kv_block_bytes(&self, block_size: usize) -> Vec<u64>;
    /// Activations, paged K/V pools and step metadata for `shape`, refused (before
    /// allocating) beyond the backend's memory.
    fn new_batch(&self, shape: &BatchShape) -> Result<BatchState>;
    /// One step over a flat batch: row `r` is token `tokens[r]` at the position and in the
    /// sequence `layout` gives. Writes each row's K/V through the layout's slots, attends
    /// each sequence's rows over its own blocks, and writes the logits of the rows in
    /// `logit_rows` (in that order, `vocab` each; any number, in passes of the shape's
    /// `max_logit_rows`) into `out` (or only their argmax ids). A row's results depend on
    /// its token, position and its own sequence's K/V only, not on what else the batch
    /// holds.
    fn forward_batch(
        &self,
        tokens: &[u32],
        layout: &StepLayout,
        logit_rows: &[u32],
        state: &mut BatchState,
        tap: &mut Tap,
        out: StepOut<'_>,
    ) -> Result<()>;
    /// The model's per-sequence recurrent state, if it has recurrent layers: each sequence
    /// of a step then names its state slot (`StepLayout::state_slots`).
    fn recurrent_state(&self) -> Option<RecurrentInfo> {
        None
    }
    /// Copies recurrent-state slot `src` to `dst` in every recurrent layer (a state kept
    /// for prefix caching, or restored from it).
    fn copy_state_slot(&self, state: &mut BatchState, src: usize, dst: usize) -> Result<()> {
        let _ = (state, src, dst);
        Err(Error::new("the model has no recurrent state"))
    }
    /// A fresh state with room for `max_seq` tokens, processing at most `chunk` tokens
    /// per forward pass: a one-sequence batch whose block tables are fixed (a ring for
    /// sliding-window groups).
    fn new_state(&self, max_seq: usize, chunk: usize) -> Result<InferenceState> {
        one_seq::new_state(self, max_seq, chunk)
    }
    /// Runs `tokens` at positions `state.pos..`, appending them to the cache, and writes
    /// the logits of the last token (or of every token, `[n, vocab]`, when `all_logits`)
    /// into `logits`. Longer inputs are processed in chunks of `state.chunk`, each one
    /// step of [`forward_batch`](Self::forward_batch).
    fn forward(
        &self,
        tokens: &[u32],
        state: &mut InferenceState,
        all_logits: bool,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        one_seq::forward(self, tokens, state, all_logits, logits)
    }
    /// [`forward`](Self::forward) for the last token's row only, handed back as `out`
    /// asks (its slices sized for one row): a sampler that can decide from candidates
    /// needs no whole row from a GPU.
    fn forward_last(&self, tokens: &[u32], state: &mut InferenceState, out: StepOut<'_>) -> Result<()> {
        one_seq::forward_last(self, tokens, state, out)
    }
    /// Whether the cache can be cut back to its first `len` positions and continued from
    /// there: always for global layers; a sliding-window layer's ring must still hold the
    /// `window` positions before `len`.
    fn can_rewind(&self, state: &InferenceState, len: usize) -> bool {
        // A recurrent state holds only the latest position: it cannot go back.
        if self.recurrent_state().is_some() {
            return len == state.pos;
        }
        one_seq::can_rewind(state, len)
    }
}

/// A registered family: the names it answers to and how to build it.
pub struct Family {
    pub name: &'static str,
    /// The shapes inside the family (each a type implementing the family's variant trait).
    pub variants: &'static [&'static str],
    /// config.json `architectures[0]` values.
    pub hf_architectures: &'static [&'static str],
    /// config.json `model_type` values.
    pub model_types: &'static [&'static str],
    /// GGUF `general.architecture` values.
    pub gguf_architectures: &'static [&'static str],
    pub load: fn(&ModelConfig, &Weights, &Device) -> Result<Box<dyn LanguageModel>>,
}

pub static FAMILIES: &[Family] = &[
    llama::FAMILY,
    qwen3::FAMILY,
    phi3::FAMILY,
    gemma::FAMILY,
    gemma4::FAMILY,
    olmo2::FAMILY,
    granite::FAMILY,
    starcoder2::FAMILY,
    qwen3_moe::FAMILY,
    mixtral::FAMILY,
    olmoe::FAMILY,
    gpt_oss::FAMILY,
    deepseek::FAMILY_V2,
    deepseek::FAMILY_V3,
    lfm2::FAMILY,
    mamba2::FAMILY,
    nemotron_h::FAMILY,
    granite4::FAMILY,
    qwen3_next::FAMILY,
    qwen3_5::FAMILY,
    qwen3_5::FAMILY_MOE,
    falcon_h1::FAMILY,
    jamba::FAMILY,
];

/// Finds the family for a config: architecture first, then model_type.
pub fn family_for(cfg: &ModelConfig, from_gguf: bool) -> Result<&'static Family> {
    let by_arch = FAMILIES.iter().find(|f| {
        if from_gguf {
            f.gguf_architectures.contains(&cfg.architecture.as_str())
        } else {
            f.hf_architectures.contains(&cfg.architecture.as_str())
        }
    });
    if let Some(f) = by_arch {
        return Ok(f);
    }
    if let Some(f) = FAMILIES
        .iter()
        .find(|f| f.model_types.contains(&cfg.model_type.as_str()))
    {
        return Ok(f);
    }
    let supported: Vec<String> = FAMILIES
        .iter()
        .map(|f| {
            format!(
                "{} ({})",
                f.name,
                f.hf_architectures
                    .iter()
                    .chain(f.gguf_architectures)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    let what = if cfg.architecture.is_empty() {
        &cfg.model_type
    } else {
        &cfg.architecture
    };
    Err(Error::new(format!(
        "unsupported architecture \"{what}\"; supported: {}",
        supported.join("; ")
    )))
}

/// Checks that token ids fit the vocabulary and the cache has room.
pub(crate) fn check_tokens(tokens: &[u32], state: &InferenceState, vocab: usize) -> Result<()> {
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::new(format!(
            "token id {bad} is outside the vocabulary ({vocab} tokens)"
        )));
    }
    if state.pos + tokens.len() > state.max_seq {
        return Err(Error::new(format!(
            "context full: {} tokens already cached + {} new exceed the context of {} tokens",
            state.pos,
            tokens.len(),
            state.max_seq
        )));
    }
    Ok(())
}
