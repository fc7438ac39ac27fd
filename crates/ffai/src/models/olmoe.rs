//! OLMoE: the Llama block (pre-norms) with RMSNorm on q and k over the whole projection
//! (as OLMo 2), q/k/v clamped to `±clip_qkv` when the config sets it, and a
//! mixture-of-experts MLP in every layer: softmax over all experts, top-k, not
//! renormalised (unless `norm_topk_prob`).

use super::decoder::{self, DecoderSpec, Identity, QkNorm};
use super::moe::{self, MoeAct, MoeRouting, MoeSpec};
use super::{Device, Family, LanguageModel};
use crate::config::ModelConfig;
use crate::ensure;
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "olmoe",
    variants: &["olmoe"],
    hf_architectures: &["OlmoeForCausalLM"],
    model_types: &["olmoe"],
    gguf_architectures: &["olmoe"],
    load,
};

/// OLMoE (1B-7B).
pub struct Olmoe;

impl Olmoe {
    pub const NAME: &'static str = "olmoe";

    /// AI2 publishes no sampling defaults; the engine baseline.
    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters::default()
    }
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let sparse = if cfg.is_gguf() {
        moe::sparse_layers_from_tensors(cfg, w)
    } else {
        vec![true; cfg.num_layers]
    };
    let spec = MoeSpec {
        n_experts: moe::required_count(cfg, &["num_experts", "num_local_experts"], "expert_count")?,
        k: moe::required_count(cfg, &["num_experts_per_tok"], "expert_used_count")?,
        // llama.cpp's olmoe graph never renormalises (its converter writes no flag).
        routing: MoeRouting::softmax(!cfg.is_gguf() && cfg.extra_bool("norm_topk_prob", "")?.unwrap_or(false)),
        // OLMoE's intermediate_size is the experts' (there is no dense MLP).
        ffn: cfg.intermediate_size,
        shared_ffn: 0,
        sparse,
        act: MoeAct::SwiGlu,
        latent: 0,
    }
    .checked(cfg)?;
    // GGUF: `attention.clamp_kqv` (llama.cpp's key for OLMo's clip_qkv). llama.cpp's
    // converter does not write it for OLMoE and its olmoe graph does not clamp; the
    // released OLMoE checkpoints have no clip_qkv, so the two agree on real files.
    let clip = cfg.extra_f64("clip_qkv", "attention.clamp_kqv")?.unwrap_or(0.0);
    ensure!(clip >= 0.0, "{}: clip_qkv = {clip} is negative", cfg.source);
    let spec = DecoderSpec {
        qk_norm: QkNorm::Full,
        moe: Some(spec),
        clip_qkv: clip as f32,
        ..DecoderSpec::llama(cfg, None)
    };
    let id = Identity {
        family: FAMILY.name,
        variant: Olmoe::NAME,
        defaults: Olmoe::default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}
