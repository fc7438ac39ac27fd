//! Gemma 4 (text): `Gemma4ForCausalLM`, and the language model inside
//! `Gemma4ForConditionalGeneration` (its vision and audio towers are not read).
//!
//! Its block is not the shared decoder's (see `decoder.rs`), so it has a model type of its
//! own on the same backend ops, the same paged KV pools and the same step layout:
//! - layers of two kinds (`layer_types`): sliding-window layers with `head_dim` and
//!   `num_key_value_heads`, full layers with their own head size and KV heads
//!   (`per_layer_config`, or `global_head_dim` / `num_global_key_value_heads`), each kind
//!   with its own RoPE (full layers' "proportional" RoPE rotates only the first
//!   `partial_rotary_factor` of the pairs, with exponents over the whole head);
//! - per-head q/k RMSNorm, a weightless RMSNorm on v, attention scale 1; full layers with
//!   `attention_k_eq_v` have no v projection (v is the raw k projection);
//! - the last `num_kv_shared_layers` layers compute no K/V: each attends over the cache of
//!   the last earlier layer of its kind and owns no cache of its own;
//! - plain RMSNorms (`x · w`, not Gemma 2/3's `1 + w`) before and after attention and MLP;
//! - an optional mixture of experts beside the dense MLP (`enable_moe_block`): routed on
//!   its own norm of the residual stream (`router.scale`, `per_expert_scale`), the experts
//!   on a third norm, both branches normed again and summed (`moe::MoeLayer`);
//! - per-layer embeddings (`hidden_size_per_layer_input`): a second embedding table with
//!   one slice per layer, mixed with a projection of the embeddings, gated into the
//!   residual stream after each MLP;
//! - `layer_scalar` on the whole hidden state at the end of each layer; a final logit
//!   soft-cap.
//!
//! The math follows transformers 5.17's `modeling_gemma4.py`; the fixtures `gemma4` (MoE,
//! k = v) and `gemma4_dense` (double-wide MLP) check it. GGUF files (architecture
//! `gemma4`, as llama.cpp's converter writes them) are read by `plan_gguf`.

use std::sync::Arc;

use ffai_kernels::backend::{AttnShape, Backend, RopeParams, StepLayout};
use ffai_kernels::cpu::CpuBackend;
use ffai_kernels::cuda::backend::CudaBackend;
use serde_json::Value;

use super::moe::{MoeAct, MoeLayer, MoeRouting, MoeScratch, MoeSpec};
use super::{BatchShape, BatchState, Device, Family, LanguageModel, StepOut};
use crate::config::{ModelConfig, RawConfig, MAX_DIM, MAX_GQA_GROUP};
use crate::error::{Error, Result};
use crate::generate::GenerationParameters;
use crate::inspect::Tap;
use crate::weights::Weights;
use crate::{bail, ensure};

pub const FAMILY: Family = Family {
    name: "gemma4",
    variants: &["gemma4 (text)"],
    hf_architectures: &["Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"],
    model_types: &["gemma4", "gemma4_text"],
    gguf_architectures: &["gemma4"],
    load,
};

/// Google's sampling defaults for Gemma 4 (as for Gemma 3: T 1.0, top-k 64, top-p 0.95).
pub fn default_parameters() -> GenerationParameters {
    GenerationParameters {
        temperature: 1.0,
        top_k: 64,
        top_p: 0.95,
        ..Default::default()
    }
}

/// One layer's shape, from the config.
#[derive(Clone, Debug)]
struct LayerPlan {
    sliding: bool,
    head_dim: usize,
    kv_heads: usize,
    /// The layer whose cache this one attends over: itself, or (KV-shared layers) the
    /// last earlier layer of its kind.
    kv_source: usize,
    /// No v projection: v is the raw k projection (full layers with `attention_k_eq_v`).
    k_eq_v: bool,
    /// The dense MLP's intermediate size (doubled on KV-shared layers with
    /// `use_double_wide_mlp`).
    ffn: usize,
    /// RoPE inverse frequencies, `head_dim / 2` of them (zeros: pairs left unrotated).
    rope: Vec<f32>,
}

/// Everything the config says about the model's shape, checked.
#[derive(Clone, Debug)]
struct Plan {
    layers: Vec<LayerPlan>,
    /// The sliding layers' window (0: they see everything).
    window: usize,
    /// `hidden_size_per_layer_input` (0: no per-layer embeddings) and the rows of its table.
    ple: usize,
    ple_vocab: usize,
    moe: Option<MoeSpec>,
    final_softcap: f32,
}

/// A config.json field as written, looked up as `ModelConfig::extra` does (text_config
/// first), but telling a present `null` (`Some(Null)`) from an absent field (`None`).
fn hf_field(cfg: &ModelConfig, key: &str) -> Option<Value> {
    match &cfg.raw {
        RawConfig::Hf(v) => v
            .get("text_config")
            .and_then(|t| t.get(key))
            .or_else(|| v.get(key))
            .cloned(),
        RawConfig::Gguf(_) => None,
    }
}

/// A count field that must be a positive integer of at most `MAX_DIM`.
fn positive(cfg: &ModelConfig, what: &str, v: &Value) -> Result<usize> {
    match v.as_u64().and_then(|x| usize::try_from(x).ok()) {
        Some(x) if x > 0 && x <= MAX_DIM => Ok(x),
        _ => bail!("{}: {what} = {v} is not an integer in 1..={MAX_DIM}", cfg.source),
    }
}

/// RoPE inverse frequencies for a layer kind: `default` (every pair, `theta^(-2i/d)`),
/// `linear` (the same, divided by `factor`) or Gemma 4's `proportional` (only the first
/// `floor(partial_rotary_factor · d / 2)` pairs, exponents still over `d`, divided by
/// `factor`; the other pairs get 0 and stay as they are).
fn rope_table(cfg: &ModelConfig, kind: &str, params: &Value, head_dim: usize) -> Result<Vec<f32>> {
    let src = &cfg.source;
    let num = |k: &str| -> Result<Option<f64>> {
        match params.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_f64() {
                Some(f) if f.is_finite() => Ok(Some(f)),
                _ => bail!("{src}: rope_parameters.{kind}.{k} = {x} is not a finite number"),
            },
        }
    };
    let rope_type = match params.get("rope_type") {
        None | Some(Value::Null) => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(x) => bail!("{src}: rope_parameters.{kind}.rope_type = {x} is not a string"),
    };
    let theta =
        num("rope_theta")?.ok_or_else(|| Error::new(format!("{src}: rope_parameters.{kind} has no rope_theta")))?;
    ensure!(
        theta > 0.0,
        "{src}: rope_parameters.{kind}.rope_theta = {theta} must be positive"
    );
    let factor = num("factor")?.unwrap_or(1.0);
    ensure!(
        factor > 0.0,
        "{src}: rope_parameters.{kind}.factor = {factor} must be positive"
    );
    let half = head_dim / 2;
    let rotated = match rope_type {
        "default" => half,
        "linear" => half,
        "proportional" => {
            let p = num("partial_rotary_factor")?.unwrap_or(1.0);
            ensure!(
                (0.0..=1.0).contains(&p),
                "{src}: rope_parameters.{kind}.partial_rotary_factor = {p} is not in 0..=1"
            );
            ((p * head_dim as f64) / 2.0).floor() as usize
        }
        other => bail!("{src}: rope_parameters.{kind}.rope_type \"{other}\" is not supported for Gemma 4"),
    };
    let factor = if rope_type == "default" { 1.0 } else { factor };
    let table: Vec<f32> = (0..half)
        .map(|i| {
            if i < rotated {
                (1.0 / (theta.powf(2.0 * i as f64 / head_dim as f64) * factor)) as f32
            } else {
                0.0
            }
        })
        .collect();
    ensure!(
        table.iter().all(|f| f.is_finite()),
        "{src}: rope_parameters.{kind} give non-finite RoPE frequencies"
    );
    Ok(table)
}

fn plan(cfg: &ModelConfig, w: &Weights) -> Result<Plan> {
    if cfg.is_gguf() {
        return plan_gguf(cfg, w);
    }
    let src = &cfg.source;
    let n = cfg.num_layers;
    // Unsupported switches are refused rather than silently ignored.
    if let Some(v) = hf_field(cfg, "use_bidirectional_attention") {
        ensure!(
            v.is_null() || v.as_str() == Some("vision"),
            "{src}: use_bidirectional_attention = {v} is not supported (text is causal)"
        );
    }
    if let Some(v) = hf_field(cfg, "hidden_activation") {
        ensure!(
            v.is_null() || v.as_str() == Some("gelu_pytorch_tanh"),
            "{src}: hidden_activation = {v} is not supported (gelu_pytorch_tanh)"
        );
    }
    ensure!(
        !cfg.attention_bias,
        "{src}: attention_bias is not supported for Gemma 4"
    );
    // Layer kinds: as given (the last layer is always full, as transformers forces it),
    // or every 6th layer full.
    let mut sliding: Vec<bool> = match hf_field(cfg, "layer_types") {
        None | Some(Value::Null) => (0..n).map(|i| !(i + 1).is_multiple_of(6)).collect(),
        Some(Value::Array(a)) => {
            ensure!(
                a.len() == n,
                "{src}: layer_types has {} entries for {n} layers",
                a.len()
            );
            a.iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => bail!("{src}: layer_types entry {t} is not \"sliding_attention\" or \"full_attention\""),
                })
                .collect::<Result<_>>()?
        }
        Some(v) => bail!("{src}: layer_types = {v} is not a list"),
    };
    if let Some(last) = sliding.last_mut() {
        *last = false;
    }
    let k_eq_v = cfg.extra_bool("attention_k_eq_v", "")?.unwrap_or(false);
    // Per-layer head size and KV heads: transformers 5.17 writes `per_layer_config`
    // ({layer: {head_dim, num_key_value_heads}}); released configs say `global_head_dim`
    // (512 when absent) and, with k = v, `num_global_key_value_heads` for full layers.
    let mut shapes: Vec<(usize, usize)> = vec![(cfg.head_dim, cfg.num_kv_heads); n];
    match hf_field(cfg, "per_layer_config") {
        Some(Value::Object(m)) => {
            for (key, over) in &m {
                let i =
                    key.parse::<usize>().ok().filter(|&i| i < n).ok_or_else(|| {
                        Error::new(format!("{src}: per_layer_config key \"{key}\" is not a layer index"))
                    })?;
                let over = over
                    .as_object()
                    .ok_or_else(|| Error::new(format!("{src}: per_layer_config.{key} = {over} is not an object")))?;
                for (field, v) in over {
                    match field.as_str() {
                        "head_dim" => shapes[i].0 = positive(cfg, &format!("per_layer_config.{key}.head_dim"), v)?,
                        "num_key_value_heads" => {
                            shapes[i].1 = positive(cfg, &format!("per_layer_config.{key}.num_key_value_heads"), v)?
                        }
                        other => bail!("{src}: per_layer_config.{key}.{other} is not supported"),
                    }
                }
            }
        }
        None | Some(Value::Null) => {
            let global = match hf_field(cfg, "global_head_dim") {
                None | Some(Value::Null) => 512,
                Some(v) => positive(cfg, "global_head_dim", &v)?,
            };
            let global_kv = match hf_field(cfg, "num_global_key_value_heads") {
                Some(v) if k_eq_v && !v.is_null() => Some(positive(cfg, "num_global_key_value_heads", &v)?),
                _ => None,
            };
            for (s, &sl) in shapes.iter_mut().zip(&sliding) {
                if !sl {
                    *s = (global, global_kv.unwrap_or(s.1));
                }
            }
        }
        Some(v) => bail!("{src}: per_layer_config = {v} is not an object"),
    }
    check_shapes(cfg, &shapes)?;
    // KV sharing: the last `num_kv_shared_layers` layers read the cache of the last earlier
    // layer of their kind.
    let shared = cfg.extra_usize("num_kv_shared_layers", "")?.unwrap_or(0);
    ensure!(
        shared <= n,
        "{src}: num_kv_shared_layers = {shared} exceeds the {n} layers"
    );
    let first_shared = n - shared;
    let double_wide = cfg.extra_bool("use_double_wide_mlp", "")?.unwrap_or(false);
    let wide_ffn = cfg
        .intermediate_size
        .checked_mul(2)
        .filter(|&f| f <= MAX_DIM)
        .ok_or_else(|| Error::new(format!("{src}: a double-wide MLP exceeds the limit of {MAX_DIM}")))?;
    // RoPE per layer kind: transformers' defaults when the config has none.
    let rope_params = hf_field(cfg, "rope_parameters").filter(|v| !v.is_null());
    let kind_params = |kind: &str| -> Result<Value> {
        match &rope_params {
            None => Ok(match kind {
                "sliding_attention" => serde_json::json!({"rope_type": "default", "rope_theta": 10000.0}),
                _ => serde_json::json!({"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}),
            }),
            Some(p) => match p.get(kind) {
                Some(v @ Value::Object(_)) => Ok(v.clone()),
                _ => bail!("{src}: rope_parameters has no \"{kind}\" section"),
            },
        }
    };
    let mut layers = Vec::with_capacity(n);
    for i in 0..n {
        let (head_dim, kv_heads) = shapes[i];
        let kind = if sliding[i] {
            "sliding_attention"
        } else {
            "full_attention"
        };
        let kv_source = if i >= first_shared {
            let src_layer = (0..first_shared)
                .rev()
                .find(|&j| sliding[j] == sliding[i])
                .ok_or_else(|| {
                    Error::new(format!(
                    "{src}: num_kv_shared_layers = {shared} leaves layer {i} no earlier {kind} layer to share K/V with"
                ))
                })?;
            ensure!(
                shapes[src_layer] == shapes[i],
                "{src}: layer {i} shares the K/V of layer {src_layer}, whose head shape differs"
            );
            src_layer
        } else {
            i
        };
        layers.push(LayerPlan {
            sliding: sliding[i],
            head_dim,
            kv_heads,
            kv_source,
            k_eq_v: k_eq_v && !sliding[i],
            ffn: if double_wide && i >= first_shared && first_shared > 0 {
                wide_ffn
            } else {
                cfg.intermediate_size
            },
            rope: rope_table(cfg, kind, &kind_params(kind)?, head_dim)?,
        });
    }
    // Per-layer embeddings: transformers' default is 256 when the field is absent; null or
    // 0 turns them off.
    let ple = match hf_field(cfg, "hidden_size_per_layer_input") {
        None => 256,
        Some(Value::Null) => 0,
        Some(v) => match v.as_u64() {
            Some(0) => 0,
            _ => positive(cfg, "hidden_size_per_layer_input", &v)?,
        },
    };
    let ple_vocab = match hf_field(cfg, "vocab_size_per_layer_input") {
        None | Some(Value::Null) => 262_144,
        Some(v) => positive(cfg, "vocab_size_per_layer_input", &v)?,
    };
    if ple > 0 {
        ensure!(
            ple_vocab >= cfg.vocab_size,
            "{src}: vocab_size_per_layer_input = {ple_vocab} is smaller than the vocabulary ({})",
            cfg.vocab_size
        );
        ple.checked_mul(n).filter(|&d| d <= MAX_DIM).ok_or_else(|| {
            Error::new(format!(
                "{src}: hidden_size_per_layer_input {ple} x {n} layers exceeds the limit of {MAX_DIM}"
            ))
        })?;
    }
    let moe = if cfg.extra_bool("enable_moe_block", "")?.unwrap_or(false) {
        let need = |k: &str| -> Result<usize> {
            cfg.extra_usize(k, "")?
                .ok_or_else(|| Error::new(format!("{src}: enable_moe_block needs \"{k}\"")))
        };
        Some(
            MoeSpec {
                n_experts: need("num_experts")?,
                k: need("top_k_experts")?,
                routing: MoeRouting::softmax(true),
                ffn: need("moe_intermediate_size")?,
                shared_ffn: 0,
                sparse: vec![true; n],
                act: MoeAct::GeGlu,
                latent: 0,
            }
            .checked(cfg)?,
        )
    } else {
        None
    };
    let final_softcap = match cfg.extra_f64("final_logit_softcapping", "")? {
        None => 0.0,
        Some(c) if c > 0.0 && (c as f32).is_finite() => c as f32,
        Some(c) => bail!("{src}: final_logit_softcapping = {c} must be a positive f32"),
    };
    Ok(Plan {
        layers,
        window: cfg.sliding_window.unwrap_or(0),
        ple,
        ple_vocab,
        moe,
        final_softcap,
    })
}

/// Each layer's (head size, KV heads): even heads, whole GQA groups, widths in limits.
fn check_shapes(cfg: &ModelConfig, shapes: &[(usize, usize)]) -> Result<()> {
    let src = &cfg.source;
    for (i, &(hd, kvh)) in shapes.iter().enumerate() {
        ensure!(
            hd.is_multiple_of(2),
            "{src}: layer {i}'s head_dim {hd} must be even for RoPE"
        );
        ensure!(
            kvh > 0 && cfg.num_heads.is_multiple_of(kvh) && cfg.num_heads / kvh <= MAX_GQA_GROUP,
            "{src}: layer {i}: {} query heads over {kvh} KV heads (a whole number of at most {MAX_GQA_GROUP} per KV head)",
            cfg.num_heads
        );
        cfg.num_heads.checked_mul(hd).filter(|&d| d <= MAX_DIM).ok_or_else(|| {
            Error::new(format!(
                "{src}: layer {i}: {} heads of {hd} exceed the limit of {MAX_DIM}",
                cfg.num_heads
            ))
        })?;
    }
    Ok(())
}

/// A GGUF per-layer count `{arch}.{key}`: one integer for every layer, or an array of
/// one per layer; each in `lo..=MAX_DIM`. `None` when absent.
fn gguf_per_layer(cfg: &ModelConfig, key: &str, lo: usize) -> Result<Option<Vec<usize>>> {
    let (src, n) = (&cfg.source, cfg.num_layers);
    let name = format!("{}.{key}", cfg.architecture);
    let one = |v: &Value| -> Result<usize> {
        match v.as_u64().and_then(|x| usize::try_from(x).ok()) {
            Some(x) if (lo..=MAX_DIM).contains(&x) => Ok(x),
            _ => bail!("{src}: GGUF {name} holds {v}, not an integer in {lo}..={MAX_DIM}"),
        }
    };
    match cfg.extra("", key) {
        None => Ok(None),
        Some(Value::Array(a)) => {
            ensure!(
                a.len() == n,
                "{src}: GGUF {name} has {} entries for {n} layers",
                a.len()
            );
            a.iter().map(one).collect::<Result<Vec<_>>>().map(Some)
        }
        Some(v) => Ok(Some(vec![one(&v)?; n])),
    }
}

/// The plan from a `gemma4` GGUF file, as llama.cpp's converter writes it and its loader
/// reads it:
/// - layer kinds: `attention.sliding_window_pattern` (one bool per layer, taken as
///   written); head sizes `attention.key_length` (full layers) and `key_length_swa`
///   (value lengths must equal them); KV heads `attention.head_count_kv` (one, or one
///   per layer); the MLP width `feed_forward_length` (one, or one per layer: the
///   double-wide MLP of the KV-shared layers is written out there);
/// - RoPE: `rope.freq_base` (full layers) and `rope.freq_base_swa`; every pair rotates
///   (`rope.dimension_count{,_swa}` must be the head sizes); full layers divide each
///   pair's frequency by `rope_freqs.weight` (the converter writes 1 for the rotated pairs
///   of the "proportional" RoPE and 1e30 for the rest, which then turn by less than
///   1e-30 rad per position);
/// - KV sharing: the last `attention.shared_kv_layers` layers read the cache of layer
///   `first_shared - 2` (sliding) or `first_shared - 1` (full), llama.cpp's rule;
/// - k = v: a layer with K/V but no `attn_v` tensor uses the raw k projection as v;
/// - per-layer embeddings `embedding_length_per_layer_input` (0: none), the table with
///   `vocab_size` rows; experts (`expert_count`, `expert_used_count`,
///   `expert_feed_forward_length`) on the layers with an `ffn_gate_inp` tensor, the
///   router's scale `ffn_gate_inp.scale` and the per-expert scale `ffn_down_exps.scale`
///   as transformers names them; `final_logit_softcapping`.
///
/// Norms are stored as used (`x · w`: the converter adds nothing for Gemma 4), and no
/// tensor is permuted.
fn plan_gguf(cfg: &ModelConfig, w: &Weights) -> Result<Plan> {
    let (src, n) = (&cfg.source, cfg.num_layers);
    let key = |k: &str| format!("{}.{k}", cfg.architecture);
    ensure!(
        cfg.rope_scaling.is_none(),
        "{src}: RoPE scaling is not supported for Gemma 4 GGUF files"
    );
    let sliding: Vec<bool> = match cfg.extra("", "attention.sliding_window_pattern") {
        None => bail!("{src}: GGUF has no {}", key("attention.sliding_window_pattern")),
        Some(Value::Array(a)) => {
            ensure!(
                a.len() == n,
                "{src}: GGUF {} has {} entries for {n} layers",
                key("attention.sliding_window_pattern"),
                a.len()
            );
            a.iter()
                .map(|v| {
                    v.as_bool().ok_or_else(|| {
                        Error::new(format!(
                            "{src}: GGUF {} holds {v}, not a bool",
                            key("attention.sliding_window_pattern")
                        ))
                    })
                })
                .collect::<Result<_>>()?
        }
        Some(_) => bail!(
            "{src}: GGUF {} is not an array of bools",
            key("attention.sliding_window_pattern")
        ),
    };
    let hd_full = cfg.head_dim;
    let hd_swa = cfg
        .extra_usize("", "attention.key_length_swa")?
        .ok_or_else(|| Error::new(format!("{src}: GGUF has no {}", key("attention.key_length_swa"))))?;
    ensure!(
        hd_swa > 0,
        "{src}: GGUF {} must be positive",
        key("attention.key_length_swa")
    );
    for (k, want) in [
        ("attention.value_length", hd_full),
        ("attention.value_length_swa", hd_swa),
    ] {
        if let Some(v) = cfg.extra_usize("", k)? {
            ensure!(
                v == want,
                "{src}: GGUF {} = {v} differs from the key length {want} (Gemma 4 has K and V heads of one size)",
                key(k)
            );
        }
    }
    let kv_heads = gguf_per_layer(cfg, "attention.head_count_kv", 1)?.unwrap_or_else(|| vec![cfg.num_kv_heads; n]);
    let ffn = gguf_per_layer(cfg, "feed_forward_length", 1)?
        .ok_or_else(|| Error::new(format!("{src}: GGUF has no {}", key("feed_forward_length"))))?;
    let shapes: Vec<(usize, usize)> = sliding
        .iter()
        .zip(&kv_heads)
        .map(|(&sl, &kvh)| (if sl { hd_swa } else { hd_full }, kvh))
        .collect();
    check_shapes(cfg, &shapes)?;
    // RoPE: every pair of both kinds; the full layers' frequency factors.
    let rot_full = cfg.extra_usize("", "rope.dimension_count")?.unwrap_or(hd_full);
    let rot_swa = cfg.extra_usize("", "rope.dimension_count_swa")?.unwrap_or(rot_full);
    for (what, rot, hd) in [
        ("rope.dimension_count", rot_full, hd_full),
        ("rope.dimension_count_swa", rot_swa, hd_swa),
    ] {
        ensure!(
            rot == hd,
            "{src}: GGUF {} = {rot} rotates part of the {hd}-wide heads: not supported (Gemma 4 files rotate whole heads, with rope_freqs)",
            key(what)
        );
    }
    let base_full = cfg.rope_theta;
    let base_swa = cfg.extra_f64("", "rope.freq_base_swa")?.unwrap_or(base_full);
    ensure!(
        base_swa > 0.0,
        "{src}: GGUF {} = {base_swa} must be positive",
        key("rope.freq_base_swa")
    );
    let factors = match w.has("rope_freqs.weight") {
        true => {
            let f = w.f32_vec("rope_freqs.weight", hd_full / 2)?;
            ensure!(
                f.iter().all(|x| x.is_finite() && *x > 0.0),
                "{src}: rope_freqs.weight holds a factor that is not a positive finite number"
            );
            Some(f)
        }
        false => None,
    };
    let table = |base: f64, hd: usize, ff: Option<&[f32]>| -> Result<Vec<f32>> {
        let t: Vec<f32> = (0..hd / 2)
            .map(|i| {
                let f = ff.map_or(1.0, |f| f[i] as f64);
                (1.0 / (base.powf(2.0 * i as f64 / hd as f64) * f)) as f32
            })
            .collect();
        ensure!(
            t.iter().all(|f| f.is_finite()),
            "{src}: the RoPE base and factors give non-finite frequencies"
        );
        Ok(t)
    };
    let rope_full = table(base_full, hd_full, factors.as_deref())?;
    let rope_swa = table(base_swa, hd_swa, None)?;
    // KV sharing, by llama.cpp's rule.
    let shared = cfg.extra_usize("", "attention.shared_kv_layers")?.unwrap_or(0);
    ensure!(
        shared <= n,
        "{src}: GGUF {} = {shared} exceeds the {n} layers",
        key("attention.shared_kv_layers")
    );
    let first_shared = n - shared;
    let mut layers = Vec::with_capacity(n);
    for i in 0..n {
        let kv_source = if i >= first_shared {
            let back = if sliding[i] { 2 } else { 1 };
            let s = first_shared.checked_sub(back).ok_or_else(|| {
                Error::new(format!(
                    "{src}: GGUF {} = {shared} leaves layer {i} no earlier layer to share K/V with",
                    key("attention.shared_kv_layers")
                ))
            })?;
            ensure!(
                sliding[s] == sliding[i] && shapes[s] == shapes[i],
                "{src}: layer {i} would share the K/V of layer {s}, a layer of another kind or head shape"
            );
            s
        } else {
            i
        };
        layers.push(LayerPlan {
            sliding: sliding[i],
            head_dim: shapes[i].0,
            kv_heads: shapes[i].1,
            kv_source,
            k_eq_v: kv_source == i && !w.has(&format!("blk.{i}.attn_v.weight")),
            ffn: ffn[i],
            rope: if sliding[i] {
                rope_swa.clone()
            } else {
                rope_full.clone()
            },
        });
    }
    let window = cfg.sliding_window.unwrap_or(0);
    ensure!(
        window > 0 || !sliding.contains(&true),
        "{src}: GGUF has sliding layers but no positive {}",
        key("attention.sliding_window")
    );
    let ple = cfg
        .extra_usize("", "embedding_length_per_layer_input")?
        .ok_or_else(|| {
            Error::new(format!(
                "{src}: GGUF has no {}",
                key("embedding_length_per_layer_input")
            ))
        })?;
    if ple > 0 {
        ple.checked_mul(n).filter(|&d| d <= MAX_DIM).ok_or_else(|| {
            Error::new(format!(
                "{src}: {} {ple} x {n} layers exceeds the limit of {MAX_DIM}",
                key("embedding_length_per_layer_input")
            ))
        })?;
    }
    let sparse: Vec<bool> = (0..n).map(|i| w.has(&format!("blk.{i}.ffn_gate_inp.weight"))).collect();
    let moe = match cfg.extra_usize("", "expert_count")?.unwrap_or(0) {
        0 => {
            ensure!(
                !sparse.contains(&true),
                "{src}: GGUF has expert router tensors but no {}",
                key("expert_count")
            );
            None
        }
        n_experts => {
            let k = cfg
                .extra_usize("", "expert_used_count")?
                .ok_or_else(|| Error::new(format!("{src}: GGUF has no {}", key("expert_used_count"))))?;
            let ffs = gguf_per_layer(cfg, "expert_feed_forward_length", 1)?
                .ok_or_else(|| Error::new(format!("{src}: GGUF has no {}", key("expert_feed_forward_length"))))?;
            ensure!(
                ffs.windows(2).all(|p| p[0] == p[1]),
                "{src}: GGUF {} differs between layers (not supported)",
                key("expert_feed_forward_length")
            );
            Some(
                MoeSpec {
                    n_experts,
                    k,
                    routing: MoeRouting::softmax(true),
                    ffn: ffs[0],
                    shared_ffn: 0,
                    sparse,
                    act: MoeAct::GeGlu,
                    latent: 0,
                }
                .checked(cfg)?,
            )
        }
    };
    let final_softcap = match cfg.extra_f64("", "final_logit_softcapping")? {
        None => 0.0,
        Some(c) if c > 0.0 && (c as f32).is_finite() => c as f32,
        Some(c) => bail!(
            "{src}: GGUF {} = {c} must be a positive f32",
            key("final_logit_softcapping")
        ),
    };
    Ok(Plan {
        layers,
        window,
        ple,
        ple_vocab: cfg.vocab_size,
        moe,
        final_softcap,
    })
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let p = plan(cfg, w)?;
    match dev {
        Device::Cpu(b) => Ok(Box::new(Gemma4::<CpuBackend>::load(cfg, w, b.clone(), p)?)),
        Device::Cuda(b) => Ok(Box::new(Gemma4::<CudaBackend>::load(cfg, w, b.clone(), p)?)),
    }
}

/// A layer's own K and V projections and norms (KV-shared layers have none).
struct KvProj<B: Backend> {
    wk: B::Mat,
    /// None: v is the raw k projection.
    wv: Option<B::Mat>,
    k_norm: B::Buf,
    /// Ones: v's RMSNorm has no weight.
    v_norm: B::Buf,
}

/// The mixture of experts beside the dense MLP.
struct MoeBlock<B: Backend> {
    experts: MoeLayer<B>,
    /// The router's input norm: `router.scale · hidden^-½` (a weightless RMSNorm, then
    /// that vector).
    router_norm: B::Buf,
    pre_norm: B::Buf,
    post_norm_dense: B::Buf,
    post_norm_experts: B::Buf,
}

/// A layer's per-layer-input gate, projection and norm.
struct PleLayer<B: Backend> {
    gate: B::Mat,
    proj: B::Mat,
    norm: B::Buf,
}

struct Layer<B: Backend> {
    attn_norm: B::Buf,
    post_attn_norm: B::Buf,
    ffn_norm: B::Buf,
    post_ffn_norm: B::Buf,
    wq: B::Mat,
    q_norm: B::Buf,
    kv: Option<KvProj<B>>,
    wo: B::Mat,
    rope: B::Buf,
    gate: B::Mat,
    up: B::Mat,
    down: B::Mat,
    moe: Option<MoeBlock<B>>,
    ple: Option<PleLayer<B>>,
    scalar: f32,
}

/// The per-layer embedding table, the projection of the embeddings and its norm.
struct Ple<B: Backend> {
    table: B::Mat,
    proj: B::Mat,
    norm: B::Buf,
}

pub struct Gemma4<B: Backend> {
    b: Arc<B>,
    cfg: ModelConfig,
    plan: Plan,
    embed: B::Mat,
    ple: Option<Ple<B>>,
    layers: Vec<Layer<B>>,
    final_norm: B::Buf,
    lm_head: Option<B::Mat>,
    /// The KV groups' windows, and per layer its group.
    windows: Vec<usize>,
    layer_group: Vec<usize>,
}

/// A batch's activations, the caches of the layers that own one, and the step.
struct State<B: Backend> {
    x: B::Buf,
    xn: B::Buf,
    tmp: B::Buf,
    tmp2: B::Buf,
    q: B::Buf,
    qn: B::Buf,
    k: B::Buf,
    v: B::Buf,
    kn: B::Buf,
    att: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    /// Per-layer inputs `[rows, layers · ple]`, scratch of that size while they are
    /// built, and one layer's slice and gate `[rows, ple]`.
    ple_all: B::Buf,
    ple_tok: B::Buf,
    ple_i: B::Buf,
    ple_g: B::Buf,
    moe: Option<MoeScratch<B>>,
    router_in: B::Buf,
    moe_in: B::Buf,
    moe_out: B::Buf,
    last: B::Buf,
    logits: B::Buf,
    /// Per layer: its K and V pools (None for KV-shared layers).
    k_pages: Vec<Option<B::Kv>>,
    v_pages: Vec<Option<B::Kv>>,
    step: B::Step,
}

impl<B: Backend> Gemma4<B> {
    fn load(cfg: &ModelConfig, w: &Weights, b: Arc<B>, plan: Plan) -> Result<Self> {
        let (h, nh) = (cfg.hidden_size, cfg.num_heads);
        let mat = |name: &str, rows: usize, cols: usize| -> Result<B::Mat> {
            let e = w.matrix(name, rows, cols)?;
            Ok(b.matrix(e.ty, rows, cols, e.bytes.clone()))
        };
        let vec = |name: &str, len: usize| -> Result<B::Buf> { Ok(b.upload(&w.f32_vec(name, len)?)) };
        let n_layers = cfg.num_layers;
        let ple = match plan.ple {
            0 => None,
            p => Some(Ple {
                table: mat("per_layer_token_embd.weight", plan.ple_vocab, n_layers * p)?,
                proj: mat("per_layer_model_proj.weight", n_layers * p, h)?,
                norm: vec("per_layer_proj_norm.weight", p)?,
            }),
        };
        let mut layers = Vec::with_capacity(n_layers);
        for (i, lp) in plan.layers.iter().enumerate() {
            let p = |s: &str| format!("blk.{i}.{s}");
            let (hd, kvh) = (lp.head_dim, lp.kv_heads);
            let kv = if lp.kv_source == i {
                Some(KvProj {
                    wk: mat(&p("attn_k.weight"), kvh * hd, h)?,
                    wv: if lp.k_eq_v {
                        None
                    } else {
                        Some(mat(&p("attn_v.weight"), kvh * hd, h)?)
                    },
                    k_norm: vec(&p("attn_k_norm.weight"), hd)?,
                    v_norm: b.upload(&vec![1.0; hd]),
                })
            } else {
                None
            };
            let moe = match &plan.moe {
                Some(ms) if ms.sparse[i] => {
                    let mut scale = w.f32_vec(&p("ffn_gate_inp.scale"), h)?;
                    let root = (h as f32).powf(-0.5);
                    scale.iter_mut().for_each(|x| *x *= root);
                    Some(MoeBlock {
                        experts: MoeLayer::load(w, &*b, i, ms, h)?,
                        router_norm: b.upload(&scale),
                        pre_norm: vec(&p("pre_ffw_norm_2.weight"), h)?,
                        post_norm_dense: vec(&p("post_ffw_norm_1.weight"), h)?,
                        post_norm_experts: vec(&p("post_ffw_norm_2.weight"), h)?,
                    })
                }
                _ => None,
            };
            let ple_layer = match plan.ple {
                0 => None,
                pd => Some(PleLayer {
                    gate: mat(&p("inp_gate.weight"), pd, h)?,
                    proj: mat(&p("proj.weight"), h, pd)?,
                    norm: vec(&p("post_norm.weight"), h)?,
                }),
            };
            let scalar = match w.has(&p("layer_output_scale.weight")) {
                true => {
                    let s = w.f32_vec(&p("layer_output_scale.weight"), 1)?[0];
                    ensure!(s.is_finite(), "{}: layer {i}'s layer_scalar is {s}", w.source);
                    s
                }
                false => 1.0,
            };
            layers.push(Layer {
                attn_norm: vec(&p("attn_norm.weight"), h)?,
                post_attn_norm: vec(&p("post_attention_norm.weight"), h)?,
                ffn_norm: vec(&p("ffn_norm.weight"), h)?,
                post_ffn_norm: vec(&p("post_ffw_norm.weight"), h)?,
                wq: mat(&p("attn_q.weight"), nh * hd, h)?,
                q_norm: vec(&p("attn_q_norm.weight"), hd)?,
                kv,
                wo: mat(&p("attn_output.weight"), h, nh * hd)?,
                rope: b.upload(&lp.rope),
                gate: mat(&p("ffn_gate.weight"), lp.ffn, h)?,
                up: mat(&p("ffn_up.weight"), lp.ffn, h)?,
                down: mat(&p("ffn_down.weight"), h, lp.ffn)?,
                moe,
                ple: ple_layer,
                scalar,
            });
        }
        let lm_head = if w.has("output.weight") && !cfg.tie_word_embeddings {
            Some(mat("output.weight", cfg.vocab_size, h)?)
        } else {
            None
        };
        let mut windows: Vec<usize> = Vec::new();
        let layer_group = plan
            .layers
            .iter()
            .map(|l| {
                let win = if l.sliding { plan.window } else { 0 };
                match windows.iter().position(|&x| x == win) {
                    Some(g) => g,
                    None => {
                        windows.push(win);
                        windows.len() - 1
                    }
                }
            })
            .collect();
        let model = Gemma4 {
            embed: mat("token_embd.weight", cfg.vocab_size, h)?,
            final_norm: vec("output_norm.weight", h)?,
            ple,
            layers,
            lm_head,
            windows,
            layer_group,
            cfg: cfg.clone(),
            plan,
            b,
        };
        model.b.check().map_err(Error::new)?;
        Ok(model)
    }

    /// Layer `i`'s attention shape (its own heads, or its KV source's: the same).
    fn shape(&self, i: usize) -> AttnShape {
        let lp = &self.plan.layers[i];
        AttnShape {
            n_heads: self.cfg.num_heads,
            n_kv_heads: lp.kv_heads,
            head_dim: lp.head_dim,
            cap: 0,
            window: self.windows[self.layer_group[i]],
            scale: 1.0,
            softcap: 0.0,
        }
    }

    /// Bytes of K and V per position of layer `i`'s own cache (0 for KV-shared layers).
    fn kv_row_bytes(&self, i: usize) -> usize {
        let lp = &self.plan.layers[i];
        match lp.kv_source == i {
            true => 2 * lp.kv_heads * lp.head_dim * self.b.kv_elem_bytes(),
            false => 0,
        }
    }

    /// The widest of each activation over the layers: (q, k/v, dense MLP).
    fn widths(&self) -> (usize, usize, usize) {
        let ls = &self.plan.layers;
        let nh = self.cfg.num_heads;
        (
            ls.iter().map(|l| nh * l.head_dim).max().unwrap_or(0),
            ls.iter().map(|l| l.kv_heads * l.head_dim).max().unwrap_or(0),
            ls.iter().map(|l| l.ffn).max().unwrap_or(0),
        )
    }

    /// One step's rows through every layer; leaves the final-normed states in `s.xn`.
    fn forward_step(&self, ids: &[u32], s: &mut State<B>, tap: &mut Tap) {
        let (b, c, n) = (&*self.b, &self.cfg, ids.len());
        let (h, nh, eps) = (c.hidden_size, c.num_heads, c.rms_norm_eps as f32);
        let n_layers = self.layers.len();
        b.embed_step(&self.embed, ids, &s.step, &mut s.x);
        b.scale(&mut s.x, (h as f32).sqrt(), n * h);
        tap.boundary(b, &s.x, n * h, "embed", None);
        // Per-layer inputs: (norm(proj(embeddings) · h^-½) + table(ids) · √ple) · 2^-½.
        let pd = self.plan.ple;
        if let Some(ple) = &self.ple {
            let width = n_layers * pd;
            b.matmul(&ple.proj, &s.x, n, &mut s.ple_tok);
            b.scale(&mut s.ple_tok, (h as f32).powf(-0.5), n * width);
            b.rms_norm(&s.ple_tok, &ple.norm, eps, n * n_layers, &mut s.ple_all);
            b.embed_step(&ple.table, ids, &s.step, &mut s.ple_tok);
            b.scale(&mut s.ple_tok, (pd as f32).sqrt(), n * width);
            b.add(&mut s.ple_all, &s.ple_tok, n * width);
            b.scale(&mut s.ple_all, std::f32::consts::FRAC_1_SQRT_2, n * width);
        }
        for (i, l) in self.layers.iter().enumerate() {
            let lp = &self.plan.layers[i];
            let (hd, kvh) = (lp.head_dim, lp.kv_heads);
            let (shape, g) = (self.shape(i), self.layer_group[i]);
            let rope = RopeParams {
                inv_freq: &l.rope,
                neox: c.rope_neox,
            };
            // --- attention ---
            b.rms_norm(&s.x, &l.attn_norm, eps, n, &mut s.xn);
            tap.linear_input(b, &s.xn, n, h, "attn_in", Some(i));
            match &l.kv {
                Some(kv) => {
                    match &kv.wv {
                        Some(wv) => b.matmuls(&[&l.wq, &kv.wk, wv], &s.xn, n, &mut [&mut s.q, &mut s.k, &mut s.v]),
                        None => {
                            b.matmuls(&[&l.wq, &kv.wk], &s.xn, n, &mut [&mut s.q, &mut s.k]);
                            b.copy(&s.k, 0, &mut s.v, 0, n * kvh * hd);
                        }
                    }
                    b.rms_norm(&s.v, &kv.v_norm, eps, n * kvh, &mut s.kn);
                    std::mem::swap(&mut s.v, &mut s.kn);
                    b.rms_norm(&s.k, &kv.k_norm, eps, n * kvh, &mut s.kn);
                    std::mem::swap(&mut s.k, &mut s.kn);
                }
                None => b.matmul(&l.wq, &s.xn, n, &mut s.q),
            }
            b.rms_norm(&s.q, &l.q_norm, eps, n * nh, &mut s.qn);
            std::mem::swap(&mut s.q, &mut s.qn);
            let src = lp.kv_source;
            if src == i {
                let (Some(kc), Some(vc)) = (&mut s.k_pages[i], &mut s.v_pages[i]) else {
                    unreachable!("a layer with K/V projections has its own cache")
                };
                b.rope_kv_write_step(&mut s.q, &mut s.k, &s.v, n, &s.step, &rope, kc, vc, g, &shape);
            } else {
                b.rope_step(&mut s.q, n, nh, hd, &s.step, &rope);
            }
            let (Some(kc), Some(vc)) = (&s.k_pages[src], &s.v_pages[src]) else {
                unreachable!("a KV source layer has its own cache")
            };
            b.attention_step(&s.q, kc, vc, n, &s.step, g, &shape, None, &mut s.att);
            tap.linear_input(b, &s.att, n, nh * hd, "attn_out", Some(i));
            b.matmul(&l.wo, &s.att, n, &mut s.tmp);
            b.rms_norm(&s.tmp, &l.post_attn_norm, eps, n, &mut s.xn);
            b.add(&mut s.x, &s.xn, n * h);

            // --- MLP, and the experts beside it ---
            b.rms_norm(&s.x, &l.ffn_norm, eps, n, &mut s.xn);
            tap.linear_input(b, &s.xn, n, h, "ffn_in", Some(i));
            b.matmuls(&[&l.gate, &l.up], &s.xn, n, &mut [&mut s.gate, &mut s.up]);
            b.gelu_mul(&mut s.gate, &s.up, n * lp.ffn);
            tap.linear_input(b, &s.gate, n, lp.ffn, "ffn_down_in", Some(i));
            b.matmul(&l.down, &s.gate, n, &mut s.tmp);
            if let Some(m) = &l.moe {
                let (Some(ms), Some(scratch)) = (&self.plan.moe, &mut s.moe) else {
                    unreachable!("a model with experts allocates their scratch")
                };
                b.rms_norm(&s.tmp, &m.post_norm_dense, eps, n, &mut s.tmp2);
                b.rms_norm(&s.x, &m.router_norm, eps, n, &mut s.router_in);
                b.rms_norm(&s.x, &m.pre_norm, eps, n, &mut s.moe_in);
                m.experts
                    .forward_routed(b, ms, &s.router_in, &s.moe_in, n, scratch, &mut s.moe_out);
                b.rms_norm(&s.moe_out, &m.post_norm_experts, eps, n, &mut s.tmp);
                b.add(&mut s.tmp, &s.tmp2, n * h);
            }
            b.rms_norm(&s.tmp, &l.post_ffn_norm, eps, n, &mut s.xn);
            b.add(&mut s.x, &s.xn, n * h);

            // --- per-layer input ---
            if let Some(pl) = &l.ple {
                b.matmul(&pl.gate, &s.x, n, &mut s.ple_g);
                b.copy_rows(&s.ple_all, n_layers * pd, i * pd, &mut s.ple_i, pd, 0, pd, n);
                b.gelu_mul(&mut s.ple_g, &s.ple_i, n * pd);
                b.matmul(&pl.proj, &s.ple_g, n, &mut s.tmp);
                b.rms_norm(&s.tmp, &pl.norm, eps, n, &mut s.xn);
                b.add(&mut s.x, &s.xn, n * h);
            }
            if l.scalar != 1.0 {
                b.scale(&mut s.x, l.scalar, n * h);
            }
            tap.boundary(b, &s.x, n * h, "layer_out", Some(i));
        }
        b.rms_norm(&s.x, &self.final_norm, eps, n, &mut s.xn);
        tap.boundary(b, &s.xn, n * h, "final_norm", None);
        tap.linear_input(b, &s.xn, n, h, "head_in", None);
    }
}

impl<B: Backend> LanguageModel for Gemma4<B> {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn family(&self) -> &'static str {
        FAMILY.name
    }

    fn variant(&self) -> &'static str {
        FAMILY.variants[0]
    }

    fn default_parameters(&self) -> GenerationParameters {
        default_parameters()
    }

    fn device_name(&self) -> String {
        self.b.name()
    }

    fn kv_bytes_by_kind(&self, max_seq: usize, chunk: usize) -> Vec<(String, usize, usize)> {
        let bs = super::one_seq::DEFAULT_BLOCK_SIZE;
        let mut out: Vec<(String, usize, usize)> = Vec::new();
        for i in 0..self.layers.len() {
            let window = self.windows[self.layer_group[i]];
            let kind = match (window, self.plan.layers[i].kv_source == i) {
                (_, false) => "shared (no cache)".to_string(),
                (0, true) => "global".to_string(),
                (w, true) => format!("window {w}"),
            };
            let rows = super::one_seq::ring_blocks(window, max_seq, chunk.clamp(1, max_seq.max(1)), bs) * bs;
            let bytes = rows.saturating_mul(self.kv_row_bytes(i));
            match out.iter_mut().find(|e| e.0 == kind) {
                Some(e) => {
                    e.1 += 1;
                    e.2 = e.2.saturating_add(bytes);
                }
                None => out.push((kind, 1, bytes)),
            }
        }
        out
    }

    fn kv_windows(&self) -> Vec<usize> {
        self.windows.clone()
    }

    fn memory_bytes(&self) -> u64 {
        self.b.memory_bytes()
    }

    fn kv_block_bytes(&self, block_size: usize) -> Vec<u64> {
        (0..self.windows.len())
            .map(|g| {
                (0..self.layers.len())
                    .filter(|&i| self.layer_group[i] == g)
                    .map(|i| (self.kv_row_bytes(i) * block_size) as u64)
                    .sum()
            })
            .collect()
    }

    fn new_batch(&self, shape: &BatchShape) -> Result<BatchState> {
        let (c, sh, b) = (&self.cfg, shape, &*self.b);
        ensure!(
            sh.max_rows > 0 && sh.max_seqs > 0 && sh.block_size > 0 && sh.max_logit_rows > 0,
            "a batch needs room for at least one row, sequence, position and logit row"
        );
        ensure!(
            sh.group_blocks.len() == self.windows.len(),
            "a batch shape with {} KV groups for a model with {}",
            sh.group_blocks.len(),
            self.windows.len()
        );
        let h = c.hidden_size;
        let (qd, kvd, ffn) = self.widths();
        let ple_w = self.plan.ple * self.layers.len();
        let logit_rows = sh.max_logit_rows.min(sh.max_rows.max(sh.max_seqs));
        // What the batch takes, in checked arithmetic, refused before anything is
        // allocated when it exceeds the backend's memory.
        let bytes = (|| -> Option<u64> {
            let moe_row = match &self.plan.moe {
                Some(ms) => ms.floats_per_row(h)?.checked_add(3 * h)?,
                None => 0,
            };
            let per_row = [4 * h, 3 * qd, 3 * kvd, 2 * ffn, 2 * ple_w, 2 * self.plan.ple, moe_row]
                .iter()
                .try_fold(0u64, |a, &x| a.checked_add(x as u64))?;
            let acts = per_row
                .checked_mul(sh.max_rows as u64)?
                .checked_add((logit_rows as u64).checked_mul((h + c.vocab_size) as u64)?)?
                .checked_mul(4)?;
            let per_block = self.kv_block_bytes(sh.block_size);
            let kv = sh
                .group_blocks
                .iter()
                .zip(&per_block)
                .try_fold(0u64, |a, (&n, &pb)| a.checked_add((n as u64).checked_mul(pb)?))?;
            acts.checked_add(kv)
        })();
        let limit = b.memory_bytes();
        match bytes {
            Some(n) if n <= limit => {}
            _ => bail!(
                "a batch of {} rows with KV pools of {} blocks of {} positions needs {}, more than the {:.1} GiB of memory here; use a shorter context or a smaller KV cache",
                sh.max_rows,
                sh.group_blocks.iter().max().copied().unwrap_or(0),
                sh.block_size,
                bytes.map_or("more than 2^64 bytes".to_string(), |n| format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64)),
                limit as f64 / (1u64 << 30) as f64
            ),
        }
        let rows = sh.max_rows;
        // Only layers that compute K/V own pools; KV-shared layers read their source's.
        let pages = || -> Vec<Option<B::Kv>> {
            (0..self.layers.len())
                .map(|i| {
                    let lp = &self.plan.layers[i];
                    (lp.kv_source == i).then(|| {
                        b.alloc_kv_pages(
                            sh.group_blocks[self.layer_group[i]],
                            sh.block_size,
                            lp.kv_heads,
                            lp.head_dim,
                        )
                    })
                })
                .collect()
        };
        let moe = self.plan.moe.is_some();
        let state = State::<B> {
            x: b.alloc(rows * h),
            xn: b.alloc(rows * h),
            tmp: b.alloc(rows * h),
            tmp2: b.alloc(if moe { rows * h } else { 0 }),
            q: b.alloc(rows * qd),
            qn: b.alloc(rows * qd),
            k: b.alloc(rows * kvd),
            v: b.alloc(rows * kvd),
            kn: b.alloc(rows * kvd),
            att: b.alloc(rows * qd),
            gate: b.alloc(rows * ffn),
            up: b.alloc(rows * ffn),
            ple_all: b.alloc(rows * ple_w),
            ple_tok: b.alloc(rows * ple_w),
            ple_i: b.alloc(rows * self.plan.ple),
            ple_g: b.alloc(rows * self.plan.ple),
            moe: self.plan.moe.as_ref().map(|ms| MoeScratch::new(b, ms, h, rows)),
            router_in: b.alloc(if moe { rows * h } else { 0 }),
            moe_in: b.alloc(if moe { rows * h } else { 0 }),
            moe_out: b.alloc(if moe { rows * h } else { 0 }),
            last: b.alloc(logit_rows * h),
            logits: b.alloc(logit_rows * c.vocab_size),
            k_pages: pages(),
            v_pages: pages(),
            step: b.new_step(rows, sh.max_seqs, sh.max_table, self.windows.len()),
        };
        b.check().map_err(Error::new)?;
        Ok(BatchState {
            shape: BatchShape {
                max_logit_rows: logit_rows,
                ..shape.clone()
            },
            inner: Box::new(state),
        })
    }

    fn forward_batch(
        &self,
        tokens: &[u32],
        layout: &StepLayout,
        logit_rows: &[u32],
        state: &mut BatchState,
        tap: &mut Tap,
        mut out: StepOut<'_>,
    ) -> Result<()> {
        let (vocab, h) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let sh = &state.shape;
        super::decoder::check_step(tokens, layout, logit_rows, &out, vocab, &self.windows, sh)?;
        let per_pass = sh.max_logit_rows;
        let b = &*self.b;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let s = state
            .inner
            .downcast_mut::<State<B>>()
            .ok_or_else(|| Error::new("batch state belongs to a different model"))?;
        b.write_step(layout, &mut s.step)
            .map_err(|e| Error::new(format!("bad step layout: {e}")))?;
        b.write_step_tokens(tokens, &mut s.step).map_err(Error::new)?;
        // Never recorded as a GPU graph: the experts route on the host there, and the
        // dense model's recording is not tested yet.
        let mode = b.begin_graph(&mut s.step, None);
        self.forward_step(tokens, s, tap);
        if !b.end_graph(&mut s.step, mode) {
            self.forward_step(tokens, s, tap);
        }
        for (pi, rows) in logit_rows.chunks(per_pass).enumerate() {
            let m = rows.len();
            let src = if super::decoder::gather_logit_rows(b, &s.xn, &mut s.last, rows, h) {
                &s.last
            } else {
                &s.xn
            };
            b.matmul(head, src, m, &mut s.logits);
            if self.plan.final_softcap > 0.0 {
                b.softcap(&mut s.logits, self.plan.final_softcap, m * vocab);
            }
            match &mut out {
                StepOut::Logits(logits) => {
                    let dst = pi * per_pass * vocab;
                    b.download(&s.logits, 0..m * vocab, &mut logits[dst..dst + m * vocab]);
                }
                StepOut::Argmax(ids) => {
                    b.argmax_rows(&s.logits, m, vocab, &mut ids[pi * per_pass..pi * per_pass + m]);
                }
                StepOut::Candidates(c) => c.write_pass(b, &s.logits, pi * per_pass, m, vocab),
            }
        }
        if !logit_rows.is_empty() {
            tap.boundary(b, &s.logits, vocab, "logits", None);
        }
        b.check().map_err(Error::new)
    }
}
