//! The Llama family: pre-norm blocks of RMSNorm → GQA attention with RoPE → RMSNorm →
//! SwiGLU MLP. Covers Llama 2/3/3.x (llama3 rope scaling), SmolLM/SmolLM2, dense
//! Mistral (sliding window) and Qwen2 (q/k/v bias): the variants differ in defaults;
//! the forward pass is the shared decoder driven by the config.

use super::decoder::{self, DecoderSpec, Identity};
use super::{Device, Family, LanguageModel};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "llama",
    variants: &[
        "llama (Llama 2/3/3.x)",
        "smollm (SmolLM/SmolLM2)",
        "mistral (dense, sliding window)",
        "qwen2 (Qwen2/2.5, q/k/v bias)",
    ],
    hf_architectures: &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"],
    model_types: &["llama", "mistral", "qwen2", "smollm", "smollm2"],
    gguf_architectures: &["llama", "mistral", "qwen2"],
    load,
};

/// A shape inside the family: its name and the sampling defaults it ships with.
pub trait LlamaVariant: Sync {
    fn name(&self) -> &'static str;
    fn default_parameters(&self) -> GenerationParameters;
}

/// Llama 2 / 3 / 3.x: Meta's generation_config (T 0.6, top-p 0.9).
pub struct Llama3;
/// SmolLM / SmolLM2: the model card recommends a low temperature (0.2, top-p 0.9).
pub struct SmolLM;
/// Dense Mistral: T 0.7 as Mistral's instruct checkpoints recommend; long prefill steps.
pub struct Mistral;
/// Qwen2 / 2.5 (biased q/k/v): Qwen's generation_config (T 0.7, top-p 0.8, top-k 20, rep 1.05).
pub struct Qwen2;

impl LlamaVariant for Llama3 {
    fn name(&self) -> &'static str {
        "llama"
    }
    fn default_parameters(&self) -> GenerationParameters {
        GenerationParameters {
            temperature: 0.6,
            top_p: 0.9,
            ..Default::default()
        }
    }
}

impl LlamaVariant for SmolLM {
    fn name(&self) -> &'static str {
        "smollm"
    }
    fn default_parameters(&self) -> GenerationParameters {
        GenerationParameters {
            temperature: 0.2,
            top_p: 0.9,
            ..Default::default()
        }
    }
}

impl LlamaVariant for Mistral {
    fn name(&self) -> &'static str {
        "mistral"
    }
    fn default_parameters(&self) -> GenerationParameters {
        GenerationParameters {
            temperature: 0.7,
            prefill_step_size: 4096,
            ..Default::default()
        }
    }
}

impl LlamaVariant for Qwen2 {
    fn name(&self) -> &'static str {
        "qwen2"
    }
    fn default_parameters(&self) -> GenerationParameters {
        GenerationParameters {
            temperature: 0.7,
            top_p: 0.8,
            top_k: 20,
            repetition_penalty: 1.05,
            ..Default::default()
        }
    }
}

pub fn variant_for(cfg: &ModelConfig) -> &'static dyn LlamaVariant {
    let name = cfg.name.to_ascii_lowercase();
    match cfg.model_type.as_str() {
        "qwen2" => &Qwen2,
        "mistral" => &Mistral,
        _ if cfg.architecture == "Qwen2ForCausalLM" => &Qwen2,
        _ if cfg.architecture == "MistralForCausalLM" => &Mistral,
        _ if name.contains("smollm") || cfg.model_type.starts_with("smollm") => &SmolLM,
        _ => &Llama3,
    }
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    // llama.cpp writes Mixtral as `llama` with experts.
    if super::mixtral::is_gguf_mixtral(cfg)? {
        return super::mixtral::load(cfg, w, dev);
    }
    let variant = variant_for(cfg);
    // Qwen2 configs carry sliding-window fields that are off unless use_sliding_window.
    let mut cfg = cfg.clone();
    if variant.name() == "qwen2" && cfg.extra_bool("use_sliding_window", "use_sliding_window")? != Some(true) {
        cfg.sliding_window = None;
    }
    // GGUF llama3 conversions store the rope scaling as per-frequency divisors.
    let freq_factors = if w.has("rope_freqs.weight") {
        Some(w.f32_vec("rope_freqs.weight", cfg.head_dim / 2)?)
    } else {
        None
    };
    let spec = DecoderSpec::llama(&cfg, freq_factors.as_deref());
    let id = Identity {
        family: FAMILY.name,
        variant: variant.name(),
        defaults: variant.default_parameters(),
    };
    decoder::build(&cfg, w, dev, spec, id)
}
