//! Falcon-H1 (`falcon_h1`): every layer runs GQA attention (RoPE) and a Mamba 2 mixer side
//! by side on the same `input_layernorm` output and adds both to the residual
//! (`DecoderSpec::parallel_mixers`), then a SwiGLU MLP after `pre_ff_layernorm`.
//!
//! The µP multipliers, as transformers applies them, and where ffai puts them:
//! - `embedding_multiplier` on the embeddings, `lm_head_multiplier` on the logits: the
//!   decoder's `embed_scale` / `logits_scale`;
//! - attention: input × `attention_in_multiplier`, k × `key_multiplier` (after `k_proj`,
//!   before RoPE), output × `attention_out_multiplier`;
//! - Mamba: input × `ssm_in_multiplier`, `in_proj`'s output × the `ssm_multipliers` vector
//!   (five factors, for z, x, B, C and dt), output × `ssm_out_multiplier`;
//! - MLP: `gate_proj`'s output × `mlp_multipliers[0]`, `down_proj`'s × `mlp_multipliers[1]`.
//!
//! Every one of those multiplies a linear map's input or output rows, so each is folded
//! into that projection's weight rows at load (the projections without biases: biases are
//! refused): a scaled projection becomes an f32 copy, an unscaled one stays as stored.
//!
//! The Mamba mixer's gate: `y · silu(z)` without `mamba_rms_norm`; with it, a gated RMSNorm
//! over each of `mamba_n_groups` groups, normalising before the gate when
//! `mamba_norm_before_gate` (transformers' default) and after it otherwise. Its inner width
//! is `mamba_d_ssm` when set (`mamba_n_heads × mamba_d_head`).

use super::decoder::{self, DecoderSpec, Identity};
use super::mamba2::{mixer_spec, MixerKeys};
use super::recurrent::{self, Mamba2Gate, MixerSpec, RecurrentSpec};
use super::{Device, Family, LanguageModel};
use crate::config::{ModelConfig, MAX_DIM};
use crate::error::{Error, Result};
use crate::generate::GenerationParameters;
use crate::weights::Weights;
use crate::{bail, ensure};

pub const FAMILY: Family = Family {
    name: "falcon_h1",
    variants: &["falcon_h1"],
    hf_architectures: &["FalconH1ForCausalLM"],
    model_types: &["falcon_h1"],
    gguf_architectures: &["falcon-h1"],
    load,
};

pub struct FalconH1;

impl FalconH1 {
    pub const NAME: &'static str = "falcon_h1";

    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters::default()
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
    expand: None,
    grouped_norm: true,
};

/// A list of `n` finite numbers (`ssm_multipliers`, `mlp_multipliers`), all 1 when absent.
fn multipliers(cfg: &ModelConfig, key: &str, n: usize) -> Result<Vec<f32>> {
    let Some(v) = cfg.extra(key, "") else {
        return Ok(vec![1.0; n]);
    };
    let list = v
        .as_array()
        .filter(|a| a.len() == n)
        .ok_or_else(|| Error::new(format!("{}: {key} = {v} is not a list of {n} numbers", cfg.source)))?;
    list.iter()
        .map(|x| match x.as_f64() {
            Some(f) if f.is_finite() => Ok(f as f32),
            _ => bail!("{}: {key} entry {x} is not a finite number", cfg.source),
        })
        .collect()
}

/// A projection's factor per output row.
type RowScale<'a> = dyn Fn(usize) -> f32 + 'a;

/// `name`'s rows scaled by `row_scale(r)`, as f32 values; None when every factor is 1.
fn scaled(w: &Weights, name: &str, rows: usize, cols: usize, row_scale: &RowScale<'_>) -> Result<Option<Vec<f32>>> {
    if (0..rows).all(|r| row_scale(r) == 1.0) {
        return Ok(None);
    }
    w.matrix(name, rows, cols)?;
    let mut v = w.f32_vec(name, rows * cols)?;
    for (r, row) in v.chunks_mut(cols).enumerate() {
        let f = row_scale(r);
        row.iter_mut().for_each(|x| *x *= f);
    }
    Ok(Some(v))
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    if cfg.is_gguf() {
        // llama.cpp's layout, read as the Hugging Face one (`hybrid_gguf`).
        let (cfg, w) = super::hybrid_gguf::hf_view(cfg, w)?;
        return load(&cfg, &w, dev);
    }
    let flag = |k: &str| -> Result<bool> { Ok(cfg.extra_bool(k, "")?.unwrap_or(false)) };
    for k in ["attention_bias", "mlp_bias", "projectors_bias", "mamba_proj_bias"] {
        ensure!(
            !flag(k)?,
            "{}: Falcon-H1 with {k} is not supported (its multipliers are folded into bias-free projections)",
            cfg.source
        );
    }
    ensure!(
        cfg.sliding_window.is_none(),
        "{}: Falcon-H1 with a sliding window is not supported",
        cfg.source
    );
    let mut m = mixer_spec(cfg, &KEYS)?;
    let di = m.scan.heads * m.scan.head_dim;
    if let Some(d_ssm) = cfg.extra_usize("mamba_d_ssm", "")? {
        ensure!(
            d_ssm == di,
            "{}: mamba_d_ssm {d_ssm} is not mamba_n_heads * mamba_d_head = {di}",
            cfg.source
        );
    } else {
        let expand = recurrent::sized(
            cfg,
            "mamba_expand",
            cfg.extra_usize("mamba_expand", "")?,
            Some(2),
            MAX_DIM,
        )?;
        ensure!(
            cfg.hidden_size.checked_mul(expand) == Some(di),
            "{}: mamba_expand * hidden_size is not mamba_n_heads * mamba_d_head = {di}",
            cfg.source
        );
    }
    m.gate = match (
        flag("mamba_rms_norm")?,
        cfg.extra_bool("mamba_norm_before_gate", "")?.unwrap_or(true),
    ) {
        (false, _) => Mamba2Gate::GateOnly,
        (true, true) => Mamba2Gate::NormThenGate,
        (true, false) => Mamba2Gate::GateThenNorm,
    };
    let f = |k: &str| -> Result<f32> { Ok(cfg.extra_f64(k, "")?.unwrap_or(1.0) as f32) };
    let (attn_in, attn_out, key_mult) = (
        f("attention_in_multiplier")?,
        f("attention_out_multiplier")?,
        f("key_multiplier")?,
    );
    let (ssm_in, ssm_out) = (f("ssm_in_multiplier")?, f("ssm_out_multiplier")?);
    let ssm_mult = multipliers(cfg, "ssm_multipliers", 5)?;
    let mlp_mult = multipliers(cfg, "mlp_multipliers", 2)?;
    let lm_head = f("lm_head_multiplier")?;

    // The recurrent spec is checked before its widths size anything below.
    let rec = RecurrentSpec {
        layers: vec![true; cfg.num_layers],
        mixer: MixerSpec::Mamba2(m.clone()),
        mlp: vec![true; cfg.num_layers],
        mlp_only: vec![false; cfg.num_layers],
    };
    recurrent::check(cfg, &rec)?;

    // The multipliers folded into the projections' rows.
    let (h, gs) = (cfg.hidden_size, m.scan.groups * m.scan.state);
    let (qd, kvd, ff) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    );
    let in_rows = 2 * di + 2 * gs + m.scan.heads;
    let section = move |r: usize| -> usize {
        [di, 2 * di, 2 * di + gs, 2 * di + 2 * gs]
            .iter()
            .filter(|&&end| r >= end)
            .count()
    };
    let mut replace = Vec::new();
    for i in 0..cfg.num_layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        let ssm_in_row = |r: usize| ssm_in * ssm_mult[section(r)];
        let jobs: [(String, usize, usize, &RowScale<'_>); 8] = [
            (p("ssm_in.weight"), in_rows, h, &ssm_in_row),
            (p("ssm_out.weight"), h, di, &|_| ssm_out),
            (p("attn_q.weight"), qd, h, &|_| attn_in),
            (p("attn_k.weight"), kvd, h, &|_| attn_in * key_mult),
            (p("attn_v.weight"), kvd, h, &|_| attn_in),
            (p("attn_output.weight"), h, qd, &|_| attn_out),
            (p("ffn_gate.weight"), ff, h, &|_| mlp_mult[0]),
            (p("ffn_down.weight"), h, ff, &|_| mlp_mult[1]),
        ];
        for (name, rows, cols, scale) in jobs {
            if let Some(v) = scaled(w, &name, rows, cols, scale)? {
                replace.push((name, v));
            }
        }
    }
    let folded;
    let w = if replace.is_empty() {
        w
    } else {
        folded = w.with_f32(replace)?;
        &folded
    };
    let spec = DecoderSpec {
        embed_scale: f("embedding_multiplier")?,
        logits_scale: lm_head,
        parallel_mixers: true,
        recurrent: Some(rec),
        ..DecoderSpec::llama(cfg, None)
    };
    let id = Identity {
        family: FAMILY.name,
        variant: FalconH1::NAME,
        defaults: FalconH1::default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}
