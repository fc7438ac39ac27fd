//! Qwen3 (dense): the Llama block with a per-head RMSNorm on q and k before RoPE
//! (q_norm / k_norm), no q/k/v bias, and a head_dim that need not be hidden/heads.

use super::decoder::{self, DecoderSpec, Identity, QkNorm};
use super::{Device, Family, LanguageModel};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "qwen3",
    variants: &["qwen3 (dense)"],
    hf_architectures: &["Qwen3ForCausalLM"],
    model_types: &["qwen3"],
    gguf_architectures: &["qwen3"],
    load,
};

/// The dense Qwen3 checkpoints (0.6B … 32B).
pub struct Qwen3Dense;

impl Qwen3Dense {
    pub const NAME: &'static str = "qwen3";

    /// Qwen's generation_config for thinking mode: T 0.6, top-p 0.95, top-k 20.
    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters {
            temperature: 0.6,
            top_p: 0.95,
            top_k: 20,
            ..Default::default()
        }
    }
}

/// The config as Qwen3 (dense and MoE) reads it: the sliding-window fields exist but are
/// off unless `use_sliding_window`.
pub(crate) fn effective_config(cfg: &ModelConfig) -> Result<ModelConfig> {
    let mut cfg = cfg.clone();
    if cfg.extra_bool("use_sliding_window", "use_sliding_window")? != Some(true) {
        cfg.sliding_window = None;
    }
    Ok(cfg)
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let cfg = effective_config(cfg)?;
    let spec = DecoderSpec {
        qk_norm: QkNorm::PerHead,
        ..DecoderSpec::llama(&cfg, None)
    };
    let id = Identity {
        family: FAMILY.name,
        variant: Qwen3Dense::NAME,
        defaults: Qwen3Dense::default_parameters(),
    };
    decoder::build(&cfg, w, dev, spec, id)
}
