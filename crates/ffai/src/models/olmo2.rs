//! OLMo 2: norms after each branch instead of before (x + norm(attn(x)), then
//! x + norm(mlp(x))), and RMSNorm on q and k over the whole projection before the
//! heads are split.

use super::decoder::{self, DecoderSpec, Identity, NormPlacement, QkNorm};
use super::{Device, Family, LanguageModel};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "olmo2",
    variants: &["olmo2"],
    hf_architectures: &["Olmo2ForCausalLM"],
    model_types: &["olmo2"],
    gguf_architectures: &["olmo2"],
    load,
};

/// OLMo 2 (1B … 32B).
pub struct Olmo2;

impl Olmo2 {
    pub const NAME: &'static str = "olmo2";

    /// AI2 publishes no sampling defaults; the engine baseline (T 0.6).
    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters::default()
    }
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let spec = DecoderSpec {
        placement: NormPlacement::Post,
        qk_norm: QkNorm::Full,
        ..DecoderSpec::llama(cfg, None)
    };
    let id = Identity {
        family: FAMILY.name,
        variant: Olmo2::NAME,
        defaults: Olmo2::default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}
