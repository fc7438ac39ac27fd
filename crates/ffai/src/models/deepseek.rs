//! DeepSeek-V2 (V2, V2-Lite, V2.5) and DeepSeek-V3 (V3, R1): a pre-norm block with
//! multi-head latent attention (`mla`: the cache holds the normed latent and the shared
//! RoPE key, `kv_lora_rank + qk_rope_head_dim` per token and layer) and a mixture of
//! experts with shared experts (`moe`), the first `first_k_dense_replace` layers dense.
//!
//! One file, two registered families: V2 and V3 differ only in their router and a few
//! defaults, everything else (attention, weights, MoE block, GGUF layout) is the same
//! code, so they share `load` and differ in a [`Variant`]:
//! - V2: softmax scores over all experts; `topk_method` "greedy" or
//!   "group_limited_greedy" (groups scored by their best expert); weights times
//!   `routed_scaling_factor`, never renormalised (transformers' V2 router has no
//!   `norm_topk_prob`); RoPE on interleaved pairs.
//! - V3: sigmoid scores; `e_score_correction_bias` added for the choice only; the best
//!   `topk_group` of `n_group` groups by the sum of their two best biased scores; weights
//!   the unbiased scores, renormalised when `norm_topk_prob`, times
//!   `routed_scaling_factor`; RoPE interleaved unless `rope_interleave` is false.
//!
//! Both: score scale `(qk_nope + qk_rope)^-½`, times `mscale²` with `mscale = 0.1 ·
//! mscale_all_dim · ln(factor) + 1` when YaRN's `mscale_all_dim` is set; YaRN's own
//! attention factor (`mscale / mscale_all_dim` ratio) on the rope part only.
//!
//! GGUF (llama.cpp's `deepseek2`, both versions): `{arch}.attention.{q_lora_rank,
//! kv_lora_rank, key_length_mla, value_length_mla}`, `rope.dimension_count`,
//! `leading_dense_block_count`, `expert_{count, used_count, feed_forward_length,
//! shared_count, weights_scale, weights_norm, gating_func (1 softmax, 2 sigmoid),
//! group_count, group_used_count}`, `rope.scaling.yarn_log_multiplier` (`0.1 ·
//! mscale_all_dim`, as llama.cpp's converter writes it). A sigmoid router is V3.

use super::decoder::{self, DecoderSpec, Identity};
use super::mla::MlaSpec;
use super::moe::{self, GroupScore, MoeAct, MoeRouting, MoeScoring, MoeSpec};
use super::{Device, Family, LanguageModel};
use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;
use crate::{bail, ensure};

pub const FAMILY_V2: Family = Family {
    name: "deepseek_v2",
    variants: &["deepseek_v2"],
    hf_architectures: &["DeepseekV2ForCausalLM"],
    model_types: &["deepseek_v2"],
    gguf_architectures: &["deepseek2"],
    load,
};

pub const FAMILY_V3: Family = Family {
    name: "deepseek_v3",
    variants: &["deepseek_v3"],
    hf_architectures: &["DeepseekV3ForCausalLM"],
    model_types: &["deepseek_v3"],
    // llama.cpp files both as `deepseek2`; the V2 entry answers and picks V3 from the
    // router's gating function.
    gguf_architectures: &[],
    load,
};

/// Which DeepSeek generation a checkpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    V2,
    V3,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::V2 => "deepseek_v2",
            Variant::V3 => "deepseek_v3",
        }
    }

    /// The checkpoints' generation_config.json: V3 and R1 sample at temperature 0.6 with
    /// top-p 0.95; the V2 chat models at 0.3 with top-p 0.95.
    pub fn default_parameters(self) -> GenerationParameters {
        GenerationParameters {
            temperature: match self {
                Variant::V2 => 0.3,
                Variant::V3 => 0.6,
            },
            top_p: 0.95,
            ..Default::default()
        }
    }
}

/// `0.1 · m · ln(scale) + 1` (1 for `scale <= 1`): YaRN's magnitude correction.
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let src = &cfg.source;
    let gguf = cfg.is_gguf();
    let count = |hf: &str, gg: &str| cfg.extra_usize(hf, gg);
    let need = |hf: &str, gg: &str| moe::required_count(cfg, &[hf], gg);

    // --- routing ---
    let scoring = if gguf {
        match count("", "expert_gating_func")? {
            None | Some(0) | Some(1) => MoeScoring::Softmax,
            Some(2) => MoeScoring::Sigmoid,
            Some(x) => bail!(
                "{src}: {}.expert_gating_func = {x} (1 softmax or 2 sigmoid)",
                cfg.architecture
            ),
        }
    } else if cfg.architecture == "DeepseekV3ForCausalLM" || cfg.model_type == "deepseek_v3" {
        MoeScoring::Sigmoid
    } else {
        MoeScoring::Softmax
    };
    let variant = match scoring {
        MoeScoring::Sigmoid => Variant::V3,
        MoeScoring::Softmax => Variant::V2,
    };
    let n_experts = need("n_routed_experts", "expert_count")?;
    let k = need("num_experts_per_tok", "expert_used_count")?;
    let (n_groups, topk_groups) = match (gguf, variant) {
        (true, _) => (
            count("", "expert_group_count")?.unwrap_or(1).max(1),
            count("", "expert_group_used_count")?.unwrap_or(1).max(1),
        ),
        (false, Variant::V3) => (
            count("n_group", "")?.unwrap_or(1),
            count("topk_group", "")?.unwrap_or(1),
        ),
        (false, Variant::V2) => match cfg.extra("topk_method", "").as_ref().and_then(|v| v.as_str()) {
            None | Some("greedy") => (1, 1),
            Some("group_limited_greedy") => (need("n_group", "")?, need("topk_group", "")?),
            Some(other) => bail!("{src}: topk_method \"{other}\" (greedy or group_limited_greedy)"),
        },
    };
    ensure!(n_groups >= 1, "{src}: n_group must be at least 1");
    let renormalize = match (gguf, variant) {
        (true, _) => cfg.extra_bool("", "expert_weights_norm")?.unwrap_or(false),
        (false, Variant::V3) => cfg.extra_bool("norm_topk_prob", "")?.unwrap_or(true),
        // transformers' DeepseekV2TopkRouter never renormalises.
        (false, Variant::V2) => false,
    };
    let scale = cfg
        .extra_f64("routed_scaling_factor", "expert_weights_scale")?
        .unwrap_or(1.0);
    ensure!(
        scale.is_finite() && scale > 0.0 && scale <= f32::MAX as f64,
        "{src}: routed_scaling_factor = {scale} must be a positive finite number"
    );
    let routing = MoeRouting {
        scoring,
        renormalize,
        scale: scale as f32,
        n_groups,
        topk_groups,
        group_score: match variant {
            Variant::V2 => GroupScore::Max,
            Variant::V3 => GroupScore::TopTwoSum,
        },
    };

    // --- which layers are sparse ---
    let dense_lead = count("first_k_dense_replace", "leading_dense_block_count")?.unwrap_or(0);
    let freq = count("moe_layer_freq", "")?.unwrap_or(1);
    ensure!(freq >= 1, "{src}: moe_layer_freq must be at least 1");
    let sparse: Vec<bool> = if gguf {
        moe::sparse_layers_from_tensors(cfg, w)
    } else {
        (0..cfg.num_layers).map(|i| i >= dense_lead && i % freq == 0).collect()
    };
    let ffn = need("moe_intermediate_size", "expert_feed_forward_length")?;
    let n_shared = count("n_shared_experts", "expert_shared_count")?.unwrap_or(0);
    let shared_ffn = n_shared
        .checked_mul(ffn)
        .filter(|&x| x <= crate::config::MAX_DIM)
        .ok_or_else(|| {
            crate::error::Error::new(format!("{src}: {n_shared} shared experts of {ffn} exceed the limits"))
        })?;
    let moe_spec = MoeSpec {
        n_experts,
        k,
        routing,
        ffn,
        shared_ffn,
        sparse,
        act: MoeAct::SwiGlu,
        latent: 0,
    }
    .checked(cfg)?;

    // --- attention ---
    let kv_lora_rank = need("kv_lora_rank", "attention.kv_lora_rank")?;
    let qk_rope = need("qk_rope_head_dim", "rope.dimension_count")?;
    let q_lora_rank = count("q_lora_rank", "attention.q_lora_rank")?.filter(|&x| x > 0);
    let (qk_nope, v_dim) = if gguf {
        // MLA files give the per-head widths as `*_mla` (their plain key/value lengths are
        // the compressed ones); older files give them as the plain lengths.
        let key = match count("", "attention.key_length_mla")? {
            Some(x) => x,
            None => need("", "attention.key_length")?,
        };
        let value = match count("", "attention.value_length_mla")? {
            Some(x) => x,
            None => need("", "attention.value_length")?,
        };
        ensure!(
            key > qk_rope,
            "{src}: key length {key} leaves no room beside the rope part {qk_rope}"
        );
        (key - qk_rope, value)
    } else {
        (need("qk_nope_head_dim", "")?, need("v_head_dim", "")?)
    };
    // YaRN: cos/sin factor on the rope part, mscale² on the whole score.
    let (rope_factor, mscale) = match &cfg.rope_scaling {
        Some(RopeScaling::Yarn {
            factor,
            attention_factor,
            ..
        }) => {
            if gguf {
                // `yarn_log_multiplier` is `0.1 · mscale_all_dim`; `yarn_attn_factor`, when
                // present, is taken as transformers' factor on cos and sin (the rope part).
                let log_mul = cfg.extra_f64("", "rope.scaling.yarn_log_multiplier")?.unwrap_or(0.0);
                (
                    cfg.extra_f64("", "rope.scaling.yarn_attn_factor")?.unwrap_or(1.0),
                    if *factor > 1.0 {
                        1.0 + log_mul * factor.ln()
                    } else {
                        1.0
                    },
                )
            } else {
                let rp = cfg
                    .extra("rope_parameters", "")
                    .or_else(|| cfg.extra("rope_scaling", ""));
                let all_dim = match rp.as_ref().and_then(|r| r.get("mscale_all_dim")) {
                    None | Some(serde_json::Value::Null) => 0.0,
                    Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                        crate::error::Error::new(format!("{src}: mscale_all_dim = {v} is not a finite number"))
                    })?,
                };
                let m = if all_dim != 0.0 {
                    yarn_mscale(*factor, all_dim)
                } else {
                    1.0
                };
                (*attention_factor, m)
            }
        }
        _ => (1.0, 1.0),
    };
    ensure!(
        mscale.is_finite() && mscale > 0.0,
        "{src}: the YaRN mscale {mscale} must be a positive finite number"
    );
    let mla = MlaSpec {
        n_heads: cfg.num_heads,
        q_lora_rank,
        kv_lora_rank,
        qk_nope,
        qk_rope,
        v_dim,
        rope_factor: rope_factor as f32,
    }
    .checked(cfg)?;
    let attn_scale = (mscale * mscale / ((qk_nope + qk_rope) as f64).sqrt()) as f32;
    let neox = match (gguf, variant) {
        (false, Variant::V3) => !cfg.extra_bool("rope_interleave", "")?.unwrap_or(true),
        _ => false,
    };
    // RoPE runs over the rope part: its tables (and YaRN's correction range) are sized by
    // qk_rope_head_dim, as transformers' `head_dim` for these models says. K/V heads are
    // MLA's own (one latent row); the query heads stay.
    let mut cfg = cfg.clone();
    cfg.head_dim = qk_rope;
    cfg.num_kv_heads = cfg.num_heads;
    cfg.rope_neox = neox;
    let spec = DecoderSpec {
        moe: Some(moe_spec),
        mla: Some(mla),
        attn_scale,
        rope_neox: neox,
        ..DecoderSpec::llama(&cfg, None)
    };
    let id = Identity {
        family: match variant {
            Variant::V2 => FAMILY_V2.name,
            Variant::V3 => FAMILY_V3.name,
        },
        variant: variant.name(),
        defaults: variant.default_parameters(),
    };
    decoder::build(&cfg, w, dev, spec, id)
}
