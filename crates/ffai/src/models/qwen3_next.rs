//! Qwen3-Next: gated DeltaNet layers (`linear_attention`: `recurrent::MixerSpec::
//! GatedDeltaNet`) and gated attention layers (`full_attention`: per head `[q | gate]` from
//! `q_proj`, per-head q/k norms, partial RoPE, the output × `sigmoid(gate)`), every norm
//! zero-centred (`x̂ · (1 + w)`) except the DeltaNet's gated one. The MLP is the sparse
//! MoE block with a sigmoid-gated shared expert (the released checkpoints, see
//! [`moe_spec`]) on the sparse layers, and a dense SwiGLU MLP of `intermediate_size` on
//! the others (`mlp_only_layers`, off the `decoder_sparse_step` grid, or every layer with
//! `num_experts: 0`).

use ffai_kernels::ssm::GdnShape;

use super::decoder::{self, DecoderSpec, Identity, NormKind, QkNorm};
use super::moe::{self, MoeAct, MoeRouting, MoeSpec};
use super::recurrent::{self, GdnSpec, MixerSpec, RecurrentSpec};
use super::{Device, Family, LanguageModel};
use crate::config::{ModelConfig, MAX_DIM};
use crate::error::Result;
use crate::generate::GenerationParameters;
use crate::weights::Weights;
use crate::{bail, ensure};

pub const FAMILY: Family = Family {
    name: "qwen3_next",
    variants: &["qwen3_next"],
    hf_architectures: &["Qwen3NextForCausalLM"],
    model_types: &["qwen3_next"],
    gguf_architectures: &["qwen3next"],
    load,
};

pub struct Qwen3Next;

impl Qwen3Next {
    pub const NAME: &'static str = "qwen3_next";

    /// Qwen's generation_config: T 0.7, top-p 0.8, top-k 20.
    pub fn default_parameters() -> GenerationParameters {
        GenerationParameters {
            temperature: 0.7,
            top_p: 0.8,
            top_k: 20,
            ..Default::default()
        }
    }
}

/// Which layers are DeltaNet layers: `layer_types`, else every `full_attention_interval`-th
/// (default 4th) layer attends.
fn linear_layers(cfg: &ModelConfig) -> Result<Vec<bool>> {
    if let Some(l) = recurrent::layer_types(cfg)? {
        return Ok(l);
    }
    let every = recurrent::sized(
        cfg,
        "full_attention_interval",
        cfg.extra_usize("full_attention_interval", "")?,
        Some(4),
        MAX_DIM,
    )?;
    Ok((0..cfg.num_layers).map(|i| !(i + 1).is_multiple_of(every)).collect())
}

/// The sparse MoE block, when the config has experts (`num_experts`, transformers'
/// default 512): softmax over all experts, top `num_experts_per_tok`, renormalised when
/// `norm_topk_prob` (default true); SwiGLU experts of `moe_intermediate_size`; a SwiGLU
/// shared expert of `shared_expert_intermediate_size` whose output is multiplied by
/// `σ(x · shared_expert_gate)`. Layer `i` is sparse unless listed in `mlp_only_layers`,
/// and only when `(i + 1) % decoder_sparse_step == 0`.
fn moe_spec(cfg: &ModelConfig, w: &Weights) -> Result<Option<MoeSpec>> {
    if let Some(a) = cfg.extra("mlp_only_layers", "").as_ref().and_then(|v| v.as_array()) {
        for e in a {
            ensure!(
                e.as_u64().is_some_and(|i| (i as usize) < cfg.num_layers),
                "{}: mlp_only_layers entry {e} is not a layer index",
                cfg.source
            );
        }
    }
    let n_experts = cfg.extra_usize("num_experts", "")?.unwrap_or(512);
    if n_experts == 0 {
        return Ok(None);
    }
    let sparse = moe::sparse_layers_qwen(cfg, n_experts)?;
    if !sparse.iter().any(|&s| s) {
        return Ok(None);
    }
    let u =
        |k: &str, d: usize| -> Result<usize> { recurrent::sized(cfg, k, cfg.extra_usize(k, "")?, Some(d), MAX_DIM) };
    let spec = MoeSpec {
        n_experts,
        k: u("num_experts_per_tok", 10)?,
        routing: MoeRouting::softmax(cfg.extra_bool("norm_topk_prob", "")?.unwrap_or(true)),
        ffn: u("moe_intermediate_size", 512)?,
        shared_ffn: u("shared_expert_intermediate_size", 512)?,
        sparse,
        act: MoeAct::SwiGlu,
        latent: 0,
    }
    .checked(cfg)?;
    moe::require_shared_gate(w, &spec)?;
    Ok(Some(spec))
}

/// The decoder shape Qwen3-Next and Qwen3.5 share (no MoE): the DeltaNet layers and
/// their shape, partial RoPE on the attention layers, `(1 + w)` norms, gated attention.
pub(crate) fn gdn_decoder_spec(cfg: &ModelConfig) -> Result<DecoderSpec> {
    let layers = linear_layers(cfg)?;
    let u =
        |k: &str, d: usize| -> Result<usize> { recurrent::sized(cfg, k, cfg.extra_usize(k, "")?, Some(d), MAX_DIM) };
    let shape = GdnShape {
        k_heads: u("linear_num_key_heads", 16)?,
        v_heads: u("linear_num_value_heads", 32)?,
        k_dim: u("linear_key_head_dim", 128)?,
        v_dim: u("linear_value_head_dim", 128)?,
    };
    let conv_kernel = recurrent::conv_kernel(
        cfg,
        "linear_conv_kernel_dim",
        cfg.extra_usize("linear_conv_kernel_dim", "")?,
        4,
    )?;
    // Partial RoPE: rope_parameters' factor (where transformers 5 keeps it), else the
    // top-level one, else transformers' default of 0.25.
    let factor = match cfg
        .extra("rope_parameters", "")
        .and_then(|r| r.get("partial_rotary_factor").cloned())
    {
        Some(v) => v.as_f64(),
        None => match cfg.extra("partial_rotary_factor", "") {
            Some(v) => v.as_f64(),
            None => Some(0.25),
        },
    };
    let rot = match factor {
        Some(f) if f > 0.0 && f <= 1.0 => ((cfg.head_dim as f64 * f) as usize) & !1,
        _ => bail!("{}: partial_rotary_factor must be a number in (0, 1]", cfg.source),
    };
    ensure!(
        rot >= 2,
        "{}: partial_rotary_factor rotates no dimension pair",
        cfg.source
    );
    let inv_freq: Vec<f32> = (0..rot / 2)
        .map(|i| (1.0 / cfg.rope_theta.powf((2 * i) as f64 / rot as f64)) as f32)
        .collect();
    Ok(DecoderSpec {
        // llama.cpp's converter stores these norms with the 1 added (the same f32 sum).
        norm: if cfg.llama_cpp {
            NormKind::Rms
        } else {
            NormKind::RmsPlusOne
        },
        qk_norm: QkNorm::PerHead,
        attn_gate: true,
        ropes: vec![inv_freq],
        recurrent: Some(RecurrentSpec {
            layers,
            mixer: MixerSpec::GatedDeltaNet(GdnSpec {
                shape,
                conv_kernel,
                norm_eps: cfg.rms_norm_eps as f32,
            }),
            mlp: vec![true; cfg.num_layers],
            mlp_only: vec![false; cfg.num_layers],
        }),
        ..DecoderSpec::llama(cfg, None)
    })
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    if cfg.is_gguf() {
        // llama.cpp's layout, read as the Hugging Face one (`hybrid_gguf`).
        let (cfg, w) = super::hybrid_gguf::hf_view(cfg, w)?;
        return load(&cfg, &w, dev);
    }
    let moe = moe_spec(cfg, w)?;
    let spec = DecoderSpec {
        moe,
        ..gdn_decoder_spec(cfg)?
    };
    let id = Identity {
        family: FAMILY.name,
        variant: Qwen3Next::NAME,
        defaults: Qwen3Next::default_parameters(),
    };
    decoder::build(cfg, w, dev, spec, id)
}
