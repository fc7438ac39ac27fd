//! The hybrid and state-space families from GGUF files as llama.cpp's converter writes
//! them (architectures `qwen3next`, `qwen35`, `qwen35moe`, `nemotron_h`, `nemotron_h_moe`,
//! `granitehybrid`, `lfm2moe`, `falcon-h1`, `jamba`). Each family reads its Hugging Face
//! config.json and tensors; [`hf_view`] gives it both from a GGUF file: the `{arch}.*`
//! metadata as the config.json the family reads, and the tensors with the converter's
//! transforms undone where the family's loader does not take llama.cpp's form already.
//! The view's config has `llama_cpp` set, so the family runs as llama.cpp does where the
//! two runtimes differ (the Mamba 2 gated norm per group).
//!
//! What the converter does, per architecture, and what is undone here:
//! - all: `A_log` → `ssm_a = -exp(A_log)` (the loaders take either), depthwise conv
//!   weights squeezed to `[channels, kernel]` and the gated norm shaped `[groups, width]`
//!   (the same row-major values), experts stacked `[experts, rows, cols]` (read as
//!   they are). Which layer is which kind comes from the tensors present (the converter's
//!   per-layer metadata is not always right: Granite 4's `head_count_kv` is all zero for
//!   configs spelling `full_attention`, NemotronH's `feed_forward_length` is 0 for dense
//!   MLP blocks of MoE models).
//! - `qwen3next`: `in_proj_qkvz` split into `attn_qkv` (`[q | k | v]` of all heads) and
//!   `attn_gate` (the form Qwen3.5's loader reads), `in_proj_ba` kept as `ssm_ba` (split
//!   here into `ssm_beta` / `ssm_alpha`), the `(1 + w)` norms stored with the 1 added
//!   (run as plain RMS norms: the same f32 sum transformers computes), the MLP norm as
//!   `post_attention_norm`.
//! - `qwen35`, `qwen35moe`: as `qwen3next`, separate projections, and the value heads
//!   reordered from grouped by key head to tiled (`[G0v0, G1v0, .., G0v1, ..]`) in
//!   `attn_qkv`'s v rows, `attn_gate`, `ssm_beta`, `ssm_alpha`, `ssm_a`, `ssm_dt`, the
//!   conv's v channels and `ssm_out`'s columns: put back here.
//! - `granitehybrid`: the shared MLP split into `ffn_gate` / `ffn_up` (dense) or
//!   `ffn_{gate,up,down}_shexp` (MoE); the multipliers as `attention.scale`,
//!   `embedding_scale`, `residual_scale`, `logit_scale`; the attention layers' q/k
//!   rows permuted for RoPE on adjacent pairs as for `llama` (`attn_k` over the KV
//!   heads), RoPE switched by `rope.scaling.finetuned` (true for Bamba, false for the
//!   NoPE Granite 4 hybrids; absent means RoPE, as llama.cpp reads it), `rope.freq_base`,
//!   `rope.dimension_count` (Bamba's `attn_rotary_emb`). With RoPE the permutation is
//!   undone here (rows back to transformers' halves, partial RoPE over the first
//!   `rope.dimension_count` dims as transformers rotates them); without RoPE it is left
//!   alone (q and k rows permuted alike leave every score as it was).
//! - `falcon-h1`: every µP multiplier folded into the weights (so none is applied here),
//!   the MLP norm named `blk.N.ffn_norm` without `.weight`; llama.cpp's Mamba 2 layer gates
//!   before its grouped norm.
//! - `jamba`: which layers attend and which have experts as per-layer tensors (read back
//!   as the period/offset pairs the family's config has).

use serde_json::{json, Map, Value};

use ffai_kernels::backend::HostBytes;
use ffai_kernels::quant::WeightType;

use crate::config::{ModelConfig, MAX_DIM};
use crate::error::{Error, Result};
use crate::weights::{WeightEntry, Weights};
use crate::{bail, ensure};

/// The GGUF architectures read through [`hf_view`].
pub const ARCHITECTURES: &[&str] = &[
    "qwen3next",
    "qwen35",
    "qwen35moe",
    "nemotron_h",
    "nemotron_h_moe",
    "granitehybrid",
    "lfm2moe",
    "falcon-h1",
    "jamba",
];

/// Reads `{arch}.*` keys with errors that name them.
struct Meta<'a> {
    cfg: &'a ModelConfig,
}

impl Meta<'_> {
    fn opt(&self, key: &str) -> Result<Option<usize>> {
        self.cfg.extra_usize("", key)
    }

    /// A present number in 1..=MAX_DIM.
    fn req(&self, key: &str) -> Result<usize> {
        match self.opt(key)? {
            Some(v) if v > 0 => Ok(v),
            Some(v) => bail!(
                "{}: GGUF {}.{key} = {v} must be in 1..={MAX_DIM}",
                self.cfg.source,
                self.cfg.architecture
            ),
            None => bail!(
                "{}: GGUF metadata is missing {}.{key}",
                self.cfg.source,
                self.cfg.architecture
            ),
        }
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.cfg.extra_f64("", key)
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.cfg.extra_bool("", key)
    }

    /// `a / b` where it divides exactly, else an error naming both keys.
    fn ratio(&self, a: (&str, usize), b: (&str, usize)) -> Result<usize> {
        ensure!(
            b.1 > 0 && a.1.is_multiple_of(b.1),
            "{}: GGUF {arch}.{} = {} is not a multiple of {arch}.{} = {}",
            self.cfg.source,
            a.0,
            a.1,
            b.0,
            b.1,
            arch = self.cfg.architecture
        );
        Ok(a.1 / b.1)
    }
}

fn layer_has(w: &Weights, n: usize, suffix: &str) -> Vec<bool> {
    (0..n).map(|i| w.has(&format!("blk.{i}.{suffix}"))).collect()
}

/// Rows of the first layer's `suffix` tensor that has one.
fn first_rows(w: &Weights, n: usize, suffix: &str) -> Option<usize> {
    (0..n).find_map(|i| w.get(&format!("blk.{i}.{suffix}")).ok().map(|e| e.shape[0]))
}

/// The config.json and weights `cfg` (a GGUF file's) and `w` stand for, in the form the
/// family reads from a Hugging Face directory; `cfg.llama_cpp` stays set.
pub fn hf_view(cfg: &ModelConfig, w: &Weights) -> Result<(ModelConfig, Weights)> {
    let g = Meta { cfg };
    let n = cfg.num_layers;
    let mut w = w.clone();
    let mut j = Map::new();
    let common = json!({
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": n,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": !w.has("output.weight"),
    });
    if let Value::Object(m) = common {
        j.extend(m);
    }
    let mut set = |k: &str, v: Value| {
        j.insert(k.to_string(), v);
    };
    match cfg.architecture.as_str() {
        arch @ ("qwen3next" | "qwen35" | "qwen35moe") => {
            let (kh, vh) = (g.req("ssm.group_count")?, g.req("ssm.time_step_rank")?);
            let dk = g.req("ssm.state_size")?;
            let dv = g.ratio(("ssm.inner_size", g.req("ssm.inner_size")?), ("ssm.time_step_rank", vh))?;
            g.ratio(("ssm.time_step_rank", vh), ("ssm.group_count", kh))?;
            set("linear_num_key_heads", kh.into());
            set("linear_num_value_heads", vh.into());
            set("linear_key_head_dim", dk.into());
            set("linear_value_head_dim", dv.into());
            set("linear_conv_kernel_dim", g.req("ssm.conv_kernel")?.into());
            let recurrent: Vec<bool> = match cfg.extra("", "attention.recurrent_layers") {
                Some(Value::Array(a)) => {
                    let flags: Option<Vec<bool>> = a.iter().map(|v| v.as_bool()).collect();
                    match flags {
                        Some(f) if f.len() >= n => f[..n].to_vec(),
                        _ => bail!(
                            "{}: GGUF {arch}.attention.recurrent_layers is not a list of {n} booleans",
                            cfg.source
                        ),
                    }
                }
                Some(_) => bail!("{}: GGUF {arch}.attention.recurrent_layers is not a list", cfg.source),
                None => {
                    let every = g.opt("full_attention_interval")?.unwrap_or(4);
                    ensure!(
                        every > 0,
                        "{}: GGUF {arch}.full_attention_interval must be positive",
                        cfg.source
                    );
                    (0..n).map(|i| !(i + 1).is_multiple_of(every)).collect()
                }
            };
            let kinds: Vec<&str> = recurrent
                .iter()
                .map(|&r| if r { "linear_attention" } else { "full_attention" })
                .collect();
            set("layer_types", json!(kinds));
            let rot = g.req("rope.dimension_count")?;
            ensure!(
                rot <= cfg.head_dim && rot.is_multiple_of(2),
                "{}: GGUF {arch}.rope.dimension_count = {rot} must be even and at most the head size {}",
                cfg.source,
                cfg.head_dim
            );
            let factor = rot as f64 / cfg.head_dim as f64;
            ensure!(
                ((cfg.head_dim as f64 * factor) as usize & !1) == rot,
                "{}: GGUF {arch}.rope.dimension_count = {rot} is not a fraction of the head size {} ffai can express",
                cfg.source,
                cfg.head_dim
            );
            set(
                "rope_parameters",
                json!({"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor}),
            );
            let sparse = layer_has(&w, n, "ffn_gate_inp.weight");
            let model_type = match arch {
                "qwen3next" => {
                    let dense: Vec<usize> = (0..n).filter(|&i| !sparse[i]).collect();
                    set("mlp_only_layers", json!(dense));
                    set("decoder_sparse_step", 1.into());
                    set("norm_topk_prob", g.bool("expert_weights_norm")?.unwrap_or(true).into());
                    "qwen3_next"
                }
                "qwen35" => "qwen3_5_text",
                _ => "qwen3_5_moe_text",
            };
            if sparse.iter().any(|&s| s) {
                set("num_experts", g.req("expert_count")?.into());
                set("num_experts_per_tok", g.req("expert_used_count")?.into());
                set("moe_intermediate_size", g.req("expert_feed_forward_length")?.into());
                set(
                    "shared_expert_intermediate_size",
                    g.req("expert_shared_feed_forward_length")?.into(),
                );
            } else {
                set("num_experts", 0.into());
            }
            set("model_type", model_type.into());
            for (i, &rec) in recurrent.iter().enumerate() {
                w.rename(
                    &format!("blk.{i}.post_attention_norm.weight"),
                    &format!("blk.{i}.ffn_norm.weight"),
                );
                if !rec {
                    continue;
                }
                let p = |s: &str| format!("blk.{i}.{s}");
                if arch == "qwen3next" {
                    // in_proj_ba rows per key head: [b (r) | a (r)].
                    let r = vh / kh;
                    let ba = w.get(&p("ssm_ba.weight"))?.clone();
                    ensure!(
                        ba.shape.len() == 2 && ba.shape[0] == 2 * vh,
                        "{}: tensor \"{}\" has shape {:?}, expected {} rows",
                        cfg.source,
                        p("ssm_ba.weight"),
                        ba.shape,
                        2 * vh
                    );
                    let b: Vec<(usize, usize)> = (0..kh).map(|k| (k * 2 * r, r)).collect();
                    let a: Vec<(usize, usize)> = (0..kh).map(|k| (k * 2 * r + r, r)).collect();
                    let (eb, ea) = (
                        gather(&w, &p("ssm_ba.weight"), &ba, 2 * vh, &b)?,
                        gather(&w, &p("ssm_ba.weight"), &ba, 2 * vh, &a)?,
                    );
                    w.remove(&p("ssm_ba.weight"));
                    w.insert(&p("ssm_beta.weight"), eb);
                    w.insert(&p("ssm_alpha.weight"), ea);
                } else if kh != vh {
                    untile_value_heads(&mut w, i, kh, vh, dk, dv)?;
                }
            }
        }
        "nemotron_h" | "nemotron_h_moe" => {
            let mamba = layer_has(&w, n, "ssm_in.weight");
            let attn = layer_has(&w, n, "attn_q.weight");
            let moe = layer_has(&w, n, "ffn_gate_inp.weight");
            let mlp = layer_has(&w, n, "ffn_up.weight");
            let kinds = (0..n)
                .map(|i| match (mamba[i], attn[i], moe[i], mlp[i]) {
                    (true, false, false, false) => Ok("mamba"),
                    (false, true, false, false) => Ok("attention"),
                    (false, false, true, _) => Ok("moe"),
                    (false, false, false, true) => Ok("mlp"),
                    _ => bail!(
                        "{}: GGUF layer {i} is not one Mamba, attention, MLP or MoE block",
                        cfg.source
                    ),
                })
                .collect::<Result<Vec<&str>>>()?;
            set("model_type", "nemotron_h".into());
            set("layers_block_type", json!(kinds));
            mamba2_keys(
                &g,
                &mut set,
                [
                    "mamba_num_heads",
                    "mamba_head_dim",
                    "ssm_state_size",
                    "n_groups",
                    "conv_kernel",
                ],
            )?;
            let eps = match g.f64("attention.layer_norm_epsilon")? {
                Some(e) => e,
                None => cfg.rms_norm_eps,
            };
            set("layer_norm_epsilon", eps.into());
            set("mlp_hidden_act", "relu2".into());
            if let Some(ff) = first_rows(&w, n, "ffn_up.weight") {
                set("intermediate_size", ff.into());
            }
            if moe.iter().any(|&m| m) {
                set("n_routed_experts", g.req("expert_count")?.into());
                set("num_experts_per_tok", g.req("expert_used_count")?.into());
                set("moe_intermediate_size", g.req("expert_feed_forward_length")?.into());
                set(
                    "moe_shared_expert_intermediate_size",
                    g.req("expert_shared_feed_forward_length")?.into(),
                );
                set("n_group", g.opt("expert_group_count")?.unwrap_or(1).into());
                set("topk_group", g.opt("expert_group_used_count")?.unwrap_or(1).into());
                set("norm_topk_prob", g.bool("expert_weights_norm")?.unwrap_or(true).into());
                set(
                    "routed_scaling_factor",
                    g.f64("expert_weights_scale")?.unwrap_or(1.0).into(),
                );
            }
        }
        "granitehybrid" => {
            // RoPE unless `rope.scaling.finetuned` is false (llama.cpp's default is true).
            let rope = g.bool("rope.scaling.finetuned")? != Some(false);
            let mamba = layer_has(&w, n, "ssm_in.weight");
            let kinds: Vec<&str> = mamba.iter().map(|&m| if m { "mamba" } else { "attention" }).collect();
            set("model_type", "granitemoehybrid".into());
            set("layer_types", json!(kinds));
            if rope {
                // `rope_theta` (from `rope.freq_base`) is in the common keys.
                set("position_embedding_type", "rope".into());
                let rot = g.opt("rope.dimension_count")?.unwrap_or(cfg.head_dim);
                ensure!(
                    rot >= 2 && rot <= cfg.head_dim && rot.is_multiple_of(2) && cfg.head_dim.is_multiple_of(2),
                    "{}: GGUF granitehybrid.rope.dimension_count = {rot} must be even, at least 2 and at most the (even) head size {}",
                    cfg.source,
                    cfg.head_dim
                );
                if rot < cfg.head_dim {
                    let factor = rot as f64 / cfg.head_dim as f64;
                    ensure!(
                        ((cfg.head_dim as f64 * factor) as usize & !1) == rot,
                        "{}: GGUF granitehybrid.rope.dimension_count = {rot} is not a fraction of the head size {} ffai can express",
                        cfg.source,
                        cfg.head_dim
                    );
                    set("partial_rotary_factor", factor.into());
                }
                // The attention layers' q/k rows as transformers has them.
                for i in (0..n).filter(|&i| !mamba[i]) {
                    for t in ["attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias"] {
                        let name = format!("blk.{i}.{t}");
                        if w.has(&name) {
                            unpermute_rope_rows(&mut w, &name, cfg.head_dim)?;
                        }
                    }
                }
            } else {
                set("position_embedding_type", "nope".into());
            }
            mamba2_keys(&g, &mut set, MAMBA_KEYS_MAMBA_PREFIXED)?;
            let inner = g.req("ssm.inner_size")?;
            set(
                "mamba_expand",
                g.ratio(("ssm.inner_size", inner), ("embedding_length", cfg.hidden_size))?
                    .into(),
            );
            set_kv_heads(cfg, &w, &mut set)?;
            for (hf, gg) in [
                ("attention_multiplier", "attention.scale"),
                ("embedding_multiplier", "embedding_scale"),
                ("residual_multiplier", "residual_scale"),
                ("logits_scaling", "logit_scale"),
            ] {
                if let Some(v) = g.f64(gg)? {
                    set(hf, v.into());
                }
            }
            let experts = match first_rows(&w, n, "ffn_gate_inp.weight") {
                Some(_) => g.req("expert_count")?,
                None => 0,
            };
            set("num_local_experts", experts.into());
            if experts > 0 {
                set("num_experts_per_tok", g.req("expert_used_count")?.into());
            }
            set(
                "shared_intermediate_size",
                g.req("expert_shared_feed_forward_length")?.into(),
            );
        }
        "lfm2moe" => {
            let conv = layer_has(&w, n, "shortconv.in_proj.weight");
            let kinds: Vec<&str> = conv
                .iter()
                .map(|&c| if c { "conv" } else { "full_attention" })
                .collect();
            set("model_type", "lfm2_moe".into());
            set("layer_types", json!(kinds));
            set("conv_L_cache", g.req("shortconv.l_cache")?.into());
            set("norm_eps", cfg.rms_norm_eps.into());
            set(
                "num_dense_layers",
                g.opt("leading_dense_block_count")?.unwrap_or(0).into(),
            );
            set("num_experts", g.req("expert_count")?.into());
            set("num_experts_per_tok", g.req("expert_used_count")?.into());
            set("moe_intermediate_size", g.req("expert_feed_forward_length")?.into());
            if let Some(f) = g.opt("expert_gating_func")? {
                // llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID.
                ensure!(
                    f == 2,
                    "{}: GGUF lfm2moe.expert_gating_func = {f}: only the sigmoid router (2) is supported",
                    cfg.source
                );
            }
            set("norm_topk_prob", g.bool("expert_weights_norm")?.unwrap_or(true).into());
            set(
                "routed_scaling_factor",
                g.f64("expert_weights_scale")?.unwrap_or(1.0).into(),
            );
            let bias = layer_has(&w, n, "exp_probs_b.bias").iter().any(|&b| b);
            set("use_expert_bias", bias.into());
        }
        "falcon-h1" => {
            set("model_type", "falcon_h1".into());
            mamba2_keys(&g, &mut set, MAMBA_KEYS_MAMBA_PREFIXED)?;
            set("mamba_d_ssm", g.req("ssm.inner_size")?.into());
            let norm = layer_has(&w, n, "ssm_norm.weight").iter().any(|&x| x);
            set("mamba_rms_norm", norm.into());
            // llama.cpp's Mamba 2 layer: y · silu(z), then the grouped norm.
            set("mamba_norm_before_gate", false.into());
            for i in 0..n {
                w.rename(&format!("blk.{i}.ffn_norm"), &format!("blk.{i}.ffn_norm.weight"));
            }
        }
        "jamba" => {
            let attn = layer_has(&w, n, "attn_q.weight");
            let experts = layer_has(&w, n, "ffn_gate_inp.weight");
            let (ap, ao) = period(cfg, "attention", &attn)?;
            let (ep, eo) = period(cfg, "expert", &experts)?;
            set("model_type", "jamba".into());
            set("attn_layer_period", ap.into());
            set("attn_layer_offset", ao.into());
            set("expert_layer_period", ep.into());
            set("expert_layer_offset", eo.into());
            set("mamba_d_state", g.req("ssm.state_size")?.into());
            set("mamba_dt_rank", g.req("ssm.time_step_rank")?.into());
            set("mamba_d_conv", g.req("ssm.conv_kernel")?.into());
            let inner = g.req("ssm.inner_size")?;
            set(
                "mamba_expand",
                g.ratio(("ssm.inner_size", inner), ("embedding_length", cfg.hidden_size))?
                    .into(),
            );
            let e = match experts.iter().any(|&x| x) {
                true => g.req("expert_count")?,
                false => 1,
            };
            set("num_experts", e.into());
            set("num_experts_per_tok", g.opt("expert_used_count")?.unwrap_or(1).into());
        }
        other => bail!("{}: GGUF architecture {other} has no Hugging Face view", cfg.source),
    }
    let mut out = ModelConfig::from_hf_json(&Value::Object(j), &cfg.source)?;
    out.name = cfg.name.clone();
    out.llama_cpp = true;
    Ok((out, w))
}

/// The Mamba 2 mixer's config.json numbers (heads, head size, state, groups, conv kernel
/// under the family's `keys`) from `ssm.*`.
/// Granite 4's and Falcon-H1's config names for the Mamba 2 shape (`mamba_` prefixed).
const MAMBA_KEYS_MAMBA_PREFIXED: [&str; 5] = [
    "mamba_n_heads",
    "mamba_d_head",
    "mamba_d_state",
    "mamba_n_groups",
    "mamba_d_conv",
];

fn mamba2_keys(g: &Meta<'_>, set: &mut impl FnMut(&str, Value), keys: [&str; 5]) -> Result<()> {
    let heads = g.req("ssm.time_step_rank")?;
    let inner = g.req("ssm.inner_size")?;
    set(keys[0], heads.into());
    set(
        keys[1],
        g.ratio(("ssm.inner_size", inner), ("ssm.time_step_rank", heads))?
            .into(),
    );
    set(keys[2], g.req("ssm.state_size")?.into());
    set(keys[3], g.req("ssm.group_count")?.into());
    set(keys[4], g.req("ssm.conv_kernel")?.into());
    Ok(())
}

/// KV heads from the first attention layer's `attn_k` rows.
fn set_kv_heads(cfg: &ModelConfig, w: &Weights, set: &mut impl FnMut(&str, Value)) -> Result<()> {
    if let Some(rows) = first_rows(w, cfg.num_layers, "attn_k.weight") {
        ensure!(
            rows > 0 && rows.is_multiple_of(cfg.head_dim),
            "{}: attn_k has {rows} rows, not a multiple of the head size {}",
            cfg.source,
            cfg.head_dim
        );
        set("num_key_value_heads", (rows / cfg.head_dim).into());
    }
    Ok(())
}

/// Undoes the permutation llama.cpp's converter gives `llama`-style q/k projections (and
/// their biases) for RoPE on adjacent pairs: within each head of `head_dim` rows, the
/// Hugging Face row `j · head_dim/2 + i` (half `j`, pair `i`) was stored at row `2i + j`.
/// The head count is the rows over `head_dim` (the KV heads for `attn_k`).
fn unpermute_rope_rows(w: &mut Weights, name: &str, head_dim: usize) -> Result<()> {
    let e = w.get(name)?.clone();
    let rows = e.shape.first().copied().unwrap_or(0);
    ensure!(
        matches!(e.shape.len(), 1 | 2)
            && rows > 0
            && head_dim >= 2
            && head_dim.is_multiple_of(2)
            && rows.is_multiple_of(head_dim),
        "{}: tensor \"{name}\" has shape {:?}, expected whole heads of {head_dim} rows",
        w.source,
        e.shape
    );
    let cols = e.shape.get(1).copied().unwrap_or(1);
    let rb =
        e.ty.row_bytes(cols)
            .filter(|&rb| rb > 0 && rows.checked_mul(rb) == Some(e.bytes.len()))
            .ok_or_else(|| {
                Error::new(format!(
                    "{}: tensor \"{name}\" holds {} bytes, not {rows} rows of {cols} {}",
                    w.source,
                    e.bytes.len(),
                    e.ty.name()
                ))
            })?;
    let half = head_dim / 2;
    let src = e.bytes.as_slice();
    let mut out = Vec::with_capacity(src.len());
    for r in 0..rows {
        let (head, within) = (r / head_dim, r % head_dim);
        let (j, i) = (within / half, within % half);
        let from = head * head_dim + 2 * i + j;
        out.extend_from_slice(&src[from * rb..(from + 1) * rb]);
    }
    w.insert(
        name,
        WeightEntry {
            ty: e.ty,
            shape: e.shape.clone(),
            bytes: HostBytes::from_vec(out),
        },
    );
    Ok(())
}

/// The `(period, offset)` with `flags[i] == (i % period == offset)`; none set: a period
/// past the last layer.
fn period(cfg: &ModelConfig, what: &str, flags: &[bool]) -> Result<(usize, usize)> {
    let n = flags.len();
    if !flags.iter().any(|&f| f) {
        return Ok((n + 1, n));
    }
    // The offset is the first flagged layer.
    let o = flags.iter().position(|&f| f).unwrap_or(0);
    for p in o + 1..=n {
        if (0..n).all(|i| flags[i] == (i % p == o)) {
            return Ok((p, o));
        }
    }
    bail!(
        "{}: the {what} layers {flags:?} do not repeat with a period",
        cfg.source
    )
}

/// Rows `ranges` (first, count) of tensor `name` (`e`, `total` rows) as a new matrix.
fn gather(w: &Weights, name: &str, e: &WeightEntry, total: usize, ranges: &[(usize, usize)]) -> Result<WeightEntry> {
    ensure!(
        e.shape.len() == 2 && e.shape[0] == total,
        "{}: tensor \"{name}\" has shape {:?}, expected {total} rows",
        w.source,
        e.shape
    );
    let cols = e.shape[1];
    let rb =
        e.ty.row_bytes(cols)
            .ok_or_else(|| Error::new(format!("{}: tensor \"{name}\": bad row length", w.source)))?;
    let src = e.bytes.as_slice();
    let mut out = Vec::new();
    let mut rows = 0;
    for &(first, count) in ranges {
        ensure!(
            first + count <= total,
            "{}: tensor \"{name}\": rows out of range",
            w.source
        );
        out.extend_from_slice(&src[first * rb..(first + count) * rb]);
        rows += count;
    }
    Ok(WeightEntry {
        ty: e.ty,
        shape: vec![rows, cols],
        bytes: HostBytes::from_vec(out),
    })
}

/// Grouped value head `h` (key head `h / r`, `r = vh / kh`) sits at tiled position
/// `(h % r) · kh + h / r`.
fn tiled_pos(h: usize, kh: usize, r: usize) -> usize {
    (h % r) * kh + h / r
}

/// Undoes the Qwen3.5 converter's value-head reordering in layer `i`.
fn untile_value_heads(w: &mut Weights, i: usize, kh: usize, vh: usize, dk: usize, dv: usize) -> Result<()> {
    let r = vh / kh;
    let p = |s: &str| format!("blk.{i}.{s}");
    // Row blocks of `size` rows starting at `offset`, in grouped order.
    let rows = |offset: usize, size: usize| -> Vec<(usize, usize)> {
        (0..vh).map(|h| (offset + tiled_pos(h, kh, r) * size, size)).collect()
    };
    let qk = 2 * kh * dk;
    for (name, lead, size) in [
        ("attn_qkv.weight", qk, dv),
        ("attn_gate.weight", 0, dv),
        ("ssm_beta.weight", 0, 1),
        ("ssm_alpha.weight", 0, 1),
        ("ssm_conv1d.weight", qk, dv),
    ] {
        let name = p(name);
        let e = w.get(&name)?.clone();
        let total = lead + vh * size;
        // Checked before the row list (one entry per value head) is built.
        ensure!(
            e.shape.len() == 2 && e.shape[0] == total,
            "{}: tensor \"{name}\" has shape {:?}, expected {total} rows",
            w.source,
            e.shape
        );
        let mut ranges = vec![(0, lead)];
        ranges.extend(rows(lead, size));
        let g = gather(w, &name, &e, total, &ranges)?;
        w.insert(&name, g);
    }
    for name in ["ssm_a", "ssm_dt.bias"] {
        let name = p(name);
        let v = w.f32_vec(&name, vh)?;
        let shape = w.get(&name)?.shape.clone();
        let out: Vec<f32> = (0..vh).map(|h| v[tiled_pos(h, kh, r)]).collect();
        w.insert(&name, f32_entry(shape, &out));
    }
    // ssm_out's columns: blocks of dv per value head.
    let name = p("ssm_out.weight");
    let e = w.get(&name)?.clone();
    ensure!(
        e.shape.len() == 2 && e.shape[1] == vh * dv,
        "{}: tensor \"{name}\" has shape {:?}, expected [_, {}]",
        w.source,
        e.shape,
        vh * dv
    );
    let rows = e.shape[0];
    if !dv.is_multiple_of(e.ty.block_len()) {
        // Heads narrower than the type's blocks: the columns move as f32 values.
        let v = w.f32_vec(&name, rows * vh * dv)?;
        let mut out = Vec::with_capacity(v.len());
        for row in v.chunks_exact(vh * dv) {
            for h in 0..vh {
                let t = tiled_pos(h, kh, r);
                out.extend_from_slice(&row[t * dv..(t + 1) * dv]);
            }
        }
        w.insert(&name, f32_entry(e.shape.clone(), &out));
        return Ok(());
    }
    let (rb, hb) = (e.ty.row_bytes(vh * dv).unwrap_or(0), e.ty.row_bytes(dv).unwrap_or(0));
    let src = e.bytes.as_slice();
    let mut out = Vec::with_capacity(src.len());
    for row in src.chunks_exact(rb.max(1)) {
        for h in 0..vh {
            let t = tiled_pos(h, kh, r);
            out.extend_from_slice(&row[t * hb..(t + 1) * hb]);
        }
    }
    w.insert(
        &name,
        WeightEntry {
            ty: e.ty,
            shape: e.shape.clone(),
            bytes: HostBytes::from_vec(out),
        },
    );
    Ok(())
}

fn f32_entry(shape: Vec<usize>, v: &[f32]) -> WeightEntry {
    WeightEntry {
        ty: WeightType::F32,
        shape,
        bytes: HostBytes::from_vec(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    }
}
