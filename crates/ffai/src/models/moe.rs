//! The mixture-of-experts MLP every MoE family shares (Qwen3-MoE, Mixtral, OLMoE,
//! GPT-OSS, DeepSeek, Gemma 4, and the hybrids' MoE variants: Qwen3-Next, LFM2-MoE,
//! NemotronH, Granite 4): a router picks `k` of `n_experts` SwiGLU experts per token and the block returns their
//! outputs weighted by the router's probabilities. A family fills a [`MoeSpec`] (the
//! scoring rule and which layers are sparse) and the decoder does the rest through the
//! backend's MoE ops:
//!
//! ```text
//! logits  = x · routerᵀ                       [n, n_experts]   matmul
//! ids, w  = top-k of softmax(logits)          [n, k]           moe_route (renormalised or not;
//!           or DeepSeek's sigmoid / grouped rules, `MoeRouting`)
//! g, u    = gate[e] · x, up[e] · x            [n·k, ffn]       moe_matmuls (only the chosen experts' rows)
//! g       = silu(g) · u                                        silu_mul
//! y       = down[e] · g                       [n·k, h]         moe_matmuls (each slot's own row)
//! out[t]  = Σ_j w[t, j] · y[t·k + j]          [n, h]           moe_combine
//! out    += shared(x)                         [n, h]           (DeepSeek's shared experts)
//!           · σ(x · shared_gateᵀ)              [n, 1]           (Qwen2/3-MoE-style gated shared
//!                                                                expert, when the layer has one)
//! ```
//!
//! The shared expert's sigmoid gate (Qwen3-Next, Qwen3.5-MoE, Qwen2-MoE: `shared_expert_gate`,
//! a `[1, hidden]` linear; llama.cpp's `ffn_gate_inp_shexp`) is taken from the layer's
//! tensors: a layer that has `blk.N.ffn_gate_inp_shexp.weight` multiplies its shared
//! expert's output per token by `σ(x · w)` before adding it; one without adds it as is
//! (DeepSeek). A family whose checkpoints always gate checks for the tensor with
//! [`require_shared_gate`].
//!
//! Expert weights are read in any of the layouts checkpoints use, under GGUF-style names
//! (see `weights::hf_to_gguf_name_for`): llama.cpp's stacked 3-D tensors
//! `blk.N.ffn_{gate,up,down}_exps.weight` (`[n_experts, rows, cols]`), Hugging Face's
//! per-expert matrices (`mlp.experts.E.gate_proj.weight`, Mixtral's
//! `block_sparse_moe.experts.E.w1.weight`, filed as `blk.N.ffn_gate_exps.E.weight`), and
//! transformers 5's fused `mlp.experts.gate_up_proj` (`[n_experts, 2·ffn, h]`, gate rows
//! first). Each expert is a `B::Mat` viewing its rows of the memory map: nothing is
//! copied or dequantized.

use ffai_kernels::backend::Backend;
pub use ffai_kernels::ops::{GroupScore, MoeRouting, MoeScoring};
use ffai_kernels::ops::{MAX_EXPERTS, MAX_EXPERTS_PER_TOKEN};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::{WeightEntry, Weights};
use crate::{bail, ensure};

/// How a family's MoE layers route and where they are.
#[derive(Clone, Debug)]
pub struct MoeSpec {
    pub n_experts: usize,
    /// Experts per token.
    pub k: usize,
    /// How the router chooses and weighs (`MoeRouting::softmax(renormalize)` for
    /// Qwen3-MoE, Mixtral, OLMoE and GPT-OSS; renormalise: Mixtral always, Qwen3-MoE and
    /// OLMoE when `norm_topk_prob`; DeepSeek: sigmoid or softmax scores, group limits,
    /// `routed_scaling_factor`). A layer with `exp_probs_b.bias` adds it to the scores
    /// for the choice only (DeepSeek-V3's `e_score_correction_bias`).
    pub routing: MoeRouting,
    /// Each expert's intermediate size.
    pub ffn: usize,
    /// The intermediate size of the shared experts every token goes through, added to
    /// the routed experts' sum (DeepSeek: `n_shared_experts · moe_intermediate_size`, one
    /// SwiGLU MLP `ffn_{gate,up,down}_shexp`; Qwen3-Next's sigmoid-gated shared expert;
    /// Granite 4's `shared_mlp`; NemotronH's relu2 shared MLP); 0 = none.
    pub shared_ffn: usize,
    /// Per layer: the sparse block (true) or the dense MLP of `intermediate_size`.
    pub sparse: Vec<bool>,
    /// The experts' gated activation.
    pub act: MoeAct,
    /// The routed experts' width when they work in a latent space (NemotronH's
    /// `moe_latent_size`): `x` goes down to it (`ffn_latent_down`, `[latent, hidden]`)
    /// before the experts and their weighted sum back up (`ffn_latent_up`) after; the
    /// router and the shared expert read `x` itself. 0 = the experts read `x`.
    pub latent: usize,
}

/// How an expert combines its gate and up projections.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MoeAct {
    /// `silu(gate) · up`.
    SwiGlu,
    /// `gelu_tanh(gate) · up` (Gemma 4).
    GeGlu,
    /// GPT-OSS: `(clamp(up, ±limit) + 1) · g · σ(alpha · g)` with `g = min(gate, limit)`.
    ClampedSwiGlu { alpha: f32, limit: f32 },
    /// No gate: `relu(up)²` (NemotronH). The experts and the shared experts have only up
    /// and down projections (`ffn_{up,down}_exps`, `ffn_{up,down}_shexp`).
    Relu2,
}

impl MoeSpec {
    /// The width the routed experts read and write: the latent size, else `hidden`.
    pub fn expert_width(&self, hidden: usize) -> usize {
        if self.latent > 0 {
            self.latent
        } else {
            hidden
        }
    }

    /// Checks the counts against the kernels' limits (config values are untrusted).
    pub fn checked(self, cfg: &ModelConfig) -> Result<MoeSpec> {
        let src = &cfg.source;
        ensure!(
            (1..=MAX_EXPERTS).contains(&self.n_experts),
            "{src}: {} experts (1..={MAX_EXPERTS} supported)",
            self.n_experts
        );
        ensure!(
            (1..=self.n_experts.min(MAX_EXPERTS_PER_TOKEN)).contains(&self.k),
            "{src}: {} experts per token of {} (1..={} supported)",
            self.k,
            self.n_experts,
            self.n_experts.min(MAX_EXPERTS_PER_TOKEN)
        );
        ensure!(self.ffn > 0, "{src}: the experts' intermediate size is 0");
        ensure!(
            self.shared_ffn <= crate::config::MAX_DIM,
            "{src}: shared experts of {} exceed the limit",
            self.shared_ffn
        );
        ensure!(
            self.latent <= crate::config::MAX_DIM,
            "{src}: an expert latent size of {} exceeds the limit",
            self.latent
        );
        if let Err(e) = self.routing.check(self.n_experts, self.k) {
            bail!("{src}: expert routing: {e}");
        }
        ensure!(
            self.sparse.len() == cfg.num_layers,
            "{src}: MoE layer list of {} for {} layers",
            self.sparse.len(),
            cfg.num_layers
        );
        Ok(self)
    }

    /// Floats of scratch one row of a step needs (router logits, ids, weights, the
    /// experts' gate/up and outputs).
    pub fn floats_per_row(&self, hidden: usize) -> Option<usize> {
        let k = self.k;
        self.n_experts
            .checked_add(2 * k)?
            .checked_add(k.checked_mul(self.ffn)?.checked_mul(2)?)?
            .checked_add(k.checked_mul(self.expert_width(hidden))?)?
            // The latent input and the latent weighted sum.
            .checked_add(self.latent.checked_mul(2)?)?
            .checked_add(self.shared_ffn.checked_mul(2)?)?
            // The shared output, its gated copy, and the gate's logit, weight and one.
            .checked_add(if self.shared_ffn > 0 {
                hidden.checked_mul(2)?.checked_add(3)?
            } else {
                0
            })
    }
}

/// One sparse layer's weights.
pub struct MoeLayer<B: Backend> {
    router: B::Mat,
    /// The router's bias (GPT-OSS), `[n_experts]`.
    router_bias: Option<B::Buf>,
    gate: Vec<B::Mat>,
    up: Vec<B::Mat>,
    down: Vec<B::Mat>,
    /// The experts' biases (GPT-OSS), stacked: gate and up `[n_experts, ffn]`, down
    /// `[n_experts, hidden]`.
    biases: Option<[B::Buf; 3]>,
    /// The bias added to the scores for choosing (DeepSeek-V3), `[n_experts]`.
    choice_bias: Option<B::Buf>,
    /// The shared experts' gate (none with [`MoeAct::Relu2`]), up and down (DeepSeek,
    /// Qwen3-Next, NemotronH).
    shared: Option<SharedMlp<B>>,
    /// The shared expert's sigmoid gate `[1, hidden]` (`ffn_gate_inp_shexp`, Qwen's
    /// `shared_expert_gate`): the shared output is multiplied per token by `σ(x · w)`.
    shared_gate: Option<B::Mat>,
    /// Multiplies each chosen expert's routing weight (Gemma 4's `per_expert_scale`,
    /// `ffn_down_exps.scale`), `[n_experts]`.
    expert_scale: Option<B::Buf>,
    /// The latent projections (down `[latent, hidden]`, up `[hidden, latent]`) when the
    /// experts work in a latent space ([`MoeSpec::latent`]).
    latent: Option<(B::Mat, B::Mat)>,
}

/// The shared experts' projections: gate (none with [`MoeAct::Relu2`]), up, down.
type SharedMlp<B> = (Option<<B as Backend>::Mat>, <B as Backend>::Mat, <B as Backend>::Mat);

/// A step's MoE scratch, allocated with the batch.
pub struct MoeScratch<B: Backend> {
    logits: B::Buf,
    ids: B::Buf,
    weights: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    y: B::Buf,
    /// The shared experts' gate/up and output (empty without shared experts).
    sh_gate: B::Buf,
    sh_up: B::Buf,
    sh_y: B::Buf,
    /// The shared expert's gate: its logit and weight per row, a row of ones to start
    /// the weight from, and the gated output (empty without shared experts).
    sh_logit: B::Buf,
    sh_w: B::Buf,
    ones: B::Buf,
    sh_out: B::Buf,
    /// The experts' latent input and their weighted sum (empty without a latent space).
    lat_x: B::Buf,
    lat_y: B::Buf,
}

impl<B: Backend> MoeScratch<B> {
    pub fn new(b: &B, spec: &MoeSpec, hidden: usize, rows: usize) -> Self {
        let slots = rows * spec.k;
        let sh = spec.shared_ffn;
        MoeScratch {
            logits: b.alloc(rows * spec.n_experts),
            ids: b.alloc(slots),
            weights: b.alloc(slots),
            gate: b.alloc(slots * spec.ffn),
            up: b.alloc(slots * spec.ffn),
            y: b.alloc(slots * spec.expert_width(hidden)),
            sh_gate: b.alloc(rows * sh),
            sh_up: b.alloc(rows * sh),
            sh_y: b.alloc(if sh > 0 { rows * hidden } else { 0 }),
            sh_logit: b.alloc(if sh > 0 { rows } else { 0 }),
            sh_w: b.alloc(if sh > 0 { rows } else { 0 }),
            ones: b.upload(&vec![1.0; if sh > 0 { rows } else { 0 }]),
            sh_out: b.alloc(if sh > 0 { rows * hidden } else { 0 }),
            lat_x: b.alloc(rows * spec.latent),
            lat_y: b.alloc(rows * spec.latent),
        }
    }
}

/// Expert `e`'s `rows` rows of a stacked `[n_experts, rows, cols]` entry (`first` rows
/// into each expert's block of `block_rows`).
fn expert_rows(
    e: &WeightEntry,
    expert: usize,
    block_rows: usize,
    first: usize,
    rows: usize,
    cols: usize,
) -> Result<ffai_kernels::backend::HostBytes> {
    let rb =
        e.ty.row_bytes(cols)
            .ok_or_else(|| Error::new("bad expert row length"))?;
    let start = (expert * block_rows + first) * rb;
    let len = rows * rb;
    ensure!(start + len <= e.bytes.len(), "expert tensor too small");
    Ok(e.bytes.slice(start, len))
}

impl<B: Backend> MoeLayer<B> {
    /// Layer `i`'s router and experts, from whichever layout the checkpoint has.
    pub fn load(w: &Weights, b: &B, i: usize, spec: &MoeSpec, hidden: usize) -> Result<Self> {
        let (ne, f, h) = (spec.n_experts, spec.ffn, hidden);
        let p = |s: &str| format!("blk.{i}.{s}");
        let latent = match spec.latent {
            0 => {
                ensure!(
                    !w.has(&p("ffn_latent_down.weight")),
                    "{}: layer {i} has expert latent projections but the config gives no latent size",
                    w.source
                );
                None
            }
            l => {
                let down = w.matrix(&p("ffn_latent_down.weight"), l, h)?;
                let up = w.matrix(&p("ffn_latent_up.weight"), h, l)?;
                Some((
                    b.matrix(down.ty, l, h, down.bytes.clone()),
                    b.matrix(up.ty, h, l, up.bytes.clone()),
                ))
            }
        };
        // From here `h` is what the routed experts read and write.
        let (hidden, h) = (h, spec.expert_width(h));
        let re = w.matrix(&p("ffn_gate_inp.weight"), ne, hidden)?;
        let router = b.matrix(re.ty, ne, hidden, re.bytes.clone());
        let router_bias = match w.has(&p("ffn_gate_inp.bias")) {
            true => Some(b.upload(&w.f32_vec(&p("ffn_gate_inp.bias"), ne)?)),
            false => None,
        };
        let choice_bias = match w.has(&p("exp_probs_b.bias")) {
            true => Some(b.upload(&w.f32_vec(&p("exp_probs_b.bias"), ne)?)),
            false => None,
        };
        let expert_scale = match w.has(&p("ffn_down_exps.scale")) {
            true => Some(b.upload(&w.f32_vec(&p("ffn_down_exps.scale"), ne)?)),
            false => None,
        };
        let shared = match spec.shared_ffn {
            0 => None,
            sf => {
                let h = hidden;
                let m = |name: &str, rows: usize, cols: usize| -> Result<B::Mat> {
                    let e = w.matrix(&p(name), rows, cols)?;
                    Ok(b.matrix(e.ty, rows, cols, e.bytes.clone()))
                };
                let down = m("ffn_down_shexp.weight", h, sf)?;
                let fused = p("ffn_gate_up_shexp.weight");
                match spec.act {
                    MoeAct::Relu2 => Some((None, m("ffn_up_shexp.weight", sf, h)?, down)),
                    // One [2·sf, h] matrix, gate rows first (Granite 4's shared_mlp).
                    _ if w.has(&fused) && !w.has(&p("ffn_gate_shexp.weight")) => {
                        let e = w.matrix(&fused, 2 * sf, h)?;
                        let gate = b.matrix(e.ty, sf, h, expert_rows(e, 0, 2 * sf, 0, sf, h)?);
                        let up = b.matrix(e.ty, sf, h, expert_rows(e, 0, 2 * sf, sf, sf, h)?);
                        Some((Some(gate), up, down))
                    }
                    _ => Some((
                        Some(m("ffn_gate_shexp.weight", sf, h)?),
                        m("ffn_up_shexp.weight", sf, h)?,
                        down,
                    )),
                }
            }
        };
        let shared_gate = match (&shared, w.has(&p("ffn_gate_inp_shexp.weight"))) {
            (Some(_), true) => {
                let e = w.matrix(&p("ffn_gate_inp_shexp.weight"), 1, hidden)?;
                Some(b.matrix(e.ty, 1, hidden, e.bytes.clone()))
            }
            (None, true) => bail!(
                "{}: layer {i} has a shared expert gate (ffn_gate_inp_shexp) but no shared expert",
                w.source
            ),
            (_, false) => None,
        };
        if let Some((gate, up, down)) = Self::load_oai(w, b, i, spec, h)? {
            let biases = Self::load_biases(w, b, i, spec, h)?;
            return Ok(MoeLayer {
                router,
                router_bias,
                gate,
                up,
                down,
                biases,
                choice_bias,
                shared,
                shared_gate,
                expert_scale,
                latent,
            });
        }
        // One projection: stacked, or one matrix per expert.
        let load = |name: &str, rows: usize, cols: usize| -> Result<Option<Vec<B::Mat>>> {
            let stacked = p(&format!("ffn_{name}_exps.weight"));
            if w.has(&stacked) {
                let e = stacked_entry(w, &stacked, [ne, rows, cols])?;
                return (0..ne)
                    .map(|x| Ok(b.matrix(e.ty, rows, cols, expert_rows(e, x, rows, 0, rows, cols)?)))
                    .collect::<Result<Vec<_>>>()
                    .map(Some);
            }
            if !w.has(&p(&format!("ffn_{name}_exps.0.weight"))) {
                return Ok(None);
            }
            (0..ne)
                .map(|x| {
                    let e = w.matrix(&p(&format!("ffn_{name}_exps.{x}.weight")), rows, cols)?;
                    Ok(b.matrix(e.ty, rows, cols, e.bytes.clone()))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some)
        };
        let (gate, up) = match (load("gate", f, h)?, load("up", f, h)?) {
            (None, Some(u)) if spec.act == MoeAct::Relu2 => (Vec::new(), u),
            _ if spec.act == MoeAct::Relu2 => bail!(
                "{}: layer {i} needs up-only experts (ffn_up_exps without ffn_gate_exps)",
                w.source
            ),
            (Some(g), Some(u)) => (g, u),
            (None, None) => {
                // transformers 5's fused gate_up: [ne, 2f, h], gate rows first.
                let name = p("ffn_gate_up_exps.weight");
                ensure!(w.has(&name), "{}: layer {i} has no expert gate/up weights", w.source);
                let e = stacked_entry(w, &name, [ne, 2 * f, h])?;
                let half = |first: usize| -> Result<Vec<B::Mat>> {
                    (0..ne)
                        .map(|x| Ok(b.matrix(e.ty, f, h, expert_rows(e, x, 2 * f, first, f, h)?)))
                        .collect()
                };
                (half(0)?, half(f)?)
            }
            _ => bail!(
                "{}: layer {i} has expert gate weights without up weights (or the reverse)",
                w.source
            ),
        };
        let down = load("down", h, f)?
            .ok_or_else(|| Error::new(format!("{}: layer {i} has no expert down weights", w.source)))?;
        let biases = Self::load_biases(w, b, i, spec, h)?;
        Ok(MoeLayer {
            router,
            router_bias,
            gate,
            up,
            down,
            biases,
            choice_bias,
            shared,
            shared_gate,
            expert_scale,
            latent,
        })
    }

    /// The experts' biases: GPT-OSS's interleaved `oai_gate_up_exps.bias` `[ne, 2·ffn]`
    /// (gate at even, up at odd entries) or llama.cpp's `ffn_{gate,up}_exps.bias`
    /// `[ne, ffn]`, with `ffn_down_exps.bias` `[ne, hidden]`; None when the layer has none.
    fn load_biases(w: &Weights, b: &B, i: usize, spec: &MoeSpec, h: usize) -> Result<Option<[B::Buf; 3]>> {
        let (ne, f) = (spec.n_experts, spec.ffn);
        let p = |s: &str| format!("blk.{i}.{s}");
        let (gate, up) = if w.has(&p("oai_gate_up_exps.bias")) {
            let gu = w.f32_vec(&p("oai_gate_up_exps.bias"), ne * 2 * f)?;
            (
                gu.iter().step_by(2).copied().collect::<Vec<f32>>(),
                gu.iter().skip(1).step_by(2).copied().collect::<Vec<f32>>(),
            )
        } else if w.has(&p("ffn_gate_exps.bias")) {
            (
                w.f32_vec(&p("ffn_gate_exps.bias"), ne * f)?,
                w.f32_vec(&p("ffn_up_exps.bias"), ne * f)?,
            )
        } else {
            ensure!(
                !w.has(&p("ffn_down_exps.bias")),
                "{}: layer {i} has expert down biases without gate/up biases",
                w.source
            );
            return Ok(None);
        };
        let down = w.f32_vec(&p("ffn_down_exps.bias"), ne * h)?;
        Ok(Some([b.upload(&gate), b.upload(&up), b.upload(&down)]))
    }

    /// GPT-OSS's Hugging Face expert layouts (see `weights::gpt_oss_name`), split into
    /// one matrix per expert and projection: float `oai_gate_up_exps.weight` `[ne, h,
    /// 2·ffn]` and `oai_down_exps.weight` `[ne, ffn, h]` are in × out, so they are copied
    /// transposed (gate from the even columns, up from the odd); MXFP4
    /// `oai_gate_up_exps.mxfp4` `[ne, 2·ffn, h]` is out × in, so gate and up are its even
    /// and odd rows, copied as they are (never dequantized), and its down is llama.cpp's
    /// stacked `ffn_down_exps.weight`. None when the layer has neither.
    #[allow(clippy::type_complexity)]
    fn load_oai(
        w: &Weights,
        b: &B,
        i: usize,
        spec: &MoeSpec,
        h: usize,
    ) -> Result<Option<(Vec<B::Mat>, Vec<B::Mat>, Vec<B::Mat>)>> {
        let (ne, f) = (spec.n_experts, spec.ffn);
        let p = |s: &str| format!("blk.{i}.{s}");
        let (fl, mx) = (p("oai_gate_up_exps.weight"), p("oai_gate_up_exps.mxfp4"));
        let (gate, up) = if w.has(&fl) {
            let e = stacked_entry(w, &fl, [ne, h, 2 * f])?;
            let half = |first: usize| -> Result<Vec<B::Mat>> {
                (0..ne)
                    .map(|x| Ok(b.matrix(e.ty, f, h, transposed(e, x, h, 2 * f, first, 2, f)?)))
                    .collect()
            };
            (half(0)?, half(1)?)
        } else if w.has(&mx) {
            let e = stacked_entry(w, &mx, [ne, 2 * f, h])?;
            let half = |first: usize| -> Result<Vec<B::Mat>> {
                (0..ne)
                    .map(|x| Ok(b.matrix(e.ty, f, h, strided_rows(e, x, 2 * f, first, 2, f, h)?)))
                    .collect()
            };
            (half(0)?, half(1)?)
        } else {
            return Ok(None);
        };
        let dn = p("oai_down_exps.weight");
        let down = if w.has(&dn) {
            let e = stacked_entry(w, &dn, [ne, f, h])?;
            (0..ne)
                .map(|x| Ok(b.matrix(e.ty, h, f, transposed(e, x, f, h, 0, 1, h)?)))
                .collect::<Result<Vec<_>>>()?
        } else {
            let e = stacked_entry(w, &p("ffn_down_exps.weight"), [ne, h, f])?;
            (0..ne)
                .map(|x| Ok(b.matrix(e.ty, h, f, expert_rows(e, x, h, 0, h, f)?)))
                .collect::<Result<Vec<_>>>()?
        };
        Ok(Some((gate, up, down)))
    }

    /// `out[n, h]` = the block applied to `x[n, h]`.
    pub fn forward(&self, b: &B, spec: &MoeSpec, x: &B::Buf, n: usize, s: &mut MoeScratch<B>, out: &mut B::Buf) {
        self.forward_routed(b, spec, x, x, n, s, out)
    }

    /// As [`forward`](Self::forward), with the router reading `router_x[n, h]` and the
    /// experts `x` (Gemma 4 routes on its own normalisation of the residual stream).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_routed(
        &self,
        b: &B,
        spec: &MoeSpec,
        router_x: &B::Buf,
        x: &B::Buf,
        n: usize,
        s: &mut MoeScratch<B>,
        out: &mut B::Buf,
    ) {
        let (k, f) = (spec.k, spec.ffn);
        // The experts' width (the latent size or the hidden size) and the hidden size.
        let he = b.mat_shape(&self.down[0]).0;
        let h = self.latent.as_ref().map_or(he, |(_, up)| b.mat_shape(up).0);
        b.matmul(&self.router, router_x, n, &mut s.logits);
        if let Some(rb) = &self.router_bias {
            b.add_bias(&mut s.logits, rb, n);
        }
        b.moe_route(
            &s.logits,
            n,
            spec.n_experts,
            k,
            &spec.routing,
            self.choice_bias.as_ref(),
            self.expert_scale.as_ref(),
            &mut s.ids,
            &mut s.weights,
        );
        let xe = match &self.latent {
            Some((down, _)) => {
                b.matmul(down, x, n, &mut s.lat_x);
                &s.lat_x
            }
            None => x,
        };
        if spec.act == MoeAct::Relu2 {
            b.moe_matmuls(&[&self.up], xe, false, &s.ids, n, k, &mut [&mut s.gate]);
        } else {
            b.moe_matmuls(
                &[&self.gate, &self.up],
                xe,
                false,
                &s.ids,
                n,
                k,
                &mut [&mut s.gate, &mut s.up],
            );
        }
        if let Some([bg, bu, _]) = &self.biases {
            b.moe_add_bias(&mut s.gate, bg, &s.ids, n * k, f);
            b.moe_add_bias(&mut s.up, bu, &s.ids, n * k, f);
        }
        match spec.act {
            MoeAct::SwiGlu => b.silu_mul(&mut s.gate, &s.up, n * k * f),
            MoeAct::GeGlu => b.gelu_mul(&mut s.gate, &s.up, n * k * f),
            MoeAct::ClampedSwiGlu { alpha, limit } => b.swiglu_clamped(&mut s.gate, &s.up, alpha, limit, n * k * f),
            MoeAct::Relu2 => b.relu_sq(&mut s.gate, n * k * f),
        }
        b.moe_matmuls(&[&self.down], &s.gate, true, &s.ids, n, k, &mut [&mut s.y]);
        if let Some([_, _, bd]) = &self.biases {
            b.moe_add_bias(&mut s.y, bd, &s.ids, n * k, he);
        }
        match &self.latent {
            Some((_, up)) => {
                b.moe_combine(&s.y, &s.weights, n, k, he, &mut s.lat_y);
                b.matmul(up, &s.lat_y, n, out);
            }
            None => b.moe_combine(&s.y, &s.weights, n, k, he, out),
        }
        if let Some((g, u, d)) = &self.shared {
            match g {
                Some(g) => {
                    b.matmuls(&[g, u], x, n, &mut [&mut s.sh_gate, &mut s.sh_up]);
                    b.silu_mul(&mut s.sh_gate, &s.sh_up, n * spec.shared_ffn);
                }
                None => {
                    b.matmul(u, x, n, &mut s.sh_gate);
                    b.relu_sq(&mut s.sh_gate, n * spec.shared_ffn);
                }
            }
            b.matmul(d, &s.sh_gate, n, &mut s.sh_y);
            match &self.shared_gate {
                None => b.add(out, &s.sh_y, n * h),
                Some(sg) => {
                    // w = σ(x · sg) per row (a one times its sigmoid), then sh_y · w.
                    b.matmul(sg, x, n, &mut s.sh_logit);
                    b.copy(&s.ones, 0, &mut s.sh_w, 0, n);
                    b.sigmoid_mul(&mut s.sh_w, &s.sh_logit, n);
                    b.moe_combine(&s.sh_y, &s.sh_w, n, 1, h, &mut s.sh_out);
                    b.add(out, &s.sh_out, n * h);
                }
            }
        }
    }
}

/// Expert `expert`'s matrix `[rows, cols]` out of a stacked float tensor stored in × out,
/// `[n_experts, cols, width]`: row `r` is column `first + r · stride` (a copy; F32, F16 or
/// BF16).
fn transposed(
    e: &WeightEntry,
    expert: usize,
    cols: usize,
    width: usize,
    first: usize,
    stride: usize,
    rows: usize,
) -> Result<ffai_kernels::backend::HostBytes> {
    use ffai_kernels::quant::WeightType;
    let es = match e.ty {
        WeightType::F32 => 4,
        WeightType::F16 | WeightType::BF16 => 2,
        other => bail!("in × out expert weights of type {} are not supported", other.name()),
    };
    let base = expert * cols * width * es;
    ensure!(
        base + cols * width * es <= e.bytes.len() && first + (rows - 1) * stride < width,
        "expert tensor too small"
    );
    let src = &e.bytes.as_slice()[base..base + cols * width * es];
    let mut out = vec![0u8; rows * cols * es];
    for r in 0..rows {
        let col = first + r * stride;
        for c in 0..cols {
            let s = (c * width + col) * es;
            out[(r * cols + c) * es..(r * cols + c + 1) * es].copy_from_slice(&src[s..s + es]);
        }
    }
    Ok(ffai_kernels::backend::HostBytes::from_vec(out))
}

/// Rows `first, first + stride, …` (`rows` of them) of expert `expert`'s block of
/// `block_rows` rows in a stacked `[n_experts, block_rows, cols]` entry of any type,
/// copied as stored.
fn strided_rows(
    e: &WeightEntry,
    expert: usize,
    block_rows: usize,
    first: usize,
    stride: usize,
    rows: usize,
    cols: usize,
) -> Result<ffai_kernels::backend::HostBytes> {
    let rb =
        e.ty.row_bytes(cols)
            .ok_or_else(|| Error::new("bad expert row length"))?;
    let mut out = Vec::with_capacity(rows * rb);
    for r in 0..rows {
        let start = (expert * block_rows + first + r * stride) * rb;
        ensure!(start + rb <= e.bytes.len(), "expert tensor too small");
        out.extend_from_slice(&e.bytes.as_slice()[start..start + rb]);
    }
    Ok(ffai_kernels::backend::HostBytes::from_vec(out))
}

/// A stacked expert tensor of exactly `shape`.
fn stacked_entry<'a>(w: &'a Weights, name: &str, shape: [usize; 3]) -> Result<&'a WeightEntry> {
    let e = w.get(name)?;
    ensure!(
        e.shape == shape,
        "{}: tensor \"{name}\" has shape {:?}, expected {shape:?}",
        w.source,
        e.shape
    );
    Ok(e)
}

/// A count the MoE config must give: the first present of config.json's `hf_keys`
/// (transformers 5 writes Qwen3-MoE's `num_experts` as `num_local_experts`; released
/// checkpoints say `num_experts`), or GGUF `{arch}.gguf_key`.
pub fn required_count(cfg: &ModelConfig, hf_keys: &[&str], gguf_key: &str) -> Result<usize> {
    for k in hf_keys {
        if let Some(v) = cfg.extra_usize(k, gguf_key)? {
            return Ok(v);
        }
    }
    let key = if cfg.is_gguf() {
        format!("{}.{gguf_key}", cfg.architecture)
    } else {
        hf_keys.join("\" or \"")
    };
    bail!("{}: a mixture-of-experts model needs \"{key}\"", cfg.source)
}

/// Checks that every sparse layer of `spec` has a shared expert gate
/// (`blk.N.ffn_gate_inp_shexp.weight`), for families whose shared expert is always gated
/// (Qwen3-Next, Qwen3.5-MoE): without the check a checkpoint missing it would load and
/// add the shared expert ungated.
pub fn require_shared_gate(w: &Weights, spec: &MoeSpec) -> Result<()> {
    ensure!(
        spec.shared_ffn > 0,
        "{}: the model's shared expert has intermediate size 0",
        w.source
    );
    for (i, _) in spec.sparse.iter().enumerate().filter(|(_, s)| **s) {
        ensure!(
            w.has(&format!("blk.{i}.ffn_gate_inp_shexp.weight")),
            "{}: layer {i} has no shared expert gate (shared_expert_gate / ffn_gate_inp_shexp)",
            w.source
        );
    }
    Ok(())
}

/// Which layers are sparse in a GGUF file: those with a router (llama.cpp writes no
/// layer list; its converters keep the dense layers' plain `ffn_*` tensors).
pub fn sparse_layers_from_tensors(cfg: &ModelConfig, w: &Weights) -> Vec<bool> {
    (0..cfg.num_layers)
        .map(|i| w.has(&format!("blk.{i}.ffn_gate_inp.weight")))
        .collect()
}

/// Qwen2/3-MoE's layer rule: layer `i` is sparse unless listed in `mlp_only_layers`,
/// and only when `(i + 1) % decoder_sparse_step == 0` (config.json; GGUF files are read
/// with [`sparse_layers_from_tensors`]).
pub fn sparse_layers_qwen(cfg: &ModelConfig, n_experts: usize) -> Result<Vec<bool>> {
    let step = cfg
        .extra_usize("decoder_sparse_step", "decoder_sparse_step")?
        .unwrap_or(1);
    ensure!(step >= 1, "{}: decoder_sparse_step must be at least 1", cfg.source);
    let dense: Vec<u64> = match cfg.extra("mlp_only_layers", "mlp_only_layers") {
        None => Vec::new(),
        Some(v) => {
            let a = v
                .as_array()
                .ok_or_else(|| Error::new(format!("{}: mlp_only_layers = {v} is not a list", cfg.source)))?;
            a.iter()
                .map(|x| {
                    x.as_u64().ok_or_else(|| {
                        Error::new(format!("{}: mlp_only_layers holds {x}, not a layer index", cfg.source))
                    })
                })
                .collect::<Result<_>>()?
        }
    };
    Ok((0..cfg.num_layers)
        .map(|i| !dense.contains(&(i as u64)) && n_experts > 0 && (i + 1) % step == 0)
        .collect())
}
