//! Phi-3 / Phi-3.5: the Llama block with fused projections (`qkv_proj`, `gate_up_proj`,
//! split by rows at load) and LongRoPE ("longrope", formerly "su"): per-frequency
//! divisors, short ones up to `original_max_position_embeddings` and long ones beyond
//! (chosen per sequence by its context length), with an attention factor on cos/sin
//! that we fold into the attention scale (it multiplies q·k by its square).

use super::decoder::{self, DecoderSpec, Identity};
use super::{Device, Family, LanguageModel};
use crate::config::{ModelConfig, RopeScaling};
use crate::ensure;
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "phi3",
    variants: &["phi3 (Phi-3, Phi-3.5)"],
    hf_architectures: &["Phi3ForCausalLM"],
    model_types: &["phi3"],
    gguf_architectures: &["phi3"],
    load,
};

/// Phi-3-mini/medium and Phi-3.5-mini.
pub struct Phi3;

impl Phi3 {
    pub const NAME: &'static str = "phi3";

    /// Microsoft's generation_config samples nothing: greedy.
    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters {
            temperature: 0.0,
            ..Default::default()
        }
    }
}

/// `1 / (factor_i * theta^(2i/d))` for each rotated pair.
fn table(theta: f64, head_dim: usize, factors: &[f64]) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| (1.0 / (factors.get(i).copied().unwrap_or(1.0) * theta.powf(2.0 * i as f64 / head_dim as f64))) as f32)
        .collect()
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let mut spec = DecoderSpec::llama(cfg, None);
    if let Some(RopeScaling::LongRope {
        short_factor,
        long_factor,
        original_max_position_embeddings,
        attention_factor,
    }) = &cfg.rope_scaling
    {
        let half = cfg.head_dim / 2;
        ensure!(
            short_factor.len() == half && long_factor.len() == half,
            "{}: longrope factor lists must have head_dim/2 = {half} entries",
            cfg.source
        );
        let orig = *original_max_position_embeddings;
        // transformers: attention_factor, else sqrt(1 + ln(s) / ln(orig)) with s the
        // context extension ratio (1 when there is none).
        let ratio = cfg.max_position_embeddings as f64 / orig;
        let attn_factor = attention_factor.unwrap_or(if ratio <= 1.0 {
            1.0
        } else {
            (1.0 + ratio.ln() / orig.ln()).sqrt()
        });
        spec.ropes = vec![table(cfg.rope_theta, cfg.head_dim, short_factor)];
        spec.long_ropes = Some((orig as usize, vec![table(cfg.rope_theta, cfg.head_dim, long_factor)]));
        spec.attn_scale *= (attn_factor * attn_factor) as f32;
    }
    let id = Identity {
        family: FAMILY.name,
        variant: Phi3::NAME,
        defaults: Phi3::default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}
