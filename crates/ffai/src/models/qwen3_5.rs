//! Qwen3.5 (`qwen3_5_text`, and `qwen3_5_moe_text` with experts): Qwen3-Next's math with
//! separate DeltaNet projections. Gated DeltaNet layers (`linear_attention`:
//! `recurrent::MixerSpec::GatedDeltaNet`, from `in_proj_qkv` (`[q | k | v]` of all heads),
//! `in_proj_z`, `in_proj_b`, `in_proj_a`, read as they are) and gated attention layers
//! (`full_attention`: per head `[q | gate]` from `q_proj`, per-head q/k norms, partial RoPE,
//! the output × `sigmoid(gate)`); every norm zero-centred (`x̂ · (1 + w)`) except the
//! DeltaNet's gated one. Dense: a SwiGLU MLP of `intermediate_size` in every block. MoE:
//! every block's MLP is the sparse block (softmax over all experts, top-k, always
//! renormalised, experts of `moe_intermediate_size`) plus a shared SwiGLU expert of
//! `shared_expert_intermediate_size` scaled by `sigmoid(shared_expert_gate(x))`.
//!
//! RoPE: transformers computes multimodal RoPE (`mrope_section` interleaving the
//! temporal, height and width positions); for text all three positions are the token's
//! position, which is plain RoPE on the first `partial_rotary_factor · head_dim` dims.
//! The multimodal wrappers (`qwen3_5`, `qwen3_5_moe`) load through their `text_config`
//! and `model.language_model.*` tensors; the vision tower and the MTP head are not read.

use super::decoder::{self, DecoderSpec, Identity};
use super::moe::{self, MoeAct, MoeRouting, MoeSpec};
use super::{Device, Family, LanguageModel};
use crate::config::ModelConfig;
use crate::ensure;
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "qwen3_5",
    variants: &["qwen3_5"],
    hf_architectures: &["Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"],
    model_types: &["qwen3_5_text", "qwen3_5"],
    gguf_architectures: &["qwen35"],
    load: load_dense,
};

pub const FAMILY_MOE: Family = Family {
    name: "qwen3_5_moe",
    variants: &["qwen3_5_moe"],
    hf_architectures: &["Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"],
    model_types: &["qwen3_5_moe_text", "qwen3_5_moe"],
    gguf_architectures: &["qwen35moe"],
    load: load_moe,
};

pub struct Qwen3_5;

impl Qwen3_5 {
    pub const NAME: &'static str = "qwen3_5";
    pub const NAME_MOE: &'static str = "qwen3_5_moe";

    /// Qwen's generation_config for the thinking mode: T 0.6, top-p 0.95, top-k 20.
    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters {
            temperature: 0.6,
            top_p: 0.95,
            top_k: 20,
            ..Default::default()
        }
    }
}

/// The decoder shape both variants share: Qwen3-Next's.
fn spec(cfg: &ModelConfig) -> Result<DecoderSpec> {
    ensure!(
        !cfg.attention_bias,
        "{}: Qwen3.5 attention biases are not supported",
        cfg.source
    );
    super::qwen3_next::gdn_decoder_spec(cfg)
}

fn load_dense(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    if cfg.is_gguf() {
        // llama.cpp's layout, read as the Hugging Face one (`hybrid_gguf`).
        let (cfg, w) = super::hybrid_gguf::hf_view(cfg, w)?;
        return load_dense(&cfg, &w, dev);
    }
    let spec = spec(cfg)?;
    let id = Identity {
        family: FAMILY.name,
        variant: Qwen3_5::NAME,
        defaults: Qwen3_5::default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}

fn load_moe(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    if cfg.is_gguf() {
        // llama.cpp's layout, read as the Hugging Face one (`hybrid_gguf`).
        let (cfg, w) = super::hybrid_gguf::hf_view(cfg, w)?;
        return load_moe(&cfg, &w, dev);
    }
    let moe = MoeSpec {
        n_experts: moe::required_count(cfg, &["num_experts"], "")?,
        k: moe::required_count(cfg, &["num_experts_per_tok"], "")?,
        routing: MoeRouting::softmax(true),
        ffn: moe::required_count(cfg, &["moe_intermediate_size"], "")?,
        shared_ffn: moe::required_count(cfg, &["shared_expert_intermediate_size"], "")?,
        sparse: vec![true; cfg.num_layers],
        act: MoeAct::SwiGlu,
        latent: 0,
    }
    .checked(cfg)?;
    moe::require_shared_gate(w, &moe)?;
    let spec = DecoderSpec {
        moe: Some(moe),
        ..spec(cfg)?
    };
    let id = Identity {
        family: FAMILY_MOE.name,
        variant: Qwen3_5::NAME_MOE,
        defaults: Qwen3_5::default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}
