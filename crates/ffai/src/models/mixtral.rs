//! Mixtral (8x7B, 8x22B): the Mistral block with a mixture-of-experts MLP in every
//! layer: softmax over the experts, top-2, always renormalised (the same as a softmax
//! over the two largest logits). llama.cpp writes Mixtral as GGUF architecture `llama`
//! with expert tensors; the llama family hands such files here.

use super::decoder::{self, DecoderSpec, Identity};
use super::moe::{self, MoeAct, MoeRouting, MoeSpec};
use super::{Device, Family, LanguageModel};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "mixtral",
    variants: &["mixtral"],
    hf_architectures: &["MixtralForCausalLM"],
    model_types: &["mixtral"],
    // GGUF files say `llama`; `llama::load` passes those with experts to `load`.
    gguf_architectures: &[],
    load,
};

/// The Mixtral checkpoints.
pub struct Mixtral;

impl Mixtral {
    pub const NAME: &'static str = "mixtral";

    /// Mistral's instruct recommendation, as for dense Mistral: T 0.7.
    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters {
            temperature: 0.7,
            ..Default::default()
        }
    }
}

/// Whether a GGUF `llama` file is a Mixtral (it has experts).
pub fn is_gguf_mixtral(cfg: &ModelConfig) -> Result<bool> {
    Ok(cfg.is_gguf() && cfg.extra_usize("num_local_experts", "expert_count")?.unwrap_or(0) > 0)
}

pub fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let sparse = if cfg.is_gguf() {
        moe::sparse_layers_from_tensors(cfg, w)
    } else {
        vec![true; cfg.num_layers]
    };
    // GGUF llama3-style conversions may carry per-frequency RoPE divisors.
    let freq_factors = if w.has("rope_freqs.weight") {
        Some(w.f32_vec("rope_freqs.weight", cfg.head_dim / 2)?)
    } else {
        None
    };
    let spec = MoeSpec {
        n_experts: moe::required_count(cfg, &["num_local_experts"], "expert_count")?,
        k: moe::required_count(cfg, &["num_experts_per_tok"], "expert_used_count")?,
        routing: MoeRouting::softmax(true),
        // Mixtral's intermediate_size is the experts' (there is no dense MLP).
        ffn: cfg.intermediate_size,
        shared_ffn: 0,
        sparse,
        act: MoeAct::SwiGlu,
        latent: 0,
    }
    .checked(cfg)?;
    let spec = DecoderSpec {
        moe: Some(spec),
        ..DecoderSpec::llama(cfg, freq_factors.as_deref())
    };
    let id = Identity {
        family: FAMILY.name,
        variant: Mixtral::NAME,
        defaults: Mixtral::default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}
