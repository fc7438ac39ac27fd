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
use crate::{bail, ensure};

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
    fn is_global(&self, cfg: &ModelConfig, i: usize) -> Result<bool>;
    fn qk_norm(&self) -> QkNorm;
    /// (global table, local table) RoPE parameters: (theta, scaling).
    fn ropes(&self, cfg: &ModelConfig) -> Result<[(f64, Option<RopeScaling>); 2]>;
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
    fn is_global(&self, _: &ModelConfig, i: usize) -> Result<bool> {
        Ok(!i.is_multiple_of(2))
    }
    fn qk_norm(&self) -> QkNorm {
        QkNorm::None
    }
    fn ropes(&self, cfg: &ModelConfig) -> Result<[(f64, Option<RopeScaling>); 2]> {
        Ok([(cfg.rope_theta, None), (cfg.rope_theta, None)])
    }
    fn gguf_27b_layers(&self) -> usize {
        46
    }
}

impl GemmaVariant for Gemma3 {
    fn name(&self) -> &'static str {
        "gemma3"
    }
    fn is_global(&self, cfg: &ModelConfig, i: usize) -> Result<bool> {
        let pattern = match cfg.extra_usize("sliding_window_pattern", "attention.sliding_window_pattern")? {
            Some(p) => p,
            None => cfg
                .extra_usize("_sliding_window_pattern", "attention.sliding_window_pattern")?
                .unwrap_or(6),
        };
        Ok((i + 1).is_multiple_of(pattern.max(1)))
    }
    fn qk_norm(&self) -> QkNorm {
        QkNorm::PerHead
    }
    fn ropes(&self, cfg: &ModelConfig) -> Result<[(f64, Option<RopeScaling>); 2]> {
        // transformers v5: rope_parameters per layer type; older configs: rope_theta,
        // rope_scaling (global) and rope_local_base_freq; GGUF: freq_base (global) and
        // llama.cpp's fixed 10000 for local layers.
        let per_type = cfg.extra("rope_parameters", "");
        let part = |k: &str| per_type.as_ref().and_then(|p| p.get(k)).cloned();
        // A present number must be a positive finite one (NaN or 0 would fill the tables
        // with NaN or infinities).
        let num = |v: &Option<Value>, k: &str| -> Result<Option<f64>> {
            match v.as_ref().and_then(|p| p.get(k)) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => match x.as_f64() {
                    Some(f) if f > 0.0 && f.is_finite() => Ok(Some(f)),
                    _ => bail!(
                        "{}: rope_parameters {k} = {x} is not a positive finite number",
                        cfg.source
                    ),
                },
            }
        };
        let theta_of = |v: &Option<Value>| num(v, "rope_theta");
        let linear = |v: &Option<Value>| -> Result<Option<RopeScaling>> {
            let is_linear = v.as_ref().and_then(|p| p.get("rope_type")).and_then(|t| t.as_str()) == Some("linear");
            Ok(match num(v, "factor")? {
                Some(factor) if is_linear => Some(RopeScaling::Linear { factor }),
                _ => None,
            })
        };
        let (full, sliding) = (part("full_attention"), part("sliding_attention"));
        let global_theta = theta_of(&full)?.unwrap_or(if cfg.is_gguf() || cfg.rope_theta != 10000.0 {
            cfg.rope_theta
        } else {
            1_000_000.0
        });
        let global_scaling = if full.is_some() {
            linear(&full)?
        } else {
            cfg.rope_scaling.clone()
        };
        let local_theta = match theta_of(&sliding)? {
            Some(t) => t,
            None => cfg
                .extra_f64("rope_local_base_freq", "rope.local_freq_base")?
                .unwrap_or(10_000.0),
        };
        ensure!(
            local_theta > 0.0 && local_theta.is_finite(),
            "{}: rope_local_base_freq must be positive",
            cfg.source
        );
        Ok([(global_theta, global_scaling), (local_theta, None)])
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
                _ => v.is_global(cfg, i)?,
            };
            Ok(if global {
                LayerAttn { window: 0, rope: 0 }
            } else {
                LayerAttn { window, rope: 1 }
            })
        })
        .collect::<Result<_>>()?;
    let tables = v.ropes(cfg)?.map(|(theta, scaling)| {
        let c = ModelConfig {
            rope_theta: theta,
            rope_scaling: scaling,
            ..cfg.clone()
        };
        c.rope_inv_freq(None)
    });
    let scalar = match cfg.extra_f64("query_pre_attn_scalar", "")? {
        Some(s) => {
            ensure!(
                s > 0.0 && s.is_finite(),
                "{}: query_pre_attn_scalar must be positive",
                cfg.source
            );
            s
        }
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
            .extra_f64("attn_logit_softcapping", "attn_logit_softcapping")?
            .unwrap_or(0.0) as f32,
        final_softcap: cfg
            .extra_f64("final_logit_softcapping", "final_logit_softcapping")?
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
