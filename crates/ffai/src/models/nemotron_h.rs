//! NemotronH (NVIDIA Nemotron-H, Nemotron Nano 2): a stack of single-mixer blocks,
//! `h + mixer(rmsnorm(h))`, each one of a Mamba 2 mixer (`linear_attention`, `M`), GQA
//! attention without positional embeddings (`full_attention`, `*`) or a non-gated MLP
//! `down(relu(up(x))^2)` (`mlp`, `-`), from `layers_block_type` (transformers 5) or the
//! Hub configs' `hybrid_override_pattern`. The Mamba 2 mixer's gated norm is per group
//! of `d_inner / n_groups`.
//!
//! Mixture-of-experts blocks (`moe`, `E`; Nemotron 3 Nano) are `h + moe(rmsnorm(h))`:
//! scores `σ(gate(x))` over `n_routed_experts`; choice scores plus
//! `e_score_correction_bias`; with `n_group > 1` only the best `topk_group` groups (scored
//! by the sum of their two best choice scores) are candidates; the top
//! `num_experts_per_tok`; weights their unbiased scores, renormalised when
//! `norm_topk_prob`, times `routed_scaling_factor` (DeepSeek-V3's router); non-gated
//! `relu2` experts of `moe_intermediate_size` (`moe::MoeAct::Relu2`), plus the shared
//! `relu2` MLP of `moe_shared_expert_intermediate_size`. With `moe_latent_size`
//! (Nemotron 3 Super) the routed experts work in that smaller space: `x` goes down by
//! `fc1_latent_proj` before them and their weighted sum back up by `fc2_latent_proj`
//! (`moe::MoeSpec::latent`); the router and the shared MLP read `x`.

use super::decoder::{self, DecoderSpec, Identity, Mlp};
use super::mamba2::{mixer_spec, MixerKeys};
use super::moe::{self, GroupScore, MoeAct, MoeRouting, MoeScoring, MoeSpec};
use super::recurrent::{MixerSpec, RecurrentSpec};
use super::{Device, Family, LanguageModel};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::GenerationParameters;
use crate::weights::Weights;
use crate::{bail, ensure};

pub const FAMILY: Family = Family {
    name: "nemotron_h",
    variants: &["nemotron_h"],
    hf_architectures: &["NemotronHForCausalLM"],
    model_types: &["nemotron_h"],
    gguf_architectures: &["nemotron_h", "nemotron_h_moe"],
    load,
};

pub struct NemotronH;

impl NemotronH {
    pub const NAME: &'static str = "nemotron_h";

    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters::default()
    }
}

const KEYS: MixerKeys = MixerKeys {
    heads: "mamba_num_heads",
    head_dim: "mamba_head_dim",
    state: "ssm_state_size",
    groups: "n_groups",
    conv: "conv_kernel",
    chunk: "chunk_size",
    eps: "layer_norm_epsilon",
    expand: None,
    grouped_norm: true,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Mamba,
    Attention,
    Mlp,
    Moe,
}

/// The block kinds: `layers_block_type` (names, with the legacy `mamba`/`attention`
/// spellings) or `hybrid_override_pattern` (`M`, `*`, `-`).
fn blocks(cfg: &ModelConfig) -> Result<Vec<Block>> {
    let kind = |s: &str| -> Result<Block> {
        Ok(match s {
            "linear_attention" | "mamba" | "M" => Block::Mamba,
            "full_attention" | "attention" | "*" => Block::Attention,
            "mlp" | "-" => Block::Mlp,
            "moe" | "E" => Block::Moe,
            other => bail!("{}: NemotronH block type \"{other}\" is unknown", cfg.source),
        })
    };
    let list: Vec<Block> = if let Some(v) = cfg.extra("layers_block_type", "") {
        let a = v
            .as_array()
            .ok_or_else(|| Error::new(format!("{}: layers_block_type is not a list", cfg.source)))?;
        a.iter()
            .map(|e| match e.as_str() {
                Some(s) => kind(s),
                None => bail!("{}: layers_block_type entry {e} is not a string", cfg.source),
            })
            .collect::<Result<_>>()?
    } else if let Some(v) = cfg.extra("hybrid_override_pattern", "") {
        let p = v
            .as_str()
            .ok_or_else(|| Error::new(format!("{}: hybrid_override_pattern is not a string", cfg.source)))?;
        ensure!(
            p.len() <= crate::config::MAX_LAYERS,
            "{}: hybrid_override_pattern is longer than {} layers",
            cfg.source,
            crate::config::MAX_LAYERS
        );
        p.chars()
            .map(|c| kind(c.encode_utf8(&mut [0u8; 4])))
            .collect::<Result<_>>()?
    } else {
        bail!(
            "{}: NemotronH needs layers_block_type or hybrid_override_pattern",
            cfg.source
        );
    };
    ensure!(
        list.len() == cfg.num_layers,
        "{}: {} block types for {} layers",
        cfg.source,
        list.len(),
        cfg.num_layers
    );
    Ok(list)
}

/// The MoE blocks' routing and experts (see the module docs).
fn moe_spec(cfg: &ModelConfig, blocks: &[Block]) -> Result<MoeSpec> {
    let src = &cfg.source;
    let latent = cfg.extra_usize("moe_latent_size", "moe_latent_size")?;
    ensure!(
        latent != Some(0),
        "{src}: moe_latent_size = 0 (give a positive size, or null for none)"
    );
    let latent = latent.unwrap_or(0);
    let count = |k: &str| cfg.extra_usize(k, "");
    let scale = cfg.extra_f64("routed_scaling_factor", "")?.unwrap_or(1.0);
    ensure!(
        scale.is_finite() && scale > 0.0,
        "{src}: routed_scaling_factor = {scale} must be a positive number"
    );
    MoeSpec {
        n_experts: moe::required_count(cfg, &["n_routed_experts", "num_local_experts"], "expert_count")?,
        k: moe::required_count(cfg, &["num_experts_per_tok"], "expert_used_count")?,
        routing: MoeRouting {
            scoring: MoeScoring::Sigmoid,
            renormalize: cfg.extra_bool("norm_topk_prob", "")?.unwrap_or(true),
            scale: scale as f32,
            n_groups: count("n_group")?.unwrap_or(1),
            topk_groups: count("topk_group")?.unwrap_or(1),
            group_score: GroupScore::TopTwoSum,
        },
        ffn: moe::required_count(cfg, &["moe_intermediate_size"], "expert_feed_forward_length")?,
        shared_ffn: moe::required_count(
            cfg,
            &["moe_shared_expert_intermediate_size"],
            "expert_shared_feed_forward_length",
        )?,
        sparse: blocks.iter().map(|&b| b == Block::Moe).collect(),
        act: MoeAct::Relu2,
        latent,
    }
    .checked(cfg)
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    if cfg.is_gguf() {
        // llama.cpp's layout, read as the Hugging Face one (`hybrid_gguf`).
        let (cfg, w) = super::hybrid_gguf::hf_view(cfg, w)?;
        return load(&cfg, &w, dev);
    }
    let blocks = blocks(cfg)?;
    let moe = match blocks.contains(&Block::Moe) {
        true => Some(moe_spec(cfg, &blocks)?),
        false => None,
    };
    let m = mixer_spec(cfg, &KEYS)?;
    let mut cfg = cfg.clone();
    cfg.rms_norm_eps = m.norm_eps as f64;
    ensure!(
        cfg.extra_bool("mlp_bias", "")? != Some(true) && cfg.extra_bool("attention_bias", "")? != Some(true),
        "{}: NemotronH biases (mlp_bias, attention_bias) are not supported yet",
        cfg.source
    );
    let act = cfg.extra("mlp_hidden_act", "");
    ensure!(
        act.as_ref().is_none_or(|a| a == "relu2"),
        "{}: NemotronH mlp_hidden_act {} is not supported (relu2 is)",
        cfg.source,
        act.unwrap_or_default()
    );
    let base = DecoderSpec::llama(&cfg, None);
    // No positional embeddings: a table of zero frequencies rotates by 0 (cos 1, sin 0),
    // which leaves q and k exactly as they are.
    let nope = vec![0f32; cfg.head_dim / 2];
    let spec = DecoderSpec {
        mlp: Mlp::Relu2,
        ropes: vec![nope],
        // One norm per block: an MLP block's is its "ffn" norm.
        ffn_norm: "attn_norm",
        recurrent: Some(RecurrentSpec {
            layers: blocks.iter().map(|&b| b == Block::Mamba).collect(),
            mixer: MixerSpec::Mamba2(m),
            mlp: blocks.iter().map(|&b| matches!(b, Block::Mlp | Block::Moe)).collect(),
            mlp_only: blocks.iter().map(|&b| matches!(b, Block::Mlp | Block::Moe)).collect(),
        }),
        moe,
        ..base
    };
    let id = Identity {
        family: FAMILY.name,
        variant: NemotronH::NAME,
        defaults: NemotronH::default_parameters(),
    };
    decoder::build(&cfg, w, dev, spec, id)
}
