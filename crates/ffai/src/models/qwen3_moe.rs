//! Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 block (per-head q/k RMSNorm,
//! `head_dim · heads` free of `hidden`) with a mixture-of-experts MLP: softmax over all
//! experts, top-k, renormalised when `norm_topk_prob`. Layers listed in
//! `mlp_only_layers`, or off the `decoder_sparse_step` grid, keep a dense MLP of
//! `intermediate_size`; experts have `moe_intermediate_size`.

use super::decoder::{self, DecoderSpec, Identity, QkNorm};
use super::moe::{self, MoeAct, MoeRouting, MoeSpec};
use super::{Device, Family, LanguageModel};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "qwen3_moe",
    variants: &["qwen3_moe"],
    hf_architectures: &["Qwen3MoeForCausalLM"],
    model_types: &["qwen3_moe"],
    gguf_architectures: &["qwen3moe"],
    load,
};

/// The Qwen3 mixture-of-experts checkpoints.
pub struct Qwen3Moe;

impl Qwen3Moe {
    pub const NAME: &'static str = "qwen3_moe";

    /// As the dense Qwen3's (its thinking-mode generation_config).
    pub fn default_parameters() -> GenerationParameters {
        super::qwen3::Qwen3Dense::default_parameters()
    }
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let cfg = super::qwen3::effective_config(cfg)?;
    let n_experts = moe::required_count(&cfg, &["num_experts", "num_local_experts"], "expert_count")?;
    let sparse = if cfg.is_gguf() {
        moe::sparse_layers_from_tensors(&cfg, w)
    } else {
        moe::sparse_layers_qwen(&cfg, n_experts)?
    };
    let spec = MoeSpec {
        n_experts,
        k: moe::required_count(&cfg, &["num_experts_per_tok"], "expert_used_count")?,
        // config.json's default is false. llama.cpp always renormalises qwen3moe (its
        // converter writes no flag and its graph hard-codes it), so a GGUF does.
        routing: MoeRouting::softmax(if cfg.is_gguf() {
            true
        } else {
            cfg.extra_bool("norm_topk_prob", "")?.unwrap_or(false)
        }),
        ffn: moe::required_count(&cfg, &["moe_intermediate_size"], "expert_feed_forward_length")?,
        shared_ffn: 0,
        sparse,
        act: MoeAct::SwiGlu,
        latent: 0,
    }
    .checked(&cfg)?;
    let spec = DecoderSpec {
        qk_norm: QkNorm::PerHead,
        moe: Some(spec),
        ..DecoderSpec::llama(&cfg, None)
    };
    let id = Identity {
        family: FAMILY.name,
        variant: Qwen3Moe::NAME,
        defaults: Qwen3Moe::default_parameters(),
    };
    decoder::build(&cfg, w, dev, spec, id)
}
