#!/usr/bin/env python3
"""Generate Hugging Face transformers parity fixtures for ffai.

For every model family below this builds a tiny random-weight model with
transformers, with the family's quirks switched on, and writes into
<out>/<family>/:

  config.json            exactly as transformers' save_pretrained writes it
  model.safetensors      weights as transformers' save_pretrained writes them
                         (float32; BF16 for llama_bf16; tied weights once)
  reference.safetensors  "input_ids" I64 [T] and "logits" F32 [T, vocab]:
                         transformers' fp32 logits of one full-sequence forward
                         pass, attn_implementation="eager", on CPU
  meta.json              family, model_type, architecture, versions, seq_len,
                         notes (which quirks are on, what a reimplementation
                         must match) plus rope buffers and quirk sensitivities

Usage (needs torch + transformers >= 5, runs on CPU):

  python3 scripts/make_parity_fixtures.py --out tests/fixtures/parity [--only llama,phi3]

Everything is seeded per family (torch.manual_seed) and runs single-threaded
with deterministic algorithms, so reruns are byte-identical on one machine.
"""

import argparse
import json
import math
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import transformers
from transformers import AutoModelForCausalLM

SEQ_LEN = 64

# Common tiny sizes.
BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

WINDOW = 16

# Phi-3 longrope factors (head_dim 16 -> 8 factors each); short and long are
# different everywhere except the first entry so using the wrong set shows.
PHI3_SHORT = [1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875]
PHI3_LONG = [1.0, 1.5, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0]


def fam_configs():
    """family -> (config class name, config kwargs, notes, per-family init overrides)."""
    F = {}

    F["llama"] = (
        "LlamaConfig",
        dict(
            BASE,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
            attention_bias=False,
            mlp_bias=False,
        ),
        [
            "rope_parameters.rope_type=llama3 (factor 8, low_freq_factor 1, high_freq_factor 4, "
            "original_max_position_embeddings 32, rope_theta 1e4); with head_dim 16 the 8 frequencies cover all three "
            "llama3 regimes: wavelen=2*pi/inv_freq < 32/4=8 kept (i=0), > 32/1=32 divided by factor (i>=2), in between "
            "smoothed with s=(32/wavelen - 1)/(4 - 1): inv=(1-s)*inv/8 + s*inv (i=1)",
            "GQA 4 heads / 2 kv heads, head_dim 16, untied lm_head, attention_bias False, mlp_bias False, silu gated MLP",
        ],
        {},
    )

    F["qwen2"] = (
        "Qwen2Config",
        dict(BASE, use_sliding_window=False),
        [
            "q_proj/k_proj/v_proj have biases (always on in Qwen2), o_proj has none",
            "use_sliding_window False (config.sliding_window is written as null, all layer_types full_attention)",
            "GQA 4/2, head_dim 16, untied lm_head, rope_theta 1e4 default rope",
        ],
        {},
    )

    F["qwen3"] = (
        "Qwen3Config",
        dict(BASE, head_dim=32, attention_bias=False, use_sliding_window=False),
        [
            "head_dim 32 with hidden 64 and 4 heads (q_proj out 128 != hidden), GQA 2 kv heads",
            "q_norm/k_norm: plain RMSNorm (weight * x_normed, weight init around 1) over head_dim, applied per head "
            "after the projection reshape and before RoPE",
            "no biases (attention_bias False), untied lm_head, no sliding window",
        ],
        {},
    )

    F["mistral"] = (
        "MistralConfig",
        dict(BASE, sliding_window=WINDOW),
        [
            "sliding_window 16 on every layer: query i attends keys j with i-16 < j <= i "
            "(transformers sliding_window_overlay: kv_idx > q_idx - sliding_window, and causal), i.e. 16 keys incl. itself",
            "GQA 4/2, head_dim 16, untied lm_head",
        ],
        {},
    )

    F["phi3"] = (
        "Phi3Config",
        dict(
            BASE,
            original_max_position_embeddings=32,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                short_factor=PHI3_SHORT,
                long_factor=PHI3_LONG,
                original_max_position_embeddings=32,
            ),
        ),
        [
            "fused self_attn.qkv_proj (rows: q [n_heads*hd], then k [n_kv*hd], then v [n_kv*hd]) and fused "
            "mlp.gate_up_proj (rows: gate [0:I], then up [I:2I]; out = down(up * silu(gate)))",
            "GQA 4/2, head_dim 16, untied lm_head, no biases",
            "rope_type longrope with short_factor=%s, long_factor=%s, original_max_position_embeddings 32 (also the "
            "top-level Phi3Config field, which transformers gives priority), max_position_embeddings 256, no 'factor' key"
            % (PHI3_SHORT, PHI3_LONG),
        ],
        {},
    )

    F["gemma2"] = (
        "Gemma2Config",
        dict(
            BASE,
            num_hidden_layers=4,
            head_dim=32,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=WINDOW,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        ),
        [
            "head_dim 32 (q_proj out 128 != hidden 64), GQA 4/2; attention scale = query_pre_attn_scalar**-0.5 = 24**-0.5 "
            "(not head_dim**-0.5)",
            "attn_logit_softcapping 50: scores = tanh((q.k * scale)/50)*50 before mask+softmax; final_logit_softcapping 30: "
            "logits = tanh(logits/30)*30",
            "layer_types default ((i+1)%2 -> sliding): layers 0,2 sliding_attention (window 16: i-16 < j <= i), layers 1,3 "
            "full_attention",
            "embeddings multiplied by sqrt(hidden)=8.0 (cast to weight dtype); all RMSNorms are Gemma-style "
            "x_normed * (1 + w) computed in fp32; 4 norms per layer: input_layernorm, post_attention_layernorm "
            "(on attn output before residual add), pre_feedforward_layernorm, post_feedforward_layernorm (on mlp output "
            "before residual add); gated MLP with gelu_pytorch_tanh",
            "TIED lm_head (tie_word_embeddings True, as in every real Gemma 2; model.safetensors has no lm_head.weight, "
            "logits = final_norm(h) @ embed_tokens.weight^T, WITHOUT the sqrt(hidden) embedding scale): untied would "
            "push the 4-layer head_dim-32 fixture to the 1 MB limit, and this covers the tied path",
            "init: q_proj/k_proj std 0.3 and embed_tokens (= lm_head) std 0.6 (instead of 0.15) so both soft-caps bite "
            "(see sensitivity)",
        ],
        {"q_proj": 0.3, "k_proj": 0.3, "embed_tokens": 0.6},
    )

    F["gemma3"] = (
        "Gemma3TextConfig",
        dict(
            BASE,
            num_hidden_layers=4,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            sliding_window_pattern=2,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            },
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        ),
        [
            "Gemma3ForCausalLM, model_type gemma3_text; head_dim 32 (q_proj out 128 != hidden 64), GQA 4/2",
            "layer_types given explicitly = [sliding, full, sliding, full] (global every 2nd layer; 4 layers to stay "
            "under 1 MB) together with sliding_window_pattern=2 (a legacy kwarg: transformers only uses it to build "
            "layer_types when layer_types is absent, (i+1) % pattern != 0 -> sliding, and writes it back as the private "
            "key _sliding_window_pattern). A reimplementation should take config.layer_types as authoritative; "
            "without our kwarg transformers would have written _sliding_window_pattern 6, which disagrees with "
            "layer_types",
            "rope per layer type (config.rope_parameters is a dict keyed by layer type): sliding_attention layers use "
            "default rope theta 1e4; full_attention layers use rope_type linear, factor 8, theta 1e6 -> "
            "inv_freq = 1/(1e6**(2i/32)) / 8; attention_scaling 1.0 for both",
            "sliding layers: window 16 (i-16 < j <= i); full layers causal",
            "q_norm/k_norm: Gemma-style RMSNorm x_normed*(1+w) over head_dim, per head, before RoPE",
            "attention scale = query_pre_attn_scalar**-0.5 = 24**-0.5; attn_logit_softcapping and "
            "final_logit_softcapping are None (as in real Gemma 3)",
            "embeddings multiplied by sqrt(hidden)=8.0; all RMSNorms are (1 + w) in fp32; 4 norms per layer as in Gemma 2; "
            "gated MLP with gelu_pytorch_tanh",
            "TIED lm_head (tie_word_embeddings True, as in every real Gemma 3; no lm_head.weight in model.safetensors; "
            "logits use embed_tokens.weight without the sqrt(hidden) scale): untied would push the fixture to the 1 MB limit",
        ],
        {},
    )

    F["olmo2"] = (
        "Olmo2Config",
        dict(BASE),
        [
            "post-norm blocks: h = h + post_attention_layernorm(attn(h)); h = h + post_feedforward_layernorm(mlp(h)); no "
            "pre-norms (there is no input_layernorm); final model.norm before lm_head",
            "q_norm over the full q projection (n_heads*head_dim = 64) and k_norm over the full k projection "
            "(n_kv*head_dim = 32), plain RMSNorm, applied before reshape into heads and before RoPE",
            "GQA 4/2 (real OLMo 2 is MHA, GQA is allowed by the config), head_dim 16, untied lm_head, rms_norm_eps 1e-5",
        ],
        {},
    )

    F["granite"] = (
        "GraniteConfig",
        dict(
            BASE,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.0625,
            logits_scaling=8.0,
        ),
        [
            "embedding_multiplier 12: h0 = embed(ids) * 12",
            "residual_multiplier 0.22: h = h + 0.22 * attn(...), h = h + 0.22 * mlp(...)",
            "attention_multiplier 0.0625 used as the attention scale instead of head_dim**-0.5 (=0.25)",
            "logits_scaling 8: logits = lm_head(norm(h)) / 8",
            "init: lm_head std 1.2 (= 0.15 * logits_scaling) so the logits still span a few units after the / 8",
            "GQA 4/2, head_dim 16, untied lm_head",
        ],
        {"lm_head": 1.2},
    )

    F["starcoder2"] = (
        "Starcoder2Config",
        dict(
            BASE,
            use_bias=True,
            sliding_window=WINDOW,
            hidden_act="gelu_pytorch_tanh",
            norm_epsilon=1e-5,
        ),
        [
            "LayerNorm (with bias, eps 1e-5) for input_layernorm, post_attention_layernorm and model.norm",
            "MLP not gated: c_proj(gelu_pytorch_tanh(c_fc(x))) with biases on c_fc and c_proj (hidden_act kept at the "
            "family default gelu_pytorch_tanh, the tanh approximation)",
            "q/k/v/o projections with biases (use_bias True)",
            "sliding_window 16 on every layer (i-16 < j <= i)",
            "GQA 4/2, head_dim 16, untied lm_head (family default is tied)",
        ],
        {},
    )
    F["qwen3_moe"] = (
        "Qwen3MoeConfig",
        dict(
            BASE,
            num_hidden_layers=4,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            attention_bias=False,
            use_sliding_window=False,
        ),
        [
            "Qwen3MoeForCausalLM: the Qwen3 attention (head_dim 32 with hidden 64 and 4 heads, q_proj out 128 != hidden; "
            "GQA 4/1; per-head q_norm/k_norm RMSNorm before RoPE), untied lm_head, no sliding window",
            "MoE MLP: router = mlp.gate (Linear 64 -> 8 experts, no bias); probs = softmax(router_logits) in fp32 over "
            "all 8 experts; top-2 by probability (torch.topk); norm_topk_prob True: the two probabilities divided by "
            "their sum; out = sum_j w_j * down_e(silu(gate_e(x)) * up_e(x)); moe_intermediate_size 16",
            "mlp_only_layers [1] and decoder_sparse_step 1: layers 0, 2, 3 are sparse, layer 1 has the dense MLP of "
            "intermediate_size 64 (a layer is sparse iff not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0)",
            "save_pretrained writes the experts one matrix each: mlp.experts.E.{gate,up,down}_proj.weight "
            "(transformers 5 keeps them fused as experts.gate_up_proj [E, 2*16, 64], gate rows first, and "
            "experts.down_proj [E, 64, 16] in memory)",
        ],
        {},
    )
    F["mixtral"] = (
        "MixtralConfig",
        dict(
            BASE,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=WINDOW,
        ),
        [
            "MixtralForCausalLM: the Mistral block (GQA 4/2, head_dim 16, untied lm_head) with sliding_window 16 on "
            "every layer (i-16 < j <= i)",
            "MoE MLP in every layer: router mlp.gate (64 -> 8, no bias); softmax over the 8 experts in fp32, top-2, "
            "ALWAYS renormalised (Mixtral has no norm_topk_prob); experts are SwiGLU w2(silu(w1 x) * w3 x) of "
            "intermediate_size 32 (w1 = gate, w3 = up, w2 = down)",
            "save_pretrained writes mlp.experts.E.{gate,up,down}_proj.weight (transformers 5 names); original Mixtral "
            "checkpoints use block_sparse_moe.gate and block_sparse_moe.experts.E.{w1,w3,w2}",
        ],
        {},
    )
    F["olmoe"] = (
        "OlmoeConfig",
        dict(
            BASE,
            num_key_value_heads=4,
            intermediate_size=16,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            clip_qkv=1.5,
            rms_norm_eps=1e-5,
        ),
        [
            "OlmoeForCausalLM: pre-norm Llama block; q_norm over the whole q projection (hidden 64) and k_norm over "
            "the whole k projection (n_kv * head_dim 64), plain RMSNorm, before the head split and RoPE; MHA 4/4 as "
            "in real OLMoE, head_dim 16, untied lm_head, rms_norm_eps 1e-5",
            "clip_qkv 1.5: after the norms, q, k and v are clamped to [-1.5, 1.5] (it bites: normed q/k are ~N(0, 1))",
            "MoE MLP in every layer: router mlp.gate (64 -> 16, no bias); softmax over 16 experts in fp32, top-4, NOT "
            "renormalised (norm_topk_prob False): out = sum of the four experts' outputs times their raw "
            "probabilities; experts SwiGLU of intermediate_size 16",
        ],
        {},
    )
    F["gpt_oss"] = (
        "GptOssConfig",
        dict(
            BASE,
            head_dim=16,
            intermediate_size=16,
            max_position_embeddings=131072,
            num_local_experts=16,
            num_experts_per_tok=4,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            attention_bias=True,
            rms_norm_eps=1e-5,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=32.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=4096,
            ),
        ),
        [
            "GptOssForCausalLM: pre-norm block (input_layernorm, post_attention_layernorm = the norm before the MLP), "
            "GQA 4/2, head_dim 16, q/k/v/o with biases (attention_bias True), untied lm_head, rms_norm_eps 1e-5",
            "layer_types [sliding_attention, full_attention]: layer 0 sees the last 16 positions (i-16 < j <= i), "
            "layer 1 everything",
            "attention sinks: self_attn.sinks [heads], one logit per head appended to every row's scores before the "
            "softmax and dropped after it (adds exp(sink) to the denominator, nothing to the output); re-initialised "
            "N(0.5, 1.5) so they matter",
            "YaRN RoPE: rope_theta 150000, factor 32, beta_fast 32, beta_slow 1, original_max_position_embeddings 4096, "
            "truncate False (the correction range low/high stay fractional: for head_dim 16, low = 2.02.., high = "
            "4.35..); inv_freq = interp * (1 - extrap_factor) + extrap * extrap_factor with extrap_factor = 1 - "
            "ramp(low, high); attention_factor 0.1 ln 32 + 1 multiplies cos AND sin (so q.k is scaled by its square); "
            "rotate_half (NeoX halves) over the whole head",
            "MoE MLP in every layer: router mlp.router = Linear(64 -> 16) WITH bias; top-4 of the router logits "
            "(torch.topk), softmax over those 4 logits only; experts with biases: gate_up = x @ gate_up_proj[e] "
            "(stored [E, hidden, 2*16], in x out) + gate_up_proj_bias[e]; gate = gate_up[..., ::2] (even columns), up "
            "= gate_up[..., 1::2] (odd); clamped SwiGLU g = min(gate, 7), u = clamp(up, -7, 7), (u + 1) * g * "
            "sigmoid(1.702 g); out = glu @ down_proj[e] ([E, 16, hidden], in x out) + down_proj_bias[e]",
            "expert weights re-initialised N(0, 0.6) so that the SwiGLU clamp at 7 bites (see sensitivity)",
        ],
        {"experts": 0.6},
    )
    cls, kw, notes, ov = F["gpt_oss"]
    F["gpt_oss_mxfp4"] = (
        cls,
        dict(kw, intermediate_size=32),
        notes[:-1] + [
            "as gpt_oss but intermediate_size 32 (MXFP4 needs rows of 32) and the experts stored as the released "
            "checkpoints store them: mlp.experts.{gate_up,down}_proj_blocks (u8 [E, out, in/32, 16], element 2i of a "
            "block in the low nibble of byte i, 2i+1 in the high nibble; codes index the E2M1 values 0, .5, 1, 1.5, 2, "
            "3, 4, 6, bit 3 the sign) and _scales (u8 [E, out, in/32], E8M0: 2^(s - 127)); gate_up rows are "
            "interleaved (gate even, up odd), i.e. the transposes of the float gate_up_proj / down_proj",
            "the expert weights N(0, 0.6) are rounded to MXFP4 (per block of 32 along the input: scale 2^ceil(log2("
            "amax / 6)), nearest E2M1 code, ties to the even code) BEFORE the routing check and the reference forward, "
            "and the reference logits come from transformers' own convert_moe_packed_tensors of the stored "
            "blocks/scales (checked equal to the rounded weights), so the stored MXFP4 is exactly the reference's "
            "weights",
        ],
        ov,
    )
    F["deepseek_v2"] = (
        "DeepseekV2Config",
        dict(
            BASE,
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=64,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        [
            "DeepseekV2ForCausalLM, V2-Lite shape: q_lora_rank null (a plain q_proj 64 -> 4 * (16 + 8)); multi-head "
            "latent attention: kv_a_proj_with_mqa 64 -> 32 + 8, split into the latent (kv_lora_rank 32, then "
            "kv_a_layernorm) and the shared k_pe (qk_rope_head_dim 8); kv_b_proj 32 -> 4 * (16 + 16) gives per head "
            "k_nope (qk_nope_head_dim 16) and v (v_head_dim 16); q splits per head into q_nope 16 | q_pe 8",
            "RoPE on q_pe and k_pe only, interleaved pairs (x0, x1), (x2, x3), ... (apply_rotary_emb via complex "
            "numbers), rope_theta 1e4 over qk_rope_head_dim 8; softmax scale (16 + 8)^-0.5; o_proj 4 * 16 -> 64",
            "layer 0 dense (first_k_dense_replace 1, intermediate_size 64); layers 1, 2: MoE with 8 routed experts "
            "(moe_intermediate_size 16) and 1 shared expert (an MLP of 16, added to the routed sum)",
            "router: softmax over all 8 experts in fp32; topk_method group_limited_greedy: 4 groups of 2 scored by "
            "their best probability, the best 2 groups kept, top-3 experts of those (k 3 > topk_group 2, so the "
            "group limit changes choices); weights are the probabilities "
            "times routed_scaling_factor 1.5, never renormalised (transformers' V2 router has no norm_topk_prob)",
        ],
        {},
    )
    F["deepseek_v3"] = (
        "DeepseekV3Config",
        dict(
            BASE,
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=64,
            q_lora_rank=24,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=True,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=32,
                beta_fast=32.0,
                beta_slow=1.0,
                mscale=1.0,
                mscale_all_dim=0.8,
            ),
        ),
        [
            "DeepseekV3ForCausalLM: MLA as deepseek_v2 but with q_lora_rank 24: q = q_b_proj(q_a_layernorm("
            "q_a_proj(x))) (64 -> 24 -> 4 * 24)",
            "rope_interleave True: RoPE on interleaved pairs of q_pe / k_pe (apply_rotary_pos_emb_interleave)",
            "YaRN over qk_rope_head_dim 8: factor 4, original_max_position_embeddings 32, beta 32/1, truncate "
            "(default True); mscale 1.0 and mscale_all_dim 0.8 differ, so cos and sin carry attention_factor = "
            "mscale(4, 1) / mscale(4, 0.8) (on the rope part of the score only) and the softmax scale is "
            "(16 + 8)^-0.5 * mscale(4, 0.8)^2, mscale(s, m) = 0.1 m ln s + 1",
            "layer 0 dense; layers 1, 2 MoE: 16 routed experts (4 per token) + 1 shared expert; router: sigmoid of "
            "the fp32 logits; choice scores = sigmoid + e_score_correction_bias (a buffer, drawn N(0, 0.1)); 4 groups "
            "of 4 scored by the sum of their two best choice scores, the best 2 groups kept; top-4 choice scores "
            "among those; weights are the UNBIASED sigmoid scores, divided by their sum (norm_topk_prob) and times "
            "routed_scaling_factor 2.5",
        ],
        {},
    )

    # Gemma 4 (text): hidden 32 (not BASE's 64) keeps six layers with experts and per-layer
    # embeddings under the 1 MB fixture limit.
    G4 = dict(
        BASE,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 3,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=256,
        num_kv_shared_layers=2,
        final_logit_softcapping=3.0,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    )
    g4_notes = [
        "Gemma4ForCausalLM, model_type gemma4_text; hidden 32, 4 query heads; layer_types [sliding, full] x 3; "
        "sliding layers: head_dim 16, 2 kv heads, window 16 (i-16 < j <= i), rope default theta 1e4; full layers: "
        "head_dim 32 (global_head_dim, written by transformers 5.17 as per_layer_config {layer: {head_dim}}), rope "
        "'proportional' theta 1e6 partial_rotary_factor 0.25: inv_freq[i] = 1e6**(-2i/32) for i < int(0.25*32//2) = 4, "
        "0 for the other 12 pairs (identity), rotate_half over the whole head_dim",
        "attention scale 1.0 (no 1/sqrt(d)); q_norm and k_norm plain RMSNorm (x_normed * w, NOT 1 + w) per head before "
        "RoPE; v_norm a weightless RMSNorm per head; every RMSNorm is x * (mean(x^2) + eps)^-0.5 * w",
        "num_kv_shared_layers 2: layers 4 (sliding) and 5 (full) have no k/v projections of their own and attend "
        "over the K/V of the last earlier layer of their type (layers 2 and 3); they write no cache",
        "per-layer embeddings (hidden_size_per_layer_input 8): ple = (rms_norm(per_layer_model_projection(e) * 32^-0.5 "
        "per layer chunk of 8, per_layer_projection_norm) + embed_tokens_per_layer(ids) * sqrt(8)) * 2^-0.5, where e = "
        "embed_tokens(ids) * sqrt(32); after each layer's MLP residual: h += post_per_layer_input_norm("
        "per_layer_projection(gelu_tanh(per_layer_input_gate(h)) * ple[:, layer]))",
        "layer_scalar (a persistent buffer) multiplies the whole hidden state at the end of each layer; re-init to "
        "U(0.5, 1.5) per layer",
        "final_logit_softcapping 3 (low, so the cap shapes the logits); tied lm_head; embeddings * sqrt(hidden) in fp32",
    ]
    F["gemma4"] = (
        "Gemma4TextConfig",
        dict(
            G4,
            attention_k_eq_v=True,
            num_global_key_value_heads=1,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=16,
        ),
        g4_notes + [
            "attention_k_eq_v with num_global_key_value_heads 1: full layers have 1 kv head and no v_proj; "
            "v = v_norm(k_proj(x)) (the raw k projection, before k_norm and RoPE)",
            "MoE block beside the dense MLP in every layer: dense = post_feedforward_layernorm_1(mlp(pre_feedforward_"
            "layernorm(h))); router on h (the residual stream before the MLP): logits = proj(rms_norm(h) * scale * "
            "32^-0.5), softmax, top-2, renormalised, times per_expert_scale[expert]; experts on pre_feedforward_layernorm_2(h),"
            " gelu_tanh(gate) * up (fused gate_up_proj [4, 32, 32], down_proj [4, 32, 16]); moe = "
            "post_feedforward_layernorm_2(sum); h += post_feedforward_layernorm(dense + moe)",
        ],
        {},
    )
    F["gemma4_dense"] = (
        "Gemma4TextConfig",
        dict(G4, use_double_wide_mlp=True),
        g4_notes + [
            "no MoE block; use_double_wide_mlp: the kv-shared layers 4 and 5 have an MLP of 2 * intermediate_size = 64",
            "attention_k_eq_v False: full layers keep v_proj and num_key_value_heads 2",
        ],
        {},
    )
    return F


MOE_FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss", "gpt_oss_mxfp4", "deepseek_v2", "deepseek_v3", "gemma4")
DEEPSEEK = ("deepseek_v2", "deepseek_v3")


def is_router(m):
    return type(m).__name__.lower().endswith("topkrouter")

FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def mxfp4_quantize(w):
    """w [..., rows, cols] (cols % 32 == 0) -> (blocks u8 [..., rows, cols/32, 16], scales u8 [..., rows, cols/32])
    in the released gpt-oss layout."""
    *pre, rows, cols = w.shape
    b = w.reshape(*pre, rows, cols // 32, 32).double()
    amax = b.abs().amax(dim=-1).clamp(min=1e-30)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    x = b / torch.pow(2.0, e)[..., None]
    lut = torch.tensor(FP4, dtype=torch.float64)
    mag = x.abs()[..., None]
    # nearest magnitude, ties to the lower (even) code
    idx = (mag - lut).abs().argmin(dim=-1)
    codes = (idx | ((x < 0) & (idx > 0)).to(torch.int64) << 3).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (e + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def mxfp4_round_experts_(model):
    """Rounds every GptOssExperts' gate_up_proj / down_proj to MXFP4 in place (via transformers' own dequantizer)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ != "GptOssExperts":
                continue
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(m, name)
                bl, sc = mxfp4_quantize(p.detach().transpose(1, 2))
                p.copy_(convert_moe_packed_tensors(bl, sc, dtype=torch.float32))


def mxfp4_save(model, fdir):
    """model.safetensors with the experts as *_blocks/*_scales (everything else float32)."""
    os.remove(os.path.join(fdir, "model.safetensors"))
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            bl, sc = mxfp4_quantize(v.transpose(1, 2))
            back = convert_moe_packed_tensors(bl, sc, dtype=torch.float32)
            if not torch.equal(back, v):
                raise RuntimeError(f"{k}: MXFP4 round trip is not exact")
            out[k + "_blocks"], out[k + "_scales"] = bl, sc
        else:
            out[k] = v.contiguous()
    save_file(out, os.path.join(fdir, "model.safetensors"), metadata={"format": "pt"})

FAMILY_ORDER = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "olmo2", "granite", "starcoder2",
                "llama_bf16", "qwen3_moe", "mixtral", "olmoe", "gpt_oss", "gpt_oss_mxfp4", "deepseek_v2", "deepseek_v3",
                "gemma4", "gemma4_dense", "lfm2", "mamba2", "nemotron_h", "granite4", "qwen3_next",
                "qwen3_next_moe", "lfm2_moe", "nemotron_h_moe", "granite4_moe", "qwen3_5",
                "qwen3_5_moe", "falcon_h1", "jamba", "nemotron_h_moe_latent"]
FAMILY_SEED = {f: 1000 + i for i, f in enumerate(FAMILY_ORDER)}
# The hybrid fixtures' seeds, fixed: families added to FAMILY_ORDER before them (in a
# merge) must not change them, so a rerun reproduces the committed files.
FAMILY_SEED.update({"lfm2": 1016, "mamba2": 1017, "nemotron_h": 1018, "granite4": 1019, "qwen3_next": 1020})
FAMILY_SEED.update({"qwen3_next_moe": 1030, "lfm2_moe": 1031, "nemotron_h_moe": 1032, "granite4_moe": 1033})
# (Seeds are per family: the same number for two families is fine.)
FAMILY_SEED.update({"qwen3_5": 1030, "qwen3_5_moe": 1031, "falcon_h1": 1032, "jamba": 1033})
FAMILY_SEED.update({"nemotron_h_moe_latent": 1034})


def reinit_(model, model_type, overrides):
    """Re-initialise every parameter so the logits span a healthy range."""
    # Gemma 2/3 norms are (1 + w); Gemma 4's are plain w.
    gemma_norm = model_type.startswith("gemma") and not model_type.startswith("gemma4")
    seen = set()
    with torch.no_grad():
        for mname, mod in model.named_modules():
            cls = type(mod).__name__
            local = list(mod.named_parameters(recurse=False))
            if not local:
                continue
            is_norm = "Norm" in cls
            if cls == "Gemma4TextRouter":
                # Its own parameters: the input scale [hidden] and per_expert_scale [experts].
                for pname, p in local:
                    seen.add(id(p))
                    p.normal_(0.0, 0.2 if pname == "per_expert_scale" else 0.1).add_(1.0)
                continue
            if cls == "GptOssAttention":
                # Its own parameter is the attention sinks (the projections are Linear children).
                for pname, p in local:
                    seen.add(id(p))
                    p.normal_(0.5, 1.5)
                continue
            # MoE routers and stacked experts hold plain Parameters: initialised as Linear weights.
            is_lin = isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) or cls.endswith(("TopKRouter", "TopkRouter", "Experts"))
            if not (is_norm or is_lin):
                raise RuntimeError(f"unexpected parameterised module {mname} ({cls})")
            leaf = mname.split(".")[-1]
            for pname, p in local:
                full = f"{mname}.{pname}" if mname else pname
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if pname == "bias":
                    p.normal_(0.0, 0.1)
                elif is_lin:
                    p.normal_(0.0, overrides.get(leaf, 0.15))
                elif gemma_norm:
                    # Gemma RMSNorm: out = x_normed * (1 + w), w around 0
                    p.normal_(0.0, 0.1)
                else:
                    # plain RMSNorm / LayerNorm: out = w * x_normed, w around 1
                    p.normal_(0.0, 0.1).add_(1.0)
    for n, p in model.named_parameters():
        if id(p) not in seen:
            raise RuntimeError(f"parameter {n} not re-initialised")
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "Gemma4TextDecoderLayer":
                m.layer_scalar.uniform_(0.5, 1.5)
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0.0, 0.1)


def rope_info(model):
    """Rope buffers/attributes as used by the last forward (after dynamic_rope_update)."""
    info = {}
    for mname, mod in model.named_modules():
        if not type(mod).__name__.endswith("RotaryEmbedding"):
            continue
        d = {"class": type(mod).__name__, "rope_type": mod.rope_type}
        for bname, b in mod.named_buffers(recurse=False):
            d[bname] = [float(x) for x in b.float().tolist()]
        for k, v in vars(mod).items():
            if "attention_scaling" in k and isinstance(v, (int, float)):
                d[k] = float(v)
        info[mname] = d
    return info


def forward_logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids[None, :], use_cache=False)
    return out.logits[0].float().contiguous()


def sensitivity(family, model, ids, ref):
    """max|logits - logits_with_quirk_off| for a few quirks, to show they matter. Restores the model."""
    res = {}
    cfg = model.config

    def diff(tag):
        res[tag] = float((forward_logits(model, ids) - ref).abs().max())

    if getattr(cfg, "sliding_window", None) is not None:
        sw = cfg.sliding_window
        cfg.sliding_window = 10**6
        diff("sliding_window_off")
        cfg.sliding_window = sw
    if family == "gemma2":
        mods = [m for m in model.modules() if hasattr(m, "attn_logit_softcapping")]
        for m in mods:
            m.attn_logit_softcapping = None
        diff("attn_logit_softcapping_off")
        for m in mods:
            m.attn_logit_softcapping = cfg.attn_logit_softcapping
        fc = cfg.final_logit_softcapping
        cfg.final_logit_softcapping = None
        diff("final_logit_softcapping_off")
        cfg.final_logit_softcapping = fc
    if family in ("llama", "llama_bf16"):
        rot = model.model.rotary_emb
        saved = rot.inv_freq.clone()
        d = rot.inv_freq.numel() * 2
        rot.inv_freq.copy_(1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)))
        diff("llama3_rope_scaling_off")
        rot.inv_freq.copy_(saved)
    if family == "phi3":
        rot = model.model.rotary_emb
        omp = cfg.rope_parameters["original_max_position_embeddings"]
        cfg.rope_parameters["original_max_position_embeddings"] = 10**6
        diff("short_factor_instead_of_long_factor")
        cfg.rope_parameters["original_max_position_embeddings"] = omp
        s = rot.attention_scaling
        rot.attention_scaling = 1.0
        diff("longrope_attention_scaling_off")
        rot.attention_scaling = s
    if family == "gemma3":
        rot = model.model.rotary_emb
        saved = rot.full_attention_inv_freq.clone()
        rot.full_attention_inv_freq.mul_(8.0)
        diff("global_linear_rope_factor_off")
        rot.full_attention_inv_freq.copy_(saved)
    if family.startswith("gpt_oss"):
        attns = [m for m in model.modules() if type(m).__name__ == "GptOssAttention"]
        saved = [m.sinks.detach().clone() for m in attns]
        with torch.no_grad():
            for m in attns:
                m.sinks.fill_(-1e4)
        diff("attention_sinks_off")
        with torch.no_grad():
            for m, s in zip(attns, saved):
                m.sinks.copy_(s)
        experts = [m for m in model.modules() if type(m).__name__ == "GptOssExperts"]
        for m in experts:
            m.limit = float("inf")
        diff("swiglu_limit_off")
        for m in experts:
            m.limit = 7.0
        rot = model.model.rotary_emb
        s = rot.attention_scaling
        rot.attention_scaling = 1.0
        diff("yarn_attention_factor_off")
        rot.attention_scaling = s
        saved = rot.inv_freq.clone()
        rp = cfg.rope_parameters
        rp["truncate"] = True
        inv, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](cfg, None)
        rp["truncate"] = False
        rot.inv_freq.copy_(inv)
        diff("yarn_truncate_true")
        rot.inv_freq.copy_(saved)
        d = rot.inv_freq.numel() * 2
        rot.inv_freq.copy_(1.0 / (rp["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)))
        diff("yarn_inv_freq_off")
        rot.inv_freq.copy_(saved)
    if family in DEEPSEEK:
        routers = [m for m in model.modules() if is_router(m)]
        for m in routers:
            m.routed_scaling_factor = 1.0
        diff("routed_scaling_factor_off")
        for m in routers:
            m.routed_scaling_factor = cfg.routed_scaling_factor
        if family == "deepseek_v3":
            saved = [m.e_score_correction_bias.clone() for m in routers]
            with torch.no_grad():
                for m in routers:
                    m.e_score_correction_bias.zero_()
            diff("e_score_correction_bias_off")
            with torch.no_grad():
                for m, b in zip(routers, saved):
                    m.e_score_correction_bias.copy_(b)
            for m in routers:
                m.num_group, m.topk_group = 1, 1
            diff("group_limit_off")
            for m in routers:
                m.num_group, m.topk_group = cfg.n_group, cfg.topk_group
            attns = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
            saved = [m.scaling for m in attns]
            for m in attns:
                m.scaling = m.qk_head_dim ** -0.5
            diff("yarn_mscale_all_dim_off")
            for m, sc in zip(attns, saved):
                m.scaling = sc
            rot = model.model.rotary_emb
            a = rot.attention_scaling
            rot.attention_scaling = 1.0
            diff("yarn_attention_factor_off")
            rot.attention_scaling = a
        else:
            for m in routers:
                m.topk_method = "greedy"
            diff("group_limited_greedy_off")
            for m in routers:
                m.topk_method = cfg.topk_method
    if family.startswith("gemma4"):
        fc = cfg.final_logit_softcapping
        cfg.final_logit_softcapping = None
        diff("final_logit_softcapping_off")
        cfg.final_logit_softcapping = fc
        layers = [m for m in model.modules() if type(m).__name__ == "Gemma4TextDecoderLayer"]
        saved = [m.layer_scalar.clone() for m in layers]
        with torch.no_grad():
            for m in layers:
                m.layer_scalar.fill_(1.0)
        diff("layer_scalar_off")
        with torch.no_grad():
            for m, v in zip(layers, saved):
                m.layer_scalar.copy_(v)
        routers = [m for m in model.modules() if type(m).__name__ == "Gemma4TextRouter"]
        saved = [m.per_expert_scale.detach().clone() for m in routers]
        with torch.no_grad():
            for m in routers:
                m.per_expert_scale.fill_(1.0)
        if routers:
            diff("per_expert_scale_off")
        with torch.no_grad():
            for m, v in zip(routers, saved):
                m.per_expert_scale.copy_(v)
    if family in MOE_FAMILIES and not family.startswith(("gpt_oss", "gemma4")) and family not in DEEPSEEK:
        routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
        for m in routers:
            m.norm_topk_prob = not getattr(m, "norm_topk_prob", True)
        if family != "mixtral":
            diff("norm_topk_prob_flipped")
        for m in routers:
            m.norm_topk_prob = not m.norm_topk_prob
    if family == "olmoe":
        c = cfg.clip_qkv
        cfg.clip_qkv = None
        diff("clip_qkv_off")
        cfg.clip_qkv = c
    # sanity: restored model reproduces the reference exactly
    again = forward_logits(model, ids)
    if not torch.equal(again, ref):
        raise RuntimeError(f"{family}: model not restored after sensitivity checks")
    return res


def deepseek_routing_stats(model, ids):
    """routing_stats for DeepSeek's routers: the margins are those of the choice the router
    makes (group scores at the topk_group boundary, then choice scores at the top-k boundary
    among the kept groups), in its own score space (softmax probabilities or sigmoid + bias)."""
    logs = []
    hooks = [m.register_forward_hook(lambda m, i, o: logs.append((m, o[0].detach().float())))
             for m in model.modules() if is_router(m)]
    forward_logits(model, ids)
    for h in hooks:
        h.remove()
    stats = []
    for m, logits in logs:
        k, ne = m.top_k, logits.shape[-1]
        if hasattr(m, "e_score_correction_bias"):
            c = logits.sigmoid() + m.e_score_correction_bias
            g = c.view(-1, m.num_group, ne // m.num_group).topk(2, dim=-1)[0].sum(-1)
        else:
            c = logits.softmax(dim=-1)
            if m.topk_method == "group_limited_greedy":
                g = c.view(-1, m.num_group, ne // m.num_group).max(dim=-1).values
            else:
                g = torch.zeros(c.shape[0], 1)
        ng, tg = g.shape[-1], (m.topk_group if g.shape[-1] > 1 else 1)
        gs = torch.sort(g, dim=-1, descending=True).values
        g_margin = float((gs[:, tg - 1] - gs[:, tg]).min()) if ng > tg else float("inf")
        keep = torch.zeros_like(g).scatter_(1, torch.topk(g, tg, dim=-1).indices, 1.0)
        mask = keep.unsqueeze(-1).expand(-1, ng, ne // ng).reshape(-1, ne).bool()
        cm = c.masked_fill(~mask, float("-inf"))
        top = torch.sort(cm, dim=-1, descending=True).values
        idx = torch.topk(cm, k, dim=-1).indices
        counts = torch.bincount(idx.flatten(), minlength=ne).tolist()
        if min(counts) == 0:
            raise RuntimeError(f"an expert is never routed to: {counts}")
        e_margin = float((top[:, k - 1] - top[:, k]).min())
        stats.append({"tokens_per_expert": counts, "min_topk_margin": min(g_margin, e_margin),
                      "min_group_margin": g_margin, "min_expert_margin": e_margin})
    return stats


def jamba_routers(model):
    """(router Linear, top_k) of each Jamba layer with a MoE block."""
    return [(m.router, m.top_k) for m in model.modules() if type(m).__name__ == "JambaSparseMoeBlock"]


def gemma4_routers(model):
    """(router.proj Linear, top_k) of each Gemma 4 layer with a MoE block: proj's output is the logits."""
    return [(m.proj, m.config.top_k_experts) for m in model.modules() if type(m).__name__ == "Gemma4TextRouter"]


def routing_stats(model, ids):
    if gemma4_routers(model) or jamba_routers(model):
        logs = []
        hooks = [lin.register_forward_hook(lambda m, i, o, k=k: logs.append((k, o.detach().float().reshape(-1, o.shape[-1]))))
                 for lin, k in gemma4_routers(model) + jamba_routers(model)]
        forward_logits(model, ids)
        for h in hooks:
            h.remove()
        stats = []
        for k, logits in logs:
            p = torch.softmax(logits, dim=-1)
            top = torch.sort(p, dim=-1, descending=True).values
            idx = torch.topk(p, k, dim=-1).indices
            counts = torch.bincount(idx.flatten(), minlength=p.shape[-1]).tolist()
            if min(counts) == 0:
                raise RuntimeError(f"an expert is never routed to: {counts}")
            stats.append({"tokens_per_expert": counts, "min_topk_margin": float((top[:, k - 1] - top[:, k]).min())})
        return stats
    if any(is_router(m) and "Deepseek" in type(m).__name__ for m in model.modules()):
        return deepseek_routing_stats(model, ids)
    """Per sparse layer: tokens per expert, and the smallest gap between the k-th and (k+1)-th
    routing probability over all tokens (a reimplementation agrees on the chosen experts when its
    router probabilities are closer to transformers' than this)."""
    logs = []
    hooks = [m.register_forward_hook(lambda m, i, o: logs.append((m.top_k, o[0].detach().float())))
             for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    forward_logits(model, ids)
    for h in hooks:
        h.remove()
    stats = []
    for k, logits in logs:
        p = torch.softmax(logits, dim=-1)
        top = torch.sort(p, dim=-1, descending=True).values
        idx = torch.topk(p, k, dim=-1).indices
        counts = torch.bincount(idx.flatten(), minlength=p.shape[-1]).tolist()
        if min(counts) == 0:
            raise RuntimeError(f"an expert is never routed to: {counts}")
        stats.append({"tokens_per_expert": counts, "min_topk_margin": float((top[:, k - 1] - top[:, k]).min())})
    return stats


def balance_routers_(model, ids):
    """Random routers on random tiny models send most tokens to a few experts: the hidden states
    share a large common direction (attention averages values), and W.mean dominates the logits.
    Layer by layer, project each router's rows off the mean direction of the inputs it sees, so
    its logits follow what differs between tokens and every expert gets some."""
    routers = [m for m in model.modules() if is_router(m)] + [lin for lin, _ in gemma4_routers(model) + jamba_routers(model)]
    for r in routers:
        seen = []
        h = r.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().reshape(-1, i[0].shape[-1])))
        forward_logits(model, ids)
        h.remove()
        mean = seen[0].mean(dim=0)
        u = mean / mean.norm()
        with torch.no_grad():
            r.weight.sub_(torch.outer(r.weight @ u, u))


# A MoE fixture's routers must not sit near a tie: if the k-th and (k+1)-th routing probabilities
# of some token are closer than this, an f16 KV cache or another summation order (a GPU) can flip
# that token's expert choice, and the comparison would measure the flip, not the implementation.
MOE_MIN_MARGIN = 2e-4
SEED_USED = {}


def build(family, cfg_cls_name, cfg_kwargs, overrides):
    """The family's model and input ids. MoE families try seeds FAMILY_SEED + 100 * i until every
    expert is used and every routing margin is at least MOE_MIN_MARGIN (SEED_USED records it)."""
    tries = 64 if family in MOE_FAMILIES else 1
    for attempt in range(tries):
        seed = FAMILY_SEED[family] + 100 * attempt
        torch.manual_seed(seed)
        cfg_cls = getattr(transformers, cfg_cls_name)
        config = cfg_cls(**cfg_kwargs)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        model.eval()
        assert model.config._attn_implementation == "eager", model.config._attn_implementation
        reinit_(model, config.model_type, overrides)
        if family == "gpt_oss_mxfp4":
            mxfp4_round_experts_(model)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, config.vocab_size, (SEQ_LEN,), generator=g, dtype=torch.int64)
        if family in MOE_FAMILIES:
            balance_routers_(model, ids)
            try:
                stats = routing_stats(model, ids)
            except RuntimeError:
                continue
            if min(s["min_topk_margin"] for s in stats) < MOE_MIN_MARGIN:
                continue
        SEED_USED[family] = seed
        return model, ids
    raise RuntimeError(f"{family}: no seed in {tries} tries gives routing margins >= {MOE_MIN_MARGIN}")


def write_fixture(out_dir, family, model, ids, notes, extra_meta):
    fdir = os.path.join(out_dir, family)
    if os.path.exists(fdir):
        shutil.rmtree(fdir)
    os.makedirs(fdir)
    ref = forward_logits(model, ids)
    if not torch.isfinite(ref).all():
        raise RuntimeError(f"{family}: non-finite logits")
    rope = rope_info(model)
    sens = sensitivity(family, model, ids, ref)
    return fdir, ref, rope, sens


def finish(fdir, family, model, ids, ref, notes, rope, sens, extra_meta):
    save_file({"input_ids": ids.contiguous(), "logits": ref}, os.path.join(fdir, "reference.safetensors"))
    gen = os.path.join(fdir, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    cfg = model.config
    meta = {
        "family": family,
        "model_type": cfg.model_type,
        "architecture": type(model).__name__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seq_len": SEQ_LEN,
        "notes": notes,
        "seed": SEED_USED[family],
        "input_ids": "torch.randint(0, vocab_size, (seq_len,), generator=torch.Generator().manual_seed(seed))",
        "attn_implementation": "eager",
        "device": "cpu, fp32, torch.set_num_threads(1)",
        "max_abs_logit": float(ref.abs().max()),
        "logit_std": float(ref.std()),
        "rope_after_forward": rope,
        "sensitivity_max_abs_logit_diff": sens,
    }
    meta.update(extra_meta)
    with safe_open(os.path.join(fdir, "model.safetensors"), "pt") as sf:
        meta["weights"] = {k: [str(sf.get_slice(k).get_dtype()), list(sf.get_slice(k).get_shape())]
                           for k in sorted(sf.keys())}
    with open(os.path.join(fdir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(fdir, n)) for n in os.listdir(fdir))
    print(f"{fdir}: {total} bytes, files={sorted(os.listdir(fdir))}, max|logit|={meta['max_abs_logit']:.4f}, "
          f"std={meta['logit_std']:.4f}, sens={ {k: round(v, 5) for k, v in sens.items()} }", flush=True)
    if total >= 1_000_000:
        raise RuntimeError(f"{family}: fixture is {total} bytes (>= 1 MB)")
    return meta


def phi3_notes(model):
    rot = model.model.rotary_emb
    rp = model.config.rope_parameters
    omp = rp["original_max_position_embeddings"]
    mpe = model.config.max_position_embeddings
    factor = mpe / omp
    att = math.sqrt(1 + math.log(factor) / math.log(omp))
    return [
        "transformers longrope for this 64-token forward: Phi3RotaryEmbedding.forward is wrapped by dynamic_rope_update "
        "-> longrope_frequency_update: seq_len = max(position_ids)+1 = 64 > original_max_position_embeddings = %d, so "
        "inv_freq = 1 / (long_factor[i] * rope_theta**(2i/head_dim)) for EVERY position 0..63 (the choice is per forward "
        "call from its largest position; with seq_len <= %d it would be 1 / (short_factor[i] * theta**(2i/hd)) for every "
        "position). During cached generation transformers re-decides per call, so keys cached while max position < %d "
        "keep short-factor rotation." % (omp, omp, omp),
        "attention_scaling (multiplies BOTH cos and sin, so q.k is scaled by its square) is computed once at init, does "
        "not depend on seq_len, and is applied to short and long alike: no 'factor'/'attention_factor' in rope_parameters "
        "-> factor = max_position_embeddings / original_max_position_embeddings = %d/%d = %g -> attention_scaling = "
        "sqrt(1 + ln(factor)/ln(original_max_position_embeddings)) = sqrt(1 + ln %g / ln %d) = %.10f (module value %.10f)"
        % (mpe, omp, factor, factor, omp, att, rot.attention_scaling),
        "softmax scale stays head_dim**-0.5 = 0.25; rotate_half (non-interleaved) rope on the full head_dim "
        "(partial_rotary_factor 1.0)",
    ]


# ---- hybrid / state-space families ------------------------------------------------------
#
# These fixtures check the recurrent path as well as the parallel one: the reference is
# transformers' logits of a HYBRID_PREFILL-token prefill (one forward with a cache) followed by
# HYBRID_DECODE tokens fed one at a time through that cache (the one-step recurrences), so
# "logits" row t is what transformers gives for position t along that path. The prompt is
# longer than 64 tokens, so Mamba 2's chunked scan runs several chunks.

HYBRID_PREFILL = 80
HYBRID_DECODE = 20

HYBRID = {
    "lfm2": (
        "Lfm2Config",
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=160,
            block_auto_adjust_ff_dim=True,
            block_ffn_dim_multiplier=1.3,
            block_multiple_of=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            layer_types=["conv", "conv", "full_attention", "conv"],
            conv_L_cache=3,
            conv_bias=True,
            norm_eps=1e-5,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        [
            "layer_types [conv, conv, full_attention, conv]; operator_norm -> conv or attention -> residual; "
            "ffn_norm -> SwiGLU (w1 gate, w3 up, w2 down) -> residual; final norm is model.embedding_norm",
            "conv layer (Lfm2ShortConv): B, C, x = in_proj(h).chunk(3) (rows 0:H, H:2H, 2H:3H); y = C * "
            "causal_depthwise_conv(B * x) with kernel L_cache 3 (conv.weight [H, 1, 3], tap 2 multiplies the current "
            "row), conv_bias True (conv, in_proj and out_proj all have biases); out_proj(y)",
            "FFN width: block_auto_adjust_ff_dim with intermediate_size 160, block_ffn_dim_multiplier 1.3, "
            "block_multiple_of 48: int(2*160/3)=106, int(1.3*106)=137, rounded up to a multiple of 48 = 144",
            "attention: GQA 4/2, head_dim 16, q_layernorm/k_layernorm RMSNorm per head before RoPE (default, theta 1e4), "
            "TIED lm_head",
        ],
    ),
    "mamba2": (
        "Mamba2Config",
        dict(
            vocab_size=256,
            hidden_size=64,
            expand=2,
            num_heads=8,
            head_dim=16,
            state_size=16,
            n_groups=2,
            conv_kernel=4,
            chunk_size=32,
            num_hidden_layers=2,
            use_bias=False,
            use_conv_bias=True,
            layer_norm_epsilon=1e-5,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        [
            "Mamba2ForCausalLM: per layer h = h + mixer(norm(h)) (no MLP); final norm_f; untied lm_head",
            "mixer: in_proj -> z [128], xBC [128 + 2*2*16], dt [8]; xBC = silu(causal depthwise conv1d(xBC), kernel 4, "
            "bias); x, B, C = split(xBC, [128, 32, 32]); dt = softplus(dt + dt_bias) clamped to time_step_limit "
            "(default (0, inf): the clamp does nothing here, and transformers' one-step path does not clamp); "
            "A = -exp(A_log); per head h (group h // 4): S = exp(dt*A) S + dt x B^T, y = S C + D x",
            "chunk_size 32: the 80-token prefill runs the chunked (SSD) form over 3 chunks; decode runs the one-step "
            "recurrence",
            "gated RMSNorm (MambaRMSNormGated): y = w * rmsnorm(y * silu(z)) over the WHOLE intermediate width (128), "
            "not per group: transformers' norm has no group size (mamba_ssm and llama.cpp normalise per group of "
            "128 / n_groups)",
        ],
    ),
    "nemotron_h": (
        "NemotronHConfig",
        dict(
            vocab_size=256,
            hidden_size=64,
            layers_block_type=["linear_attention", "mlp", "full_attention", "mlp", "linear_attention", "mlp"],
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            mlp_hidden_act="relu2",
            mamba_num_heads=8,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=2,
            conv_kernel=4,
            expand=2,
            chunk_size=32,
            use_conv_bias=True,
            mamba_proj_bias=False,
            layer_norm_epsilon=1e-5,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        [
            "NemotronHForCausalLM: each block is h + mixer(rmsnorm(h)) with ONE mixer per layers_block_type entry: "
            "linear_attention = the Mamba 2 mixer, full_attention = GQA attention WITHOUT positional embeddings (no "
            "RoPE), mlp = up_proj -> relu(x)^2 -> down_proj (no gate); final norm_f; untied lm_head",
            "mamba mixer: mamba_num_heads 8 x mamba_head_dim 16 (= the inner width 128), ssm_state_size 16, "
            "n_groups 2, conv_kernel 4, chunk_size 32; its gated norm is PER GROUP of 128 / n_groups = 64 "
            "(Zamba2RMSNormGated with group_size), unlike Mamba2ForCausalLM's",
        ],
    ),
    "granite4": (
        "GraniteMoeHybridConfig",
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            shared_intermediate_size=96,
            num_local_experts=0,
            num_hidden_layers=4,
            layer_types=["mamba", "attention", "mamba", "mamba"],
            num_attention_heads=4,
            num_key_value_heads=2,
            position_embedding_type="rope",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            embedding_multiplier=6.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=2.5,
            mamba_n_heads=8,
            mamba_d_head="auto",
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=32,
            mamba_conv_bias=True,
            mamba_proj_bias=False,
            rms_norm_eps=1e-5,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        [
            "GraniteMoeHybridForCausalLM with num_local_experts 0 (the dense hybrid, as Granite-4.0-H-Micro): "
            "layer_types [mamba, attention, mamba, mamba] (legacy names, remapped by transformers to "
            "linear_attention / full_attention); per layer h = h + 0.5 * mixer(input_layernorm(h)); "
            "h = h + 0.5 * shared_mlp(post_attention_layernorm(h))",
            "shared_mlp: input_linear [2*96, 64] -> chunk(2): silu(first half) * second half -> output_linear",
            "Granite multipliers: embeddings x 6, residual branches x 0.5, attention scores x 0.2 (instead of "
            "head_dim**-0.5), logits / 2.5; RoPE (position_embedding_type rope, theta 1e4); TIED head",
            "mamba layers: the Mamba 2 mixer (8 heads x mamba_d_head auto = 2*64/8 = 16, state 16, 2 groups, "
            "kernel 4, chunk 32), its gated norm over the whole inner width, eps = rms_norm_eps",
        ],
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
            mlp_only_layers=[0, 1, 2, 3],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            rms_norm_eps=1e-6,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        [
            "Qwen3NextForCausalLM with mlp_only_layers = every layer (dense SwiGLU MLPs, no experts: the sparse "
            "MoE block with its shared expert is not in this fixture); layer_types [linear, linear, full, linear]",
            "every Qwen3NextRMSNorm is zero-centred: x_normed * (1 + w) (input, post-attention, q/k norms, final); "
            "the DeltaNet's gated norm is plain: w * rmsnorm(y) * silu(z), per head over linear_value_head_dim",
            "attention: q_proj gives per head [q (16) | gate (16)]; out = o_proj(attn * sigmoid(gate)); q/k norms "
            "per head before RoPE; partial_rotary_factor 0.5 (rotate_half over the first 8 dims)",
            "gated DeltaNet: in_proj_qkvz rows per key head g: [q (16) | k (16) | v (2*16) | z (2*16)], "
            "in_proj_ba rows per key head: [b (2) | a (2)]; conv1d (kernel 4, no bias, silu) over [q | k | v]; q, k "
            "l2-normalised (eps 1e-6), q * 16**-0.5; beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias); "
            "value head h reads key head h // 2; S = exp(g) S; S += k (beta (v - S^T k))^T; y = S^T q",
            "the 80-token prefill runs transformers' chunked delta rule (chunk 64: 2 chunks), decode its one-step "
            "recurrence",
        ],
    ),
}

# Qwen3.5's tiny text models: the DeltaNet layout of Qwen3-Next with separate projections.
QWEN3_5_TEXT = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=4,
    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                     "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
QWEN3_5_NOTES = [
    "every Qwen3_5RMSNorm is zero-centred: x_normed * (1 + w) (input, post-attention, q/k norms, final); the "
    "DeltaNet's gated norm is plain: w * rmsnorm(y) * silu(z), per head over linear_value_head_dim",
    "attention: q_proj gives per head [q (16) | gate (16)]; out = o_proj(attn * sigmoid(gate)); q/k norms per head "
    "before RoPE; partial_rotary_factor 0.5 (rotate_half over the first 8 dims); mrope_section [2, 1, 1] "
    "interleaved: text positions are the same in all three sections, so it is plain RoPE",
    "gated DeltaNet: SEPARATE in_proj_qkv ([q (2*16) | k (2*16) | v (4*16)] of all heads, not per key head), "
    "in_proj_z (4*16), in_proj_b (4), in_proj_a (4); conv1d (kernel 4, no bias, silu) over [q | k | v]; q, k "
    "l2-normalised, q * 16**-0.5; beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias); value head h reads "
    "key head h // 2 (repeat_interleave); S = exp(g) S; S += k (beta (v - S^T k))^T; y = S^T q",
    "the 80-token prefill runs transformers' chunked delta rule (chunk 64: 2 chunks), decode its one-step recurrence",
]
HYBRID["qwen3_5"] = (
    "Qwen3_5TextConfig",
    dict(QWEN3_5_TEXT, intermediate_size=128),
    ["Qwen3_5ForCausalLM (model_type qwen3_5_text), layer_types [linear, full, linear, linear], a dense SwiGLU "
     "MLP (intermediate 128) in every block"] + QWEN3_5_NOTES,
)
HYBRID["qwen3_5_moe"] = (
    "Qwen3_5MoeTextConfig",
    dict(QWEN3_5_TEXT, num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"],
         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
         shared_expert_intermediate_size=24),
    ["Qwen3_5MoeForCausalLM (model_type qwen3_5_moe_text), layer_types [linear, full, linear], every "
     "block's MLP the sparse MoE block: router softmax over 8 experts, top-2, renormalised; experts as fused "
     "gate_up_proj [8, 2*16, 64] / down_proj [8, 64, 16]; plus shared_expert (SwiGLU, 24) times "
     "sigmoid(shared_expert_gate(x)) (a [1, 64] Linear)"] + QWEN3_5_NOTES,
)
HYBRID["falcon_h1"] = (
    "FalconH1Config",
    dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        mamba_d_ssm=96,
        mamba_n_heads=6,
        mamba_d_head=16,
        mamba_n_groups=2,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_chunk_size=32,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        mamba_rms_norm=True,
        mamba_norm_before_gate=True,
        embedding_multiplier=1.7,
        lm_head_multiplier=0.6,
        attention_in_multiplier=0.8,
        attention_out_multiplier=1.3,
        key_multiplier=0.7,
        ssm_in_multiplier=1.2,
        ssm_out_multiplier=0.9,
        ssm_multipliers=[0.5, 1.5, 0.8, 1.25, 0.6],
        mlp_multipliers=[0.75, 1.4],
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    [
        "FalconH1ForCausalLM: per layer h_n = input_layernorm(h); h = h + ssm_out * mamba(ssm_in * h_n) + "
        "attn_out * attn(attn_in * h_n) (both mixers on the same normed input, every layer); h = h + "
        "mlp(pre_ff_layernorm(h)); final_layernorm; logits = lm_head(h) * lm_head_multiplier",
        "every multiplier non-trivial: embedding 1.7, lm_head 0.6, attention_in 0.8, attention_out 1.3, key 0.7 "
        "(k after k_proj, before RoPE), ssm_in 1.2, ssm_out 0.9, ssm_multipliers [0.5, 1.5, 0.8, 1.25, 0.6] on "
        "in_proj's [z | x | B | C | dt] (the mup_vector), mlp_multipliers [0.75 (gate_proj output), 1.4 "
        "(down_proj output)]",
        "mamba: mamba_d_ssm 96 = 6 heads x 16, 2 groups, state 16, kernel 4, chunk 32 (the 80-token prefill runs "
        "3 chunks); mamba_rms_norm True with norm_before_gate True: y = w * rmsnorm(y) * silu(z), the norm PER "
        "GROUP of 96 / 2 = 48",
        "attention: GQA 4/2, head_dim 16, RoPE theta 1e4, no biases; MLP (48): down(up(x) * silu(gate(x) * 0.75)) * 1.4",
    ],
)
HYBRID["jamba"] = (
    "JambaConfig",
    dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=0,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=4,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        use_mamba_kernels=False,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    [
        "JambaForCausalLM: layer i attends when i % attn_layer_period (2) == attn_layer_offset (1), else the "
        "Mamba 1 mixer: [mamba, attention, mamba, attention]; each block h + mixer(input_layernorm(h)), then h + "
        "ffn(pre_ff_layernorm(h)); the ffn is the MoE block on layers i % expert_layer_period (2) == "
        "expert_layer_offset (0) (layers 0 and 2: softmax over 4 experts, top-2, NOT renormalised, experts of "
        "intermediate_size 48) and a SwiGLU MLP (48) on the others; final_layernorm; untied lm_head",
        "attention: GQA 4/2, head_dim 8, NO positional embeddings",
        "Mamba 1 mixer: d_inner 64 (expand 2), state 8, dt_rank 4, conv kernel 4 with bias; in_proj -> x, z "
        "(chunk 2); x = silu(conv(x)); x_proj -> dt (4), B (8), C (8), each RMS-normed (dt_layernorm, b_layernorm, "
        "c_layernorm); dt = dt_proj.weight @ dt; softplus(dt + dt_proj.bias); A = -exp(A_log) [64, 8]; per channel "
        "S = exp(dt A) S + dt B x, y = C.S + D x; y * silu(z); out_proj",
    ],
)
# Hybrid fixtures with experts: seeds FAMILY_SEED + 100 * i until every routing margin is at
# least MOE_MIN_MARGIN (as build() does for the other MoE fixtures) and the weights rounded
# to f16 route every token to the same experts.
HYBRID_MOE_F16 = ("qwen3_5_moe", "jamba")
# Hybrid fixtures whose reference.safetensors also holds logits_f16_weights (see hybrid_fixture).
F16_REFERENCE = ("qwen3_5", "qwen3_5_moe")


def topk_choices(model, ids):
    """Each router's chosen experts per token (sorted), over one forward of ids."""
    logs = []
    hooks = [m.register_forward_hook(lambda m, i, o: logs.append((m.top_k, o[0].detach().float())))
             for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    hooks += [lin.register_forward_hook(lambda m, i, o, k=k: logs.append((k, o.detach().float().reshape(-1, o.shape[-1]))))
              for lin, k in jamba_routers(model)]
    forward_logits(model, ids)
    for h in hooks:
        h.remove()
    return [torch.topk(l, k, dim=-1).indices.sort(dim=-1).values for k, l in logs]


def f16_keeps_routing(model, ids):
    """Whether the weights rounded to f16 (an f16 conversion) choose the same experts for
    every token: otherwise the conversion test would measure an expert flip."""
    before = topk_choices(model, ids)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    after = topk_choices(model, ids)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return all(torch.equal(a, b) for a, b in zip(before, after))


# The MoE variants of the hybrid families: the dense fixtures' shapes with sparse MLPs.
HYBRID_MOE = ("qwen3_next_moe", "lfm2_moe", "nemotron_h_moe", "granite4_moe", "nemotron_h_moe_latent") + HYBRID_MOE_F16
HYBRID["qwen3_next_moe"] = (
    "Qwen3NextConfig",
    dict(HYBRID["qwen3_next"][1], num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
         "linear_attention"], intermediate_size=64, mlp_only_layers=[0], decoder_sparse_step=1, num_experts=8,
         num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24, norm_topk_prob=True),
    HYBRID["qwen3_next"][2][1:] + [
        "Qwen3NextForCausalLM with num_experts 8, 3 layers [linear, full, linear]: layer 0 (mlp_only_layers) has a "
        "dense SwiGLU MLP of 64; layers 1-2 the sparse MoE block (saved per expert, mlp.experts.E.*_proj): softmax over 8 experts, top 2, renormalised (norm_topk_prob); SwiGLU experts of "
        "moe_intermediate_size 16 (fused gate_up_proj [8, 32, 64], gate rows first); plus the shared expert "
        "(SwiGLU, 24) times sigmoid(shared_expert_gate(x)) (a [1, 64] linear)",
    ],
)
HYBRID["lfm2_moe"] = (
    "Lfm2MoeConfig",
    dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv", "conv", "full_attention", "conv"],
        conv_L_cache=3,
        conv_bias=False,
        num_dense_layers=1,
        num_experts=8,
        num_experts_per_tok=2,
        use_expert_bias=True,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
        norm_eps=1e-5,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    [
        "Lfm2MoeForCausalLM: LFM2's conv / attention layers (layer_types [conv, conv, full_attention, conv], "
        "conv kernel 3, no conv bias, per-head q/k RMSNorm, TIED head, final norm embedding_norm)",
        "layer 0 (num_dense_layers 1): dense SwiGLU (w1, w3, w2) of intermediate_size 96, used as is (no "
        "block_auto_adjust_ff_dim in LFM2-MoE)",
        "layers 1-3: s = sigmoid(router(x)) over 8 experts; the top 2 of s + expert_bias (a buffer, N(0, 0.1) here) "
        "are chosen; weights = their s, divided by (sum + 1e-6) (norm_topk_prob), times routed_scaling_factor 1.5; "
        "SwiGLU experts of 16 (fused gate_up_proj)",
    ],
)
HYBRID["nemotron_h_moe"] = (
    "NemotronHConfig",
    dict(
        HYBRID["nemotron_h"][1],
        layers_block_type=["linear_attention", "moe", "full_attention", "moe", "linear_attention", "mlp"],
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    HYBRID["nemotron_h"][2] + [
        "layers_block_type [M, E, *, E, M, -]: moe blocks (E) are h + moe(rmsnorm(h)) with moe(x) = routed(x) + "
        "shared_experts(x); routed: s = sigmoid(gate(x)) over 8 experts, choice scores s + e_score_correction_bias "
        "(N(0, 0.1) here), 2 groups of 4 scored by their two best choice scores, the best 1 group kept, top 2 in it; "
        "weights = their s renormalised (norm_topk_prob), times routed_scaling_factor 2.5; experts are NON-gated "
        "relu2 MLPs: down(relu(up(x))^2), up_proj [8, 16, 64], down_proj [8, 64, 16]; shared_experts: the relu2 MLP "
        "of 24; no latent projection (moe_latent_size None)",
    ],
)
HYBRID["nemotron_h_moe_latent"] = (
    "NemotronHConfig",
    dict(HYBRID["nemotron_h_moe"][1], moe_latent_size=32),
    HYBRID["nemotron_h_moe"][2][:-1] + [
        HYBRID["nemotron_h_moe"][2][-1].replace("no latent projection (moe_latent_size None)", "")
        + "WITH the latent projection of Nemotron 3 Super (moe_latent_size 32): the routed experts read "
        "fc1_latent_proj(x) [32, 64] (no bias) and their weighted sum goes back through fc2_latent_proj [64, 32]; "
        "up_proj [8, 16, 32], down_proj [8, 32, 16]; the router and the shared experts read x",
    ],
)
HYBRID["granite4_moe"] = (
    "GraniteMoeHybridConfig",
    dict(HYBRID["granite4"][1], num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
         num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, shared_intermediate_size=32),
    [
        "GraniteMoeHybridForCausalLM with num_local_experts 8 (as Granite-4.0-H-Tiny/Small), 3 layers: layer_types "
        "[mamba, attention, mamba]; saved as released (block_sparse_moe.input_linear [8, 32, 64], output_linear "
        "[8, 64, 16], router.layer); per layer h = h + 0.5 * mixer(input_layernorm(h)); x = post_attention_layernorm(h); "
        "h = h + 0.5 * (moe(x) + shared_mlp(x))",
        "moe: the top 2 of the router's 8 logits, weights = softmax over those 2 (renormalised softmax); SwiGLU "
        "experts of intermediate_size 16 (gate rows first); shared_mlp: SwiGLU of "
        "shared_intermediate_size 32 (input_linear [64, 64], gate rows first)",
    ] + HYBRID["granite4"][2][2:],
)


def moe_bias_init_(model):
    """The choice biases are buffers (not re-initialised with the parameters): give them values
    that move choices, as trained checkpoints' do."""
    with torch.no_grad():
        for m in model.modules():
            for name in ("expert_bias", "e_score_correction_bias"):
                b = getattr(m, name, None)
                if isinstance(b, torch.Tensor):
                    b.normal_(0.0, 0.1)


def hybrid_routing_stats(model, ids):
    """routing_stats for the hybrid families' routers, in each one's own choice space: softmax
    probabilities (Qwen3-Next, Granite 4: its top-k of logits is the top-k of their softmax) or
    sigmoid scores plus the choice bias (LFM2-MoE, NemotronH), with NemotronH's groups scored by
    their two best choice scores. Margins: the group at the topk_group boundary, then the expert at
    the top-k boundary among the kept groups."""
    logs = []

    def hook(m, i, o):
        logits = o[2] if type(m).__name__.startswith("GraniteMoeHybrid") else o[0]
        bias = i[1] if len(i) > 1 else getattr(m, "e_score_correction_bias", None)
        logs.append((m, logits.detach().float().reshape(-1, logits.shape[-1]), bias))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if is_router(m)]
    forward_logits(model, ids)
    for h in hooks:
        h.remove()
    stats = []
    for m, logits, bias in logs:
        k, ne = m.top_k, logits.shape[-1]
        sigmoid = type(m).__name__.startswith(("Lfm2Moe", "NemotronH"))
        c = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)
        if bias is not None:
            c = c + bias.float()
        ng = getattr(m, "num_group", 1) or 1
        tg = getattr(m, "topk_group", 1) if ng > 1 else 1
        g = c.view(-1, ng, ne // ng).topk(min(2, ne // ng), dim=-1)[0].sum(-1) if ng > 1 else torch.zeros(c.shape[0], 1)
        gs = torch.sort(g, dim=-1, descending=True).values
        g_margin = float((gs[:, tg - 1] - gs[:, tg]).min()) if ng > tg else float("inf")
        keep = torch.zeros_like(g).scatter_(1, torch.topk(g, tg, dim=-1).indices, 1.0)
        mask = keep.unsqueeze(-1).expand(-1, ng, ne // ng).reshape(-1, ne).bool()
        cm = c.masked_fill(~mask, float("-inf"))
        top = torch.sort(cm, dim=-1, descending=True).values
        idx = torch.topk(cm, k, dim=-1).indices
        counts = torch.bincount(idx.flatten(), minlength=ne).tolist()
        if min(counts) == 0:
            raise RuntimeError(f"an expert is never routed to: {counts}")
        e_margin = float((top[:, k - 1] - top[:, k]).min())
        stats.append({"tokens_per_expert": counts, "min_topk_margin": min(g_margin, e_margin),
                      "min_group_margin": g_margin, "min_expert_margin": e_margin})
    return stats


def hybrid_init_(model):
    """Every parameter re-initialised (plain N(0, 0.15) Linear/Embedding weights; the SSM's own
    parameters in ranges where the state carries information over many tokens)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf == "A_log":
                p.copy_(torch.log(torch.empty_like(p).uniform_(0.2, 2.0)))
            elif leaf == "dt_bias":
                p.normal_(-1.5, 0.5)
            elif leaf == "D":
                p.normal_(1.0, 0.3)
            elif leaf == "bias":
                p.normal_(0.0, 0.1)
            elif "norm" in name or "layernorm" in name:
                p.normal_(0.0, 0.1).add_(1.0)
            elif "conv" in name and p.dim() == 3:
                p.normal_(0.0, 0.4)
            else:
                p.normal_(0.0, 0.15)


def hybrid_reference(model, ids):
    """Logits of a prefill of the first HYBRID_PREFILL ids with a cache, then of each later id fed
    alone through that cache; and the max difference to one cache-less forward of all ids."""
    with torch.no_grad():
        out = model(input_ids=ids[None, :HYBRID_PREFILL], use_cache=True)
        rows = [out.logits[0].float()]
        # Mamba 2 names its cache cache_params, the others past_key_values.
        key = "cache_params" if hasattr(out, "cache_params") else "past_key_values"
        cache = getattr(out, key)
        for t in range(HYBRID_PREFILL, len(ids)):
            out = model(input_ids=ids[None, t:t + 1], use_cache=True, **{key: cache})
            cache = getattr(out, key)
            rows.append(out.logits[0].float())
        ref = torch.cat(rows, 0).contiguous()
        full = model(input_ids=ids[None, :], use_cache=False).logits[0].float()
    return ref, float((full - ref).abs().max())


def hybrid_fixture(out_dir, family):
    cls_name, kw, notes = HYBRID[family]
    # MoE variants try seeds FAMILY_SEED + 100 * i until every expert is used and every routing
    # margin is at least MOE_MIN_MARGIN (as build() does for the other MoE families).
    tries = 64 if family in HYBRID_MOE else 1
    for attempt in range(tries):
        seed = FAMILY_SEED[family] + 100 * attempt
        torch.manual_seed(seed)
        config = getattr(transformers, cls_name)(**kw)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        model.eval()
        hybrid_init_(model)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, config.vocab_size, (HYBRID_PREFILL + HYBRID_DECODE,), generator=g, dtype=torch.int64)
        if family not in HYBRID_MOE:
            break
        if family in HYBRID_MOE_F16:
            # Qwen3.5-MoE, Jamba: margins as the other MoE fixtures', and the same routing
            # with f16-rounded weights (their references include an f16-weights run).
            balance_routers_(model, ids)
            try:
                stats = routing_stats(model, ids)
            except RuntimeError:
                continue
            if min(s["min_topk_margin"] for s in stats) >= MOE_MIN_MARGIN and f16_keeps_routing(model, ids):
                break
            continue
        moe_bias_init_(model)
        balance_routers_(model, ids)
        try:
            routing = hybrid_routing_stats(model, ids)
        except RuntimeError:
            continue
        if min(r["min_topk_margin"] for r in routing) >= MOE_MIN_MARGIN:
            break
    else:
        raise RuntimeError(f"{family}: no seed in {tries} tries gives routing margins >= {MOE_MIN_MARGIN}")
    ref, full_diff = hybrid_reference(model, ids)
    if not torch.isfinite(ref).all():
        raise RuntimeError(f"{family}: non-finite logits")
    fdir = os.path.join(out_dir, family)
    if os.path.exists(fdir):
        shutil.rmtree(fdir)
    os.makedirs(fdir)
    model.save_pretrained(fdir)
    SEED_USED[family] = seed
    extra_meta = {}
    if family in HYBRID_MOE and family not in HYBRID_MOE_F16:
        extra_meta["routing"] = routing
        notes = list(notes) + [
            "routers re-initialised layer by layer off the mean direction of their inputs (so every expert gets "
            "tokens); choice biases N(0, 0.1); the seed is the first of FAMILY_SEED + 100*i whose routing (of one "
            "cache-less forward) has every expert used and every top-k margin >= %g in the router's own choice "
            "space (meta routing: tokens per expert, smallest margins per sparse layer)" % MOE_MIN_MARGIN]
    notes = list(notes) + [
        "reference: prefill of the first %d ids (one forward, use_cache=True), then ids %d.. one at a time through "
        "the cache; the same ids in one cache-less forward differ from it by at most %.3g"
        % (HYBRID_PREFILL, HYBRID_PREFILL, full_diff),
        "re-init: Linear/Embedding N(0, 0.15), conv weights N(0, 0.4), biases N(0, 0.1), norm weights 1 + N(0, 0.1), "
        "A_log = log U(0.2, 2), dt_bias N(-1.5, 0.5), D N(1, 0.3)",
    ]
    extra_ref = {}
    if family == "mamba2":
        # llama.cpp (like mamba_ssm) normalises each of the n_groups groups of the gated
        # norm; transformers the whole width. The GGUF test compares against this.
        cls = type(model.backbone.layers[0].mixer.norm)
        plain = cls.forward
        groups = config.n_groups

        def grouped(self, hidden_states, gate=None):
            h = hidden_states.to(torch.float32)
            if gate is not None:
                h = h * torch.nn.functional.silu(gate.to(torch.float32))
            shape = h.shape
            h = h.view(*shape[:-1], groups, shape[-1] // groups)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight * h.view(shape)

        cls.forward = grouped
        try:
            extra_ref["logits_group_norm"], _ = hybrid_reference(model, ids)
        finally:
            cls.forward = plain
        notes.append("reference.safetensors also holds logits_group_norm: the same path with the gated norm "
                     "applied per group of 128 / n_groups (llama.cpp's and mamba_ssm's form), for GGUF files")
    if family == "falcon_h1":
        # The mixer's other two gate forms, from the same weights: without mamba_rms_norm
        # (y * silu(z), the norm unused) and with the norm after the gate.
        mixers = [layer.mamba for layer in model.model.layers]
        for m in mixers:
            m.mamba_rms_norm = False
        extra_ref["logits_no_mamba_rms_norm"], _ = hybrid_reference(model, ids)
        for m in mixers:
            m.mamba_rms_norm = True
            m.norm.norm_before_gate = False
        extra_ref["logits_norm_after_gate"], _ = hybrid_reference(model, ids)
        for m in mixers:
            m.norm.norm_before_gate = True
        notes.append("reference.safetensors also holds logits_no_mamba_rms_norm (the same weights with "
                     "mamba_rms_norm False: y * silu(z), mamba.norm unused) and logits_norm_after_gate "
                     "(mamba_norm_before_gate False: w * rmsnorm_per_group(y * silu(z)))")
    if family in F16_REFERENCE:
        # The gated delta rule carries every rounding through each later step's state: with
        # the weights rounded to f16 transformers' own logits move by up to ~0.1-0.5 here, so
        # an f16 conversion is compared with this reference instead of the fp32 one.
        saved_params = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
        extra_ref["logits_f16_weights"], _ = hybrid_reference(model, ids)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved_params[n])
        notes.append("reference.safetensors also holds logits_f16_weights: the same path with every weight rounded "
                     "to f16 (fp32 compute), max |diff| to logits %.3g: what an f16 conversion is compared with"
                     % float((extra_ref["logits_f16_weights"] - ref).abs().max()))
    global SEQ_LEN
    saved, SEQ_LEN = SEQ_LEN, len(ids)
    try:
        finish(fdir, family, model, ids, ref, notes, rope_info(model), {"cacheless_forward": full_diff},
               {"weights_dtype": "float32", "prefill_len": HYBRID_PREFILL, "decode_len": HYBRID_DECODE, **extra_meta})
    finally:
        SEQ_LEN = saved
    if extra_ref:
        save_file({"input_ids": ids.contiguous(), "logits": ref, **extra_ref},
                  os.path.join(fdir, "reference.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    only = set(x for x in args.only.split(",") if x)
    os.makedirs(args.out, exist_ok=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
    F = fam_configs()
    failures = []
    for family in FAMILY_ORDER:
        if only and family not in only:
            continue
        try:
            if family == "llama_bf16":
                cls_name, kw, notes, ov = F["llama"]
                model, ids = build(family, cls_name, kw, ov)
                # round every parameter to bf16 (buffers such as inv_freq stay fp32), run the forward in fp32
                with torch.no_grad():
                    for p in model.parameters():
                        p.copy_(p.to(torch.bfloat16).to(torch.float32))
                fdir, ref, rope, sens = write_fixture(args.out, family, model, ids, notes, {})
                with torch.no_grad():
                    for p in model.parameters():
                        p.data = p.data.to(torch.bfloat16)
                model.save_pretrained(fdir)
                notes = list(notes) + [
                    "same config and seed scheme as llama (seed %d), every weight rounded to bfloat16 "
                    "(round-to-nearest-even via torch .to(bfloat16)) and stored as BF16 in model.safetensors; reference "
                    "logits come from the forward in fp32 with those rounded weights upcast exactly to fp32 "
                    "(rope inv_freq computed in fp32)" % FAMILY_SEED[family],
                    "re-init before rounding: Linear/Embedding weights N(0, 0.15), norm weights 1 + N(0, 0.1)",
                ]
                finish(fdir, family, model, ids, ref, notes, rope, sens, {"weights_dtype": "bfloat16"})
                continue
            if family in HYBRID:
                hybrid_fixture(args.out, family)
                continue
            cls_name, kw, notes, ov = F[family]
            model, ids = build(family, cls_name, kw, ov)
            fdir, ref, rope, sens = write_fixture(args.out, family, model, ids, notes, {})
            extra = {"weights_dtype": "float32"}
            if family in MOE_FAMILIES:
                extra["routing"] = routing_stats(model, ids)
            model.save_pretrained(fdir)
            if family == "gpt_oss_mxfp4":
                mxfp4_save(model, fdir)
            notes = list(notes)
            if family == "phi3":
                notes += phi3_notes(model)
            if family in MOE_FAMILIES:
                notes.append("routers re-initialised layer by layer off the mean direction of their inputs (so every "
                             "expert gets tokens), and the seed is the first of FAMILY_SEED + 100*i whose routing has "
                             "every expert used and every top-k probability margin >= %g (meta routing: tokens per "
                             "expert, smallest margin per sparse layer), so an f16 KV cache or another summation "
                             "order cannot flip an expert choice" % MOE_MIN_MARGIN)
            notes.append("re-init: Linear/Embedding weights N(0, 0.15) unless stated, biases N(0, 0.1), norm weights "
                         + ("N(0, 0.1) (Gemma (1 + w) form)" if family in ("gemma2", "gemma3") else "1 + N(0, 0.1)"))
            finish(fdir, family, model, ids, ref, notes, rope, sens, extra)
        except Exception as e:  # keep going, report at the end
            import traceback
            traceback.print_exc()
            failures.append((family, repr(e)))
    if failures:
        print("FAILURES:", failures, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
