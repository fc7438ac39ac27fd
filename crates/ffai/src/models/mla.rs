//! Multi-head latent attention (DeepSeek-V2/V3's MLA), run in its absorbed form so the
//! KV cache holds the compressed latent, not per-head K and V.
//!
//! Per token: `c = rms_norm(x · W_DKVᵀ)` (the latent, `kv_lora_rank`) and `k_pe =
//! rope(x · W_KRᵀ)` (`qk_rope_head_dim`, one for all heads); per head `k_nope = W_UK[h] ·
//! c` and `v = W_UV[h] · c` (`W_UK`, `W_UV`: the two parts of `kv_b_proj`). Since
//! `q_nope · k_nope = (W_UK[h]ᵀ · q_nope) · c`, the query's nope part is carried into the
//! latent space once per token and head, and attention becomes multi-query attention
//! over one KV "head" `[c | k_pe]` whose value is its `c` prefix:
//!
//! ```text
//! q           = q_b(rms_norm(q_a(x)))  or  q_proj(x)      [n, H·(nope+rope)]    matmul(s)
//! c, k_pe     = kv_a(x) split; c normed; k_pe roped       [n, r], [n, rope]     matmuls, rms_norm, rope_step
//! cache row   = [c | k_pe]                                [n, r+rope]           copy_rows, kv_write_step
//! q_lat[h]    = W_UK[h]ᵀ · q_nope[h]                       [n·H, r]              moe_matmuls (head h = "expert" h)
//! q_full[h]   = [q_lat[h] | rope(q_pe[h])]                [n·H, r+rope]         copy_rows
//! o_lat[h]    = softmax(scale · q_full[h] · rowsᵀ) · c     [n·H, r]              attention_mla_step
//! out[h]      = W_UV[h] · o_lat[h]                         [n, H·v]              moe_matmuls
//! ```
//!
//! The cache costs `(kv_lora_rank + qk_rope_head_dim)` elements per token and layer
//! instead of `H · (qk_nope + qk_rope + v_head_dim)` for expanded K and V (DeepSeek-V3:
//! 576 against 40,960). The score scale is `(nope + rope)^-½` (times YaRN's mscale²,
//! set by the family); a RoPE attention factor on cos and sin multiplies q_pe and k_pe
//! (only the rope part of the score: it cannot be folded into the scale as the other
//! families do).
//!
//! Weights (GGUF names, see `weights::hf_to_gguf_name_for`): `attn_q` or `attn_q_a`,
//! `attn_q_a_norm`, `attn_q_b`; `attn_kv_a_mqa` (`[r + rope, hidden]`, split by rows at
//! load without a copy), `attn_kv_a_norm`; and either `attn_kv_b` (`[H·(nope+v), r]`:
//! each head's `W_UK` block is transposed at load into a matrix of its own, floats as
//! stored, block-quantized ones dequantized to f32; `W_UV` blocks are viewed in place) or
//! llama.cpp's split `attn_k_b` (`[H, r, nope]`, already transposed) and `attn_v_b`
//! (`[H, v, r]`).

use ffai_kernels::backend::{AttnShape, Backend, HostBytes, RopeParams};
use ffai_kernels::quant::WeightType;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::{WeightEntry, Weights};
use crate::{bail, ensure};

/// MLA's sizes.
#[derive(Clone, Debug)]
pub struct MlaSpec {
    pub n_heads: usize,
    /// The query's low-rank width (None: a plain `q_proj`, DeepSeek-V2-Lite).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope: usize,
    pub qk_rope: usize,
    pub v_dim: usize,
    /// The RoPE attention factor on cos and sin (YaRN's; 1 for DeepSeek's own configs),
    /// applied to q_pe and k_pe.
    pub rope_factor: f32,
}

impl MlaSpec {
    /// Checks the sizes against the config limits (they come from untrusted configs).
    pub fn checked(self, cfg: &ModelConfig) -> Result<MlaSpec> {
        let src = &cfg.source;
        for (name, v) in [
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope),
            ("qk_rope_head_dim", self.qk_rope),
            ("v_head_dim", self.v_dim),
            ("q_lora_rank", self.q_lora_rank.unwrap_or(1)),
        ] {
            ensure!(
                (1..=crate::config::MAX_DIM).contains(&v),
                "{src}: {name} = {v} must be in 1..={}",
                crate::config::MAX_DIM
            );
        }
        ensure!(
            self.qk_rope.is_multiple_of(2),
            "{src}: qk_rope_head_dim {} must be even for RoPE",
            self.qk_rope
        );
        ensure!(
            self.rope_factor.is_finite() && self.rope_factor > 0.0,
            "{src}: RoPE attention factor {} must be a positive finite number",
            self.rope_factor
        );
        Ok(self)
    }

    /// Elements of one cache row: the latent and the shared RoPE key.
    pub fn key_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope
    }

    /// The attention output per token (`o_proj`'s input).
    pub fn out_dim(&self) -> usize {
        self.n_heads * self.v_dim
    }

    /// Floats of scratch one row of a step needs, in checked arithmetic.
    pub fn floats_per_row(&self) -> Option<usize> {
        let h = self.n_heads;
        let (r, ro, no) = (self.kv_lora_rank, self.qk_rope, self.qk_nope);
        let per_head = [no + ro, no, ro, r, r + ro, r, 1]
            .iter()
            .try_fold(0usize, |a, &x| a.checked_add(x))?;
        h.checked_mul(per_head)?
            .checked_add(self.q_lora_rank.unwrap_or(0).checked_mul(2)?)?
            .checked_add(2 * r + ro + r + ro)?
            .checked_add(self.out_dim())
    }
}

/// One layer's MLA weights.
pub struct MlaLayer<B: Backend> {
    /// `q_a` and its norm, then `q_b`; or `q_proj` alone.
    q_a: Option<(B::Mat, B::Buf)>,
    q: B::Mat,
    kv_lat: B::Mat,
    kv_pe: B::Mat,
    kv_norm: B::Buf,
    /// Per head `W_UK[h]ᵀ` (`[r, nope]`) and `W_UV[h]` (`[v, r]`).
    uk_t: Vec<B::Mat>,
    uv: Vec<B::Mat>,
}

/// A step's MLA scratch, allocated with the batch.
pub struct MlaScratch<B: Backend> {
    qa: B::Buf,
    qan: B::Buf,
    q: B::Buf,
    q_nope: B::Buf,
    q_pe: B::Buf,
    q_lat: B::Buf,
    q_full: B::Buf,
    lat: B::Buf,
    lat_n: B::Buf,
    pe: B::Buf,
    row: B::Buf,
    o_lat: B::Buf,
    /// `t * H + h -> h` (as f32): the per-head products run as `moe_matmuls` with head
    /// `h` as expert `h`.
    head_ids: B::Buf,
}

impl<B: Backend> MlaScratch<B> {
    pub fn new(b: &B, s: &MlaSpec, rows: usize) -> Self {
        let (h, r, ro, no) = (s.n_heads, s.kv_lora_rank, s.qk_rope, s.qk_nope);
        let ql = s.q_lora_rank.unwrap_or(0);
        let ids: Vec<f32> = (0..rows * h).map(|i| (i % h) as f32).collect();
        MlaScratch {
            qa: b.alloc(rows * ql),
            qan: b.alloc(rows * ql),
            q: b.alloc(rows * h * (no + ro)),
            q_nope: b.alloc(rows * h * no),
            q_pe: b.alloc(rows * h * ro),
            q_lat: b.alloc(rows * h * r),
            q_full: b.alloc(rows * h * (r + ro)),
            lat: b.alloc(rows * r),
            lat_n: b.alloc(rows * r),
            pe: b.alloc(rows * ro),
            row: b.alloc(rows * (r + ro)),
            o_lat: b.alloc(rows * h * r),
            head_ids: b.upload(&ids),
        }
    }
}

/// `W_UK[h]ᵀ` of every head from the joined `kv_b` (`[H·(nope+v), r]`): each head's
/// `nope` rows transposed into a `[r, nope]` matrix. F32/F16/BF16 are moved element by
/// element (exact); block-quantized types are dequantized to F32.
fn transposed_uk(e: &WeightEntry, s: &MlaSpec) -> Result<Vec<(WeightType, HostBytes)>> {
    let (r, no, v) = (s.kv_lora_rank, s.qk_nope, s.v_dim);
    let rb = e.ty.row_bytes(r).ok_or_else(|| Error::new("bad kv_b row length"))?;
    let es = match e.ty {
        WeightType::F32 => Some(4),
        WeightType::F16 | WeightType::BF16 => Some(2),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.n_heads);
    let mut row = vec![0f32; r];
    for h in 0..s.n_heads {
        let base = h * (no + v) * rb;
        ensure!(base + no * rb <= e.bytes.len(), "kv_b tensor too small");
        let src = &e.bytes.as_slice()[base..base + no * rb];
        match es {
            Some(es) => {
                let mut t = vec![0u8; r * no * es];
                for i in 0..no {
                    for c in 0..r {
                        let from = (i * r + c) * es;
                        let to = (c * no + i) * es;
                        t[to..to + es].copy_from_slice(&src[from..from + es]);
                    }
                }
                out.push((e.ty, HostBytes::from_vec(t)));
            }
            None => {
                let mut t = vec![0f32; r * no];
                for i in 0..no {
                    ffai_kernels::quant::dequantize_row(e.ty, &src[i * rb..(i + 1) * rb], &mut row);
                    for c in 0..r {
                        t[c * no + i] = row[c];
                    }
                }
                let bytes: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
                out.push((WeightType::F32, HostBytes::from_vec(bytes)));
            }
        }
    }
    Ok(out)
}

impl<B: Backend> MlaLayer<B> {
    pub fn load(w: &Weights, b: &B, i: usize, s: &MlaSpec, hidden: usize) -> Result<Self> {
        let p = |x: &str| format!("blk.{i}.{x}");
        let (hh, r, ro, no, v) = (s.n_heads, s.kv_lora_rank, s.qk_rope, s.qk_nope, s.v_dim);
        let mat = |name: &str, rows: usize, cols: usize| -> Result<B::Mat> {
            let e = w.matrix(&p(name), rows, cols)?;
            Ok(b.matrix(e.ty, rows, cols, e.bytes.clone()))
        };
        let qd = hh * (no + ro);
        let (q_a, q) = match s.q_lora_rank {
            Some(ql) => (
                Some((
                    mat("attn_q_a.weight", ql, hidden)?,
                    b.upload(&w.f32_vec(&p("attn_q_a_norm.weight"), ql)?),
                )),
                mat("attn_q_b.weight", qd, ql)?,
            ),
            None => (None, mat("attn_q.weight", qd, hidden)?),
        };
        let kv_a = w.matrix(&p("attn_kv_a_mqa.weight"), r + ro, hidden)?;
        let rb = kv_a
            .ty
            .row_bytes(hidden)
            .ok_or_else(|| Error::new("bad kv_a row length"))?;
        let kv_lat = b.matrix(kv_a.ty, r, hidden, kv_a.bytes.slice(0, r * rb));
        let kv_pe = b.matrix(kv_a.ty, ro, hidden, kv_a.bytes.slice(r * rb, ro * rb));
        let kv_norm = b.upload(&w.f32_vec(&p("attn_kv_a_norm.weight"), r)?);
        let (uk_t, uv) = if w.has(&p("attn_k_b.weight")) {
            // llama.cpp's split form: k_b [H, r, nope] (W_UKᵀ per head), v_b [H, v, r].
            let per_head = |name: &str, rows: usize, cols: usize| -> Result<Vec<B::Mat>> {
                let e = w.get(&p(name))?;
                ensure!(
                    e.shape == [hh, rows, cols],
                    "{}: tensor \"{}\" has shape {:?}, expected {:?}",
                    w.source,
                    p(name),
                    e.shape,
                    [hh, rows, cols]
                );
                let rb = e.ty.row_bytes(cols).ok_or_else(|| Error::new("bad row length"))?;
                ensure!(e.bytes.len() >= hh * rows * rb, "{}: {} too small", w.source, p(name));
                Ok((0..hh)
                    .map(|h| b.matrix(e.ty, rows, cols, e.bytes.slice(h * rows * rb, rows * rb)))
                    .collect())
            };
            (per_head("attn_k_b.weight", r, no)?, per_head("attn_v_b.weight", v, r)?)
        } else {
            let e = w.matrix(&p("attn_kv_b.weight"), hh * (no + v), r)?;
            let rb = e.ty.row_bytes(r).ok_or_else(|| Error::new("bad kv_b row length"))?;
            let uk = transposed_uk(e, s)?
                .into_iter()
                .map(|(ty, bytes)| b.matrix(ty, r, no, bytes))
                .collect();
            let uv = (0..hh)
                .map(|h| b.matrix(e.ty, v, r, e.bytes.slice((h * (no + v) + no) * rb, v * rb)))
                .collect();
            (uk, uv)
        };
        for name in ["attn_q_a.bias", "attn_kv_a_mqa.bias", "attn_q.bias"] {
            if w.has(&p(name)) {
                bail!("{}: {} (attention_bias) is not supported for MLA", w.source, p(name));
            }
        }
        Ok(MlaLayer {
            q_a,
            q,
            kv_lat,
            kv_pe,
            kv_norm,
            uk_t,
            uv,
        })
    }

    /// Layer attention of `x[n, hidden]` (already normed) into `out[n, H·v]`, writing the
    /// step's cache rows into `cache` (one KV head of `key_dim`). `shape` is the layer's
    /// (one KV head, `head_dim = key_dim`, the MLA score scale).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        b: &B,
        sp: &MlaSpec,
        x: &B::Buf,
        n: usize,
        s: &mut MlaScratch<B>,
        cache: &mut B::Kv,
        step: &B::Step,
        group: usize,
        shape: &AttnShape,
        rope: &RopeParams<'_, B>,
        eps: f32,
        out: &mut B::Buf,
    ) {
        let (hh, r, ro, no) = (sp.n_heads, sp.kv_lora_rank, sp.qk_rope, sp.qk_nope);
        match &self.q_a {
            Some((qa, qn)) => {
                b.matmuls(
                    &[qa, &self.kv_lat, &self.kv_pe],
                    x,
                    n,
                    &mut [&mut s.qa, &mut s.lat, &mut s.pe],
                );
                b.rms_norm(&s.qa, qn, eps, n, &mut s.qan);
                b.matmul(&self.q, &s.qan, n, &mut s.q);
            }
            None => b.matmuls(
                &[&self.q, &self.kv_lat, &self.kv_pe],
                x,
                n,
                &mut [&mut s.q, &mut s.lat, &mut s.pe],
            ),
        }
        // Query parts per (token, head) row.
        b.copy_rows(&s.q, no + ro, 0, &mut s.q_nope, no, 0, no, n * hh);
        b.copy_rows(&s.q, no + ro, no, &mut s.q_pe, ro, 0, ro, n * hh);
        b.rope_step(&mut s.q_pe, n, hh, ro, step, rope);
        b.rope_step(&mut s.pe, n, 1, ro, step, rope);
        if sp.rope_factor != 1.0 {
            b.scale(&mut s.q_pe, sp.rope_factor, n * hh * ro);
            b.scale(&mut s.pe, sp.rope_factor, n * ro);
        }
        // The cache row [normed latent | roped k_pe].
        b.rms_norm(&s.lat, &self.kv_norm, eps, n, &mut s.lat_n);
        b.copy_rows(&s.lat_n, r, 0, &mut s.row, r + ro, 0, r, n);
        b.copy_rows(&s.pe, ro, 0, &mut s.row, r + ro, r, ro, n);
        b.kv_write_step(cache, &s.row, n, step, group, shape);
        // The query in latent space, joined with its RoPE part.
        b.moe_matmuls(&[&self.uk_t], &s.q_nope, true, &s.head_ids, n, hh, &mut [&mut s.q_lat]);
        b.copy_rows(&s.q_lat, r, 0, &mut s.q_full, r + ro, 0, r, n * hh);
        b.copy_rows(&s.q_pe, ro, 0, &mut s.q_full, r + ro, r, ro, n * hh);
        b.attention_mla_step(&s.q_full, cache, n, step, group, shape, r, &mut s.o_lat);
        // Back out of the latent: each head's value projection.
        b.moe_matmuls(&[&self.uv], &s.o_lat, true, &s.head_ids, n, hh, &mut [out]);
    }
}
