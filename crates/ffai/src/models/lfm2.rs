//! LFM2 (Liquid AI): a hybrid of gated short-convolution layers and GQA attention layers
//! (`layer_types`: `conv` / `full_attention`), each followed by a SwiGLU MLP. Attention
//! has a per-head RMSNorm on q and k before RoPE; the final norm is `embedding_norm`
//! (llama.cpp: `token_embd_norm`); the head is tied. In GGUF (architecture `lfm2`) the
//! conv layers are those with 0 in the per-layer `attention.head_count_kv`, the kernel
//! is `shortconv.l_cache`, and `feed_forward_length` is the adjusted MLP width. The conv layers are `recurrent::MixerSpec::ShortConv`.
//!
//! LFM2-MoE (`lfm2_moe`, `Lfm2MoeForCausalLM`, as LFM2-8B-A1B) is the same stack with the
//! MLP of every layer from `num_dense_layers` on a mixture of experts: scores
//! `σ(router(x))`, the top `num_experts_per_tok` of scores + `expert_bias` chosen (the bias
//! only steers the choice), weights their scores renormalised when `norm_topk_prob`, times
//! `routed_scaling_factor`; SwiGLU experts of `moe_intermediate_size`. The dense layers'
//! MLP is `intermediate_size` as given (no `block_auto_adjust_ff_dim`). transformers
//! divides by `sum + 1e-6` where the shared routing op divides by the sum: a relative
//! difference below 1e-5 with scores of sigmoids. GGUF (`lfm2moe`) is not read yet.

use super::decoder::{self, DecoderSpec, Identity, QkNorm};
use super::moe::{MoeAct, MoeRouting, MoeScoring, MoeSpec};
use super::recurrent::{self, MixerSpec, RecurrentSpec};
use super::{Device, Family, LanguageModel};
use crate::config::{ModelConfig, MAX_DIM};
use crate::error::{Error, Result};
use crate::generate::GenerationParameters;
use crate::weights::Weights;
use crate::{bail, ensure};

pub const FAMILY: Family = Family {
    name: "lfm2",
    variants: &["lfm2", "lfm2_moe"],
    hf_architectures: &["Lfm2ForCausalLM", "Lfm2MoeForCausalLM"],
    model_types: &["lfm2", "lfm2_moe"],
    gguf_architectures: &["lfm2", "lfm2moe"],
    load,
};

pub struct Lfm2;

impl Lfm2 {
    pub const NAME: &'static str = "lfm2";
    pub const NAME_MOE: &'static str = "lfm2_moe";

    /// Liquid's recommended sampling: temperature 0.3, min-p 0.15, repetition penalty 1.05.
    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters {
            temperature: 0.3,
            min_p: 0.15,
            repetition_penalty: 1.05,
            ..Default::default()
        }
    }
}

/// The MLP width transformers builds (`Lfm2MLP`): with `block_auto_adjust_ff_dim`, two
/// thirds of `intermediate_size` (truncated), times `block_ffn_dim_multiplier` (truncated)
/// and rounded up to a multiple of `block_multiple_of` when the multiplier is given.
pub fn ffn_width(cfg: &ModelConfig) -> Result<usize> {
    let ff = cfg.intermediate_size;
    if !cfg
        .extra_bool("block_auto_adjust_ff_dim", "block_auto_adjust_ff_dim")?
        .unwrap_or(true)
    {
        return Ok(ff);
    }
    let mut ff = (2 * ff) / 3;
    if let Some(mult) = cfg.extra_f64("block_ffn_dim_multiplier", "block_ffn_dim_multiplier")? {
        ensure!(
            mult > 0.0 && mult * ff as f64 <= MAX_DIM as f64,
            "{}: block_ffn_dim_multiplier = {mult} gives an MLP width outside 1..={MAX_DIM}",
            cfg.source
        );
        ff = (mult * ff as f64) as usize;
        let m = recurrent::sized(
            cfg,
            "block_multiple_of",
            cfg.extra_usize("block_multiple_of", "block_multiple_of")?,
            Some(256),
            MAX_DIM,
        )?;
        ff = ff.div_ceil(m) * m;
    }
    ensure!(
        ff > 0 && ff <= MAX_DIM,
        "{}: the adjusted MLP width {ff} must be in 1..={MAX_DIM}",
        cfg.source
    );
    Ok(ff)
}

/// Which layers are conv layers: `layer_types`, else `full_attn_idxs` (the attention
/// layers), else every layer attends (transformers' default).
fn conv_layers(cfg: &ModelConfig) -> Result<Vec<bool>> {
    if cfg.is_gguf() {
        return match cfg.extra("", "attention.head_count_kv") {
            Some(serde_json::Value::Array(a)) => {
                ensure!(
                    a.len() == cfg.num_layers,
                    "{}: {}.attention.head_count_kv has {} entries for {} layers",
                    cfg.source,
                    cfg.architecture,
                    a.len(),
                    cfg.num_layers
                );
                Ok(a.iter().map(|v| v.as_u64() == Some(0)).collect())
            }
            _ => Ok(vec![false; cfg.num_layers]),
        };
    }
    if let Some(l) = recurrent::layer_types(cfg)? {
        return Ok(l);
    }
    match cfg.extra("full_attn_idxs", "full_attn_idxs") {
        None => Ok(vec![false; cfg.num_layers]),
        Some(v) => {
            let list = v
                .as_array()
                .ok_or_else(|| Error::new(format!("{}: full_attn_idxs is not a list", cfg.source)))?;
            let mut conv = vec![true; cfg.num_layers];
            for e in list {
                match e.as_u64() {
                    Some(i) if (i as usize) < cfg.num_layers => conv[i as usize] = false,
                    _ => bail!("{}: full_attn_idxs entry {e} is not a layer index", cfg.source),
                }
            }
            Ok(conv)
        }
    }
}

/// Whether a config is LFM2-MoE's.
fn is_moe(cfg: &ModelConfig) -> bool {
    cfg.architecture == "Lfm2MoeForCausalLM" || cfg.model_type == "lfm2_moe"
}

/// LFM2-MoE's experts (see the module docs).
fn moe_spec(cfg: &ModelConfig, w: &Weights) -> Result<MoeSpec> {
    let u =
        |k: &str, d: usize| -> Result<usize> { recurrent::sized(cfg, k, cfg.extra_usize(k, "")?, Some(d), MAX_DIM) };
    let dense = cfg.extra_usize("num_dense_layers", "")?.unwrap_or(2);
    let scale = cfg.extra_f64("routed_scaling_factor", "")?.unwrap_or(1.0);
    ensure!(
        scale.is_finite() && scale > 0.0,
        "{}: routed_scaling_factor = {scale} must be a positive number",
        cfg.source
    );
    let spec = MoeSpec {
        n_experts: u("num_experts", 32)?,
        k: u("num_experts_per_tok", 4)?,
        routing: MoeRouting {
            scoring: MoeScoring::Sigmoid,
            renormalize: cfg.extra_bool("norm_topk_prob", "")?.unwrap_or(true),
            scale: scale as f32,
            ..MoeRouting::softmax(false)
        },
        ffn: u("moe_intermediate_size", 1792)?,
        shared_ffn: 0,
        sparse: (0..cfg.num_layers).map(|i| i >= dense).collect(),
        act: MoeAct::SwiGlu,
        latent: 0,
    }
    .checked(cfg)?;
    let bias = cfg.extra_bool("use_expert_bias", "")?.unwrap_or(true);
    for i in (0..cfg.num_layers).filter(|&i| spec.sparse[i]) {
        ensure!(
            w.has(&format!("blk.{i}.exp_probs_b.bias")) == bias,
            "{}: layer {i} {} an expert_bias, but use_expert_bias is {bias}",
            cfg.source,
            if bias { "has no" } else { "has" }
        );
    }
    Ok(spec)
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    if cfg.is_gguf() && cfg.architecture == "lfm2moe" {
        // llama.cpp's layout, read as the Hugging Face one (`hybrid_gguf`).
        let (cfg, w) = super::hybrid_gguf::hf_view(cfg, w)?;
        return load(&cfg, &w, dev);
    }
    let moe_model = is_moe(cfg);
    let mut cfg = cfg.clone();
    let layers = conv_layers(&cfg)?;
    let kernel = recurrent::conv_kernel(
        &cfg,
        "conv_L_cache",
        cfg.extra_usize("conv_L_cache", "shortconv.l_cache")?,
        3,
    )?;
    if !cfg.is_gguf() {
        // llama.cpp's converter writes the adjusted width as feed_forward_length;
        // LFM2-MoE's dense layers use intermediate_size as it is.
        if !moe_model {
            cfg.intermediate_size = ffn_width(&cfg)?;
        }
        if let Some(eps) = cfg.extra_f64("norm_eps", "norm_eps")? {
            cfg.rms_norm_eps = eps;
        }
        cfg.tie_word_embeddings = cfg
            .extra_bool("tie_word_embeddings", "tie_word_embeddings")?
            .or(cfg.extra_bool("tie_embedding", "tie_embedding")?)
            .unwrap_or(true);
    }
    ensure!(
        cfg.rms_norm_eps >= 0.0 && cfg.rms_norm_eps.is_finite(),
        "{}: norm_eps must be a non-negative finite number",
        cfg.source
    );
    let moe = match moe_model {
        true => Some(moe_spec(&cfg, w)?),
        false => None,
    };
    let spec = DecoderSpec {
        qk_norm: QkNorm::PerHead,
        moe,
        recurrent: Some(RecurrentSpec {
            layers,
            mixer: MixerSpec::ShortConv { kernel },
            mlp: vec![true; cfg.num_layers],
            mlp_only: vec![false; cfg.num_layers],
        }),
        final_norm: "token_embd_norm",
        ..DecoderSpec::llama(&cfg, None)
    };
    let id = Identity {
        family: FAMILY.name,
        variant: if moe_model { Lfm2::NAME_MOE } else { Lfm2::NAME },
        defaults: Lfm2::default_parameters(),
    };
    decoder::build(&cfg, w, dev, spec, id)
}
