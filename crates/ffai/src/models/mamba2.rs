//! Mamba 2: every layer is `h + mixer(rmsnorm(h))` with the selective state-space mixer
//! (`recurrent::MixerSpec::Mamba2`) and no MLP; final `norm_f`, untied head by default.
//! The gated RMSNorm follows each file's runtime: transformers normalises the whole inner
//! width, llama.cpp (and mamba_ssm) each of `n_groups` groups.

use ffai_kernels::ssm::SsmShape;
use serde_json::Value;

use super::decoder::{self, DecoderSpec, Identity};
use super::recurrent::{self, Mamba2Spec, MixerSpec, RecurrentSpec};
use super::{Device, Family, LanguageModel};
use crate::config::{ModelConfig, MAX_DIM};
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;
use crate::{bail, ensure};

pub const FAMILY: Family = Family {
    name: "mamba2",
    variants: &["mamba2"],
    hf_architectures: &["Mamba2ForCausalLM"],
    model_types: &["mamba2"],
    gguf_architectures: &["mamba2"],
    load,
};

pub struct Mamba2;

impl Mamba2 {
    pub const NAME: &'static str = "mamba2";

    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters::default()
    }
}

/// A bound of `time_step_limit`: a number, or transformers 5's `{"__float__": "Infinity"}`.
fn limit_value(cfg: &ModelConfig, v: &Value) -> Result<f64> {
    if let Some(x) = v.as_f64() {
        return Ok(x);
    }
    match v.get("__float__").and_then(|f| f.as_str()) {
        Some("Infinity") | Some("inf") => Ok(f64::INFINITY),
        _ => bail!("{}: time_step_limit entry {v} is not a number", cfg.source),
    }
}

/// How a family's config.json names the Mamba 2 mixer's numbers.
pub struct MixerKeys {
    pub heads: &'static str,
    /// May be `"auto"`: `expand * hidden_size / heads` (Granite 4).
    pub head_dim: &'static str,
    pub state: &'static str,
    pub groups: &'static str,
    pub conv: &'static str,
    pub chunk: &'static str,
    /// The norm epsilon's key.
    pub eps: &'static str,
    /// The key of the factor `expand` with `expand * hidden_size = heads * head_dim`
    /// (Mamba 2, Granite 4); `None`: the inner width is `heads * head_dim` alone (NemotronH).
    pub expand: Option<&'static str>,
    /// transformers normalises each of `n_groups` groups (NemotronH's Zamba2 norm) rather
    /// than the whole inner width (Mamba 2).
    pub grouped_norm: bool,
}

pub const MAMBA2_KEYS: MixerKeys = MixerKeys {
    heads: "num_heads",
    head_dim: "head_dim",
    state: "state_size",
    groups: "n_groups",
    conv: "conv_kernel",
    chunk: "chunk_size",
    eps: "layer_norm_epsilon",
    expand: Some("expand"),
    grouped_norm: false,
};

/// The scan's shape from a config (config.json names, then llama.cpp's `ssm.*` keys).
pub fn mixer_spec(cfg: &ModelConfig, keys: &MixerKeys) -> Result<Mamba2Spec> {
    let hidden = cfg.hidden_size;
    let u = |hf: &str, gguf: &str| cfg.extra_usize(hf, gguf);
    let state = recurrent::sized(cfg, keys.state, u(keys.state, "ssm.state_size")?, Some(128), MAX_DIM)?;
    let groups = recurrent::sized(cfg, keys.groups, u(keys.groups, "ssm.group_count")?, Some(8), MAX_DIM)?;
    let conv_kernel = recurrent::conv_kernel(cfg, keys.conv, u(keys.conv, "ssm.conv_kernel")?, 4)?;
    let chunk = recurrent::sized(cfg, keys.chunk, u(keys.chunk, "ssm.chunk_size")?, Some(256), 4096)?;
    let (heads, head_dim) = if cfg.is_gguf() {
        // llama.cpp: ssm.inner_size and ssm.time_step_rank (the head count).
        let inner = recurrent::sized(cfg, "ssm.inner_size", u("", "ssm.inner_size")?, None, MAX_DIM)?;
        let heads = recurrent::sized(cfg, "ssm.time_step_rank", u("", "ssm.time_step_rank")?, None, MAX_DIM)?;
        ensure!(
            inner.is_multiple_of(heads),
            "{}: ssm.inner_size {inner} is not a multiple of the {heads} heads",
            cfg.source
        );
        (heads, inner / heads)
    } else {
        let heads = recurrent::sized(cfg, keys.heads, u(keys.heads, "")?, Some(128), MAX_DIM)?;
        let expand = match keys.expand {
            Some(k) => Some(recurrent::sized(cfg, k, u(k, "")?, Some(2), MAX_DIM)?),
            None => None,
        };
        let head_dim = match (cfg.extra(keys.head_dim, ""), expand) {
            (Some(v), Some(e)) if v == "auto" => hidden.saturating_mul(e) / heads,
            _ => recurrent::sized(cfg, keys.head_dim, u(keys.head_dim, "")?, Some(64), MAX_DIM)?,
        };
        if let Some(expand) = expand {
            ensure!(
                (hidden as u64) * (expand as u64) == (heads as u64) * (head_dim as u64),
                "{}: hidden_size * {} ({hidden} * {expand}) must equal {} * {} ({heads} * {head_dim})",
                cfg.source,
                keys.expand.unwrap_or("expand"),
                keys.heads,
                keys.head_dim
            );
        }
        (heads, head_dim)
    };
    let (dt_min, dt_max) = match cfg.extra("time_step_limit", "") {
        None => (0.0, f64::INFINITY),
        Some(v) => match v.as_array().map(|a| a.as_slice()) {
            Some([lo, hi]) => (limit_value(cfg, lo)?, limit_value(cfg, hi)?),
            _ => bail!("{}: time_step_limit {v} is not a pair", cfg.source),
        },
    };
    let eps = match cfg.is_gguf() {
        true => cfg.rms_norm_eps,
        false => cfg.extra_f64(keys.eps, "")?.unwrap_or(1e-5),
    };
    let d_inner = heads.saturating_mul(head_dim);
    Ok(Mamba2Spec {
        scan: SsmShape {
            heads,
            head_dim,
            groups,
            state,
            chunk,
            dt_min: dt_min as f32,
            dt_max: dt_max as f32,
        },
        conv_kernel,
        norm_group: if cfg.llama_cpp || keys.grouped_norm {
            d_inner / groups.max(1)
        } else {
            d_inner
        },
        norm_eps: eps as f32,
        gate: recurrent::Mamba2Gate::GateThenNorm,
    })
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let m = mixer_spec(cfg, &MAMBA2_KEYS)?;
    let mut cfg = cfg.clone();
    cfg.rms_norm_eps = m.norm_eps as f64;
    if !cfg.is_gguf() {
        cfg.tie_word_embeddings = cfg.extra_bool("tie_word_embeddings", "")?.unwrap_or(false);
    }
    let spec = DecoderSpec {
        recurrent: Some(RecurrentSpec {
            layers: vec![true; cfg.num_layers],
            mixer: MixerSpec::Mamba2(m),
            mlp: vec![false; cfg.num_layers],
            mlp_only: vec![false; cfg.num_layers],
        }),
        ..DecoderSpec::llama(&cfg, None)
    };
    let id = Identity {
        family: FAMILY.name,
        variant: Mamba2::NAME,
        defaults: Mamba2::default_parameters(),
    };
    decoder::build(&cfg, w, dev, spec, id)
}
