//! Granite 3: the Llama block with four scalars — embeddings × embedding_multiplier,
//! each branch × residual_multiplier before the residual add, attention scores ×
//! attention_multiplier (instead of 1/sqrt(head_dim)), logits ÷ logits_scaling.

use super::decoder::{self, DecoderSpec, Identity};
use super::{Device, Family, LanguageModel};
use crate::config::ModelConfig;
use crate::ensure;
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "granite",
    variants: &["granite3"],
    hf_architectures: &["GraniteForCausalLM"],
    model_types: &["granite"],
    gguf_architectures: &["granite"],
    load,
};

/// Granite 3.x dense.
pub struct Granite3;

impl Granite3 {
    pub const NAME: &'static str = "granite3";

    /// IBM's generation_config is greedy.
    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters {
            temperature: 0.0,
            ..Default::default()
        }
    }
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let base = DecoderSpec::llama(cfg, None);
    // config.json names, then llama.cpp's GGUF keys.
    let embed = cfg.extra_f64("embedding_multiplier", "embedding_scale")?.unwrap_or(1.0);
    let residual = cfg.extra_f64("residual_multiplier", "residual_scale")?.unwrap_or(1.0);
    let attn = cfg
        .extra_f64("attention_multiplier", "attention.scale")?
        .unwrap_or(base.attn_scale as f64);
    let logits = cfg.extra_f64("logits_scaling", "logit_scale")?.unwrap_or(1.0);
    // The logits are divided by it.
    ensure!(logits != 0.0, "{}: logits_scaling must not be 0", cfg.source);
    let spec = DecoderSpec {
        embed_scale: embed as f32,
        residual_scale: residual as f32,
        attn_scale: attn as f32,
        logits_scale: (1.0 / logits) as f32,
        ..base
    };
    let id = Identity {
        family: FAMILY.name,
        variant: Granite3::NAME,
        defaults: Granite3::default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}
