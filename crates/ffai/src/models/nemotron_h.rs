//! NemotronH (NVIDIA Nemotron-H, Nemotron Nano 2): a stack of single-mixer blocks,
//! `h + mixer(rmsnorm(h))`, each one of a Mamba 2 mixer (`linear_attention`, `M`), GQA
//! attention without positional embeddings (`full_attention`, `*`) or a non-gated MLP
//! `down(relu(up(x))^2)` (`mlp`, `-`), from `layers_block_type` (transformers 5) or the
//! Hub configs' `hybrid_override_pattern`. The Mamba 2 mixer's gated norm is per group
//! of `d_inner / n_groups`. Mixture-of-experts blocks (`moe`, `E`) are not supported yet.

use super::decoder::{self, DecoderSpec, Identity, Mlp};
use super::mamba2::{mixer_spec, MixerKeys};
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
    gguf_architectures: &[],
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
}

/// The block kinds: `layers_block_type` (names, with the legacy `mamba`/`attention`
/// spellings) or `hybrid_override_pattern` (`M`, `*`, `-`).
fn blocks(cfg: &ModelConfig) -> Result<Vec<Block>> {
    let kind = |s: &str| -> Result<Block> {
        Ok(match s {
            "linear_attention" | "mamba" | "M" => Block::Mamba,
            "full_attention" | "attention" | "*" => Block::Attention,
            "mlp" | "-" => Block::Mlp,
            "moe" | "E" => bail!(
                "{}: NemotronH mixture-of-experts blocks are not supported yet",
                cfg.source
            ),
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

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let blocks = blocks(cfg)?;
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
            mlp: blocks.iter().map(|&b| b == Block::Mlp).collect(),
            mlp_only: blocks.iter().map(|&b| b == Block::Mlp).collect(),
        }),
        ..base
    };
    let id = Identity {
        family: FAMILY.name,
        variant: NemotronH::NAME,
        defaults: NemotronH::default_parameters(),
    };
    decoder::build(&cfg, w, dev, spec, id)
}
