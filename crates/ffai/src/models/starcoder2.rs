//! StarCoder 2: LayerNorm with bias, biased q/k/v/o projections, a plain (ungated)
//! GELU MLP with biases (c_fc → gelu_tanh → c_proj), and a sliding window.

use super::decoder::{self, DecoderSpec, Identity, Mlp, NormKind};
use super::{Device, Family, LanguageModel};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "starcoder2",
    variants: &["starcoder2"],
    hf_architectures: &["Starcoder2ForCausalLM"],
    model_types: &["starcoder2"],
    gguf_architectures: &["starcoder2"],
    load,
};

/// StarCoder 2 (3B, 7B, 15B).
pub struct StarCoder2;

impl StarCoder2 {
    pub const NAME: &'static str = "starcoder2";

    /// Code completion: a low temperature (T 0.2, top-p 0.95), as BigCode's examples use.
    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters {
            temperature: 0.2,
            top_p: 0.95,
            ..Default::default()
        }
    }
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let eps = cfg
        .extra_f64("norm_epsilon", "attention.layer_norm_epsilon")?
        .unwrap_or(1e-5);
    let spec = DecoderSpec {
        norm: NormKind::Layer,
        mlp: Mlp::Gelu,
        eps: eps as f32,
        ..DecoderSpec::llama(cfg, None)
    };
    let id = Identity {
        family: FAMILY.name,
        variant: StarCoder2::NAME,
        defaults: StarCoder2::default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}
