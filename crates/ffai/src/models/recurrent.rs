//! The recurrent token mixers hybrid and state-space families share, in place of attention
//! in some (or all) layers of the shared decoder: LFM2's gated short convolution, the
//! Mamba 2 selective state-space mixer, Qwen3-Next's and Qwen3.5's gated DeltaNet, and
//! Jamba's Mamba 1 mixer (run on the Mamba 2 scan op). A family fills
//! `DecoderSpec::recurrent` with a [`RecurrentSpec`] (which layers are recurrent, the
//! mixer's shape, whether blocks have an MLP); the decoder runs [`RecLayer::forward`] on
//! those layers and keeps each layer's state in fixed arrays of per-sequence slots
//! ([`RecState`]), next to the paged K/V pools.
//!
//! Where a sequence's state lives: slot `StepLayout::state_slots[seq]` of every recurrent
//! layer's arrays (the engine's `KvPool` hands out slots at admission; a lone sequence uses
//! slot 0). A sequence whose first row is at position 0 starts from zeros, so a new or
//! recomputed (preempted) sequence needs no reset. Tensor names are llama.cpp's
//! (`blk.N.shortconv.*`, `blk.N.ssm_*`); [`hf_name`] maps Hugging Face names to them.

use ffai_kernels::backend::{Backend, HostBytes};
use ffai_kernels::ssm::{GdnShape, SsmShape, MAX_CONV_KERNEL, MAX_GDN_KEY_DIM};

use crate::config::{ModelConfig, MAX_DIM};
use crate::error::{Error, Result};
use crate::inspect::Tap;
use crate::weights::Weights;
use crate::{bail, ensure};

/// The recurrent mixer of a family.
#[derive(Clone, Debug)]
pub enum MixerSpec {
    /// LFM2: `B, C, x = in_proj(h)`; `y = C * conv(B * x)` (causal depthwise, `kernel`
    /// taps); `out_proj(y)`. Biases where the checkpoint has them.
    ShortConv { kernel: usize },
    /// Mamba 2: `z, xBC, dt = in_proj(h)`; `xBC = silu(conv(xBC))`; the scan over
    /// `x, B, C` with `dt`; `y = gated_rmsnorm(y, z)`; `out_proj(y)`.
    Mamba2(Mamba2Spec),
    /// Qwen3-Next's gated DeltaNet: `q, k, v, z = in_proj_qkvz(h)`, `b, a = in_proj_ba(h)`;
    /// `qkv = silu(conv(qkv))`; the gated delta rule; `y = w * rmsnorm(y) * silu(z)` per
    /// value head; `out_proj(y)`.
    GatedDeltaNet(GdnSpec),
    /// Mamba 1 (Jamba): `x, z = in_proj(h)`; `x = silu(conv(x))`; `dt, B, C = x_proj(x)`,
    /// each RMS-normed; `dt = dt_proj(dt)`; per channel `S = exp(dt A) S + dt x Bᵀ`,
    /// `y = S C + D x`; `out_proj(y · silu(z))`. See [`Mamba1Spec`].
    Mamba1(Mamba1Spec),
}

/// Mamba 1's shape. Its scan (a state of `state` per channel, `A` per channel and state
/// element) runs on the Mamba 2 scan op as `state · d_inner` heads of one channel and a
/// state of one, head `j · d_inner + c` being channel `c`'s state element `j` (group `j`
/// reads `B_j` and `C_j`); `x` and `dt` are repeated per state element, `D` is kept on
/// element 0 only, and the heads' outputs are summed per channel (`moe_combine`).
#[derive(Clone, Debug)]
pub struct Mamba1Spec {
    pub d_inner: usize,
    pub state: usize,
    pub dt_rank: usize,
    pub conv_kernel: usize,
    /// Rows of the chunked scan the Mamba 2 op runs (1: the one-step recurrence on every
    /// row, exact whatever the cuts; more: cut-invariant up to rounding).
    pub chunk: usize,
    /// The dt/B/C RMSNorms' epsilon.
    pub norm_eps: f32,
}

impl Mamba1Spec {
    /// The Mamba 2 scan shape that runs it.
    pub fn scan(&self) -> SsmShape {
        SsmShape {
            heads: self.state * self.d_inner,
            head_dim: 1,
            groups: self.state,
            state: 1,
            chunk: self.chunk,
            dt_min: 0.0,
            dt_max: f32::INFINITY,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GdnSpec {
    pub shape: GdnShape,
    pub conv_kernel: usize,
    pub norm_eps: f32,
}

#[derive(Clone, Debug)]
pub struct Mamba2Spec {
    pub scan: SsmShape,
    pub conv_kernel: usize,
    /// Elements per group of the gated RMSNorm (the whole `heads * head_dim` in
    /// transformers; `heads * head_dim / n_groups` in mamba_ssm and llama.cpp).
    pub norm_group: usize,
    pub norm_eps: f32,
    /// How the scan's output meets the gate `z`.
    pub gate: Mamba2Gate,
}

/// How a Mamba 2 mixer combines the scan's output `y` with its gate `z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mamba2Gate {
    /// `w · rmsnorm(y · silu(z))` (Mamba 2, NemotronH, Granite 4).
    GateThenNorm,
    /// `w · rmsnorm(y) · silu(z)` (Falcon-H1 with `mamba_rms_norm` and
    /// `mamba_norm_before_gate`).
    NormThenGate,
    /// `y · silu(z)`, no norm (Falcon-H1 without `mamba_rms_norm`).
    GateOnly,
}

impl Mamba2Spec {
    fn d_inner(&self) -> usize {
        self.scan.heads * self.scan.head_dim
    }

    fn conv_dim(&self) -> usize {
        self.scan.row_width()
    }
}

#[derive(Clone, Debug)]
pub struct RecurrentSpec {
    /// Per layer: a recurrent mixer (true) or attention.
    pub layers: Vec<bool>,
    pub mixer: MixerSpec,
    /// Per layer: whether the block has an MLP after its mixer (Mamba 2's do not).
    pub mlp: Vec<bool>,
    /// Per layer: a block with no token mixer, only its MLP (NemotronH's `mlp` blocks;
    /// `layers` is false there).
    pub mlp_only: Vec<bool>,
}

impl RecurrentSpec {
    /// Floats of one sequence's state in one recurrent layer: (conv, scan).
    pub fn slot_floats(&self, hidden: usize) -> (usize, usize) {
        match &self.mixer {
            MixerSpec::ShortConv { kernel } => ((kernel - 1) * hidden, 0),
            MixerSpec::Mamba2(m) => ((m.conv_kernel - 1) * m.conv_dim(), m.scan.slot_len()),
            MixerSpec::Mamba1(m) => ((m.conv_kernel - 1) * m.d_inner, m.scan().slot_len()),
            MixerSpec::GatedDeltaNet(g) => ((g.conv_kernel - 1) * g.shape.row_width(), g.shape.slot_len()),
        }
    }

    /// Bytes of one sequence's state over every recurrent layer.
    pub fn slot_bytes(&self, hidden: usize) -> u64 {
        let (c, s) = self.slot_floats(hidden);
        let layers = self
            .layers
            .iter()
            .zip(&self.mlp_only)
            .filter(|&(&r, &m)| r && !m)
            .count() as u64;
        (c as u64 + s as u64) * 4 * layers
    }

    /// Scratch floats a recurrent layer needs per row.
    pub fn scratch_per_row(&self, hidden: usize) -> usize {
        match &self.mixer {
            MixerSpec::ShortConv { .. } => 5 * hidden,
            MixerSpec::Mamba2(m) => 2 * m.d_inner() + 2 * m.conv_dim() + m.scan.heads,
            MixerSpec::Mamba1(m) => {
                let (sd, w) = (m.state * m.d_inner, m.scan().row_width());
                // An upper bound of `RecScratch`'s buffers for Mamba 1.
                sd.max(m.dt_rank) + 3 * m.d_inner.max(m.state) + m.dt_rank.max(m.state) + m.state + w + sd + m.state
            }
            MixerSpec::GatedDeltaNet(g) => {
                let (w, vd) = (g.shape.row_width(), g.shape.v_heads * g.shape.v_dim);
                2 * w + 2 * vd + 2 * g.shape.v_heads
            }
        }
    }

    /// Rows of the chunked scan (0: none; the convolutions are cut-invariant).
    pub fn scan_chunk(&self) -> usize {
        match &self.mixer {
            MixerSpec::ShortConv { .. } => 0,
            MixerSpec::Mamba2(m) => m.scan.chunk,
            // In pieces of one row the scan is its recurrence on every row: cut-invariant.
            MixerSpec::Mamba1(m) if m.chunk == 1 => 0,
            MixerSpec::Mamba1(m) => m.chunk,
            // The delta rule runs its recurrence on every row: cut-invariant.
            MixerSpec::GatedDeltaNet(_) => 0,
        }
    }
}

/// Whether a `layer_types` entry names a recurrent mixer (true) or attention (false):
/// transformers 5's names and the spellings released configs use.
pub fn layer_type_is_recurrent(kind: &str) -> Result<bool> {
    match kind {
        "full_attention" | "attention" | "attn" | "global_attention" => Ok(false),
        "conv" | "short_conv" | "linear_attention" | "mamba" | "mamba2" | "ssm" | "recurrent" => Ok(true),
        other => bail!("layer_types entry \"{other}\" is not an attention or recurrent layer ffai knows"),
    }
}

/// The config's `layer_types` as recurrent flags (`num_layers` entries), or `None` when
/// it has none.
pub fn layer_types(cfg: &ModelConfig) -> Result<Option<Vec<bool>>> {
    let Some(v) = cfg.extra("layer_types", "layer_types") else {
        return Ok(None);
    };
    let list = v
        .as_array()
        .ok_or_else(|| Error::new(format!("{}: layer_types is not a list", cfg.source)))?;
    ensure!(
        list.len() == cfg.num_layers,
        "{}: layer_types has {} entries for {} layers",
        cfg.source,
        list.len(),
        cfg.num_layers
    );
    list.iter()
        .map(|e| {
            let s = e
                .as_str()
                .ok_or_else(|| Error::new(format!("{}: layer_types entry {e} is not a string", cfg.source)))?;
            layer_type_is_recurrent(s)
        })
        .collect::<Result<Vec<bool>>>()
        .map(Some)
}

/// A config number that sizes something: present, positive and at most `max`.
pub(crate) fn sized(
    cfg: &ModelConfig,
    key: &str,
    value: Option<usize>,
    default: Option<usize>,
    max: usize,
) -> Result<usize> {
    let v = match value.or(default) {
        Some(v) => v,
        None => bail!("{}: {key} is missing", cfg.source),
    };
    ensure!(v > 0 && v <= max, "{}: {key} = {v} must be in 1..={max}", cfg.source);
    Ok(v)
}

/// A convolution kernel size from a config, within what the backends take.
pub(crate) fn conv_kernel(cfg: &ModelConfig, key: &str, value: Option<usize>, default: usize) -> Result<usize> {
    sized(cfg, key, value, Some(default), MAX_CONV_KERNEL)
}

/// Checks the mixer's numbers against each other and the limits before anything is sized
/// by them.
pub fn check(cfg: &ModelConfig, spec: &RecurrentSpec) -> Result<()> {
    ensure!(
        spec.layers.len() == cfg.num_layers
            && spec.mlp.len() == cfg.num_layers
            && spec.mlp_only.len() == cfg.num_layers,
        "{}: {} recurrent-layer flags for {} layers",
        cfg.source,
        spec.layers.len(),
        cfg.num_layers
    );
    ensure!(
        (0..cfg.num_layers).all(|i| !spec.mlp_only[i] || (spec.mlp[i] && !spec.layers[i])),
        "{}: an MLP-only block must have an MLP and no mixer",
        cfg.source
    );
    match &spec.mixer {
        MixerSpec::ShortConv { kernel } => {
            ensure!(
                (1..=MAX_CONV_KERNEL).contains(kernel),
                "{}: conv kernel {kernel}",
                cfg.source
            )
        }
        MixerSpec::GatedDeltaNet(g) => {
            let s = &g.shape;
            ensure!(
                (1..=MAX_CONV_KERNEL).contains(&g.conv_kernel),
                "{}: linear_conv_kernel_dim = {} must be in 1..={MAX_CONV_KERNEL}",
                cfg.source,
                g.conv_kernel
            );
            for (k, v, max) in [
                ("linear_num_key_heads", s.k_heads, MAX_DIM),
                ("linear_num_value_heads", s.v_heads, MAX_DIM),
                ("linear_key_head_dim", s.k_dim, MAX_GDN_KEY_DIM),
                ("linear_value_head_dim", s.v_dim, MAX_DIM),
            ] {
                ensure!(v > 0 && v <= max, "{}: {k} = {v} must be in 1..={max}", cfg.source);
            }
            ensure!(
                s.v_heads.is_multiple_of(s.k_heads),
                "{}: linear_num_value_heads {} is not a multiple of linear_num_key_heads {}",
                cfg.source,
                s.v_heads,
                s.k_heads
            );
            let fits = (|| {
                let w = s
                    .k_heads
                    .checked_mul(s.k_dim)?
                    .checked_mul(2)?
                    .checked_add(s.v_heads.checked_mul(s.v_dim)?)?;
                let slot = s.v_heads.checked_mul(s.k_dim)?.checked_mul(s.v_dim)?;
                Some(w <= MAX_DIM && slot <= MAX_DIM * 64)
            })();
            ensure!(
                fits == Some(true),
                "{}: a gated DeltaNet of {} x {} key and {} x {} value heads exceeds the limit of {MAX_DIM}",
                cfg.source,
                s.k_heads,
                s.k_dim,
                s.v_heads,
                s.v_dim
            );
            ensure!(
                g.norm_eps >= 0.0 && g.norm_eps.is_finite(),
                "{}: the norm epsilon must be a non-negative finite number",
                cfg.source
            );
        }
        MixerSpec::Mamba1(m) => {
            ensure!(
                (1..=MAX_CONV_KERNEL).contains(&m.conv_kernel),
                "{}: mamba_d_conv = {} must be in 1..={MAX_CONV_KERNEL}",
                cfg.source,
                m.conv_kernel
            );
            for (k, v) in [
                ("the inner width", m.d_inner),
                ("mamba_d_state", m.state),
                ("mamba_dt_rank", m.dt_rank),
                ("the scan chunk", m.chunk),
            ] {
                ensure!(
                    v > 0 && v <= MAX_DIM,
                    "{}: {k} = {v} must be in 1..={MAX_DIM}",
                    cfg.source
                );
            }
            let fits = m
                .state
                .checked_mul(m.d_inner)
                .and_then(|x| x.checked_add(2 * m.state))
                .is_some_and(|w| w <= MAX_DIM);
            ensure!(
                fits,
                "{}: a Mamba mixer of {} channels with a state of {} exceeds the limit of {MAX_DIM}",
                cfg.source,
                m.d_inner,
                m.state
            );
            ensure!(
                m.norm_eps >= 0.0 && m.norm_eps.is_finite(),
                "{}: the norm epsilon must be a non-negative finite number",
                cfg.source
            );
        }
        MixerSpec::Mamba2(m) => {
            let s = &m.scan;
            ensure!(
                (1..=MAX_CONV_KERNEL).contains(&m.conv_kernel),
                "{}: conv_kernel = {} must be in 1..={MAX_CONV_KERNEL}",
                cfg.source,
                m.conv_kernel
            );
            for (k, v) in [
                ("num_heads", s.heads),
                ("head_dim", s.head_dim),
                ("n_groups", s.groups),
                ("state_size", s.state),
                ("chunk_size", s.chunk),
            ] {
                ensure!(
                    v > 0 && v <= MAX_DIM,
                    "{}: {k} = {v} must be in 1..={MAX_DIM}",
                    cfg.source
                );
            }
            ensure!(
                s.heads.is_multiple_of(s.groups),
                "{}: the scan's {} heads are not a multiple of its {} groups (n_groups)",
                cfg.source,
                s.heads,
                s.groups
            );
            // Every width the mixer allocates, in checked arithmetic, within MAX_DIM.
            let widths = (|| {
                let d_inner = s.heads.checked_mul(s.head_dim)?;
                let conv = s.groups.checked_mul(s.state)?.checked_mul(2)?.checked_add(d_inner)?;
                let slot = d_inner.checked_mul(s.state)?;
                Some((d_inner, conv, slot))
            })();
            match widths {
                Some((d, c, slot)) if d <= MAX_DIM && c <= MAX_DIM && slot <= MAX_DIM * 64 => {
                    ensure!(
                        m.norm_group > 0 && d.is_multiple_of(m.norm_group),
                        "{}: gated norm groups of {} do not divide {d}",
                        cfg.source,
                        m.norm_group
                    );
                }
                _ => bail!(
                    "{}: a Mamba 2 mixer of {} heads of {} with {} groups of state {} exceeds the limit of {MAX_DIM}",
                    cfg.source,
                    s.heads,
                    s.head_dim,
                    s.groups,
                    s.state
                ),
            }
            ensure!(
                s.dt_min >= 0.0 && s.dt_min <= s.dt_max && !s.dt_max.is_nan(),
                "{}: time_step_limit ({}, {}) is not a range of non-negative numbers",
                cfg.source,
                s.dt_min,
                s.dt_max
            );
            ensure!(
                m.norm_eps >= 0.0 && m.norm_eps.is_finite(),
                "{}: the norm epsilon must be a non-negative finite number",
                cfg.source
            );
        }
    }
    Ok(())
}

/// llama.cpp's names for the recurrent families' Hugging Face tensors (LFM2:
/// `model.layers.N.conv.*`, `operator_norm`, `feed_forward.w1/w3/w2`, `embedding_norm`;
/// Mamba 2: `backbone.*`). `A_log` becomes `ssm_a_log` (llama.cpp stores `ssm_a =
/// -exp(A_log)`; the loader takes either).
pub fn hf_name(name: &str, model_type: &str) -> Option<String> {
    match model_type {
        "lfm2" | "lfm2_moe" => {
            match name {
                "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
                "model.embedding_norm.weight" => return Some("token_embd_norm.weight".into()),
                _ => {}
            }
            let (idx, tail) = name.strip_prefix("model.layers.")?.split_once('.')?;
            idx.parse::<usize>().ok()?;
            // LFM2-MoE's sparse blocks: the router, its choice bias, the experts (one
            // w1/w3/w2 per expert as released, or transformers' fused tensors).
            if let Some(rest) = tail.strip_prefix("feed_forward.experts.") {
                return expert_name(idx, rest, &[("w1.", "gate"), ("w3.", "up"), ("w2.", "down")]);
            }
            if tail == "feed_forward.expert_bias" {
                return Some(format!("blk.{idx}.exp_probs_b.bias"));
            }
            let parts = [
                ("feed_forward.gate.", "ffn_gate_inp."),
                ("operator_norm.", "attn_norm."),
                ("ffn_norm.", "ffn_norm."),
                ("conv.in_proj.", "shortconv.in_proj."),
                ("conv.out_proj.", "shortconv.out_proj."),
                ("conv.conv.", "shortconv.conv."),
                ("self_attn.q_proj.", "attn_q."),
                ("self_attn.k_proj.", "attn_k."),
                ("self_attn.v_proj.", "attn_v."),
                ("self_attn.out_proj.", "attn_output."),
                ("self_attn.q_layernorm.", "attn_q_norm."),
                ("self_attn.k_layernorm.", "attn_k_norm."),
                ("feed_forward.w1.", "ffn_gate."),
                ("feed_forward.w3.", "ffn_up."),
                ("feed_forward.w2.", "ffn_down."),
            ];
            parts
                .iter()
                .find_map(|(hf, gg)| tail.strip_prefix(hf).map(|s| format!("blk.{idx}.{gg}{s}")))
        }
        "granitemoehybrid" => {
            let (idx, tail) = name.strip_prefix("model.layers.")?.split_once('.')?;
            idx.parse::<usize>().ok()?;
            let t = match tail {
                // The MoE block as released (ParallelExperts: input_linear [E, 2f, h] gate
                // rows first, output_linear [E, h, f], router.layer) or as transformers 5
                // names it.
                "block_sparse_moe.router.layer.weight" | "block_sparse_moe.router.weight" => "ffn_gate_inp.weight",
                "block_sparse_moe.input_linear.weight" | "block_sparse_moe.experts.gate_up_proj" => {
                    "ffn_gate_up_exps.weight"
                }
                "block_sparse_moe.output_linear.weight" | "block_sparse_moe.experts.down_proj" => {
                    "ffn_down_exps.weight"
                }
                "mamba.in_proj.weight" => "ssm_in.weight",
                "mamba.in_proj.bias" => "ssm_in.bias",
                "mamba.conv1d.weight" => "ssm_conv1d.weight",
                "mamba.conv1d.bias" => "ssm_conv1d.bias",
                "mamba.dt_bias" => "ssm_dt.bias",
                "mamba.A_log" => "ssm_a_log",
                "mamba.D" => "ssm_d",
                "mamba.norm.weight" => "ssm_norm.weight",
                "mamba.out_proj.weight" => "ssm_out.weight",
                "mamba.out_proj.bias" => "ssm_out.bias",
                // The fused [gate; up] and down of the shared MLP.
                "shared_mlp.input_linear.weight" => "ffn_up.weight",
                "shared_mlp.output_linear.weight" => "ffn_down.weight",
                // Everything else is named as Llama's.
                _ => return None,
            };
            Some(format!("blk.{idx}.{t}"))
        }
        "mamba2" | "nemotron_h" => {
            match name {
                "backbone.embeddings.weight" | "backbone.embedding.weight" => return Some("token_embd.weight".into()),
                "backbone.norm_f.weight" => return Some("output_norm.weight".into()),
                "lm_head.weight" => return Some("output.weight".into()),
                _ => {}
            }
            let (idx, tail) = name.strip_prefix("backbone.layers.")?.split_once('.')?;
            idx.parse::<usize>().ok()?;
            // NemotronH's MoE blocks: non-gated experts (up/down per expert as released, or
            // stacked), the router with its correction bias, the shared experts.
            if let Some(rest) = tail.strip_prefix("mixer.experts.") {
                return expert_name(idx, rest, &[("up_proj.", "up"), ("down_proj.", "down")]);
            }
            let t = match tail {
                "mixer.gate.weight" => "ffn_gate_inp.weight",
                "mixer.gate.e_score_correction_bias" => "exp_probs_b.bias",
                "mixer.shared_experts.up_proj.weight" => "ffn_up_shexp.weight",
                "mixer.shared_experts.down_proj.weight" => "ffn_down_shexp.weight",
                // Nemotron 3 Super's latent space for the routed experts (llama.cpp's names).
                "mixer.fc1_latent_proj.weight" => "ffn_latent_down.weight",
                "mixer.fc2_latent_proj.weight" => "ffn_latent_up.weight",
                "norm.weight" => "attn_norm.weight",
                "mixer.in_proj.weight" => "ssm_in.weight",
                "mixer.in_proj.bias" => "ssm_in.bias",
                "mixer.conv1d.weight" => "ssm_conv1d.weight",
                "mixer.conv1d.bias" => "ssm_conv1d.bias",
                "mixer.dt_bias" => "ssm_dt.bias",
                "mixer.A_log" => "ssm_a_log",
                "mixer.D" => "ssm_d",
                "mixer.norm.weight" => "ssm_norm.weight",
                "mixer.out_proj.weight" => "ssm_out.weight",
                "mixer.out_proj.bias" => "ssm_out.bias",
                // NemotronH's attention and MLP blocks.
                "mixer.q_proj.weight" => "attn_q.weight",
                "mixer.k_proj.weight" => "attn_k.weight",
                "mixer.v_proj.weight" => "attn_v.weight",
                "mixer.o_proj.weight" => "attn_output.weight",
                "mixer.up_proj.weight" => "ffn_up.weight",
                "mixer.up_proj.bias" => "ffn_up.bias",
                "mixer.down_proj.weight" => "ffn_down.weight",
                "mixer.down_proj.bias" => "ffn_down.bias",
                _ => return None,
            };
            Some(format!("blk.{idx}.{t}"))
        }
        // Falcon-H1: a Mamba 2 mixer (`mamba.*`) beside the attention in every layer, the
        // MLP as `feed_forward`, the MLP's norm `pre_ff_layernorm`, the final norm
        // `final_layernorm`.
        "falcon_h1" => {
            if name == "model.final_layernorm.weight" {
                return Some("output_norm.weight".into());
            }
            let (idx, tail) = name.strip_prefix("model.layers.")?.split_once('.')?;
            idx.parse::<usize>().ok()?;
            let t = match tail {
                "mamba.in_proj.weight" => "ssm_in.weight",
                "mamba.in_proj.bias" => "ssm_in.bias",
                "mamba.conv1d.weight" => "ssm_conv1d.weight",
                "mamba.conv1d.bias" => "ssm_conv1d.bias",
                "mamba.dt_bias" => "ssm_dt.bias",
                "mamba.A_log" => "ssm_a_log",
                "mamba.D" => "ssm_d",
                "mamba.norm.weight" => "ssm_norm.weight",
                "mamba.out_proj.weight" => "ssm_out.weight",
                "mamba.out_proj.bias" => "ssm_out.bias",
                "pre_ff_layernorm.weight" => "ffn_norm.weight",
                "feed_forward.gate_proj.weight" => "ffn_gate.weight",
                "feed_forward.up_proj.weight" => "ffn_up.weight",
                "feed_forward.down_proj.weight" => "ffn_down.weight",
                // Attention and the input norm are named as Llama's.
                _ => return None,
            };
            Some(format!("blk.{idx}.{t}"))
        }
        // Jamba: the Mamba 1 mixer (llama.cpp's names: `ssm_x` for x_proj, `ssm_dt` for
        // dt_proj, `ssm_{dt,b,c}_norm`), the MLP or experts as `feed_forward`.
        "jamba" => {
            if name == "model.final_layernorm.weight" {
                return Some("output_norm.weight".into());
            }
            let (idx, tail) = name.strip_prefix("model.layers.")?.split_once('.')?;
            idx.parse::<usize>().ok()?;
            let t = match tail {
                "mamba.in_proj.weight" => "ssm_in.weight",
                "mamba.in_proj.bias" => "ssm_in.bias",
                "mamba.conv1d.weight" => "ssm_conv1d.weight",
                "mamba.conv1d.bias" => "ssm_conv1d.bias",
                "mamba.x_proj.weight" => "ssm_x.weight",
                "mamba.dt_proj.weight" => "ssm_dt.weight",
                "mamba.dt_proj.bias" => "ssm_dt.bias",
                "mamba.A_log" => "ssm_a_log",
                "mamba.D" => "ssm_d",
                "mamba.dt_layernorm.weight" => "ssm_dt_norm.weight",
                "mamba.b_layernorm.weight" => "ssm_b_norm.weight",
                "mamba.c_layernorm.weight" => "ssm_c_norm.weight",
                "mamba.out_proj.weight" => "ssm_out.weight",
                "mamba.out_proj.bias" => "ssm_out.bias",
                "pre_ff_layernorm.weight" => "ffn_norm.weight",
                "feed_forward.gate_proj.weight" => "ffn_gate.weight",
                "feed_forward.up_proj.weight" => "ffn_up.weight",
                "feed_forward.down_proj.weight" => "ffn_down.weight",
                "feed_forward.router.weight" => "ffn_gate_inp.weight",
                "feed_forward.experts.gate_up_proj" => "ffn_gate_up_exps.weight",
                "feed_forward.experts.down_proj" => "ffn_down_exps.weight",
                _ => {
                    // Per-expert matrices: feed_forward.experts.E.{gate,up,down}_proj.weight.
                    let (e, proj) = tail.strip_prefix("feed_forward.experts.")?.split_once('.')?;
                    e.parse::<usize>().ok()?;
                    let kind = proj.strip_suffix("_proj.weight")?;
                    ensure_kind(kind)?;
                    return Some(format!("blk.{idx}.ffn_{kind}_exps.{e}.weight"));
                }
            };
            Some(format!("blk.{idx}.{t}"))
        }
        // Qwen3.5's separate DeltaNet projections (llama.cpp's names).
        "qwen3_5_text" | "qwen3_5_moe_text" => {
            let (idx, tail) = name.strip_prefix("model.layers.")?.split_once('.')?;
            idx.parse::<usize>().ok()?;
            let t = match tail {
                "linear_attn.in_proj_qkv.weight" => "attn_qkv.weight",
                "linear_attn.in_proj_z.weight" => "attn_gate.weight",
                "linear_attn.in_proj_b.weight" => "ssm_beta.weight",
                "linear_attn.in_proj_a.weight" => "ssm_alpha.weight",
                "linear_attn.conv1d.weight" => "ssm_conv1d.weight",
                "linear_attn.conv1d.bias" => "ssm_conv1d.bias",
                "linear_attn.dt_bias" => "ssm_dt.bias",
                "linear_attn.A_log" => "ssm_a_log",
                "linear_attn.norm.weight" => "ssm_norm.weight",
                "linear_attn.out_proj.weight" => "ssm_out.weight",
                // Everything else is named as Qwen3's.
                _ => return None,
            };
            Some(format!("blk.{idx}.{t}"))
        }
        "qwen3_next" => {
            let (idx, tail) = name.strip_prefix("model.layers.")?.split_once('.')?;
            idx.parse::<usize>().ok()?;
            let t = match tail {
                "linear_attn.in_proj_qkvz.weight" => "ssm_in_qkvz.weight",
                "linear_attn.in_proj_ba.weight" => "ssm_in_ba.weight",
                "linear_attn.conv1d.weight" => "ssm_conv1d.weight",
                "linear_attn.conv1d.bias" => "ssm_conv1d.bias",
                "linear_attn.dt_bias" => "ssm_dt.bias",
                "linear_attn.A_log" => "ssm_a_log",
                "linear_attn.norm.weight" => "ssm_norm.weight",
                "linear_attn.out_proj.weight" => "ssm_out.weight",
                // Everything else is named as Qwen3's.
                _ => return None,
            };
            Some(format!("blk.{idx}.{t}"))
        }
        _ => None,
    }
}

/// An expert tensor's GGUF-style name from the part after `...experts.`: transformers'
/// stacked `gate_up_proj` / `up_proj` / `down_proj` (`[experts, rows, cols]`) become
/// `blk.N.ffn_{gate_up,up,down}_exps.weight`; per-expert `E.<proj>.weight` with `<proj>`
/// one of `kinds` (prefix, gate/up/down) becomes `blk.N.ffn_<kind>_exps.E.weight`.
fn expert_name(layer: &str, rest: &str, kinds: &[(&str, &str)]) -> Option<String> {
    match rest {
        "gate_up_proj" => return Some(format!("blk.{layer}.ffn_gate_up_exps.weight")),
        "up_proj" => return Some(format!("blk.{layer}.ffn_up_exps.weight")),
        "down_proj" => return Some(format!("blk.{layer}.ffn_down_exps.weight")),
        _ => {}
    }
    let (e, proj) = rest.split_once('.')?;
    e.parse::<usize>().ok()?;
    kinds.iter().find_map(|(p, kind)| {
        proj.strip_prefix(p)
            .map(|s| format!("blk.{layer}.ffn_{kind}_exps.{e}.{s}"))
    })
}

/// `Some(())` for an expert projection's kind.
fn ensure_kind(kind: &str) -> Option<()> {
    matches!(kind, "gate" | "up" | "down").then_some(())
}

/// Gathers row ranges `(first, count)` of a `[rows, cols]` tensor into one matrix (a
/// fused projection whose parts are interleaved per head), copying their bytes.
pub(crate) fn gather_rows<B: Backend>(
    b: &B,
    w: &Weights,
    name: &str,
    total_rows: usize,
    cols: usize,
    ranges: &[(usize, usize)],
) -> Result<B::Mat> {
    let e = w.matrix(name, total_rows, cols)?;
    let rb =
        e.ty.row_bytes(cols)
            .ok_or_else(|| Error::new(format!("{name}: bad row length")))?;
    let src = e.bytes.as_slice();
    let rows: usize = ranges.iter().map(|r| r.1).sum();
    let mut out = Vec::with_capacity(rows * rb);
    for &(first, count) in ranges {
        ensure!(
            first + count <= total_rows,
            "{name}: rows {first}+{count} outside {total_rows}"
        );
        out.extend_from_slice(&src[first * rb..(first + count) * rb]);
    }
    Ok(b.matrix(e.ty, rows, cols, HostBytes::from_vec(out)))
}

/// One recurrent layer's weights.
pub enum RecLayer<B: Backend> {
    ShortConv {
        /// `in_proj` split by rows into its B, C and x parts.
        in_proj: [B::Mat; 3],
        in_bias: Option<[B::Buf; 3]>,
        /// `[kernel][hidden]`.
        conv_w: B::Buf,
        conv_b: Option<B::Buf>,
        out: B::Mat,
        out_bias: Option<B::Buf>,
    },
    Mamba2 {
        /// `in_proj` split by rows into z, xBC and dt.
        in_proj: [B::Mat; 3],
        /// `[kernel][conv_dim]`.
        conv_w: B::Buf,
        conv_b: Option<B::Buf>,
        /// `-exp(A_log)`, `D`, `dt_bias`: one per head.
        a: B::Buf,
        d: B::Buf,
        dt_bias: B::Buf,
        /// The gated norm's weight (none with `Mamba2Gate::GateOnly`).
        norm: Option<B::Buf>,
        out: B::Mat,
    },
    Mamba1 {
        /// `in_proj` split by rows into x and z.
        in_proj: [B::Mat; 2],
        /// `[kernel][d_inner]`.
        conv_w: B::Buf,
        conv_b: Option<B::Buf>,
        /// `x_proj` split by rows into dt, B and C, and their RMSNorms' weights.
        x_proj: [B::Mat; 3],
        norms: [B::Buf; 3],
        /// `dt_proj`'s weight; its bias goes into the scan as `dt_bias`.
        dt_proj: B::Mat,
        /// Per scan head (`Mamba1Spec`'s layout): `-exp(A_log)`, `D` (element 0 only) and
        /// `dt_bias`.
        a: B::Buf,
        d: B::Buf,
        dt_bias: B::Buf,
        out: B::Mat,
    },
    GatedDeltaNet {
        /// `in_proj_qkvz` regrouped: `[q | k | v]` of all heads, and `z`.
        qkv: B::Mat,
        z: B::Mat,
        /// `in_proj_ba` regrouped: `b` and `a` of all value heads.
        b: B::Mat,
        a: B::Mat,
        /// `[kernel][conv_dim]`.
        conv_w: B::Buf,
        /// `-exp(A_log)` and `dt_bias`, one per value head.
        a_neg: B::Buf,
        dt_bias: B::Buf,
        /// The gated norm's weight repeated for every value head.
        norm: B::Buf,
        out: B::Mat,
    },
}

/// A depthwise convolution weight `[channels, 1, kernel]` or `[channels, kernel]` (both
/// row-major `[channels][kernel]`), transposed to `[kernel][channels]`.
fn conv_weight(w: &Weights, name: &str, channels: usize, kernel: usize) -> Result<Vec<f32>> {
    let v = w.f32_vec(name, channels * kernel)?;
    let mut t = vec![0f32; channels * kernel];
    for c in 0..channels {
        for j in 0..kernel {
            t[j * channels + c] = v[c * kernel + j];
        }
    }
    Ok(t)
}

/// Splits `name` (`[sum(rows), cols]`) into consecutive row blocks.
fn split_rows<B: Backend, const N: usize>(
    b: &B,
    w: &Weights,
    name: &str,
    rows: [usize; N],
    cols: usize,
) -> Result<[B::Mat; N]> {
    let total = rows.iter().sum();
    let e = w.matrix(name, total, cols)?;
    let rb =
        e.ty.row_bytes(cols)
            .ok_or_else(|| Error::new(format!("{name}: bad row length")))?;
    let mut start = 0;
    Ok(rows.map(|r| {
        let m = b.matrix(e.ty, r, cols, e.bytes.slice(start * rb, r * rb));
        start += r;
        m
    }))
}

impl<B: Backend> RecLayer<B> {
    pub fn load(b: &B, w: &Weights, i: usize, spec: &RecurrentSpec, hidden: usize) -> Result<Self> {
        let p = |s: &str| format!("blk.{i}.{s}");
        let vec = |name: &str, len: usize| -> Result<B::Buf> { Ok(b.upload(&w.f32_vec(name, len)?)) };
        let opt_vec = |name: &str, len: usize| -> Result<Option<B::Buf>> {
            if w.has(name) {
                vec(name, len).map(Some)
            } else {
                Ok(None)
            }
        };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<B::Mat> {
            let e = w.matrix(name, rows, cols)?;
            Ok(b.matrix(e.ty, rows, cols, e.bytes.clone()))
        };
        match &spec.mixer {
            MixerSpec::Mamba1(m) => {
                let (di, ns, r) = (m.d_inner, m.state, m.dt_rank);
                for t in ["ssm_in.bias", "ssm_out.bias"] {
                    ensure!(!w.has(&p(t)), "{}: Mamba projection biases are not supported", p(t));
                }
                let [x, z] = split_rows(b, w, &p("ssm_in.weight"), [di, di], hidden)?;
                let x_proj = split_rows(b, w, &p("ssm_x.weight"), [r, ns, ns], di)?;
                // `[d_inner, state]`: llama.cpp's `ssm_a = -exp(A_log)`, or Hugging Face's A_log.
                let a_neg = match w.has(&p("ssm_a")) {
                    true => w.f32_vec(&p("ssm_a"), di * ns)?,
                    false => w.f32_vec(&p("ssm_a_log"), di * ns)?.iter().map(|&x| -x.exp()).collect(),
                };
                let dv = w.f32_vec(&p("ssm_d"), di)?;
                let bias = w.f32_vec(&p("ssm_dt.bias"), di)?;
                // Head j * di + c: channel c, state element j.
                let per_head = |f: &dyn Fn(usize, usize) -> f32| -> Vec<f32> {
                    (0..ns)
                        .flat_map(|j| (0..di).map(move |c| (j, c)))
                        .map(|(j, c)| f(j, c))
                        .collect()
                };
                Ok(RecLayer::Mamba1 {
                    in_proj: [x, z],
                    conv_w: b.upload(&conv_weight(w, &p("ssm_conv1d.weight"), di, m.conv_kernel)?),
                    conv_b: opt_vec(&p("ssm_conv1d.bias"), di)?,
                    x_proj,
                    norms: [
                        vec(&p("ssm_dt_norm.weight"), r)?,
                        vec(&p("ssm_b_norm.weight"), ns)?,
                        vec(&p("ssm_c_norm.weight"), ns)?,
                    ],
                    dt_proj: mat(&p("ssm_dt.weight"), di, r)?,
                    a: b.upload(&per_head(&|j, c| a_neg[c * ns + j])),
                    d: b.upload(&per_head(&|j, c| if j == 0 { dv[c] } else { 0.0 })),
                    dt_bias: b.upload(&per_head(&|_, c| bias[c])),
                    out: mat(&p("ssm_out.weight"), hidden, di)?,
                })
            }
            MixerSpec::ShortConv { kernel } => {
                let h = hidden;
                let in_bias = match opt_vec(&p("shortconv.in_proj.bias"), 3 * h)? {
                    None => None,
                    Some(_) => {
                        let v = w.f32_vec(&p("shortconv.in_proj.bias"), 3 * h)?;
                        Some([b.upload(&v[..h]), b.upload(&v[h..2 * h]), b.upload(&v[2 * h..])])
                    }
                };
                Ok(RecLayer::ShortConv {
                    in_proj: split_rows(b, w, &p("shortconv.in_proj.weight"), [h, h, h], h)?,
                    in_bias,
                    conv_w: b.upload(&conv_weight(w, &p("shortconv.conv.weight"), h, *kernel)?),
                    conv_b: opt_vec(&p("shortconv.conv.bias"), h)?,
                    out: mat(&p("shortconv.out_proj.weight"), h, h)?,
                    out_bias: opt_vec(&p("shortconv.out_proj.bias"), h)?,
                })
            }
            MixerSpec::GatedDeltaNet(g) => {
                let s = &g.shape;
                let (kh, vh, dk, dv) = (s.k_heads, s.v_heads, s.k_dim, s.v_dim);
                let r = vh / kh;
                ensure!(
                    !w.has(&p("ssm_conv1d.bias")),
                    "{}: DeltaNet conv biases are not supported",
                    p("ssm_conv1d")
                );
                // llama.cpp stores `ssm_a = -exp(A_log)`; Hugging Face `A_log`.
                let a_neg = match w.has(&p("ssm_a")) {
                    true => w.f32_vec(&p("ssm_a"), vh)?,
                    false => w.f32_vec(&p("ssm_a_log"), vh)?.iter().map(|&x| -x.exp()).collect(),
                };
                let norm = w.f32_vec(&p("ssm_norm.weight"), dv)?;
                let tiled: Vec<f32> = (0..vh).flat_map(|_| norm.iter().copied()).collect();
                let common = |qkv, z, wb, wa| -> Result<Self> {
                    Ok(RecLayer::GatedDeltaNet {
                        qkv,
                        z,
                        b: wb,
                        a: wa,
                        conv_w: b.upload(&conv_weight(w, &p("ssm_conv1d.weight"), s.row_width(), g.conv_kernel)?),
                        a_neg: b.upload(&a_neg),
                        dt_bias: vec(&p("ssm_dt.bias"), vh)?,
                        norm: b.upload(&tiled),
                        out: mat(&p("ssm_out.weight"), hidden, vh * dv)?,
                    })
                };
                if !w.has(&p("ssm_in_qkvz.weight")) {
                    // Qwen3.5: separate projections, already in the order the mixer reads
                    // ([q | k | v] of all heads, value head h reading key head h / r).
                    return common(
                        mat(&p("attn_qkv.weight"), s.row_width(), hidden)?,
                        mat(&p("attn_gate.weight"), vh * dv, hidden)?,
                        mat(&p("ssm_beta.weight"), vh, hidden)?,
                        mat(&p("ssm_alpha.weight"), vh, hidden)?,
                    );
                }
                // in_proj_qkvz rows per key head: [q dk | k dk | v r*dv | z r*dv].
                let per = 2 * dk + 2 * r * dv;
                let name = p("ssm_in_qkvz.weight");
                let part = |off: usize, len: usize| (0..kh).map(move |g| (g * per + off, len));
                let qkv_ranges: Vec<(usize, usize)> =
                    part(0, dk).chain(part(dk, dk)).chain(part(2 * dk, r * dv)).collect();
                let z_ranges: Vec<(usize, usize)> = part(2 * dk + r * dv, r * dv).collect();
                // in_proj_ba rows per key head: [b r | a r].
                let ba = p("ssm_in_ba.weight");
                let b_ranges: Vec<(usize, usize)> = (0..kh).map(|g| (g * 2 * r, r)).collect();
                let a_ranges: Vec<(usize, usize)> = (0..kh).map(|g| (g * 2 * r + r, r)).collect();
                common(
                    gather_rows(b, w, &name, kh * per, hidden, &qkv_ranges)?,
                    gather_rows(b, w, &name, kh * per, hidden, &z_ranges)?,
                    gather_rows(b, w, &ba, 2 * vh, hidden, &b_ranges)?,
                    gather_rows(b, w, &ba, 2 * vh, hidden, &a_ranges)?,
                )
            }
            MixerSpec::Mamba2(m) => {
                let (di, cd, heads) = (m.d_inner(), m.conv_dim(), m.scan.heads);
                ensure!(
                    !w.has(&p("ssm_in.bias")),
                    "{}: Mamba 2 in_proj biases are not supported",
                    p("ssm_in")
                );
                ensure!(
                    !w.has(&p("ssm_out.bias")),
                    "{}: Mamba 2 out_proj biases are not supported",
                    p("ssm_out")
                );
                let a = if w.has(&p("ssm_a")) {
                    w.f32_vec(&p("ssm_a"), heads)?
                } else {
                    let al = w.f32_vec(&p("ssm_a_log"), heads)?;
                    al.iter().map(|&x| -x.exp()).collect()
                };
                Ok(RecLayer::Mamba2 {
                    in_proj: split_rows(b, w, &p("ssm_in.weight"), [di, cd, heads], hidden)?,
                    conv_w: b.upload(&conv_weight(w, &p("ssm_conv1d.weight"), cd, m.conv_kernel)?),
                    conv_b: opt_vec(&p("ssm_conv1d.bias"), cd)?,
                    a: b.upload(&a),
                    d: vec(&p("ssm_d"), heads)?,
                    dt_bias: vec(&p("ssm_dt.bias"), heads)?,
                    norm: match m.gate {
                        Mamba2Gate::GateOnly => None,
                        _ => Some(vec(&p("ssm_norm.weight"), di)?),
                    },
                    out: mat(&p("ssm_out.weight"), hidden, di)?,
                })
            }
        }
    }

    /// The mixer over `n` rows of `input` (`[n, hidden]`, already normed) into `out`
    /// (`[n, hidden]`), reading and writing each sequence's slot of `state`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        b: &B,
        spec: &RecurrentSpec,
        input: &B::Buf,
        n: usize,
        hidden: usize,
        scratch: &mut RecScratch<B>,
        state: &mut RecState<B>,
        step: &B::Step,
        tap: &mut Tap,
        layer: usize,
        out: &mut B::Buf,
    ) {
        let [s1, s2, s3, s4, s5, s6] = &mut scratch.bufs;
        match (self, &spec.mixer) {
            (
                RecLayer::Mamba1 {
                    in_proj,
                    conv_w,
                    conv_b,
                    x_proj,
                    norms,
                    dt_proj,
                    a,
                    d,
                    dt_bias,
                    out: w_out,
                },
                MixerSpec::Mamba1(m),
            ) => {
                let (di, ns, sd) = (m.d_inner, m.state, m.state * m.d_inner);
                let scan = m.scan();
                let width = scan.row_width();
                let [s7, s8] = &mut scratch.extra;
                // x -> s2, z -> s3; silu(conv(x)) -> s4.
                b.matmuls(&[&in_proj[0], &in_proj[1]], input, n, &mut [&mut *s2, &mut *s3]);
                b.conv_step(
                    s2,
                    n,
                    di,
                    m.conv_kernel,
                    conv_w,
                    conv_b.as_ref(),
                    true,
                    &mut state.conv,
                    step,
                    s4,
                );
                // dt, B, C -> s5, s6, s2 (x is consumed); normed into s1, s5, s6.
                b.matmuls(
                    &[&x_proj[0], &x_proj[1], &x_proj[2]],
                    s4,
                    n,
                    &mut [&mut *s5, &mut *s6, &mut *s2],
                );
                b.rms_norm(s5, &norms[0], m.norm_eps, n, s1);
                b.rms_norm(s6, &norms[1], m.norm_eps, n, s5);
                b.rms_norm(s2, &norms[2], m.norm_eps, n, s6);
                // dt -> s2 (d_inner wide).
                b.matmul(dt_proj, s1, n, s2);
                // The scan's rows: [x repeated per state element | B | C] -> s7, dt
                // repeated -> s8.
                for j in 0..ns {
                    b.copy_rows(s4, di, 0, s7, width, j * di, di, n);
                    b.copy_rows(s2, di, 0, s8, sd, j * di, di, n);
                }
                b.copy_rows(s5, ns, 0, s7, width, sd, ns, n);
                b.copy_rows(s6, ns, 0, s7, width, sd + ns, ns, n);
                b.ssm_scan_step(s7, s8, a, d, dt_bias, n, &scan, &mut state.ssm, step, s1);
                // Each channel's sum over its state elements -> s2; then y * silu(z).
                b.moe_combine(s1, &scratch.ones, n, ns, di, s2);
                b.silu_mul(s3, s2, n * di);
                tap.linear_input(b, s3, n, di, "attn_out", Some(layer));
                b.matmul(w_out, s3, n, out);
            }
            (
                RecLayer::ShortConv {
                    in_proj,
                    in_bias,
                    conv_w,
                    conv_b,
                    out: w_out,
                    out_bias,
                },
                MixerSpec::ShortConv { kernel },
            ) => {
                let h = hidden;
                b.matmuls(
                    &[&in_proj[0], &in_proj[1], &in_proj[2]],
                    input,
                    n,
                    &mut [&mut *s1, &mut *s2, &mut *s3],
                );
                if let Some([bb, bc, bx]) = in_bias {
                    b.add_bias(s1, bb, n);
                    b.add_bias(s2, bc, n);
                    b.add_bias(s3, bx, n);
                }
                // B * x, convolved; then C * that.
                b.mul(s1, s3, n * h);
                b.conv_step(
                    s1,
                    n,
                    h,
                    *kernel,
                    conv_w,
                    conv_b.as_ref(),
                    false,
                    &mut state.conv,
                    step,
                    s4,
                );
                b.mul(s4, s2, n * h);
                tap.linear_input(b, s4, n, h, "attn_out", Some(layer));
                b.matmul(w_out, s4, n, out);
                if let Some(ob) = out_bias {
                    b.add_bias(out, ob, n);
                }
            }
            (
                RecLayer::Mamba2 {
                    in_proj,
                    conv_w,
                    conv_b,
                    a,
                    d,
                    dt_bias,
                    norm,
                    out: w_out,
                },
                MixerSpec::Mamba2(m),
            ) => {
                let (di, cd) = (m.d_inner(), m.conv_dim());
                // z -> s1, xBC -> s2, dt -> s5.
                b.matmuls(
                    &[&in_proj[0], &in_proj[1], &in_proj[2]],
                    input,
                    n,
                    &mut [&mut *s1, &mut *s2, &mut *s5],
                );
                b.conv_step(
                    s2,
                    n,
                    cd,
                    m.conv_kernel,
                    conv_w,
                    conv_b.as_ref(),
                    true,
                    &mut state.conv,
                    step,
                    s3,
                );
                b.ssm_scan_step(s3, s5, a, d, dt_bias, n, &m.scan, &mut state.ssm, step, s4);
                let y = match (m.gate, norm) {
                    (Mamba2Gate::GateOnly, _) | (_, None) => {
                        b.silu_mul(s1, s4, n * di);
                        &*s1
                    }
                    (gate, Some(norm)) => {
                        let first = gate == Mamba2Gate::NormThenGate;
                        b.rms_norm_gated(s4, s1, norm, m.norm_eps, n, m.norm_group, first);
                        &*s4
                    }
                };
                tap.linear_input(b, y, n, di, "attn_out", Some(layer));
                b.matmul(w_out, y, n, out);
            }
            (
                RecLayer::GatedDeltaNet {
                    qkv,
                    z,
                    b: wb,
                    a: wa,
                    conv_w,
                    a_neg,
                    dt_bias,
                    norm,
                    out: w_out,
                },
                MixerSpec::GatedDeltaNet(g),
            ) => {
                let (width, vd) = (g.shape.row_width(), g.shape.v_heads * g.shape.v_dim);
                // qkv -> s1, z -> s2, b -> s3, a -> s4.
                b.matmuls(&[qkv, z], input, n, &mut [&mut *s1, &mut *s2]);
                b.matmuls(&[wb, wa], input, n, &mut [&mut *s3, &mut *s4]);
                b.conv_step(
                    s1,
                    n,
                    width,
                    g.conv_kernel,
                    conv_w,
                    None,
                    true,
                    &mut state.conv,
                    step,
                    s5,
                );
                b.gdn_step(s5, s3, s4, a_neg, dt_bias, n, &g.shape, &mut state.ssm, step, s6);
                b.rms_norm_gated(s6, s2, norm, g.norm_eps, n, g.shape.v_dim, true);
                tap.linear_input(b, s6, n, vd, "attn_out", Some(layer));
                b.matmul(w_out, s6, n, out);
            }
            _ => unreachable!("a recurrent layer loaded for another mixer"),
        }
    }
}

/// The recurrent layers' scratch for `rows` rows (shared by all layers).
pub struct RecScratch<B: Backend> {
    bufs: [B::Buf; 6],
    /// Mamba 1's two more buffers and a row of ones per state element (empty otherwise).
    extra: [B::Buf; 2],
    ones: B::Buf,
}

impl<B: Backend> RecScratch<B> {
    pub fn new(b: &B, spec: &RecurrentSpec, hidden: usize, rows: usize) -> Self {
        let sizes = match &spec.mixer {
            MixerSpec::ShortConv { .. } => [hidden, hidden, hidden, hidden, hidden, 0],
            MixerSpec::Mamba2(m) => [m.d_inner(), m.conv_dim(), m.conv_dim(), m.d_inner(), m.scan.heads, 0],
            MixerSpec::Mamba1(m) => {
                let (di, ns) = (m.d_inner, m.state);
                [(ns * di).max(m.dt_rank), di.max(ns), di, di, m.dt_rank.max(ns), ns]
            }
            MixerSpec::GatedDeltaNet(g) => {
                let (w, vh) = (g.shape.row_width(), g.shape.v_heads);
                let vd = vh * g.shape.v_dim;
                [w, vd, vh, vh, w, vd]
            }
        };
        RecScratch {
            bufs: sizes.map(|w| b.alloc(w * rows)),
            extra: match &spec.mixer {
                MixerSpec::Mamba1(m) => [
                    b.alloc(m.scan().row_width() * rows),
                    b.alloc(m.state * m.d_inner * rows),
                ],
                _ => [b.alloc(0), b.alloc(0)],
            },
            ones: match &spec.mixer {
                MixerSpec::Mamba1(m) => b.upload(&vec![1.0; m.state * rows]),
                _ => b.alloc(0),
            },
        }
    }
}

/// One recurrent layer's state arrays: `slots` slots each.
pub struct RecState<B: Backend> {
    pub conv: B::Buf,
    pub ssm: B::Buf,
}

impl<B: Backend> RecState<B> {
    pub fn new(b: &B, spec: &RecurrentSpec, hidden: usize, slots: usize) -> Self {
        let (c, s) = spec.slot_floats(hidden);
        RecState {
            conv: b.alloc(c * slots),
            ssm: b.alloc(s * slots),
        }
    }

    /// Copies slot `src` to slot `dst` in every array.
    pub fn copy_slot(&mut self, b: &B, spec: &RecurrentSpec, hidden: usize, src: usize, dst: usize) {
        let (c, s) = spec.slot_floats(hidden);
        if c > 0 {
            b.copy_slot(&mut self.conv, c, src, dst);
        }
        if s > 0 {
            b.copy_slot(&mut self.ssm, s, src, dst);
        }
    }
}
