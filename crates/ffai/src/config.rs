//! The model configuration every family reads, filled either from a Hugging Face
//! config.json or from GGUF metadata, so model code never cares where it came from.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::{bail, ensure};

/// Largest size, count or dimension accepted from a config (hidden size, vocabulary,
/// context length, window, ...): 16.7M is past every released model (vocabularies reach
/// ~262k, contexts ~10M), and a product of two such numbers stays far from overflowing
/// 64 bits. What the numbers imply in memory is checked where it is allocated.
pub const MAX_DIM: usize = 1 << 24;
/// Most transformer blocks a config may declare.
pub const MAX_LAYERS: usize = 1024;
/// Most query heads per KV head: the attention kernels keep a group's softmax statistics
/// in a fixed array of that size.
pub const MAX_GQA_GROUP: usize = ffai_kernels::backend::MAX_GQA_GROUP;

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Phi-3's LongRoPE ("longrope", formerly "su"): per-frequency divisors, short ones
    /// for contexts up to `original_max_position_embeddings`, long ones beyond, plus an
    /// attention factor on cos/sin.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: f64,
        attention_factor: Option<f64>,
    },
    /// YaRN (transformers' `_compute_yarn_parameters`): each frequency blends its
    /// interpolated (`/ factor`) and extrapolated value by a linear ramp over the
    /// dimensions between the correction range's `low` and `high` (from `beta_fast`,
    /// `beta_slow`, `original_max_position_embeddings`; floored/ceiled when `truncate`),
    /// and cos and sin are multiplied by `attention_factor` (so q·k by its square).
    Yarn {
        factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        original_max_position_embeddings: f64,
        truncate: bool,
        /// As given, or `0.1 · ln(factor) + 1` (1 for `factor <= 1`), or the mscale ratio.
        attention_factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// GGUF `general.architecture`, or config.json `architectures[0]`.
    pub architecture: String,
    /// config.json `model_type` (for GGUF: the GGUF architecture name).
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// RoPE pairs element i with i + d/2 (Hugging Face layout) rather than adjacent
    /// elements (llama.cpp's permuted Llama layout).
    pub rope_neox: bool,
    pub sliding_window: Option<usize>,
    /// The checkpoint's own name (GGUF general.name, config.json _name_or_path), used
    /// to pick a family variant.
    pub name: String,
    /// Where the values came from, for error messages.
    pub source: String,
    /// The weights follow llama.cpp's conventions and the model runs as llama.cpp runs it:
    /// set for GGUF files, also when a family reads one through a config.json view
    /// (`models::hybrid_gguf`). Where llama.cpp and transformers differ (the Mamba 2 gated
    /// norm per group; `(1 + w)` norms stored with the 1 added), the family follows this.
    pub llama_cpp: bool,
    /// The original fields, for the quirks a family reads itself (`extra_*`).
    pub raw: RawConfig,
}

/// The configuration as stored: config.json, or the GGUF `{arch}.*` metadata.
#[derive(Debug, Clone)]
pub enum RawConfig {
    Hf(Value),
    Gguf(std::collections::BTreeMap<String, crate::gguf::MetaValue>),
}

impl ModelConfig {
    pub fn is_gguf(&self) -> bool {
        matches!(self.raw, RawConfig::Gguf(_))
    }

    /// A family-specific field: `hf_key` of config.json (or its text_config), or
    /// `{arch}.{gguf_key}` of GGUF metadata.
    pub fn extra(&self, hf_key: &str, gguf_key: &str) -> Option<Value> {
        match &self.raw {
            RawConfig::Hf(v) => v
                .get("text_config")
                .and_then(|t| t.get(hf_key))
                .or_else(|| v.get(hf_key))
                .filter(|x| !x.is_null())
                .cloned(),
            RawConfig::Gguf(m) => m.get(&format!("{}.{gguf_key}", self.architecture)).map(meta_to_json),
        }
    }

    /// A family-specific number: absent (or null) is `None`; present, it must be a
    /// finite number, since a value of the wrong type or NaN would otherwise be
    /// silently replaced by the family's default.
    pub fn extra_f64(&self, hf_key: &str, gguf_key: &str) -> Result<Option<f64>> {
        match self.extra(hf_key, gguf_key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => bail!(
                    "{}: {} = {v} is not a finite number",
                    self.source,
                    self.key_name(hf_key, gguf_key)
                ),
            },
        }
    }

    /// A family-specific count: a non-negative integer of at most [`MAX_DIM`].
    pub fn extra_usize(&self, hf_key: &str, gguf_key: &str) -> Result<Option<usize>> {
        match self.extra(hf_key, gguf_key) {
            None => Ok(None),
            Some(v) => match v.as_u64().and_then(|x| usize::try_from(x).ok()) {
                Some(x) if x <= MAX_DIM => Ok(Some(x)),
                _ => bail!(
                    "{}: {} = {v} is not an integer in 0..={MAX_DIM}",
                    self.source,
                    self.key_name(hf_key, gguf_key)
                ),
            },
        }
    }

    pub fn extra_bool(&self, hf_key: &str, gguf_key: &str) -> Result<Option<bool>> {
        match self.extra(hf_key, gguf_key) {
            None => Ok(None),
            Some(v) => match v.as_bool() {
                Some(b) => Ok(Some(b)),
                None => bail!(
                    "{}: {} = {v} is not true or false",
                    self.source,
                    self.key_name(hf_key, gguf_key)
                ),
            },
        }
    }

    /// The field's name as the source spells it, for error messages.
    fn key_name(&self, hf_key: &str, gguf_key: &str) -> String {
        match self.raw {
            RawConfig::Hf(_) => hf_key.to_string(),
            RawConfig::Gguf(_) => format!("{}.{gguf_key}", self.architecture),
        }
    }

    fn validate(mut self) -> Result<Self> {
        let c = &self;
        for (name, v) in [
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_layers),
            ("num_attention_heads", c.num_heads),
            ("num_key_value_heads", c.num_kv_heads),
            ("head_dim", c.head_dim),
            ("vocab_size", c.vocab_size),
            ("max_position_embeddings", c.max_position_embeddings),
        ] {
            ensure!(v > 0, "{}: {name} must be positive", c.source);
            ensure!(
                v <= MAX_DIM,
                "{}: {name} = {v} exceeds the limit of {MAX_DIM}",
                c.source
            );
        }
        ensure!(
            c.num_layers <= MAX_LAYERS,
            "{}: num_hidden_layers = {} exceeds the limit of {MAX_LAYERS}",
            c.source,
            c.num_layers
        );
        ensure!(
            c.num_heads.is_multiple_of(c.num_kv_heads),
            "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}",
            c.source,
            c.num_heads,
            c.num_kv_heads
        );
        // Multi-head latent attention (DeepSeek: GGUF files say one KV head) shares one
        // latent row among all heads and has no GQA group.
        let mla = c.extra("kv_lora_rank", "attention.kv_lora_rank").is_some();
        ensure!(
            mla || c.num_heads / c.num_kv_heads <= MAX_GQA_GROUP,
            "{}: {} query heads per KV head exceed the limit of {MAX_GQA_GROUP}",
            c.source,
            c.num_heads / c.num_kv_heads
        );
        ensure!(
            c.head_dim.is_multiple_of(2),
            "{}: head_dim {} must be even for RoPE",
            c.source,
            c.head_dim
        );
        ensure!(
            c.rope_theta > 0.0 && c.rope_theta.is_finite(),
            "{}: rope_theta must be a positive finite number",
            c.source
        );
        ensure!(
            c.rms_norm_eps >= 0.0 && c.rms_norm_eps.is_finite(),
            "{}: rms_norm_eps must be a non-negative finite number",
            c.source
        );
        if let Some(w) = c.sliding_window {
            ensure!(
                w <= MAX_DIM,
                "{}: sliding_window = {w} exceeds the limit of {MAX_DIM}",
                c.source
            );
        }
        let positive = |name: &str, x: f64| -> Result<()> {
            ensure!(
                x > 0.0 && x.is_finite(),
                "{}: rope scaling {name} = {x} must be a positive finite number",
                c.source
            );
            Ok(())
        };
        match &c.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => positive("factor", *factor)?,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("high_freq_factor", *high_freq_factor)?;
                positive("original_max_position_embeddings", *original_max_position_embeddings)?;
                // The smoothing divides by their difference.
                ensure!(
                    high_freq_factor > low_freq_factor && high_freq_factor.is_finite(),
                    "{}: rope scaling high_freq_factor must exceed low_freq_factor",
                    c.source
                );
            }
            Some(RopeScaling::Yarn {
                factor,
                beta_fast,
                beta_slow,
                original_max_position_embeddings,
                attention_factor,
                ..
            }) => {
                positive("factor", *factor)?;
                positive("beta_fast", *beta_fast)?;
                positive("beta_slow", *beta_slow)?;
                positive("original_max_position_embeddings", *original_max_position_embeddings)?;
                positive("attention_factor", *attention_factor)?;
            }
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            }) => {
                for x in short_factor.iter().chain(long_factor) {
                    positive("short_factor/long_factor entry", *x)?;
                }
                positive("original_max_position_embeddings", *original_max_position_embeddings)?;
                if let Some(a) = attention_factor {
                    positive("attention_factor", *a)?;
                }
            }
        }
        // A window of zero, or one as long as the context, attends to everything.
        if matches!(c.sliding_window, Some(w) if w == 0 || w >= c.max_position_embeddings) {
            self.sliding_window = None;
        }
        Ok(self)
    }

    /// Reads a Hugging Face config.json already parsed to JSON.
    pub fn from_hf_json(v: &Value, source: &str) -> Result<ModelConfig> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::new(format!("{source}: config.json is not a JSON object")))?;
        // Multimodal configs nest the language model; read through text_config when present.
        let text = obj.get("text_config").and_then(|t| t.as_object()).unwrap_or(obj);
        let get = |k: &str| text.get(k).or_else(|| obj.get(k));
        let req_usize = |k: &str| -> Result<usize> {
            let val =
                get(k).ok_or_else(|| Error::new(format!("{source}: config.json is missing required field \"{k}\"")))?;
            val.as_u64().and_then(|x| usize::try_from(x).ok()).ok_or_else(|| {
                Error::new(format!(
                    "{source}: config.json field \"{k}\" is not a non-negative integer"
                ))
            })
        };
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        Error::new(format!(
                            "{source}: config.json field \"{k}\" is not a non-negative integer"
                        ))
                    }),
            }
        };
        // Present but of the wrong type is an error, not the default.
        let opt_f64 = |k: &str| -> Result<Option<f64>> {
            match get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => match x.as_f64() {
                    Some(f) if f.is_finite() => Ok(Some(f)),
                    _ => bail!("{source}: config.json field \"{k}\" = {x} is not a finite number"),
                },
            }
        };
        let opt_bool = |k: &str| -> Result<Option<bool>> {
            match get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x.as_bool().map(Some).ok_or_else(|| {
                    Error::new(format!(
                        "{source}: config.json field \"{k}\" = {x} is not true or false"
                    ))
                }),
            }
        };
        // A number inside a rope section: absent is None, anything but a finite number an error.
        let num_in = |section: &Value, k: &str| -> Result<Option<f64>> {
            match section.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => match x.as_f64() {
                    Some(f) if f.is_finite() => Ok(Some(f)),
                    _ => bail!("{source}: rope scaling field \"{k}\" = {x} is not a finite number"),
                },
            }
        };

        let architecture = obj
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .unwrap_or("")
            .to_string();
        let model_type = get("model_type").and_then(|m| m.as_str()).unwrap_or("").to_string();
        ensure!(
            !architecture.is_empty() || !model_type.is_empty(),
            "{source}: config.json has neither \"architectures\" nor \"model_type\""
        );
        let hidden_size = req_usize("hidden_size")?;
        // A pure state-space model (Mamba 2) has no attention and no MLP: placeholders
        // here; the family reads its own numbers (its head_dim is the scan's).
        let attention_free = model_type == "mamba2";
        let num_heads = if attention_free {
            1
        } else {
            req_usize("num_attention_heads")?
        };
        ensure!(num_heads > 0, "{source}: num_attention_heads must be positive");
        let num_kv_heads = if attention_free {
            1
        } else {
            opt_usize("num_key_value_heads")?.unwrap_or(num_heads)
        };
        let head_dim = if attention_free {
            2
        } else {
            opt_usize("head_dim")?.unwrap_or(hidden_size / num_heads)
        };
        // LFM2's older configs name the MLP width block_ff_dim.
        let intermediate_size = match (attention_free, opt_usize("intermediate_size")?) {
            (true, v) => v.unwrap_or(hidden_size),
            (false, Some(v)) => v,
            (false, None) => match (opt_usize("block_ff_dim")?, opt_usize("moe_intermediate_size")?) {
                (Some(v), _) => v,
                // Qwen3.5-MoE has no dense MLP: every block's MLP is the experts'.
                (None, Some(v)) => v,
                (None, None) => req_usize("intermediate_size")?,
            },
        };

        // transformers v5 writes `rope_parameters` (with rope_theta inside); older
        // checkpoints write `rope_theta` and `rope_scaling` at the top level.
        let rope_params =
            get("rope_parameters").filter(|v| v.get("rope_type").is_some() || v.get("rope_theta").is_some());
        let rope_theta = match rope_params {
            Some(r) => num_in(r, "rope_theta")?,
            None => None,
        };
        let rope_theta = match rope_theta {
            Some(t) => Some(t),
            None => opt_f64("rope_theta")?,
        };
        let rope_scaling = match rope_params.or_else(|| get("rope_scaling")) {
            None | Some(Value::Null) => None,
            Some(rs) => {
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                let f = |k: &str| num_in(rs, k);
                let factor = f("factor")?;
                match kind {
                    "linear" => Some(RopeScaling::Linear {
                        factor: factor
                            .ok_or_else(|| Error::new(format!("{source}: rope_scaling linear needs \"factor\"")))?,
                    }),
                    "llama3" => {
                        let need = |k: &str| {
                            f(k)?.ok_or_else(|| Error::new(format!("{source}: rope_scaling llama3 needs \"{k}\"")))
                        };
                        Some(RopeScaling::Llama3 {
                            factor: need("factor")?,
                            low_freq_factor: need("low_freq_factor")?,
                            high_freq_factor: need("high_freq_factor")?,
                            original_max_position_embeddings: need("original_max_position_embeddings")?,
                        })
                    }
                    "longrope" | "su" => {
                        let list = |k: &str| -> Result<Vec<f64>> {
                            let a = rs
                                .get(k)
                                .and_then(|v| v.as_array())
                                .ok_or_else(|| Error::new(format!("{source}: rope scaling longrope needs \"{k}\"")))?;
                            a.iter()
                                .map(|x| {
                                    x.as_f64().ok_or_else(|| {
                                        Error::new(format!("{source}: rope scaling {k} holds {x}, not a number"))
                                    })
                                })
                                .collect()
                        };
                        // The top-level field takes priority, as in transformers.
                        let orig = opt_f64("original_max_position_embeddings")?
                            .or(f("original_max_position_embeddings")?)
                            .ok_or_else(|| Error::new(format!("{source}: longrope needs original_max_position_embeddings")))?;
                        Some(RopeScaling::LongRope {
                            short_factor: list("short_factor")?,
                            long_factor: list("long_factor")?,
                            original_max_position_embeddings: orig,
                            attention_factor: f("attention_factor")?,
                        })
                    }
                    "yarn" => {
                        let factor = factor.ok_or_else(|| Error::new(format!("{source}: rope_scaling yarn needs \"factor\"")))?;
                        let orig = f("original_max_position_embeddings")?
                            .or(opt_f64("original_max_position_embeddings")?)
                            .ok_or_else(|| Error::new(format!("{source}: yarn needs original_max_position_embeddings")))?;
                        let truncate = match rs.get("truncate") {
                            None | Some(Value::Null) => true,
                            Some(x) => x.as_bool().ok_or_else(|| {
                                Error::new(format!("{source}: rope scaling field \"truncate\" = {x} is not true or false"))
                            })?,
                        };
                        let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                        let attention_factor = match (f("attention_factor")?, f("mscale")?, f("mscale_all_dim")?) {
                            (Some(a), _, _) => a,
                            (None, Some(m), Some(md)) if m != 0.0 && md != 0.0 => mscale(factor, m) / mscale(factor, md),
                            _ => mscale(factor, 1.0),
                        };
                        // transformers: `get("beta_fast") or 32` (absent, null or 0).
                        let beta = |k: &str, d: f64| -> Result<f64> { Ok(f(k)?.filter(|&x| x != 0.0).unwrap_or(d)) };
                        Some(RopeScaling::Yarn {
                            factor,
                            beta_fast: beta("beta_fast", 32.0)?,
                            beta_slow: beta("beta_slow", 1.0)?,
                            original_max_position_embeddings: orig,
                            truncate,
                            attention_factor,
                        })
                    }
                    "default" | "" => None,
                    other => bail!(
                        "{source}: rope_scaling type \"{other}\" is not supported yet (supported: linear, llama3, longrope, yarn)"
                    ),
                }
            }
        };
        let use_sliding = opt_bool("use_sliding_window")?.unwrap_or(true);
        let sliding_window = if use_sliding {
            opt_usize("sliding_window")?
        } else {
            None
        };

        ModelConfig {
            architecture,
            model_type,
            hidden_size,
            intermediate_size,
            num_layers: match opt_usize("num_hidden_layers")? {
                Some(n) => n,
                // transformers 5 drops it where the layer-type list gives it (NemotronH).
                None => match get("layers_block_type")
                    .or(get("layer_types"))
                    .and_then(|v| v.as_array())
                {
                    Some(a) => a.len(),
                    None => req_usize("num_hidden_layers")?,
                },
            },
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: req_usize("vocab_size")?,
            max_position_embeddings: opt_usize("max_position_embeddings")?.unwrap_or(4096),
            rope_theta: rope_theta.unwrap_or(10000.0),
            rope_scaling,
            rms_norm_eps: opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            tie_word_embeddings: opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: opt_bool("attention_bias")?.unwrap_or(false),
            rope_neox: true,
            sliding_window,
            name: obj
                .get("_name_or_path")
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_string(),
            source: source.to_string(),
            llama_cpp: false,
            raw: RawConfig::Hf(v.clone()),
        }
        .validate()
    }

    /// Reads `{arch}.*` GGUF metadata. Tensor-derived facts (tied head, biases) are
    /// filled in by the caller, which sees the tensor list.
    pub fn from_gguf(f: &GgufFile, source: &str) -> Result<ModelConfig> {
        let arch = f
            .architecture()
            .ok_or_else(|| Error::new(format!("{source}: GGUF has no general.architecture")))?
            .to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize> {
            let full = key(k);
            f.get_u64(&full)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| Error::new(format!("{source}: GGUF metadata is missing integer \"{full}\"")))
        };
        // Present but not a non-negative integer (or not a number) is an error, not the default.
        let opt = |k: &str| -> Result<Option<usize>> {
            let full = key(k);
            match f.get(&full) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|v| usize::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| Error::new(format!("{source}: GGUF {full} is not a non-negative integer"))),
            }
        };
        let opt_f64 = |k: &str| -> Result<Option<f64>> {
            let full = key(k);
            match f.get(&full) {
                None => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() => Ok(Some(x)),
                    _ => bail!("{source}: GGUF {full} is not a finite number"),
                },
            }
        };
        let hidden_size = req("embedding_length")?;
        // Mamba 2 has no attention (llama.cpp writes 0 heads): placeholders, as for its
        // config.json.
        let attention_free = arch == "mamba2";
        let num_heads = if attention_free {
            1
        } else {
            req("attention.head_count")?
        };
        ensure!(num_heads > 0, "{source}: {arch}.attention.head_count must be positive");
        // Hybrids (LFM2) give KV heads per layer, 0 for recurrent layers: the attention
        // layers' count (the family reads which layers are which).
        let kv_key = key("attention.head_count_kv");
        let num_kv_heads = match f.get(&kv_key).and_then(|v| v.as_array()) {
            _ if attention_free => Some(1),
            Some(a) => {
                let counts = a
                    .iter()
                    .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
                    .collect::<Option<Vec<usize>>>()
                    .ok_or_else(|| Error::new(format!("{source}: GGUF {kv_key} holds a non-integer")))?;
                let attn: Vec<usize> = counts.into_iter().filter(|&c| c > 0).collect();
                // Gemma 4's full and sliding layers differ: its family reads the array.
                ensure!(
                    arch == "gemma4" || attn.windows(2).all(|w| w[0] == w[1]),
                    "{source}: GGUF {kv_key} differs between attention layers"
                );
                Some(attn.first().copied().unwrap_or(num_heads))
            }
            None => opt("attention.head_count_kv")?,
        }
        .unwrap_or(num_heads);
        let head_dim = if attention_free {
            2
        } else {
            opt("attention.key_length")?.unwrap_or(hidden_size / num_heads)
        };
        let vocab_size = match opt("vocab_size")? {
            Some(v) => v,
            None => f
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(|a| a.len())
                .ok_or_else(|| {
                    Error::new(format!(
                        "{source}: GGUF has neither {arch}.vocab_size nor tokenizer.ggml.tokens"
                    ))
                })?,
        };
        let ff_key = key("feed_forward_length");
        let per_layer_ff = match f.get(&ff_key).and_then(|v| v.as_array()) {
            None => None,
            Some(a) => Some(
                a.iter()
                    .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
                    .collect::<Option<Vec<usize>>>()
                    .ok_or_else(|| Error::new(format!("{source}: GGUF {ff_key} holds a non-integer")))?,
            ),
        };
        let rope_scaling = match f.get_str(&key("rope.scaling.type")) {
            None | Some("none") => None,
            Some("linear") => {
                let factor = opt_f64("rope.scaling.factor")?.unwrap_or(1.0);
                (factor != 1.0).then_some(RopeScaling::Linear { factor })
            }
            Some("yarn") => {
                // llama.cpp's YaRN: ggml_rope_yarn_corr_dims always floors/ceils the
                // correction range (transformers' `truncate: true`), and the cos/sin factor
                // is `yarn_attn_factor` (default 1) times `1 + 0.1 ln(factor)`.
                let factor = opt_f64("rope.scaling.factor")?
                    .ok_or_else(|| Error::new(format!("{source}: YaRN needs {arch}.rope.scaling.factor")))?;
                let orig = opt_f64("rope.scaling.original_context_length")?.ok_or_else(|| {
                    Error::new(format!("{source}: YaRN needs {arch}.rope.scaling.original_context_length"))
                })?;
                let mscale = if factor <= 1.0 { 1.0 } else { 0.1 * factor.ln() + 1.0 };
                Some(RopeScaling::Yarn {
                    factor,
                    beta_fast: opt_f64("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                    beta_slow: opt_f64("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
                    original_max_position_embeddings: orig,
                    truncate: true,
                    attention_factor: opt_f64("rope.scaling.yarn_attn_factor")?.unwrap_or(1.0) * mscale,
                })
            }
            Some(other) => bail!(
                "{source}: rope scaling \"{other}\" is not supported yet (supported: linear, yarn, llama3 via rope_freqs)"
            ),
        };
        // Llama and its relatives were converted with q/k permuted for adjacent-pair RoPE;
        // architectures converted without that permutation rotate NeoX-style halves.
        let rope_neox = !matches!(arch.as_str(), "llama" | "mistral" | "granite");
        ModelConfig {
            model_type: arch.clone(),
            architecture: arch.clone(),
            hidden_size,
            intermediate_size: match (attention_free, per_layer_ff) {
                (true, _) => opt("feed_forward_length")?.filter(|&x| x > 0).unwrap_or(hidden_size),
                // Gemma 4 may give one width per layer (its double-wide MLP): the first
                // here, its family reads the array.
                (false, Some(ff)) if arch == "gemma4" => *ff
                    .first()
                    .ok_or_else(|| Error::new(format!("{source}: GGUF {ff_key} holds a non-integer")))?,
                // Hybrids (NemotronH) give it per layer, 0 for blocks without an MLP: the
                // largest (the family reads its widths from the tensors).
                (false, Some(ff)) => ff.into_iter().max().filter(|&x| x > 0).unwrap_or(hidden_size),
                // MoE models without a dense MLP (Qwen3.5-MoE) give only the experts' width.
                (false, None) => match opt("feed_forward_length")? {
                    Some(ff) => ff,
                    None => opt("expert_feed_forward_length")?.map_or_else(|| req("feed_forward_length"), Ok)?,
                },
            },
            num_layers: req("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: opt("context_length")?.unwrap_or(4096),
            rope_theta: opt_f64("rope.freq_base")?.unwrap_or(10000.0),
            rope_scaling,
            rms_norm_eps: opt_f64("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            tie_word_embeddings: false,
            attention_bias: false,
            rope_neox,
            sliding_window: opt("attention.sliding_window")?,
            name: f
                .get_str("general.name")
                .or(f.get_str("general.basename"))
                .unwrap_or("")
                .to_string(),
            source: source.to_string(),
            llama_cpp: true,
            raw: RawConfig::Gguf(
                f.metadata
                    .iter()
                    .filter(|(k, _)| k.starts_with(&format!("{arch}.")))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
        }
        .validate()
    }

    /// The factor RoPE scaling puts on cos and sin (YaRN's attention factor; 1 otherwise,
    /// LongRoPE's is applied by its family). Since RoPE is linear, it is the same as
    /// multiplying the attention scores by its square.
    pub fn rope_attention_factor(&self) -> f64 {
        match self.rope_scaling {
            Some(RopeScaling::Yarn { attention_factor, .. }) => attention_factor,
            _ => 1.0,
        }
    }

    /// Per-pair RoPE inverse frequencies with the configured scaling folded in.
    /// `freq_factors` (GGUF `rope_freqs.weight`) divides each frequency when present.
    pub fn rope_inv_freq(&self, freq_factors: Option<&[f32]>) -> Vec<f32> {
        let half = self.head_dim / 2;
        // YaRN's ramp over the dimension pairs (transformers' find_correction_range).
        let yarn_range = match self.rope_scaling {
            Some(RopeScaling::Yarn {
                beta_fast,
                beta_slow,
                original_max_position_embeddings: omp,
                truncate,
                ..
            }) => {
                let (dim, base) = (self.head_dim as f64, self.rope_theta);
                let corr = |rot: f64| dim * (omp / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
                let (mut low, mut high) = (corr(beta_fast), corr(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                Some((low, high))
            }
            _ => None,
        };
        (0..half)
            .map(|i| {
                let mut f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64);
                match self.rope_scaling {
                    Some(RopeScaling::Yarn { factor, .. }) => {
                        let (low, high) = yarn_range.unwrap_or((0.0, 1.0));
                        // transformers computes the ramp and the blend in f32.
                        let ramp = (((i as f64 - low) / (high - low)) as f32).clamp(0.0, 1.0);
                        let extrap = 1.0 - ramp;
                        let (fe, fi) = (f as f32, (f / factor) as f32);
                        f = (fi * (1.0 - extrap) + fe * extrap) as f64;
                    }
                    Some(RopeScaling::Linear { factor }) => f /= factor,
                    // Families with LongRoPE build their own tables (see phi3.rs).
                    Some(RopeScaling::LongRope { .. }) => {}
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    }) => {
                        let low_wavelen = original_max_position_embeddings / low_freq_factor;
                        let high_wavelen = original_max_position_embeddings / high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f /= factor;
                        } else if wavelen >= high_wavelen {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            f = (1.0 - smooth) * f / factor + smooth * f;
                        }
                    }
                    None => {}
                }
                if let Some(ff) = freq_factors {
                    f /= ff.get(i).copied().unwrap_or(1.0) as f64;
                }
                f as f32
            })
            .collect()
    }
}

fn meta_to_json(v: &crate::gguf::MetaValue) -> Value {
    use crate::gguf::MetaValue as M;
    match v {
        M::String(s) => Value::from(s.clone()),
        M::Bool(b) => Value::from(*b),
        M::F32(x) => Value::from(*x as f64),
        M::F64(x) => Value::from(*x),
        M::Array(a) => Value::Array(a.iter().map(meta_to_json).collect()),
        other => other.as_i64().map(Value::from).unwrap_or(Value::Null),
    }
}

/// One module's affine quantization parameters (MLX `quantization` entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AffineParams {
    /// Bits per level; `None` where the config gives only a group size (derived from
    /// the stored shapes then).
    pub bits: Option<u8>,
    pub group: u16,
}

/// MLX's `quantization` section of config.json (or `quantization_config`, which
/// mlx-lm writes with the same content): default bits and group size, plus per-module
/// overrides keyed by module path (`model.layers.0.mlp.down_proj`), each either
/// parameters or `false` (left unquantized).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AffineQuantConfig {
    pub default: Option<AffineParams>,
    pub per_module: std::collections::HashMap<String, Option<AffineParams>>,
}

impl AffineQuantConfig {
    /// Reads the section from a config.json value; `None` when there is none (a
    /// `quantization_config` naming another `quant_method` is not ours either).
    pub fn from_hf_json(v: &Value, source: &str) -> Result<Option<AffineQuantConfig>> {
        let section = match (v.get("quantization"), v.get("quantization_config")) {
            (Some(q), _) => q,
            (None, Some(q)) if q.get("quant_method").is_none() => q,
            _ => return Ok(None),
        };
        let obj = section
            .as_object()
            .ok_or_else(|| Error::new(format!("{source}: \"quantization\" is not an object")))?;
        if let Some(mode) = obj.get("mode") {
            ensure!(
                mode.as_str() == Some("affine"),
                "{source}: quantization mode {mode} is not supported (only \"affine\")"
            );
        }
        let params = |what: &str,
                      o: &serde_json::Map<String, Value>,
                      dflt: Option<AffineParams>|
         -> Result<Option<AffineParams>> {
            let bits = match o.get("bits") {
                None => dflt.and_then(|d| d.bits),
                Some(b) => {
                    let b = b.as_u64().filter(|b| [2, 3, 4, 5, 6, 8].contains(b)).ok_or_else(|| {
                        Error::new(format!(
                            "{source}: quantization {what}: bits {b} is not one of 2, 3, 4, 5, 6, 8"
                        ))
                    })?;
                    Some(b as u8)
                }
            };
            let group = match o.get("group_size") {
                None => dflt.map(|d| d.group),
                Some(g) => {
                    let g = g.as_u64().filter(|g| [32, 64, 128].contains(g)).ok_or_else(|| {
                        Error::new(format!(
                            "{source}: quantization {what}: group_size {g} is not one of 32, 64, 128"
                        ))
                    })?;
                    Some(g as u16)
                }
            };
            Ok(match (bits, group) {
                (_, Some(group)) => Some(AffineParams { bits, group }),
                (Some(_), None) => bail!("{source}: quantization {what}: bits without a group_size"),
                (None, None) => None,
            })
        };
        let default = params("defaults", obj, None)?;
        let mut per_module = std::collections::HashMap::new();
        for (k, val) in obj {
            match val {
                Value::Bool(false) => {
                    per_module.insert(k.clone(), None);
                }
                Value::Object(o) => {
                    let p = params(&format!("of \"{k}\""), o, default)?
                        .ok_or_else(|| Error::new(format!("{source}: quantization of \"{k}\" has no group_size")))?;
                    per_module.insert(k.clone(), Some(p));
                }
                // Scalars are the defaults and settings (bits, group_size, mode, ...).
                _ => {}
            }
        }
        Ok(Some(AffineQuantConfig { default, per_module }))
    }

    /// What the config says about module `path` (a tensor name without `.weight`).
    pub fn for_module(&self, path: &str) -> ModuleQuant {
        match self.per_module.get(path) {
            Some(Some(p)) => ModuleQuant::Explicit(*p),
            Some(None) => ModuleQuant::Unquantized,
            None => self.default.map_or(ModuleQuant::Unknown, ModuleQuant::Default),
        }
    }
}

/// A module's entry in [`AffineQuantConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleQuant {
    /// Its own entry: the stored shapes must agree with it.
    Explicit(AffineParams),
    /// The section's defaults (a tensor stored with other bits at the same group size
    /// is taken as a mixed-precision layer).
    Default(AffineParams),
    /// Marked `false`: left unquantized.
    Unquantized,
    /// No parameters anywhere.
    Unknown,
}

/// Largest FP8 scale block side accepted from `weight_block_size`.
pub const MAX_FP8_BLOCK: usize = 1 << 16;

/// A fine-grained FP8 `quantization_config` (DeepSeek-V3/R1, Qwen3-*-FP8, ...):
/// `quant_method: "fp8"`, E4M3 weights with one scale per `weight_block_size` block
/// (`X.weight_scale_inv`, `[ceil(out/bo), ceil(in/bi)]`), activations quantized
/// dynamically (ffai keeps them in its own format, so nothing to read for those).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fp8QuantConfig {
    /// Scale block: `[rows, cols]` of the weight each scale covers.
    pub block: [usize; 2],
    /// Modules left in higher precision (`modules_to_not_convert`).
    pub not_converted: Vec<String>,
}

impl Fp8QuantConfig {
    /// Reads `quantization_config` from a config.json value: `None` when it is absent or
    /// names another method; an error (one line, naming what) for the FP8 variants ffai
    /// does not load: per-tensor scales (no `weight_block_size`), formats other than
    /// E4M3, static activation scales.
    pub fn from_hf_json(v: &Value, source: &str) -> Result<Option<Fp8QuantConfig>> {
        let Some(q) = v.get("quantization_config") else {
            return Ok(None);
        };
        if q.get("quant_method").and_then(|m| m.as_str()) != Some("fp8") {
            return Ok(None);
        }
        if let Some(f) = q.get("fmt").filter(|f| !f.is_null()) {
            ensure!(
                f.as_str() == Some("e4m3"),
                "{source}: FP8 format {f} is not supported (only \"e4m3\")"
            );
        }
        if let Some(a) = q.get("activation_scheme").filter(|a| !a.is_null()) {
            ensure!(
                a.as_str() == Some("dynamic"),
                "{source}: FP8 activation_scheme {a} is not supported (only \"dynamic\")"
            );
        }
        let block = match q.get("weight_block_size") {
            None | Some(Value::Null) => bail!(
                "{source}: FP8 with per-tensor scales (no weight_block_size) is not supported (only block-wise scales)"
            ),
            Some(b) => {
                let dims: Option<Vec<usize>> = b.as_array().map(|a| {
                    a.iter()
                        .map(|d| {
                            d.as_u64()
                                .and_then(|d| usize::try_from(d).ok())
                                .filter(|d| (1..=MAX_FP8_BLOCK).contains(d))
                        })
                        .collect::<Option<Vec<usize>>>()
                        .unwrap_or_default()
                });
                match dims.as_deref() {
                    Some(&[r, c]) => [r, c],
                    _ => bail!("{source}: FP8 weight_block_size {b} is not two block sides from 1 to {MAX_FP8_BLOCK}"),
                }
            }
        };
        let not_converted = match q.get("modules_to_not_convert") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|m| {
                    m.as_str().map(str::to_string).ok_or_else(|| {
                        Error::new(format!("{source}: modules_to_not_convert entry {m} is not a string"))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(other) => bail!("{source}: modules_to_not_convert is {other}, not a list of names"),
        };
        Ok(Some(Fp8QuantConfig { block, not_converted }))
    }

    /// Whether module `path` (a tensor name without `.weight`) is listed in
    /// `modules_to_not_convert` (an entry names a module or any module under it, or a
    /// trailing part of its path, as `lm_head` or `mlp.gate`).
    pub fn is_not_converted(&self, path: &str) -> bool {
        self.not_converted.iter().any(|m| {
            !m.is_empty()
                && (path == m
                    || path.ends_with(&format!(".{m}"))
                    || path.starts_with(&format!("{m}."))
                    || path.contains(&format!(".{m}.")))
        })
    }

    /// How `ffai inspect` names it.
    pub fn describe(&self) -> String {
        format!("FP8 e4m3 block {}×{} → Q8_0", self.block[0], self.block[1])
    }
}

#[cfg(test)]
mod fp8_tests {
    use super::*;

    fn parse(q: Value) -> Result<Option<Fp8QuantConfig>> {
        Fp8QuantConfig::from_hf_json(&serde_json::json!({ "quantization_config": q }), "config.json")
    }

    #[test]
    fn fp8_block_config_is_read() {
        let c = parse(serde_json::json!({
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head", "mlp.gate"]
        }))
        .unwrap()
        .unwrap();
        assert_eq!(c.block, [128, 128]);
        assert!(c.is_not_converted("lm_head"));
        assert!(c.is_not_converted("model.layers.3.mlp.gate"));
        assert!(!c.is_not_converted("model.layers.3.mlp.gate_proj"));
        assert_eq!(c.describe(), "FP8 e4m3 block 128×128 → Q8_0");
        // Other methods and no section are not FP8.
        assert_eq!(
            parse(serde_json::json!({"quant_method": "gptq", "bits": 4})).unwrap(),
            None
        );
        assert_eq!(
            Fp8QuantConfig::from_hf_json(&serde_json::json!({}), "config.json").unwrap(),
            None
        );
    }

    #[test]
    fn fp8_unsupported_variants_are_one_line_errors() {
        let cases = [
            (
                serde_json::json!({"quant_method": "fp8", "activation_scheme": "dynamic"}),
                "per-tensor scales",
            ),
            (
                serde_json::json!({"quant_method": "fp8", "weight_block_size": null}),
                "per-tensor scales",
            ),
            (
                serde_json::json!({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}),
                "e5m2",
            ),
            (
                serde_json::json!({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}),
                "static",
            ),
            (
                serde_json::json!({"quant_method": "fp8", "weight_block_size": [128]}),
                "weight_block_size",
            ),
            (
                serde_json::json!({"quant_method": "fp8", "weight_block_size": [0, 128]}),
                "weight_block_size",
            ),
            (
                serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 1e30]}),
                "weight_block_size",
            ),
            (
                serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": [1]}),
                "modules_to_not_convert",
            ),
        ];
        for (q, want) in cases {
            let e = parse(q.clone()).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{q}: {e}");
        }
    }
}
