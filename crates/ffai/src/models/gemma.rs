//! The Gemma family (Gemma 2, Gemma 3 text). Both: RMSNorm of the form x·(1 + w) (the
//! 1 folded in at load for Hugging Face weights; GGUF conversions stored 1 + w), a norm
//! before *and* after attention and MLP, a GELU-tanh gated MLP, embeddings × sqrt(hidden),
//! attention scaled by query_pre_attn_scalar^-1/2, and local (sliding-window) layers
//! mixed with global ones.
//! - Gemma 2: local and global layers alternate; attention and final logits soft-capped.
//! - Gemma 3: q/k RMSNorm per head; every `sliding_window_pattern`-th layer (or as
//!   `layer_types` says) is global with RoPE base 1e6 and optional linear scaling, the
//!   others local with base 1e4; no attention soft-cap.

use serde_json::Value;

use super::decoder::{self, DecoderSpec, Identity, LayerAttn, Mlp, NormKind, NormPlacement, QkNorm};
use super::{Device, Family, LanguageModel};
use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "gemma",
    variants: &["gemma2", "gemma3 (text)"],
    hf_architectures: &["Gemma2ForCausalLM", "Gemma3ForCausalLM"],
    model_types: &["gemma2", "gemma3", "gemma3_text"],
    gguf_architectures: &["gemma2", "gemma3"],
    load,
};

/// A Gemma generation: how its layers and RoPE tables are laid out.
pub trait GemmaVariant: Sync {
    fn name(&self) -> &'static str;
    /// Google's sampling defaults for Gemma (T 1.0, top-k 64, top-p 0.95).
    fn default_parameters(&self) -> GenerationParameters {
        GenerationParameters {
            temperature: 1.0,
            top_k: 64,
            top_p: 0.95,
            ..Default::default()
        }
    }
    /// Whether layer i (of n) is global when the config has no `layer_types`.
    fn is_global(&self, cfg: &ModelConfig, i: usize) -> bool;
    fn qk_norm(&self) -> QkNorm;
    /// (global table, local table) RoPE parameters: (theta, scaling).
    fn ropes(&self, cfg: &ModelConfig) -> [(f64, Option<RopeScaling>); 2];
    /// Layer count of the 27B model, whose attention scale llama.cpp's GGUF conversion
    /// leaves implicit (hidden/heads instead of head_dim).
    fn gguf_27b_layers(&self) -> usize;
}

pub struct Gemma2;
pub struct Gemma3;

impl GemmaVariant for Gemma2 {
    fn name(&self) -> &'static str {
        "gemma2"
    }
    fn is_global(&self, _: &ModelConfig, i: usize) -> bool {
        !i.is_multiple_of(2)
    }
    fn qk_norm(&self) -> QkNorm {
        QkNorm::None
    }
    fn ropes(&self, cfg: &ModelConfig) -> [(f64, Option<RopeScaling>); 2] {
        [(cfg.rope_theta, None), (cfg.rope_theta, None)]
    }
    fn gguf_27b_layers(&self) -> usize {
        46
    }
}

impl GemmaVariant for Gemma3 {
    fn name(&self) -> &'static str {
        "gemma3"
    }
    fn is_global(&self, cfg: &ModelConfig, i: usize) -> bool {
        let pattern = cfg
            .extra_usize("sliding_window_pattern", "attention.sliding_window_pattern")
            .or_else(|| cfg.extra_usize("_sliding_window_pattern", "attention.sliding_window_pattern"))
            .unwrap_or(6)
            .max(1);
        (i + 1).is_multiple_of(pattern)
    }
    fn qk_norm(&self) -> QkNorm {
        QkNorm::PerHead
    }
    fn ropes(&self, cfg: &ModelConfig) -> [(f64, Option<RopeScaling>); 2] {
        // transformers v5: rope_parameters per layer type; older configs: rope_theta,
        // rope_scaling (global) and rope_local_base_freq; GGUF: freq_base (global) and
        // llama.cpp's fixed 10000 for local layers.
        let per_type = cfg.extra("rope_parameters", "");
        let part = |k: &str| per_type.as_ref().and_then(|p| p.get(k)).cloned();
        let theta_of = |v: &Option<Value>| v.as_ref().and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64());
        let linear = |v: &Option<Value>| {
            let v = v.as_ref()?;
            (v.get("rope_type").and_then(|t| t.as_str()) == Some("linear"))
                .then(|| v.get("factor").and_then(|f| f.as_f64()))
                .flatten()
                .map(|factor| RopeScaling::Linear { factor })
        };
        let (full, sliding) = (part("full_attention"), part("sliding_attention"));
        let global_theta = theta_of(&full).unwrap_or(if cfg.is_gguf() || cfg.rope_theta != 10000.0 {
            cfg.rope_theta
        } else {
            1_000_000.0
        });
        let global_scaling = if full.is_some() {
            linear(&full)
        } else {
            cfg.rope_scaling.clone()
        };
        let local_theta = theta_of(&sliding)
            .or_else(|| cfg.extra_f64("rope_local_base_freq", "rope.local_freq_base"))
            .unwrap_or(10_000.0);
        [(global_theta, global_scaling), (local_theta, None)]
    }
    fn gguf_27b_layers(&self) -> usize {
        62
    }
}

fn variant_for(cfg: &ModelConfig) -> &'static dyn GemmaVariant {
    match cfg.model_type.as_str() {
        "gemma2" => &Gemma2,
        _ if cfg.architecture == "Gemma2ForCausalLM" => &Gemma2,
        _ => &Gemma3,
    }
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let v = variant_for(cfg);
    let window = cfg.sliding_window.unwrap_or(0);
    let layer_types: Option<Vec<String>> = cfg.extra("layer_types", "").and_then(|t| {
        t.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
    });
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let global = match &layer_types {
                Some(t) if t.len() == cfg.num_layers => t[i] != "sliding_attention",
                _ => v.is_global(cfg, i),
            };
            if global {
                LayerAttn { window: 0, rope: 0 }
            } else {
                LayerAttn { window, rope: 1 }
            }
        })
        .collect();
    let tables = v.ropes(cfg).map(|(theta, scaling)| {
        let c = ModelConfig {
            rope_theta: theta,
            rope_scaling: scaling,
            ..cfg.clone()
        };
        c.rope_inv_freq(None)
    });
    let scalar = match cfg.extra_f64("query_pre_attn_scalar", "") {
        Some(s) => s,
        None if cfg.is_gguf() && cfg.num_layers == v.gguf_27b_layers() => (cfg.hidden_size / cfg.num_heads) as f64,
        None => cfg.head_dim as f64,
    };
    let spec = DecoderSpec {
        norm: if cfg.is_gguf() {
            NormKind::Rms
        } else {
            NormKind::RmsPlusOne
        },
        placement: NormPlacement::Sandwich,
        qk_norm: v.qk_norm(),
        mlp: Mlp::GeGlu,
        embed_scale: (cfg.hidden_size as f32).sqrt(),
        attn_scale: (1.0 / scalar.sqrt()) as f32,
        attn_softcap: cfg
            .extra_f64("attn_logit_softcapping", "attn_logit_softcapping")
            .unwrap_or(0.0) as f32,
        final_softcap: cfg
            .extra_f64("final_logit_softcapping", "final_logit_softcapping")
            .unwrap_or(0.0) as f32,
        layers,
        ropes: tables.to_vec(),
        ..DecoderSpec::llama(cfg, None)
    };
    let id = Identity {
        family: FAMILY.name,
        variant: v.name(),
        defaults: v.default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}
