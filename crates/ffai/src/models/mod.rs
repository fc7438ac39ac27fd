//! The model registry and the trait every family implements.
//!
//! Dispatch: GGUF `general.architecture`, else config.json `architectures[0]`, then
//! `model_type` → family; the family then picks its variant from the config. One file
//! per family; a new family adds its file here and one entry to `FAMILIES`.

use std::any::Any;
use std::sync::Arc;

use ffai_kernels::cpu::CpuBackend;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::GenerationParameters;
use crate::inspect::Tap;
use crate::weights::Weights;

pub mod decoder;
pub mod gemma;
pub mod granite;
pub mod llama;
pub mod olmo2;
pub mod phi3;
pub mod qwen3;
pub mod starcoder2;

/// Where a model's tensors live and its ops run.
#[derive(Clone)]
pub enum Device {
    Cpu(Arc<CpuBackend>),
}

impl Device {
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
        }
    }

    /// Fixed cost of one parallel region on this device, in seconds.
    pub fn region_overhead_seconds(&self) -> f64 {
        match self {
            Device::Cpu(b) => b.region_overhead_seconds(20_000),
        }
    }

    pub fn name(&self) -> String {
        use ffai_kernels::backend::Backend;
        match self {
            Device::Cpu(b) => b.name(),
        }
    }
}

/// Per-sequence state: the KV cache, position, preallocated activations and the tap.
/// The model-specific part is boxed so the trait stays object-safe.
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
    /// A fresh state with room for `max_seq` tokens, processing at most `chunk` tokens
    /// per forward pass.
    fn new_state(&self, max_seq: usize, chunk: usize) -> Result<InferenceState>;
    /// Runs `tokens` at positions `state.pos..`, appending them to the cache, and writes
    /// the logits of the last token (or of every token, `[n, vocab]`, when `all_logits`)
    /// into `logits`. Longer inputs are processed in chunks of `state.chunk`.
    fn forward(
        &self,
        tokens: &[u32],
        state: &mut InferenceState,
        all_logits: bool,
        logits: &mut Vec<f32>,
    ) -> Result<()>;
    /// Whether the cache can be cut back to its first `len` positions and continued from
    /// there: always for global layers; a sliding-window layer's ring must still hold the
    /// `window` positions before `len`.
    fn can_rewind(&self, state: &InferenceState, len: usize) -> bool;
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
    olmo2::FAMILY,
    granite::FAMILY,
    starcoder2::FAMILY,
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
