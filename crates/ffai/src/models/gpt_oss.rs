//! GPT-OSS (gpt-oss-20b, gpt-oss-120b): a pre-norm block with biased q/k/v/o, learned
//! attention sinks (one logit per head, an extra term in every softmax denominator),
//! sliding-window (128) and full layers alternating as `layer_types` says, YaRN RoPE
//! (its attention factor on cos and sin, folded into the score scale), and a
//! mixture-of-experts MLP in every layer: a router with a bias, top-k of its logits with
//! a softmax over those k alone (= the renormalised top-k of a softmax over all),
//! experts with biases and GPT-OSS's clamped SwiGLU. The experts come as floats or in
//! MXFP4 (the released checkpoints' `*_blocks`/`*_scales`, or GGUF type MXFP4), read as
//! stored (see `moe::MoeLayer::load`, `weights::gpt_oss_name`).

use super::decoder::{self, DecoderSpec, Identity, LayerAttn};
use super::moe::{self, MoeAct, MoeRouting, MoeSpec};
use super::{Device, Family, LanguageModel};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::GenerationParameters;
use crate::weights::Weights;
use crate::{bail, ensure};

pub const FAMILY: Family = Family {
    name: "gpt_oss",
    variants: &["gpt_oss"],
    hf_architectures: &["GptOssForCausalLM"],
    model_types: &["gpt_oss"],
    gguf_architectures: &["gpt-oss"],
    load,
};

/// OpenAI's open-weight mixtures of experts.
pub struct GptOss;

impl GptOss {
    pub const NAME: &'static str = "gpt_oss";
    /// The SwiGLU's sigmoid slope (fixed in transformers' `GptOssExperts`).
    pub const SWIGLU_ALPHA: f32 = 1.702;
    /// The clamp when the config gives no `swiglu_limit`.
    pub const SWIGLU_LIMIT: f64 = 7.0;

    /// OpenAI recommends sampling at temperature 1 with top-p 1.
    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters {
            temperature: 1.0,
            top_p: 1.0,
            ..Default::default()
        }
    }
}

/// Per layer: sliding (true) or full attention. config.json's `layer_types`, else (and in
/// GGUF files, as llama.cpp builds gpt-oss) the even layers slide.
fn sliding_layers(cfg: &ModelConfig) -> Result<Vec<bool>> {
    let src = &cfg.source;
    match cfg.extra("layer_types", "") {
        None | Some(serde_json::Value::Null) => Ok((0..cfg.num_layers).map(|i| i % 2 == 0).collect()),
        Some(v) => {
            let a = v
                .as_array()
                .ok_or_else(|| Error::new(format!("{src}: layer_types = {v} is not a list")))?;
            ensure!(
                a.len() == cfg.num_layers,
                "{src}: layer_types lists {} layers for {}",
                a.len(),
                cfg.num_layers
            );
            a.iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => bail!("{src}: layer_types holds {t}, not \"sliding_attention\" or \"full_attention\""),
                })
                .collect()
        }
    }
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let limit = cfg
        .extra_f64("swiglu_limit", "swiglu_limit")?
        .unwrap_or(GptOss::SWIGLU_LIMIT);
    ensure!(
        limit > 0.0 && limit <= f32::MAX as f64,
        "{}: swiglu_limit = {limit} must be a positive finite number",
        cfg.source
    );
    let spec = MoeSpec {
        n_experts: moe::required_count(cfg, &["num_local_experts", "num_experts"], "expert_count")?,
        k: moe::required_count(cfg, &["num_experts_per_tok", "experts_per_token"], "expert_used_count")?,
        // A softmax over the top-k logits is the renormalised top-k of a softmax over all.
        routing: MoeRouting::softmax(true),
        // intermediate_size is the experts' (there is no dense MLP).
        ffn: match cfg.extra_usize("", "expert_feed_forward_length")? {
            Some(f) if cfg.is_gguf() => f,
            _ => cfg.intermediate_size,
        },
        shared_ffn: 0,
        sparse: vec![true; cfg.num_layers],
        act: MoeAct::ClampedSwiGlu {
            alpha: GptOss::SWIGLU_ALPHA,
            limit: limit as f32,
        },
        latent: 0,
    }
    .checked(cfg)?;
    let window = cfg.sliding_window.unwrap_or(0);
    let layers = sliding_layers(cfg)?
        .into_iter()
        .map(|s| LayerAttn {
            window: if s { window } else { 0 },
            rope: 0,
        })
        .collect();
    let spec = DecoderSpec {
        layers,
        moe: Some(spec),
        // llama.cpp files the norm before the MLP (transformers' post_attention_layernorm)
        // as `post_attention_norm`.
        ffn_norm: if cfg.is_gguf() {
            "post_attention_norm"
        } else {
            "ffn_norm"
        },
        ..DecoderSpec::llama(cfg, None)
    };
    let id = Identity {
        family: FAMILY.name,
        variant: GptOss::NAME,
        defaults: GptOss::default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}
