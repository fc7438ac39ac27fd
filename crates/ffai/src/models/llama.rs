//! The Llama family: pre-norm decoder blocks of RMSNorm → GQA attention with RoPE →
//! RMSNorm → SwiGLU MLP. Covers Llama 2/3/3.x (llama3 rope scaling), SmolLM/SmolLM2,
//! dense Mistral and Qwen2 (q/k/v bias); the variants differ in naming and defaults,
//! the forward pass is driven by the config.

use std::sync::Arc;

use ffai_kernels::backend::{AttnShape, Backend, RopeParams};
use ffai_kernels::cpu::CpuBackend;

use super::{check_tokens, Device, Family, InferenceState, LanguageModel};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::GenerationParameters;
use crate::inspect::Tap;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "llama",
    hf_architectures: &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"],
    model_types: &["llama", "mistral", "qwen2", "smollm", "smollm2"],
    gguf_architectures: &["llama", "mistral", "qwen2"],
    load,
};

/// A shape inside the family: its name and the sampling defaults it ships with.
pub trait LlamaVariant: Sync {
    fn name(&self) -> &'static str;
    fn default_parameters(&self) -> GenerationParameters;
}

/// Llama 2 / 3 / 3.x: Meta's generation_config (T 0.6, top-p 0.9).
pub struct Llama3;
/// SmolLM / SmolLM2: the model card recommends a low temperature (0.2, top-p 0.9).
pub struct SmolLM;
/// Dense Mistral: T 0.7 as Mistral's instruct checkpoints recommend.
pub struct Mistral;
/// Qwen2 / 2.5 (biased q/k/v): Qwen's generation_config (T 0.7, top-p 0.8, top-k 20, rep 1.05).
pub struct Qwen2;

impl LlamaVariant for Llama3 {
    fn name(&self) -> &'static str {
        "llama"
    }
    fn default_parameters(&self) -> GenerationParameters {
        GenerationParameters {
            temperature: 0.6,
            top_p: 0.9,
            ..Default::default()
        }
    }
}

impl LlamaVariant for SmolLM {
    fn name(&self) -> &'static str {
        "smollm"
    }
    fn default_parameters(&self) -> GenerationParameters {
        GenerationParameters {
            temperature: 0.2,
            top_p: 0.9,
            ..Default::default()
        }
    }
}

impl LlamaVariant for Mistral {
    fn name(&self) -> &'static str {
        "mistral"
    }
    fn default_parameters(&self) -> GenerationParameters {
        GenerationParameters {
            temperature: 0.7,
            prefill_step_size: 4096,
            ..Default::default()
        }
    }
}

impl LlamaVariant for Qwen2 {
    fn name(&self) -> &'static str {
        "qwen2"
    }
    fn default_parameters(&self) -> GenerationParameters {
        GenerationParameters {
            temperature: 0.7,
            top_p: 0.8,
            top_k: 20,
            repetition_penalty: 1.05,
            ..Default::default()
        }
    }
}

pub fn variant_for(cfg: &ModelConfig) -> &'static dyn LlamaVariant {
    let name = cfg.name.to_ascii_lowercase();
    match cfg.model_type.as_str() {
        "qwen2" => &Qwen2,
        "mistral" => &Mistral,
        _ if cfg.architecture == "Qwen2ForCausalLM" => &Qwen2,
        _ if cfg.architecture == "MistralForCausalLM" => &Mistral,
        _ if name.contains("smollm") || cfg.model_type.starts_with("smollm") => &SmolLM,
        _ => &Llama3,
    }
}

fn load(cfg: &ModelConfig, w: &Weights, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    match dev {
        Device::Cpu(b) => Ok(Box::new(Llama::<CpuBackend>::load(cfg, w, b.clone())?)),
    }
}

struct Layer<B: Backend> {
    attn_norm: B::Buf,
    wq: B::Mat,
    wk: B::Mat,
    wv: B::Mat,
    wo: B::Mat,
    /// q/k/v biases (Qwen2, or `attention_bias`).
    bias: Option<[B::Buf; 3]>,
    ffn_norm: B::Buf,
    w_gate: B::Mat,
    w_up: B::Mat,
    w_down: B::Mat,
}

pub struct Llama<B: Backend> {
    b: Arc<B>,
    cfg: ModelConfig,
    variant: &'static dyn LlamaVariant,
    embed: B::Mat,
    layers: Vec<Layer<B>>,
    final_norm: B::Buf,
    /// None when the head is tied to the embedding table.
    lm_head: Option<B::Mat>,
    inv_freq: B::Buf,
}

/// Activations for one chunk, allocated once per state.
struct Scratch<B: Backend> {
    x: B::Buf,
    xn: B::Buf,
    tmp: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    att: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    last: B::Buf,
    logits: B::Buf,
    k_cache: Vec<B::Kv>,
    v_cache: Vec<B::Kv>,
}

impl<B: Backend> Llama<B> {
    pub fn load(cfg: &ModelConfig, w: &Weights, b: Arc<B>) -> Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let mat = |name: &str, rows: usize, cols: usize| -> Result<B::Mat> {
            let e = w.matrix(name, rows, cols)?;
            Ok(b.matrix(e.ty, rows, cols, e.bytes.clone()))
        };
        let vec = |name: &str, len: usize| -> Result<B::Buf> { Ok(b.upload(&w.f32_vec(name, len)?)) };
        let has_bias = w.has("blk.0.attn_q.bias");
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            let bias = if has_bias {
                Some([
                    vec(&p("attn_q.bias"), qd)?,
                    vec(&p("attn_k.bias"), kvd)?,
                    vec(&p("attn_v.bias"), kvd)?,
                ])
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vec(&p("attn_norm.weight"), h)?,
                wq: mat(&p("attn_q.weight"), qd, h)?,
                wk: mat(&p("attn_k.weight"), kvd, h)?,
                wv: mat(&p("attn_v.weight"), kvd, h)?,
                wo: mat(&p("attn_output.weight"), h, qd)?,
                bias,
                ffn_norm: vec(&p("ffn_norm.weight"), h)?,
                w_gate: mat(&p("ffn_gate.weight"), f, h)?,
                w_up: mat(&p("ffn_up.weight"), f, h)?,
                w_down: mat(&p("ffn_down.weight"), h, f)?,
            });
        }
        let lm_head = if w.has("output.weight") && !cfg.tie_word_embeddings {
            Some(mat("output.weight", cfg.vocab_size, h)?)
        } else {
            None
        };
        let freq_factors = if w.has("rope_freqs.weight") {
            Some(w.f32_vec("rope_freqs.weight", cfg.head_dim / 2)?)
        } else {
            None
        };
        Ok(Llama {
            embed: mat("token_embd.weight", cfg.vocab_size, h)?,
            final_norm: vec("output_norm.weight", h)?,
            inv_freq: b.upload(&cfg.rope_inv_freq(freq_factors.as_deref())),
            layers,
            lm_head,
            variant: variant_for(cfg),
            cfg: cfg.clone(),
            b,
        })
    }

    fn attn_shape(&self, max_seq: usize) -> AttnShape {
        let c = &self.cfg;
        AttnShape {
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            max_seq,
            window: c.sliding_window.unwrap_or(0),
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        }
    }

    /// One chunk through every layer; returns nothing, leaves the final-normed hidden
    /// states in `s.xn`.
    fn forward_chunk(&self, ids: &[u32], pos0: usize, s: &mut Scratch<B>, shape: &AttnShape, tap: &mut Tap) {
        let (b, c, n) = (&*self.b, &self.cfg, ids.len());
        let h = c.hidden_size;
        let rope = RopeParams {
            inv_freq: &self.inv_freq,
            neox: c.rope_neox,
        };
        let eps = c.rms_norm_eps as f32;
        b.embed(&self.embed, ids, &mut s.x);
        tap.boundary(b, &s.x, n * h, "embed", None);
        for (i, l) in self.layers.iter().enumerate() {
            b.rms_norm(&s.x, &l.attn_norm, eps, n, &mut s.xn);
            b.matmuls(&[&l.wq, &l.wk, &l.wv], &s.xn, n, &mut [&mut s.q, &mut s.k, &mut s.v]);
            if let Some([bq, bk, bv]) = &l.bias {
                b.add_bias(&mut s.q, bq, n);
                b.add_bias(&mut s.k, bk, n);
                b.add_bias(&mut s.v, bv, n);
            }
            b.rope(&mut s.q, n, c.num_heads, c.head_dim, pos0, &rope);
            b.rope(&mut s.k, n, c.num_kv_heads, c.head_dim, pos0, &rope);
            b.kv_write(&mut s.k_cache[i], &s.k, n, pos0, shape);
            b.kv_write(&mut s.v_cache[i], &s.v, n, pos0, shape);
            b.attention(&s.q, &s.k_cache[i], &s.v_cache[i], n, pos0, shape, &mut s.att);
            b.matmul(&l.wo, &s.att, n, &mut s.tmp);
            b.add(&mut s.x, &s.tmp, n * h);

            b.rms_norm(&s.x, &l.ffn_norm, eps, n, &mut s.xn);
            b.matmuls(&[&l.w_gate, &l.w_up], &s.xn, n, &mut [&mut s.gate, &mut s.up]);
            b.silu_mul(&mut s.gate, &s.up, n * c.intermediate_size);
            b.matmul(&l.w_down, &s.gate, n, &mut s.tmp);
            b.add(&mut s.x, &s.tmp, n * h);
            tap.boundary(b, &s.x, n * h, "layer_out", Some(i));
        }
        b.rms_norm(&s.x, &self.final_norm, eps, n, &mut s.xn);
        tap.boundary(b, &s.xn, n * h, "final_norm", None);
    }
}

impl<B: Backend> LanguageModel for Llama<B> {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn family(&self) -> &'static str {
        FAMILY.name
    }

    fn variant(&self) -> &'static str {
        self.variant.name()
    }

    fn default_parameters(&self) -> GenerationParameters {
        self.variant.default_parameters()
    }

    fn device_name(&self) -> String {
        self.b.name()
    }

    fn new_state(&self, max_seq: usize, chunk: usize) -> Result<InferenceState> {
        let c = &self.cfg;
        let chunk = chunk.clamp(1, max_seq.max(1));
        let kv = c.num_kv_heads * c.head_dim * max_seq;
        let b = &*self.b;
        let scratch = Scratch::<B> {
            x: b.alloc(chunk * c.hidden_size),
            xn: b.alloc(chunk * c.hidden_size),
            tmp: b.alloc(chunk * c.hidden_size),
            q: b.alloc(chunk * c.num_heads * c.head_dim),
            k: b.alloc(chunk * c.num_kv_heads * c.head_dim),
            v: b.alloc(chunk * c.num_kv_heads * c.head_dim),
            att: b.alloc(chunk * c.num_heads * c.head_dim),
            gate: b.alloc(chunk * c.intermediate_size),
            up: b.alloc(chunk * c.intermediate_size),
            last: b.alloc(c.hidden_size),
            logits: b.alloc(c.vocab_size),
            k_cache: (0..c.num_layers).map(|_| b.alloc_kv(kv)).collect(),
            v_cache: (0..c.num_layers).map(|_| b.alloc_kv(kv)).collect(),
        };
        Ok(InferenceState {
            pos: 0,
            max_seq,
            chunk,
            tap: Tap::from_env(),
            inner: Box::new(scratch),
        })
    }

    fn forward(
        &self,
        tokens: &[u32],
        state: &mut InferenceState,
        all_logits: bool,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::new("forward called with no tokens"));
        }
        check_tokens(tokens, state, self.cfg.vocab_size)?;
        let shape = self.attn_shape(state.max_seq);
        let (vocab, h) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let b = &*self.b;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let s = state
            .inner
            .downcast_mut::<Scratch<B>>()
            .ok_or_else(|| Error::new("inference state belongs to a different model"))?;
        logits.clear();
        logits.resize(if all_logits { tokens.len() * vocab } else { vocab }, 0.0);
        let mut pos = state.pos;
        for (ci, ids) in tokens.chunks(state.chunk).enumerate() {
            let n = ids.len();
            self.forward_chunk(ids, pos, s, &shape, &mut state.tap);
            pos += n;
            let is_last = (ci + 1) * state.chunk >= tokens.len();
            // The LM head runs only where logits are wanted: every row, or the final row.
            let rows = if all_logits {
                0..n
            } else if is_last {
                n - 1..n
            } else {
                0..0
            };
            for r in rows {
                b.copy(&s.xn, r * h, &mut s.last, 0, h);
                b.matmul(head, &s.last, 1, &mut s.logits);
                let dst = if all_logits { (ci * state.chunk + r) * vocab } else { 0 };
                b.download(&s.logits, 0..vocab, &mut logits[dst..dst + vocab]);
            }
        }
        state.tap.boundary(b, &s.logits, vocab, "logits", None);
        state.pos = pos;
        Ok(())
    }
}
