//! The decoder stack every dense text family shares: embedding → N blocks of
//! (norm → attention → residual, norm → MLP → residual) → final norm → LM head.
//!
//! A family describes its shape as a `DecoderSpec` (norm kind, where the norms sit,
//! q/k norms, MLP kind, multipliers, soft-caps, per-layer attention window and RoPE
//! table) and this file does the rest, so an optimisation or a fix lands once for every
//! family. Tensor names are GGUF's (`blk.N.attn_q.weight`, see `weights`).

use std::sync::Arc;

use ffai_kernels::backend::{AttnShape, Backend, GraphMode, HeadNorms, HostBytes, RopeParams, StepLayout};

use ffai_kernels::cpu::CpuBackend;
use ffai_kernels::cuda::backend::CudaBackend;

use super::mla::{MlaLayer, MlaScratch, MlaSpec};
use super::moe::{MoeLayer, MoeScratch, MoeSpec};
use super::recurrent::{RecLayer, RecScratch, RecState, RecurrentSpec};
use super::{BatchShape, BatchState, Device, LanguageModel, StepOut};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::GenerationParameters;
use crate::inspect::Tap;
use crate::weights::{WeightEntry, Weights};
use crate::{bail, ensure};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// RMSNorm `x / rms(x) * w`.
    Rms,
    /// Gemma's RMSNorm `x / rms(x) * (1 + w)`: the 1 is folded into the weight at load
    /// (GGUF conversions already stored `1 + w`, so they use `Rms`).
    RmsPlusOne,
    /// LayerNorm with bias.
    Layer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// One norm per head over `head_dim` (Qwen3, Gemma 3).
    PerHead,
    /// One norm over the whole q (or k) projection of a token (OLMo 2).
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mlp {
    /// `down(silu(gate(x)) * up(x))`.
    SwiGlu,
    /// `down(gelu_tanh(gate(x)) * up(x))`.
    GeGlu,
    /// `down(gelu_tanh(up(x) + b) ) + b` (StarCoder 2).
    Gelu,
    /// `down(relu(up(x) + b)^2) + b`, no gate (NemotronH).
    Relu2,
}

/// Where the norms of a block sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormPlacement {
    /// Norm before attention and before the MLP (Llama).
    Pre,
    /// Norm before and after each (Gemma 2/3): `attn_norm`, `post_attention_norm`,
    /// `ffn_norm`, `post_ffw_norm`.
    Sandwich,
    /// Norm only after each, on the branch output (OLMo 2).
    Post,
}

/// One layer's attention: its window (0 = global) and which RoPE table it uses.
#[derive(Clone, Copy, Debug)]
pub struct LayerAttn {
    pub window: usize,
    pub rope: usize,
}

#[derive(Clone, Debug)]
pub struct DecoderSpec {
    pub norm: NormKind,
    pub placement: NormPlacement,
    pub eps: f32,
    pub qk_norm: QkNorm,
    pub mlp: Mlp,
    /// Multiplies the embeddings (Gemma: sqrt(hidden); Granite: embedding_multiplier).
    pub embed_scale: f32,
    /// Multiplies each branch before the residual add (Granite).
    pub residual_scale: f32,
    /// Attention score scale (usually 1/sqrt(head_dim)).
    pub attn_scale: f32,
    pub attn_softcap: f32,
    pub final_softcap: f32,
    /// Multiplies the logits (Granite: 1 / logits_scaling).
    pub logits_scale: f32,
    pub layers: Vec<LayerAttn>,
    /// RoPE inverse-frequency tables, indexed by `LayerAttn::rope`.
    pub ropes: Vec<Vec<f32>>,
    /// LongRoPE: tables used instead of `ropes` when a state's context exceeds the
    /// given length (Phi-3's long factors).
    pub long_ropes: Option<(usize, Vec<Vec<f32>>)>,
    pub rope_neox: bool,
    /// Mixture-of-experts MLPs (see `moe`): which layers are sparse and how they route.
    pub moe: Option<MoeSpec>,
    /// Clamp q, k and v to `±clip_qkv` after their norms (OLMoE's `clip_qkv`); 0 = off.
    pub clip_qkv: f32,
    /// The tensor name (after `blk.N.`) of the norm before the MLP: `ffn_norm`, or
    /// llama.cpp's `post_attention_norm` in its gpt-oss files.
    pub ffn_norm: &'static str,
    /// Multi-head latent attention instead of q/k/v projections (DeepSeek-V2/V3, see
    /// `mla`): the cache holds one latent row per token and layer.
    pub mla: Option<MlaSpec>,
    /// Recurrent mixers (see `recurrent`): which layers use one instead of attention.
    pub recurrent: Option<RecurrentSpec>,
    /// The final norm's tensor name: `output_norm`, or llama.cpp's `token_embd_norm` for
    /// LFM2 (its `embedding_norm`, applied after the last block).
    pub final_norm: &'static str,
    /// Attention output gate (Qwen3-Next): `attn_q` holds per head `[q | gate]`; the
    /// attention's output is multiplied by `sigmoid(gate)` before `attn_output`.
    pub attn_gate: bool,
    /// Layers the recurrent spec marks recurrent run attention AND the recurrent mixer on
    /// the same normed input, their outputs summed (Falcon-H1).
    pub parallel_mixers: bool,
}

impl DecoderSpec {
    /// The plain Llama shape for a config: pre-RMSNorm, SwiGLU, one RoPE table, the
    /// config's sliding window (if any) on every layer.
    pub fn llama(cfg: &ModelConfig, freq_factors: Option<&[f32]>) -> DecoderSpec {
        DecoderSpec {
            norm: NormKind::Rms,
            placement: NormPlacement::Pre,
            eps: cfg.rms_norm_eps as f32,
            qk_norm: QkNorm::None,
            mlp: Mlp::SwiGlu,
            embed_scale: 1.0,
            residual_scale: 1.0,
            // YaRN's attention factor multiplies cos and sin, so q·k by its square.
            attn_scale: (cfg.rope_attention_factor().powi(2) / (cfg.head_dim as f64).sqrt()) as f32,
            attn_softcap: 0.0,
            final_softcap: 0.0,
            logits_scale: 1.0,
            layers: vec![
                LayerAttn {
                    window: cfg.sliding_window.unwrap_or(0),
                    rope: 0
                };
                cfg.num_layers
            ],
            ropes: vec![cfg.rope_inv_freq(freq_factors)],
            long_ropes: None,
            rope_neox: cfg.rope_neox,
            moe: None,
            clip_qkv: 0.0,
            ffn_norm: "ffn_norm",
            mla: None,
            recurrent: None,
            final_norm: "output_norm",
            attn_gate: false,
            parallel_mixers: false,
        }
    }
}

/// Builds the decoder on the given device (the one place a family meets the backends).
pub fn build(
    cfg: &ModelConfig,
    w: &Weights,
    dev: &Device,
    spec: DecoderSpec,
    id: Identity,
) -> Result<Box<dyn LanguageModel>> {
    match dev {
        Device::Cpu(b) => Ok(Box::new(Decoder::<CpuBackend>::load(cfg, w, b.clone(), spec, id)?)),
        Device::Cuda(b) => Ok(Box::new(Decoder::<CudaBackend>::load(cfg, w, b.clone(), spec, id)?)),
    }
}

/// A family's identity as the decoder reports it.
pub struct Identity {
    pub family: &'static str,
    pub variant: &'static str,
    pub defaults: GenerationParameters,
}

struct Norm<B: Backend> {
    w: B::Buf,
    b: Option<B::Buf>,
}

struct Layer<B: Backend> {
    attn_norm: Option<Norm<B>>,
    post_attn_norm: Option<Norm<B>>,
    ffn_norm: Option<Norm<B>>,
    post_ffn_norm: Option<Norm<B>>,
    mixer: Mixer<B>,
    ffn: Ffn<B>,
}

/// A layer's token mixer: attention, a recurrent mixer (see `recurrent`), or none (a
/// block that is only an MLP: NemotronH's `mlp` blocks).
enum Mixer<B: Backend> {
    Attn(AttnLayer<B>),
    Rec(RecLayer<B>),
    /// Both on the same input, outputs summed (`DecoderSpec::parallel_mixers`).
    Both(AttnLayer<B>, RecLayer<B>),
    None,
}

/// An attention mixer: its projections (q/k/v or latent), output projection and extras.
struct AttnLayer<B: Backend> {
    proj: Attn<B>,
    /// The output gate's projection (`DecoderSpec::attn_gate`).
    gate: Option<B::Mat>,
    wo: B::Mat,
    /// q, k, v biases.
    qkv_bias: Option<[B::Buf; 3]>,
    o_bias: Option<B::Buf>,
    q_norm: Option<B::Buf>,
    k_norm: Option<B::Buf>,
    /// Learned attention sinks, one logit per query head (GPT-OSS `attn_sinks`).
    sinks: Option<B::Buf>,
}

/// A layer's attention projections: q/k/v, or multi-head latent attention.
enum Attn<B: Backend> {
    Qkv { wq: B::Mat, wk: B::Mat, wv: B::Mat },
    Mla(MlaLayer<B>),
}

/// A layer's MLP: dense, or a mixture of experts.
enum Ffn<B: Backend> {
    Dense {
        w_gate: Option<B::Mat>,
        w_up: B::Mat,
        w_down: B::Mat,
        up_bias: Option<B::Buf>,
        down_bias: Option<B::Buf>,
    },
    Moe(MoeLayer<B>),
    /// No MLP: the block is the mixer alone (Mamba 2).
    None,
}

pub struct Decoder<B: Backend> {
    b: Arc<B>,
    cfg: ModelConfig,
    spec: DecoderSpec,
    id: Identity,
    embed: B::Mat,
    layers: Vec<Layer<B>>,
    final_norm: Norm<B>,
    /// None when the head is tied to the embedding table.
    lm_head: Option<B::Mat>,
    ropes: Vec<B::Buf>,
    long_ropes: Option<(usize, Vec<B::Buf>)>,
    /// The KV groups' windows, and per layer its group.
    windows: Vec<usize>,
    layer_group: Vec<usize>,
}

/// Activations for `max_rows` rows, the paged K/V pools of every layer and the step's
/// metadata: a [`BatchState`]'s contents, allocated once.
struct Paged<B: Backend> {
    x: B::Buf,
    xn: B::Buf,
    tmp: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    qn: B::Buf,
    kn: B::Buf,
    att: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    /// The MoE layers' scratch (models with experts only).
    moe: Option<MoeScratch<B>>,
    /// The latent attention's scratch (MLA models only).
    mla: Option<MlaScratch<B>>,
    /// The attention output gate's activations (`DecoderSpec::attn_gate`).
    attn_gate: B::Buf,
    /// The recurrent layers' scratch, and per layer its state arrays (recurrent layers
    /// only), `BatchShape::state_slots` slots each.
    rec: Option<RecScratch<B>>,
    rec_state: Vec<Option<RecState<B>>>,
    /// The recurrent mixer's output beside attention's (`DecoderSpec::parallel_mixers`).
    par: B::Buf,
    /// `max_logit_rows` final hidden states gathered for the LM head, and their logits.
    last: B::Buf,
    logits: B::Buf,
    k_pages: Vec<B::Kv>,
    v_pages: Vec<B::Kv>,
    step: B::Step,
    /// Use the long RoPE tables (the longest sequence exceeds the LongRoPE threshold).
    long_rope: bool,
}

/// Steps of at most this many rows are recorded as GPU graphs (one per row count): launch
/// overhead matters in small decode steps; bigger steps are dominated by their products.
const GRAPH_MAX_ROWS: usize = 64;

/// The LM head's input rows of one pass: `rows` of the step's final hidden states `xn`
/// (`h` wide). When they are the step's first rows in order (a decode step wanting every
/// row) the head reads `xn` itself and this returns false; otherwise runs of consecutive
/// rows are copied into `last` (one copy a run) and it returns true.
pub(crate) fn gather_logit_rows<B: Backend>(b: &B, xn: &B::Buf, last: &mut B::Buf, rows: &[u32], h: usize) -> bool {
    if rows.iter().enumerate().all(|(i, &r)| r as usize == i) {
        return false;
    }
    let mut i = 0;
    while i < rows.len() {
        let mut j = i + 1;
        while j < rows.len() && rows[j] == rows[j - 1] + 1 {
            j += 1;
        }
        b.copy(xn, rows[i] as usize * h, last, i * h, (j - i) * h);
        i = j;
    }
    true
}

/// The checks every paged model makes of a step before running it: rows, token ids
/// inside the vocabulary, the layout's KV groups against the model's windows and the
/// batch's pools, the logit rows, and an output sized for them. Shared by the decoder
/// and the model types beside it (`gemma4`).
pub(crate) fn check_step(
    tokens: &[u32],
    layout: &StepLayout,
    logit_rows: &[u32],
    out: &StepOut<'_>,
    vocab: usize,
    windows: &[usize],
    sh: &BatchShape,
) -> Result<()> {
    let n = tokens.len();
    ensure!(n > 0, "a step with no rows");
    ensure!(
        n == layout.positions.len(),
        "{n} tokens for a layout of {} rows",
        layout.positions.len()
    );
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary ({vocab} tokens)");
    }
    ensure!(
        layout.groups.len() == windows.len(),
        "a layout with {} KV groups for a model with {}",
        layout.groups.len(),
        windows.len()
    );
    for (g, gl) in layout.groups.iter().enumerate() {
        ensure!(
            gl.window as usize == windows[g]
                && gl.block_size as usize == sh.block_size
                && gl.n_blocks as usize == sh.group_blocks[g],
            "KV group {g} of the layout (window {}, {} blocks of {}) does not match the batch (window {}, {} blocks of {})",
            gl.window,
            gl.n_blocks,
            gl.block_size,
            windows[g],
            sh.group_blocks[g],
            sh.block_size
        );
    }
    if let Some(&r) = logit_rows.iter().find(|&&r| r as usize >= n) {
        bail!("logits asked for row {r} of a {n}-row step");
    }
    let (want, per_row) = match out {
        StepOut::Logits(l) => (l.len(), vocab),
        StepOut::Argmax(ids) => (ids.len(), 1),
        StepOut::Candidates(c) => {
            let rows = logit_rows.len();
            ensure!(
                (1..=ffai_kernels::ops::MAX_CANDIDATES).contains(&c.k),
                "{} candidates a row (1 to {})",
                c.k,
                ffai_kernels::ops::MAX_CANDIDATES
            );
            let k = c.k;
            ensure!(
                c.plans.len() == rows
                    && c.ids.len() == rows * k
                    && c.vals.len() == rows * k
                    && c.tail.len() == rows
                    && c.full.len() == rows,
                "candidate outputs not sized for {rows} rows of {k}"
            );
            (c.rows.len(), vocab)
        }
    };
    ensure!(
        want == logit_rows.len() * per_row,
        "an output of {want} for {} rows of {per_row}",
        logit_rows.len()
    );
    Ok(())
}

fn rows_of(e: &WeightEntry, first_row: usize, rows: usize, cols: usize) -> Result<HostBytes> {
    let rb = e.ty.row_bytes(cols).ok_or_else(|| Error::new("bad row length"))?;
    let (start, len) = (first_row * rb, rows * rb);
    ensure!(start + len <= e.bytes.len(), "fused tensor too small");
    Ok(e.bytes.slice(start, len))
}

impl<B: Backend> Decoder<B> {
    pub fn load(cfg: &ModelConfig, w: &Weights, b: Arc<B>, spec: DecoderSpec, id: Identity) -> Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        // o_proj's input: the heads' outputs (MLA: H · v_head_dim).
        let attn_out = spec.mla.as_ref().map_or(qd, |m| m.out_dim());
        ensure!(
            spec.layers.len() == cfg.num_layers,
            "decoder spec has the wrong number of layers"
        );
        ensure!(
            spec.layers.iter().all(|l| l.rope < spec.ropes.len()),
            "decoder spec names a missing RoPE table"
        );
        ensure!(
            spec.moe.as_ref().is_none_or(|m| m.sparse.len() == cfg.num_layers),
            "decoder spec has the wrong number of MoE layer flags"
        );
        if let Some(r) = &spec.recurrent {
            super::recurrent::check(cfg, r)?;
        }
        let n_tables = spec.ropes.len();
        ensure!(
            spec.long_ropes.as_ref().is_none_or(|(_, t)| t.len() == n_tables),
            "long RoPE tables must match the short ones"
        );
        for r in spec.ropes.iter().chain(spec.long_ropes.iter().flat_map(|(_, t)| t)) {
            ensure!(
                !r.is_empty() && 2 * r.len() <= cfg.head_dim,
                "RoPE table does not fit head_dim"
            );
        }
        let mat = |name: &str, rows: usize, cols: usize| -> Result<B::Mat> {
            let e = w.matrix(name, rows, cols)?;
            Ok(b.matrix(e.ty, rows, cols, e.bytes.clone()))
        };
        let vec = |name: &str, len: usize| -> Result<B::Buf> { Ok(b.upload(&w.f32_vec(name, len)?)) };
        let opt_vec = |name: &str, len: usize| -> Result<Option<B::Buf>> {
            if w.has(name) {
                vec(name, len).map(Some)
            } else {
                Ok(None)
            }
        };
        let norm = |name: &str, len: usize| -> Result<Norm<B>> {
            let mut wv = w.f32_vec(&format!("{name}.weight"), len)?;
            if spec.norm == NormKind::RmsPlusOne {
                wv.iter_mut().for_each(|x| *x += 1.0);
            }
            let bias = match spec.norm {
                NormKind::Layer => Some(vec(&format!("{name}.bias"), len)?),
                _ => None,
            };
            Ok(Norm {
                w: b.upload(&wv),
                b: bias,
            })
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            let mixer = match &spec.recurrent {
                Some(rs) if rs.mlp_only[i] => Mixer::None,
                Some(rs) if rs.layers[i] && !spec.parallel_mixers => Mixer::Rec(RecLayer::load(&*b, w, i, rs, h)?),
                _ => {
                    // Latent attention, per head [q | gate] rows (Qwen3-Next), fused q/k/v
                    // (Phi-3) or separate projections.
                    let hd = cfg.head_dim;
                    let per_head = |off: usize| -> Vec<(usize, usize)> {
                        (0..cfg.num_heads).map(|hh| (hh * 2 * hd + off, hd)).collect()
                    };
                    let (gate, wq) = if spec.attn_gate {
                        let name = p("attn_q.weight");
                        (
                            Some(super::recurrent::gather_rows(&*b, w, &name, 2 * qd, h, &per_head(hd))?),
                            Some(super::recurrent::gather_rows(&*b, w, &name, 2 * qd, h, &per_head(0))?),
                        )
                    } else {
                        (None, None)
                    };
                    let proj = if let Some(ms) = &spec.mla {
                        Attn::Mla(MlaLayer::load(w, &*b, i, ms, h)?)
                    } else if let Some(wq) = wq {
                        Attn::Qkv {
                            wq,
                            wk: mat(&p("attn_k.weight"), kvd, h)?,
                            wv: mat(&p("attn_v.weight"), kvd, h)?,
                        }
                    } else if w.has(&p("attn_qkv.weight")) {
                        let e = w.matrix(&p("attn_qkv.weight"), qd + 2 * kvd, h)?;
                        Attn::Qkv {
                            wq: b.matrix(e.ty, qd, h, rows_of(e, 0, qd, h)?),
                            wk: b.matrix(e.ty, kvd, h, rows_of(e, qd, kvd, h)?),
                            wv: b.matrix(e.ty, kvd, h, rows_of(e, qd + kvd, kvd, h)?),
                        }
                    } else {
                        Attn::Qkv {
                            wq: mat(&p("attn_q.weight"), qd, h)?,
                            wk: mat(&p("attn_k.weight"), kvd, h)?,
                            wv: mat(&p("attn_v.weight"), kvd, h)?,
                        }
                    };
                    let qkv_bias = if spec.mla.is_none() && w.has(&p("attn_q.bias")) {
                        Some([
                            vec(&p("attn_q.bias"), qd)?,
                            vec(&p("attn_k.bias"), kvd)?,
                            vec(&p("attn_v.bias"), kvd)?,
                        ])
                    } else {
                        None
                    };
                    let (qn_len, kn_len) = match spec.qk_norm {
                        QkNorm::PerHead => (cfg.head_dim, cfg.head_dim),
                        _ => (qd, kvd),
                    };
                    let qk = |name: &str, len: usize| -> Result<Option<B::Buf>> {
                        if spec.qk_norm == QkNorm::None {
                            return Ok(None);
                        }
                        let mut v = w.f32_vec(&p(name), len)?;
                        if spec.norm == NormKind::RmsPlusOne {
                            v.iter_mut().for_each(|x| *x += 1.0);
                        }
                        Ok(Some(b.upload(&v)))
                    };
                    Mixer::Attn(AttnLayer {
                        proj,
                        gate,
                        wo: mat(&p("attn_output.weight"), h, attn_out)?,
                        qkv_bias,
                        o_bias: opt_vec(&p("attn_output.bias"), h)?,
                        q_norm: qk("attn_q_norm.weight", qn_len)?,
                        k_norm: qk("attn_k_norm.weight", kn_len)?,
                        sinks: opt_vec(&p("attn_sinks.weight"), cfg.num_heads)?,
                    })
                }
            };
            let mixer = match (mixer, &spec.recurrent) {
                (Mixer::Attn(a), Some(rs)) if spec.parallel_mixers && rs.layers[i] => {
                    Mixer::Both(a, RecLayer::load(&*b, w, i, rs, h)?)
                }
                (m, _) => m,
            };
            let ffn = match &spec.moe {
                _ if spec.recurrent.as_ref().is_some_and(|r| !r.mlp[i]) => Ffn::None,
                Some(ms) if ms.sparse[i] => Ffn::Moe(MoeLayer::load(w, &*b, i, ms, h)?),
                _ => {
                    // Gated MLPs: separate gate/up, or one fused [2f, h] matrix (Phi-3's gate_up).
                    let (w_gate, w_up) = match spec.mlp {
                        Mlp::Gelu | Mlp::Relu2 => (None, mat(&p("ffn_up.weight"), f, h)?),
                        _ if w.has(&p("ffn_gate.weight")) => {
                            (Some(mat(&p("ffn_gate.weight"), f, h)?), mat(&p("ffn_up.weight"), f, h)?)
                        }
                        _ => {
                            let e = w.matrix(&p("ffn_up.weight"), 2 * f, h)?;
                            (
                                Some(b.matrix(e.ty, f, h, rows_of(e, 0, f, h)?)),
                                b.matrix(e.ty, f, h, rows_of(e, f, f, h)?),
                            )
                        }
                    };
                    Ffn::Dense {
                        w_gate,
                        w_up,
                        w_down: mat(&p("ffn_down.weight"), h, f)?,
                        up_bias: opt_vec(&p("ffn_up.bias"), f)?,
                        down_bias: opt_vec(&p("ffn_down.bias"), h)?,
                    }
                }
            };
            let (pre, post) = match spec.placement {
                NormPlacement::Pre => (true, false),
                NormPlacement::Sandwich => (true, true),
                NormPlacement::Post => (false, true),
            };
            layers.push(Layer {
                attn_norm: if pre && !matches!(mixer, Mixer::None) {
                    Some(norm(&p("attn_norm"), h)?)
                } else {
                    None
                },
                post_attn_norm: if post {
                    Some(norm(&p("post_attention_norm"), h)?)
                } else {
                    None
                },
                ffn_norm: if pre && !matches!(ffn, Ffn::None) {
                    Some(norm(&p(spec.ffn_norm), h)?)
                } else {
                    None
                },
                post_ffn_norm: if post && !matches!(ffn, Ffn::None) {
                    Some(norm(&p("post_ffw_norm"), h)?)
                } else {
                    None
                },
                mixer,
                ffn,
            });
        }
        let lm_head = if w.has("output.weight") && !cfg.tie_word_embeddings {
            Some(mat("output.weight", cfg.vocab_size, h)?)
        } else {
            None
        };
        // KV groups over the attention layers; a model without any still has one (global)
        // group with no layers, so the engine's bookkeeping of positions is the same.
        let mut windows: Vec<usize> = Vec::new();
        let is_rec = |i: usize| {
            spec.recurrent
                .as_ref()
                .is_some_and(|r| (r.layers[i] && !spec.parallel_mixers) || r.mlp_only[i])
        };
        let layer_group = spec
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if is_rec(i) {
                    return 0;
                }
                match windows.iter().position(|&w| w == l.window) {
                    Some(g) => g,
                    None => {
                        windows.push(l.window);
                        windows.len() - 1
                    }
                }
            })
            .collect();
        if windows.is_empty() {
            windows.push(0);
        }
        b.check().map_err(Error::new)?;
        Ok(Decoder {
            windows,
            layer_group,
            embed: mat("token_embd.weight", cfg.vocab_size, h)?,
            final_norm: norm(spec.final_norm, h)?,
            ropes: spec.ropes.iter().map(|r| b.upload(r)).collect(),
            long_ropes: spec
                .long_ropes
                .as_ref()
                .map(|(n, t)| (*n, t.iter().map(|r| b.upload(r)).collect())),
            layers,
            lm_head,
            cfg: cfg.clone(),
            spec,
            id,
            b,
        })
    }

    fn is_recurrent(&self, layer: usize) -> bool {
        matches!(self.layers[layer].mixer, Mixer::Rec(_) | Mixer::Both(..))
    }

    fn is_attention(&self, layer: usize) -> bool {
        matches!(self.layers[layer].mixer, Mixer::Attn(_) | Mixer::Both(..))
    }

    fn shape(&self, layer: usize) -> AttnShape {
        let c = &self.cfg;
        if let Some(m) = &self.spec.mla {
            return AttnShape {
                n_heads: m.n_heads,
                n_kv_heads: 1,
                head_dim: m.key_dim(),
                cap: 0,
                window: self.spec.layers[layer].window,
                scale: self.spec.attn_scale,
                softcap: self.spec.attn_softcap,
            };
        }
        AttnShape {
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            cap: 0,
            window: self.spec.layers[layer].window,
            scale: self.spec.attn_scale,
            softcap: self.spec.attn_softcap,
        }
    }

    fn norm(&self, n: &Norm<B>, x: &B::Buf, rows: usize, out: &mut B::Buf) {
        match &n.b {
            Some(bias) => self.b.layer_norm(x, &n.w, bias, self.spec.eps, rows, out),
            None => self.b.rms_norm(x, &n.w, self.spec.eps, rows, out),
        }
    }

    /// One step's rows through every layer (the step's layout is in `s.step`); leaves the
    /// final-normed hidden states in `s.xn`.
    fn forward_step(&self, ids: &[u32], s: &mut Paged<B>, tap: &mut Tap) {
        let (b, c, sp, n) = (&*self.b, &self.cfg, &self.spec, ids.len());
        let (h, f) = (c.hidden_size, c.intermediate_size);
        b.embed_step(&self.embed, ids, &s.step, &mut s.x);
        if sp.embed_scale != 1.0 {
            b.scale(&mut s.x, sp.embed_scale, n * h);
        }
        tap.boundary(b, &s.x, n * h, "embed", None);
        // Each norm of the residual stream is taken where the stream was last added to
        // (`residual_norm`: one fused op where the backend has it); the first here.
        if let Some(nm) = self.input_norm_from(0) {
            self.norm(nm, &s.x, n, &mut s.xn);
        }
        for (i, l) in self.layers.iter().enumerate() {
            // --- attention or the recurrent mixer ---
            let input = if l.attn_norm.is_some() { &s.xn } else { &s.x };
            tap.linear_input(b, input, n, h, "attn_in", Some(i));
            match &l.mixer {
                Mixer::None => {}
                Mixer::Rec(r) => {
                    let (Some(rs), Some(scratch), Some(state)) = (&sp.recurrent, &mut s.rec, &mut s.rec_state[i])
                    else {
                        unreachable!("a model with recurrent layers allocates their scratch and state")
                    };
                    r.forward(b, rs, input, n, h, scratch, state, &s.step, tap, i, &mut s.tmp);
                }
                Mixer::Attn(a) | Mixer::Both(a, _) => {
                    let tables = match &self.long_ropes {
                        Some((_, long)) if s.long_rope => long,
                        _ => &self.ropes,
                    };
                    let rope = RopeParams {
                        inv_freq: &tables[sp.layers[i].rope],
                        neox: sp.rope_neox,
                    };
                    let (shape, g) = (self.shape(i), self.layer_group[i]);
                    match &a.proj {
                        Attn::Mla(m) => {
                            let (Some(ms), Some(scratch)) = (&sp.mla, &mut s.mla) else {
                                unreachable!("a model with latent attention allocates its scratch")
                            };
                            m.forward(
                                b,
                                ms,
                                input,
                                n,
                                scratch,
                                &mut s.k_pages[i],
                                &s.step,
                                g,
                                &shape,
                                &rope,
                                sp.eps,
                                &mut s.att,
                            );
                        }
                        Attn::Qkv { wq, wk, wv } => {
                            b.matmuls(&[wq, wk, wv], input, n, &mut [&mut s.q, &mut s.k, &mut s.v]);
                            if let Some(gw) = &a.gate {
                                b.matmul(gw, input, n, &mut s.attn_gate);
                            }
                            if let Some([bq, bk, bv]) = &a.qkv_bias {
                                b.add_bias(&mut s.q, bq, n);
                                b.add_bias(&mut s.k, bk, n);
                                b.add_bias(&mut s.v, bv, n);
                            }
                            // Per-head q/k norms straight before RoPE go with it (one
                            // launch on CUDA).
                            let head_norms = match (&a.q_norm, &a.k_norm) {
                                (Some(q), Some(k)) if sp.qk_norm == QkNorm::PerHead && sp.clip_qkv <= 0.0 => {
                                    Some(HeadNorms { q, k, eps: sp.eps })
                                }
                                _ => None,
                            };
                            if let (Some(qn), Some(kn), None) = (&a.q_norm, &a.k_norm, &head_norms) {
                                let (qrows, krows) = match sp.qk_norm {
                                    QkNorm::PerHead => (n * c.num_heads, n * c.num_kv_heads),
                                    _ => (n, n),
                                };
                                b.rms_norm(&s.q, qn, sp.eps, qrows, &mut s.qn);
                                b.rms_norm(&s.k, kn, sp.eps, krows, &mut s.kn);
                                std::mem::swap(&mut s.q, &mut s.qn);
                                std::mem::swap(&mut s.k, &mut s.kn);
                            }
                            if sp.clip_qkv > 0.0 {
                                let (c, qd, kvd) = (sp.clip_qkv, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
                                b.clamp(&mut s.q, -c, c, n * qd);
                                b.clamp(&mut s.k, -c, c, n * kvd);
                                b.clamp(&mut s.v, -c, c, n * kvd);
                            }
                            match &head_norms {
                                Some(norms) => b.qk_norm_rope_kv_write_step(
                                    &mut s.q,
                                    &mut s.k,
                                    &s.v,
                                    norms,
                                    (&mut s.qn, &mut s.kn),
                                    n,
                                    &s.step,
                                    &rope,
                                    &mut s.k_pages[i],
                                    &mut s.v_pages[i],
                                    g,
                                    &shape,
                                ),
                                None => b.rope_kv_write_step(
                                    &mut s.q,
                                    &mut s.k,
                                    &s.v,
                                    n,
                                    &s.step,
                                    &rope,
                                    &mut s.k_pages[i],
                                    &mut s.v_pages[i],
                                    g,
                                    &shape,
                                ),
                            }
                            b.attention_step(
                                &s.q,
                                &s.k_pages[i],
                                &s.v_pages[i],
                                n,
                                &s.step,
                                g,
                                &shape,
                                a.sinks.as_ref(),
                                &mut s.att,
                            );
                            if a.gate.is_some() {
                                b.sigmoid_mul(&mut s.att, &s.attn_gate, n * c.num_heads * c.head_dim);
                            }
                        }
                    }
                    let att_w = sp.mla.as_ref().map_or(c.num_heads * c.head_dim, |m| m.out_dim());
                    tap.linear_input(b, &s.att, n, att_w, "attn_out", Some(i));
                    b.matmul(&a.wo, &s.att, n, &mut s.tmp);
                    if let Some(ob) = &a.o_bias {
                        b.add_bias(&mut s.tmp, ob, n);
                    }
                }
            }
            if let Mixer::Both(_, r) = &l.mixer {
                let (Some(rs), Some(scratch), Some(state)) = (&sp.recurrent, &mut s.rec, &mut s.rec_state[i]) else {
                    unreachable!("a model with recurrent layers allocates their scratch and state")
                };
                let input = if l.attn_norm.is_some() { &s.xn } else { &s.x };
                // An idle tap: the mixer's `out_proj` input would land on the layer's
                // `attn_out` site, which is attention's `o_proj` input here.
                let mut idle = Tap::default();
                r.forward(b, rs, input, n, h, scratch, state, &s.step, &mut idle, i, &mut s.par);
                b.add(&mut s.tmp, &s.par, n * h);
            }
            if !matches!(l.mixer, Mixer::None) {
                let next = self.next_norm(i, true);
                self.residual_norm(l.post_attn_norm.as_ref(), next, s, n);
            }
            if matches!(l.ffn, Ffn::None) {
                tap.boundary(b, &s.x, n * h, "layer_out", Some(i));
                continue;
            }

            // --- MLP ---
            let input = if l.ffn_norm.is_some() { &s.xn } else { &s.x };
            tap.linear_input(b, input, n, h, "ffn_in", Some(i));
            match &l.ffn {
                Ffn::Moe(moe) => {
                    let (Some(ms), Some(scratch)) = (&sp.moe, &mut s.moe) else {
                        unreachable!("a model with MoE layers allocates MoE scratch")
                    };
                    moe.forward(b, ms, input, n, scratch, &mut s.tmp);
                }
                Ffn::None => unreachable!("blocks without an MLP end above"),
                Ffn::Dense {
                    w_gate,
                    w_up,
                    w_down,
                    up_bias,
                    down_bias,
                } => {
                    match (w_gate, sp.mlp) {
                        (Some(g), Mlp::SwiGlu) => {
                            b.matmuls(&[g, w_up], input, n, &mut [&mut s.gate, &mut s.up]);
                            b.silu_mul(&mut s.gate, &s.up, n * f);
                        }
                        (Some(g), Mlp::GeGlu) => {
                            b.matmuls(&[g, w_up], input, n, &mut [&mut s.gate, &mut s.up]);
                            b.gelu_mul(&mut s.gate, &s.up, n * f);
                        }
                        (None, Mlp::Relu2) => {
                            b.matmul(w_up, input, n, &mut s.gate);
                            if let Some(ub) = up_bias {
                                b.add_bias(&mut s.gate, ub, n);
                            }
                            b.relu_sq(&mut s.gate, n * f);
                        }
                        _ => {
                            b.matmul(w_up, input, n, &mut s.gate);
                            if let Some(ub) = up_bias {
                                b.add_bias(&mut s.gate, ub, n);
                            }
                            b.gelu(&mut s.gate, n * f);
                        }
                    }
                    tap.linear_input(b, &s.gate, n, f, "ffn_down_in", Some(i));
                    b.matmul(w_down, &s.gate, n, &mut s.tmp);
                    if let Some(db) = down_bias {
                        b.add_bias(&mut s.tmp, db, n);
                    }
                }
            }
            let next = self.next_norm(i, false);
            self.residual_norm(l.post_ffn_norm.as_ref(), next, s, n);
            tap.boundary(b, &s.x, n * h, "layer_out", Some(i));
        }
        tap.boundary(b, &s.xn, n * h, "final_norm", None);
        tap.linear_input(b, &s.xn, n, h, "head_in", None);
    }

    /// The norm of the residual stream that the next sublayer to run after layer `i`'s
    /// mixer (`after_mixer`) or its MLP takes as input: the MLP's `ffn_norm`, or the first
    /// of a later layer's mixer or MLP that exists (`attn_norm` / `ffn_norm`), or the final
    /// norm after the last layer. `None` where that sublayer takes the stream un-normed.
    fn next_norm(&self, i: usize, after_mixer: bool) -> Option<&Norm<B>> {
        let l = &self.layers[i];
        if after_mixer && !matches!(l.ffn, Ffn::None) {
            return l.ffn_norm.as_ref();
        }
        self.input_norm_from(i + 1)
    }

    /// The input norm of the first sublayer that runs from layer `i` on (a layer without
    /// a mixer starts at its MLP), or the final norm when none does.
    fn input_norm_from(&self, i: usize) -> Option<&Norm<B>> {
        for l in &self.layers[i.min(self.layers.len())..] {
            if !matches!(l.mixer, Mixer::None) {
                return l.attn_norm.as_ref();
            }
            if !matches!(l.ffn, Ffn::None) {
                return l.ffn_norm.as_ref();
            }
        }
        Some(&self.final_norm)
    }

    /// `x += residual_scale * post_norm(tmp)`, then `xn = next(x)` when there is a next
    /// norm: the add and an RMS norm as one op where nothing else comes between.
    fn residual_norm(&self, post: Option<&Norm<B>>, next: Option<&Norm<B>>, s: &mut Paged<B>, n: usize) {
        if let (None, Some(nm)) = (post, next) {
            if nm.b.is_none() && self.spec.residual_scale == 1.0 {
                self.b
                    .add_rms_norm(&mut s.x, &s.tmp, &nm.w, self.spec.eps, n, &mut s.xn);
                return;
            }
        }
        self.residual(post, s, n);
        if let Some(nm) = next {
            self.norm(nm, &s.x, n, &mut s.xn);
        }
    }

    /// `x += residual_scale * post_norm(tmp)` (the norm only where the family has one).
    fn residual(&self, post: Option<&Norm<B>>, s: &mut Paged<B>, n: usize) {
        let (b, h) = (&*self.b, self.cfg.hidden_size);
        let branch = match post {
            Some(nm) => {
                self.norm(nm, &s.tmp, n, &mut s.xn);
                &s.xn
            }
            None => &s.tmp,
        };
        if self.spec.residual_scale == 1.0 {
            b.add(&mut s.x, branch, n * h);
        } else {
            b.add_scaled(&mut s.x, branch, self.spec.residual_scale, n * h);
        }
    }

    /// Cache elements per position and layer: K and V of every KV head, or MLA's one
    /// latent row (`kv_lora_rank + qk_rope_head_dim`).
    fn kv_row_elems(&self) -> usize {
        match &self.spec.mla {
            Some(m) => m.key_dim(),
            None => 2 * self.cfg.num_kv_heads * self.cfg.head_dim,
        }
    }

    /// Bytes of KV cache per layer kind in a one-sequence state of context `max_seq`
    /// and prefill chunk `chunk`: (kind, layers, bytes).
    pub fn kv_bytes(&self, max_seq: usize, chunk: usize) -> Vec<(String, usize, usize)> {
        let bs = super::one_seq::DEFAULT_BLOCK_SIZE;
        let per_row = self.kv_row_elems() * self.b.kv_elem_bytes();
        let mut out: Vec<(String, usize, usize)> = Vec::new();
        for (i, l) in self.spec.layers.iter().enumerate() {
            if !self.is_attention(i) && !self.is_recurrent(i) {
                continue;
            }
            if self.is_recurrent(i) {
                // A fixed-size state per sequence: no rows that grow with the context.
                let bytes = self.spec.recurrent.as_ref().map_or(0, |r| {
                    let (c, s) = r.slot_floats(self.cfg.hidden_size);
                    (c + s) * 4
                });
                match out.iter_mut().find(|e| e.0 == "recurrent state") {
                    Some(e) => {
                        e.1 += 1;
                        e.2 += bytes;
                    }
                    None => out.push(("recurrent state".to_string(), 1, bytes)),
                }
                // A parallel layer (Falcon-H1) has K/V rows as well.
                if !self.is_attention(i) {
                    continue;
                }
            }
            let kind = match l.window {
                0 => "global".to_string(),
                w => format!("window {w}"),
            };
            let rows = super::one_seq::ring_blocks(l.window, max_seq, chunk.clamp(1, max_seq.max(1)), bs) * bs;
            match out.iter_mut().find(|e| e.0 == kind) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += rows * per_row;
                }
                None => out.push((kind, 1, rows * per_row)),
            }
        }
        out
    }
}

impl<B: Backend> LanguageModel for Decoder<B> {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn family(&self) -> &'static str {
        self.id.family
    }

    fn variant(&self) -> &'static str {
        self.id.variant
    }

    fn default_parameters(&self) -> GenerationParameters {
        self.id.defaults.clone()
    }

    fn device_name(&self) -> String {
        self.b.name()
    }

    fn kv_bytes_by_kind(&self, max_seq: usize, chunk: usize) -> Vec<(String, usize, usize)> {
        self.kv_bytes(max_seq, chunk)
    }

    fn kv_windows(&self) -> Vec<usize> {
        self.windows.clone()
    }

    fn recurrent_state(&self) -> Option<super::RecurrentInfo> {
        self.spec.recurrent.as_ref().map(|r| super::RecurrentInfo {
            slot_bytes: r.slot_bytes(self.cfg.hidden_size),
            scan_chunk: r.scan_chunk(),
        })
    }

    fn copy_state_slot(&self, state: &mut BatchState, src: usize, dst: usize) -> Result<()> {
        let Some(r) = &self.spec.recurrent else {
            bail!("the model has no recurrent state");
        };
        let slots = state.shape.state_slots;
        ensure!(src < slots && dst < slots, "state slots {src} -> {dst} of {slots}");
        let s = state
            .inner
            .downcast_mut::<Paged<B>>()
            .ok_or_else(|| Error::new("batch state belongs to a different model"))?;
        for st in s.rec_state.iter_mut().flatten() {
            st.copy_slot(&self.b, r, self.cfg.hidden_size, src, dst);
        }
        self.b.check().map_err(Error::new)
    }

    fn memory_bytes(&self) -> u64 {
        self.b.memory_bytes()
    }

    fn kv_block_bytes(&self, block_size: usize) -> Vec<u64> {
        let per_row = (self.kv_row_elems() * self.b.kv_elem_bytes()) as u64;
        (0..self.windows.len())
            .map(|g| {
                let layers = (0..self.layers.len())
                    .filter(|&i| self.layer_group[i] == g && self.is_attention(i))
                    .count() as u64;
                layers * per_row * block_size as u64
            })
            .collect()
    }

    fn new_batch(&self, shape: &BatchShape) -> Result<BatchState> {
        let c = &self.cfg;
        let sh = shape;
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
        let b = &*self.b;
        // MLA models use no q/k/v buffers: their scratch is `MlaScratch`'s.
        let (qd, kvd) = match &self.spec.mla {
            Some(_) => (0, 0),
            None => (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim),
        };
        let att_w = self.spec.mla.as_ref().map_or(qd, |m| m.out_dim());
        let logit_rows = sh.max_logit_rows.min(sh.max_rows.max(sh.max_seqs));
        // The dense MLP's scratch, unless every layer is a mixture of experts.
        let dense_ffn = match &self.spec.moe {
            Some(m) if m.sparse.iter().all(|&s| s) => 0,
            _ => c.intermediate_size,
        };
        // What this batch will take, in checked arithmetic, refused before anything is
        // allocated when it exceeds the backend's memory (a context, pool size or batch
        // from a config or the command line can imply terabytes).
        let bytes = (|| -> Option<u64> {
            let moe_row = match &self.spec.moe {
                Some(ms) => ms.floats_per_row(c.hidden_size)?,
                None => 0,
            };
            let mla_row = match &self.spec.mla {
                Some(m) => m.floats_per_row()?,
                None => 0,
            };
            let rec_row = self
                .spec
                .recurrent
                .as_ref()
                .map_or(0, |r| r.scratch_per_row(c.hidden_size));
            let gate_row = if self.spec.attn_gate { qd } else { 0 };
            let par_row = if self.spec.parallel_mixers { c.hidden_size } else { 0 };
            let per_row = [
                3 * c.hidden_size,
                3 * qd,
                3 * kvd,
                2 * dense_ffn,
                moe_row,
                mla_row,
                att_w,
                rec_row,
                gate_row,
                par_row,
            ]
            .iter()
            .try_fold(0u64, |a, &x| a.checked_add(x as u64))?;
            let acts = per_row
                .checked_mul(sh.max_rows as u64)?
                .checked_add((logit_rows as u64).checked_mul((c.hidden_size + c.vocab_size) as u64)?)?
                .checked_mul(4)?;
            let per_block = self.kv_block_bytes(sh.block_size);
            let kv = sh
                .group_blocks
                .iter()
                .zip(&per_block)
                .try_fold(0u64, |a, (&n, &pb)| a.checked_add((n as u64).checked_mul(pb)?))?;
            let state = match &self.spec.recurrent {
                Some(r) => r.slot_bytes(c.hidden_size).checked_mul(sh.state_slots as u64)?,
                None => 0,
            };
            acts.checked_add(kv)?.checked_add(state)
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
        let (hd, kvh) = (c.head_dim, c.num_kv_heads);
        ensure!(
            self.spec.recurrent.is_none() || sh.state_slots > 0,
            "a batch of a model with recurrent layers needs at least one state slot"
        );
        // MLA: one pool per layer of one latent row per position (no V pools). Recurrent
        // layers hold no K/V: an empty pool keeps the per-layer indexing.
        let (kv_heads, kv_dim) = match &self.spec.mla {
            Some(m) => (1, m.key_dim()),
            None => (kvh, hd),
        };
        let pages = |b: &B, v: bool| -> Vec<B::Kv> {
            if v && self.spec.mla.is_some() {
                return Vec::new();
            }
            (0..self.layers.len())
                .map(|i| {
                    let blocks = if self.is_attention(i) {
                        sh.group_blocks[self.layer_group[i]]
                    } else {
                        0
                    };
                    b.alloc_kv_pages(blocks, sh.block_size, kv_heads, kv_dim)
                })
                .collect()
        };
        let rows = sh.max_rows;
        let paged = Paged::<B> {
            x: b.alloc(rows * c.hidden_size),
            xn: b.alloc(rows * c.hidden_size),
            tmp: b.alloc(rows * c.hidden_size),
            q: b.alloc(rows * qd),
            k: b.alloc(rows * kvd),
            v: b.alloc(rows * kvd),
            qn: b.alloc(rows * qd),
            kn: b.alloc(rows * kvd),
            att: b.alloc(rows * att_w),
            gate: b.alloc(rows * dense_ffn),
            up: b.alloc(rows * dense_ffn),
            moe: self
                .spec
                .moe
                .as_ref()
                .map(|ms| MoeScratch::new(b, ms, c.hidden_size, rows)),
            mla: self.spec.mla.as_ref().map(|ms| MlaScratch::new(b, ms, rows)),
            attn_gate: b.alloc(if self.spec.attn_gate { rows * qd } else { 0 }),
            par: b.alloc(if self.spec.parallel_mixers {
                rows * c.hidden_size
            } else {
                0
            }),
            rec: self
                .spec
                .recurrent
                .as_ref()
                .map(|r| RecScratch::new(b, r, c.hidden_size, rows)),
            rec_state: (0..self.layers.len())
                .map(|i| match &self.spec.recurrent {
                    Some(r) if self.is_recurrent(i) => Some(RecState::new(b, r, c.hidden_size, sh.state_slots)),
                    _ => None,
                })
                .collect(),
            last: b.alloc(logit_rows * c.hidden_size),
            logits: b.alloc(logit_rows * c.vocab_size),
            k_pages: pages(b, false),
            v_pages: pages(b, true),
            step: b.new_step(rows, sh.max_seqs, sh.max_table, self.windows.len()),
            long_rope: self
                .long_ropes
                .as_ref()
                .is_some_and(|(threshold, _)| sh.max_seq_len > *threshold),
        };
        b.check().map_err(Error::new)?;
        Ok(BatchState {
            shape: BatchShape {
                max_logit_rows: logit_rows,
                ..shape.clone()
            },
            inner: Box::new(paged),
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
        let n = tokens.len();
        let sh = &state.shape;
        check_step(tokens, layout, logit_rows, &out, vocab, &self.windows, sh)?;
        if self.spec.recurrent.is_some() {
            ensure!(
                !layout.state_slots.is_empty() && layout.n_state_slots as usize == sh.state_slots,
                "a step of a model with recurrent layers needs each sequence's state slot (of the batch's {})",
                sh.state_slots
            );
        }
        let per_pass = sh.max_logit_rows;
        let b = &*self.b;
        let sp = &self.spec;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let s = state
            .inner
            .downcast_mut::<Paged<B>>()
            .ok_or_else(|| Error::new("batch state belongs to a different model"))?;
        b.write_step(layout, &mut s.step)
            .map_err(|e| Error::new(format!("bad step layout: {e}")))?;
        b.write_step_tokens(tokens, &mut s.step).map_err(Error::new)?;
        // The layers as one recorded graph on a GPU, keyed by what their launches depend
        // on (the rows; the step's metadata is read from its buffers); never while taps
        // read activations.
        // MoE layers route and gather on the device (CUDA: up to 64 rows, the most a
        // recording takes; a backend op that must read back instead breaks the capture
        // and the step runs eagerly).
        // Recurrent layers' grids depend on the number of sequences: not recorded.
        let key = (!tap.is_active() && n <= GRAPH_MAX_ROWS && sp.recurrent.is_none())
            .then_some((n as u64) << 1 | s.long_rope as u64);
        let mode = b.begin_graph(&mut s.step, key);
        if mode != GraphMode::Replay {
            self.forward_step(tokens, s, tap);
        }
        if !b.end_graph(&mut s.step, mode) {
            self.forward_step(tokens, s, tap);
        }
        // The LM head over the wanted rows only, gathered `per_pass` at a time (each row's
        // logits are the same whichever rows share its pass).
        for (pi, rows) in logit_rows.chunks(per_pass).enumerate() {
            let m = rows.len();
            let src = if gather_logit_rows(b, &s.xn, &mut s.last, rows, h) {
                &s.last
            } else {
                &s.xn
            };
            b.matmul(head, src, m, &mut s.logits);
            if sp.logits_scale != 1.0 {
                b.scale(&mut s.logits, sp.logits_scale, m * vocab);
            }
            if sp.final_softcap > 0.0 {
                b.softcap(&mut s.logits, sp.final_softcap, m * vocab);
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
