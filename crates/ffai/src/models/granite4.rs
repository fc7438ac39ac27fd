//! Granite 4 (`granitemoehybrid`): Granite's block (embeddings × `embedding_multiplier`,
//! each branch × `residual_multiplier`, attention scores × `attention_multiplier`, logits ÷
//! `logits_scaling`) with Mamba 2 mixers in place of attention on the layers
//! `layer_types` names `mamba` / `linear_attention`, and a SwiGLU `shared_mlp` (fused
//! `input_linear`: gate rows, then up rows) of `shared_intermediate_size` in every block.
//! Attention uses RoPE only with `position_embedding_type: "rope"` (partial with
//! `partial_rotary_factor`, as Bamba's GGUF files give it). The dense hybrids
//! (`num_local_experts: 0`, Granite-4.0-H-Micro) run the shared MLP alone; the
//! mixture-of-experts ones (Granite-4.0-H-Tiny/Small) add to it, on the same normed input,
//! a `block_sparse_moe` of `num_local_experts` SwiGLU experts of `intermediate_size`: the
//! top `num_experts_per_tok` router logits, weights the softmax over those (the
//! renormalised top-k of a softmax); the sum of both branches is the block's MLP output,
//! so the shared MLP is the MoE block's shared expert (`shared_mlp.input_linear`, filed as
//! the dense MLP's fused `ffn_up`, is moved to `ffn_gate_up_shexp` at load).

use super::decoder::{self, DecoderSpec, Identity};
use super::mamba2::{mixer_spec, MixerKeys};
use super::moe::{MoeAct, MoeRouting, MoeSpec};
use super::recurrent::{self, MixerSpec, RecurrentSpec};
use super::{Device, Family, LanguageModel};
use crate::config::{ModelConfig, MAX_DIM};
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;
use crate::{bail, ensure};

pub const FAMILY: Family = Family {
    name: "granite4",
    variants: &["granite4-hybrid", "granite4-hybrid-moe"],
    hf_architectures: &["GraniteMoeHybridForCausalLM"],
    model_types: &["granitemoehybrid"],
    gguf_architectures: &["granitehybrid"],
    load,
};

pub struct Granite4Hybrid;

impl Granite4Hybrid {
    pub const NAME: &'static str = "granite4-hybrid";
    pub const NAME_MOE: &'static str = "granite4-hybrid-moe";

    /// IBM's generation_config is greedy.
    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters {
            temperature: 0.0,
            ..Default::default()
        }
    }
}

const KEYS: MixerKeys = MixerKeys {
    heads: "mamba_n_heads",
    head_dim: "mamba_d_head",
    state: "mamba_d_state",
    groups: "mamba_n_groups",
    conv: "mamba_d_conv",
    chunk: "mamba_chunk_size",
    eps: "rms_norm_eps",
    expand: Some("mamba_expand"),
    grouped_norm: false,
};

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    if cfg.is_gguf() {
        // llama.cpp's layout, read as the Hugging Face one (`hybrid_gguf`).
        let (cfg, w) = super::hybrid_gguf::hf_view(cfg, w)?;
        return load(&cfg, &w, dev);
    }
    let experts = cfg.extra_usize("num_local_experts", "")?.unwrap_or(8);
    ensure!(
        cfg.extra_bool("mamba_proj_bias", "")? != Some(true) && !cfg.attention_bias,
        "{}: Granite 4 projection biases are not supported yet",
        cfg.source
    );
    let layers = match recurrent::layer_types(cfg)? {
        Some(l) => l,
        // transformers' default: every layer a mamba layer.
        None => vec![true; cfg.num_layers],
    };
    let m = mixer_spec(cfg, &KEYS)?;
    let mut cfg = cfg.clone();
    let shared = recurrent::sized(
        &cfg,
        "shared_intermediate_size",
        cfg.extra_usize("shared_intermediate_size", "")?,
        Some(1024),
        MAX_DIM,
    )?;
    let (moe, renamed) = if experts > 0 {
        let spec = MoeSpec {
            n_experts: experts,
            k: recurrent::sized(
                &cfg,
                "num_experts_per_tok",
                cfg.extra_usize("num_experts_per_tok", "")?,
                Some(2),
                MAX_DIM,
            )?,
            routing: MoeRouting::softmax(true),
            ffn: recurrent::sized(&cfg, "intermediate_size", Some(cfg.intermediate_size), None, MAX_DIM)?,
            shared_ffn: shared,
            sparse: vec![true; cfg.num_layers],
            act: MoeAct::SwiGlu,
            latent: 0,
        }
        .checked(&cfg)?;
        // The shared MLP becomes the MoE block's shared expert (llama.cpp's files already
        // name it so, split into gate and up).
        let mut w = w.clone();
        let fused: Vec<usize> = (0..cfg.num_layers)
            .filter(|i| !w.has(&format!("blk.{i}.ffn_up_shexp.weight")))
            .collect();
        for i in fused {
            for (from, to) in [("ffn_up", "ffn_gate_up_shexp"), ("ffn_down", "ffn_down_shexp")] {
                let (from, to) = (format!("blk.{i}.{from}.weight"), format!("blk.{i}.{to}.weight"));
                ensure!(
                    w.rename(&from, &to),
                    "{}: layer {i} has no shared_mlp weights ({from}) or already has {to}",
                    cfg.source
                );
            }
        }
        (Some(spec), Some(w))
    } else {
        (None, None)
    };
    let w = renamed.as_ref().unwrap_or(w);
    cfg.intermediate_size = shared;
    let rope = match cfg.extra("position_embedding_type", "") {
        None => false,
        Some(v) if v == "rope" => true,
        Some(v) if v == "nope" => false,
        Some(v) => bail!("{}: position_embedding_type {v} is not rope or nope", cfg.source),
    };
    let base = DecoderSpec::llama(&cfg, None);
    let f = |k: &str, d: f64| -> Result<f64> { Ok(cfg.extra_f64(k, "")?.unwrap_or(d)) };
    let logits = f("logits_scaling", 1.0)?;
    ensure!(logits != 0.0, "{}: logits_scaling must not be 0", cfg.source);
    let spec = DecoderSpec {
        embed_scale: f("embedding_multiplier", 1.0)? as f32,
        residual_scale: f("residual_multiplier", 1.0)? as f32,
        attn_scale: f("attention_multiplier", 1.0)? as f32,
        logits_scale: (1.0 / logits) as f32,
        // Without RoPE: zero frequencies, an exact identity rotation.
        ropes: if rope {
            match partial_rope(&cfg)? {
                Some(inv_freq) => vec![inv_freq],
                None => base.ropes.clone(),
            }
        } else {
            vec![vec![0f32; cfg.head_dim / 2]]
        },
        recurrent: Some(RecurrentSpec {
            layers,
            mixer: MixerSpec::Mamba2(m),
            mlp: vec![true; cfg.num_layers],
            mlp_only: vec![false; cfg.num_layers],
        }),
        moe,
        ..base
    };
    let id = Identity {
        family: FAMILY.name,
        variant: if experts > 0 {
            Granite4Hybrid::NAME_MOE
        } else {
            Granite4Hybrid::NAME
        },
        defaults: Granite4Hybrid::default_parameters(),
    };
    decoder::build(&cfg, w, dev, spec, id)
}

/// Partial RoPE (`partial_rotary_factor` below 1, in `rope_parameters` or at the top
/// level, as Bamba's converted files give it): the inverse frequencies of the first
/// `factor · head_dim` dims, exponents over those dims (transformers' default RoPE); `None`
/// where every dim rotates.
fn partial_rope(cfg: &ModelConfig) -> Result<Option<Vec<f32>>> {
    let factor = match cfg
        .extra("rope_parameters", "")
        .and_then(|r| r.get("partial_rotary_factor").cloned())
        .or_else(|| cfg.extra("partial_rotary_factor", ""))
    {
        None => return Ok(None),
        Some(v) => match v.as_f64() {
            Some(f) if f > 0.0 && f <= 1.0 => f,
            _ => bail!("{}: partial_rotary_factor must be a number in (0, 1]", cfg.source),
        },
    };
    let rot = ((cfg.head_dim as f64 * factor) as usize) & !1;
    if rot == cfg.head_dim {
        return Ok(None);
    }
    ensure!(
        rot >= 2,
        "{}: partial_rotary_factor rotates no dimension pair",
        cfg.source
    );
    ensure!(
        cfg.rope_scaling.is_none(),
        "{}: partial_rotary_factor with rope scaling is not supported",
        cfg.source
    );
    Ok(Some(
        (0..rot / 2)
            .map(|i| (1.0 / cfg.rope_theta.powf((2 * i) as f64 / rot as f64)) as f32)
            .collect(),
    ))
}
