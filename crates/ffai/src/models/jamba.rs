//! Jamba (`jamba`): Mamba 1 layers (`recurrent::MixerSpec::Mamba1`: in_proj → x, z; causal
//! conv + SiLU; x_proj → dt, B, C, each RMS-normed; dt_proj, softplus with its bias; the
//! selective scan; `y · silu(z)`; out_proj) and GQA attention layers WITHOUT positional
//! embeddings (layer `i` attends when `i % attn_layer_period == attn_layer_offset`), every
//! block followed by a SwiGLU MLP or, on layers with `i % expert_layer_period ==
//! expert_layer_offset` (when `num_experts > 1`), a mixture of experts of the same width:
//! softmax over all experts, top `num_experts_per_tok`, NOT renormalised.

use super::decoder::{self, DecoderSpec, Identity};
use super::moe::{self, MoeAct, MoeRouting, MoeSpec};
use super::recurrent::{self, Mamba1Spec, MixerSpec, RecurrentSpec};
use super::{Device, Family, LanguageModel};
use crate::config::{ModelConfig, MAX_DIM};
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;
use crate::{bail, ensure};

pub const FAMILY: Family = Family {
    name: "jamba",
    variants: &["jamba"],
    hf_architectures: &["JambaForCausalLM"],
    model_types: &["jamba"],
    gguf_architectures: &["jamba"],
    load,
};

pub struct Jamba;

impl Jamba {
    pub const NAME: &'static str = "jamba";

    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters::default()
    }
}

/// The Mamba 1 scan runs on the Mamba 2 op in pieces of one row: its one-step recurrence
/// on every row (as transformers' sequential scan), so any cut of a sequence into steps
/// gives the same bits.
const SCAN_CHUNK: usize = 1;

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    if cfg.is_gguf() {
        // llama.cpp's layout, read as the Hugging Face one (`hybrid_gguf`).
        let (cfg, w) = super::hybrid_gguf::hf_view(cfg, w)?;
        return load(&cfg, &w, dev);
    }
    let u =
        |k: &str, d: usize| -> Result<usize> { recurrent::sized(cfg, k, cfg.extra_usize(k, "")?, Some(d), MAX_DIM) };
    ensure!(
        cfg.extra_bool("mamba_proj_bias", "")? != Some(true) && !cfg.attention_bias,
        "{}: Jamba projection biases are not supported",
        cfg.source
    );
    let (attn_period, attn_offset) = (
        u("attn_layer_period", 8)?,
        cfg.extra_usize("attn_layer_offset", "")?.unwrap_or(4),
    );
    let (exp_period, exp_offset) = (
        u("expert_layer_period", 2)?,
        cfg.extra_usize("expert_layer_offset", "")?.unwrap_or(1),
    );
    let layers: Vec<bool> = (0..cfg.num_layers).map(|i| i % attn_period != attn_offset).collect();
    let hidden = cfg.hidden_size;
    let dt_rank = match cfg.extra("mamba_dt_rank", "") {
        Some(v) if v == "auto" => hidden.div_ceil(16),
        _ => u("mamba_dt_rank", hidden.div_ceil(16))?,
    };
    let expand = u("mamba_expand", 2)?;
    let d_inner = match hidden.checked_mul(expand) {
        Some(d) if d <= MAX_DIM => d,
        _ => bail!("{}: mamba_expand * hidden_size exceeds {MAX_DIM}", cfg.source),
    };
    let mixer = Mamba1Spec {
        d_inner,
        state: u("mamba_d_state", 16)?,
        dt_rank,
        conv_kernel: recurrent::conv_kernel(cfg, "mamba_d_conv", cfg.extra_usize("mamba_d_conv", "")?, 4)?,
        chunk: SCAN_CHUNK,
        norm_eps: cfg.rms_norm_eps as f32,
    };
    let n_experts = u("num_experts", 16)?;
    let moe = if n_experts > 1 {
        let sparse: Vec<bool> = (0..cfg.num_layers).map(|i| i % exp_period == exp_offset).collect();
        if sparse.iter().any(|&s| s) {
            Some(
                MoeSpec {
                    n_experts,
                    k: moe::required_count(cfg, &["num_experts_per_tok"], "")?,
                    routing: MoeRouting::softmax(false),
                    ffn: cfg.intermediate_size,
                    shared_ffn: 0,
                    sparse,
                    act: MoeAct::SwiGlu,
                    latent: 0,
                }
                .checked(cfg)?,
            )
        } else {
            None
        }
    } else {
        None
    };
    let spec = DecoderSpec {
        // No positional embeddings: zero frequencies, an exact identity rotation.
        ropes: vec![vec![0f32; cfg.head_dim / 2]],
        moe,
        recurrent: Some(RecurrentSpec {
            layers,
            mixer: MixerSpec::Mamba1(mixer),
            mlp: vec![true; cfg.num_layers],
            mlp_only: vec![false; cfg.num_layers],
        }),
        ..DecoderSpec::llama(cfg, None)
    };
    let id = Identity {
        family: FAMILY.name,
        variant: Jamba::NAME,
        defaults: Jamba::default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}
