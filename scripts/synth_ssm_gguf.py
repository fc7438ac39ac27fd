#!/usr/bin/env python3
"""Writes a random-weight F32/F16 GGUF in a real state-space or hybrid model's shape, laid out
as llama.cpp's converter writes it, so ffai and llama.cpp can be timed on the same file at
long contexts (quantize it with llama-quantize for other types). Values do not matter for
speed; they are kept small so the recurrences stay finite.

  python3 scripts/synth_ssm_gguf.py GGUF_PY_DIR OUT.gguf --shape mamba2-370m [--layers N]

Shapes:
  mamba2-370m  arch mamba2: d_model 1024, 48 layers, d_inner 2048 (32 heads of 64),
               state 128, 1 group, conv 4, vocab 50288 (state-spaces/mamba2-370m)
  lfm2-350m    arch lfm2: hidden 1024, 16 layers (attention at 2,5,8,10,12,14, the rest
               gated short convolutions of width 3), 16 heads / 8 KV heads of 64, FFN 4608,
               vocab 65536 (LiquidAI/LFM2-350M)
  nemotron-h-4b  arch nemotron_h: hidden 3072, 52 blocks in the pattern
               M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M- (M Mamba 2: 112 heads of
               64, state 128, 8 groups, conv 4; * attention: 32 heads / 8 KV heads of 128, no
               RoPE; - relu² MLP of 12288), vocab 131072 (nvidia Nemotron-H-4B); --layers N
               takes the pattern's first N blocks
  llama-360m   arch llama: the dense peer of about the same size (SmolLM2-360M's shape:
               hidden 960, 32 layers, 15 heads / 5 KV heads of 64, FFN 2560, vocab 49152)
"""
import argparse
import sys

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("gguf_py")
ap.add_argument("out")
ap.add_argument("--shape", required=True, choices=["mamba2-370m", "lfm2-350m", "nemotron-h-4b", "llama-360m"])
ap.add_argument("--layers", type=int, default=0, help="fewer layers than the real model")
a = ap.parse_args()
sys.path.insert(0, a.gguf_py)
import gguf  # noqa: E402

rng = np.random.default_rng(0)
POOL = (rng.standard_normal(1 << 26, dtype=np.float32) * 0.02).astype(np.float16)


def mat(*shape, dtype=np.float16):
    n = int(np.prod(shape))
    # Past the pool (Nemotron-H's 131072 x 3072 embedding), the pool repeated.
    vals = POOL[:n] if n <= POOL.size else np.resize(POOL, n)
    return vals.reshape(shape).astype(dtype)


def vocab(w, n):
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += [f"t{i}" for i in range(n - len(toks))]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * n)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def ones(n):
    return np.ones(n, dtype=np.float32)


if a.shape == "mamba2-370m":
    H, L, V = 1024, a.layers or 48, 50288
    d_inner, n_head, d_state, n_group, d_conv = 2048, 32, 128, 1, 4
    conv_dim = d_inner + 2 * n_group * d_state
    d_in_proj = 2 * d_inner + 2 * n_group * d_state + n_head
    w = gguf.GGUFWriter(a.out, "mamba2")
    w.add_context_length(1 << 20)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(d_state)
    w.add_ssm_time_step_rank(n_head)
    w.add_ssm_group_count(n_group)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    vocab(w, V)
    w.add_tensor("token_embd.weight", mat(V, H))
    w.add_tensor("output_norm.weight", ones(H))
    w.add_tensor("output.weight", mat(V, H))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(H))
        w.add_tensor(p + "ssm_in.weight", mat(d_in_proj, H))
        w.add_tensor(p + "ssm_conv1d.weight", mat(conv_dim, d_conv, dtype=np.float32))
        w.add_tensor(p + "ssm_conv1d.bias", np.zeros(conv_dim, dtype=np.float32))
        w.add_tensor(p + "ssm_dt.bias", np.full(n_head, -2.0, dtype=np.float32))
        # ssm_a = -exp(A_log), A_log = log(1..n_head) as the released models initialise it.
        w.add_tensor(p + "ssm_a", -np.arange(1, n_head + 1, dtype=np.float32).reshape(n_head, 1))
        w.add_tensor(p + "ssm_d", ones(n_head).reshape(n_head, 1))
        w.add_tensor(p + "ssm_norm.weight", ones(d_inner).reshape(n_group, d_inner // n_group))
        w.add_tensor(p + "ssm_out.weight", mat(H, d_inner))
elif a.shape == "lfm2-350m":
    H, L, V, heads, kv, hd, F = 1024, a.layers or 16, 65536, 16, 8, 64, 4608
    attn = {2, 5, 8, 10, 12, 14}
    w = gguf.GGUFWriter(a.out, "lfm2")
    w.add_context_length(128000)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(heads)
    w.add_head_count_kv([kv if i in attn else 0 for i in range(L)])
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_shortconv_l_cache(3)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    vocab(w, V)
    w.add_tensor("token_embd.weight", mat(V, H))
    w.add_tensor("token_embd_norm.weight", ones(H))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(H))
        w.add_tensor(p + "ffn_norm.weight", ones(H))
        if i in attn:
            w.add_tensor(p + "attn_q.weight", mat(heads * hd, H))
            w.add_tensor(p + "attn_k.weight", mat(kv * hd, H))
            w.add_tensor(p + "attn_v.weight", mat(kv * hd, H))
            w.add_tensor(p + "attn_output.weight", mat(H, heads * hd))
            w.add_tensor(p + "attn_q_norm.weight", ones(hd))
            w.add_tensor(p + "attn_k_norm.weight", ones(hd))
        else:
            w.add_tensor(p + "shortconv.in_proj.weight", mat(3 * H, H))
            w.add_tensor(p + "shortconv.conv.weight", mat(H, 3, dtype=np.float32))
            w.add_tensor(p + "shortconv.out_proj.weight", mat(H, H))
        w.add_tensor(p + "ffn_gate.weight", mat(F, H))
        w.add_tensor(p + "ffn_up.weight", mat(F, H))
        w.add_tensor(p + "ffn_down.weight", mat(H, F))
elif a.shape == "nemotron-h-4b":
    pattern = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
    pattern = pattern[: a.layers or len(pattern)]
    H, L, V, heads, kv, hd, F = 3072, len(pattern), 131072, 32, 8, 128, 12288
    d_inner, n_head, d_state, n_group, d_conv = 112 * 64, 112, 128, 8, 4
    conv_dim = d_inner + 2 * n_group * d_state
    d_in_proj = 2 * d_inner + 2 * n_group * d_state + n_head
    w = gguf.GGUFWriter(a.out, "nemotron_h")
    w.add_context_length(8192)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length([F if c == "-" else 0 for c in pattern])
    w.add_head_count(heads)
    w.add_head_count_kv([kv if c == "*" else 0 for c in pattern])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_eps(1e-5)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(d_state)
    w.add_ssm_time_step_rank(n_head)
    w.add_ssm_group_count(n_group)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    vocab(w, V)
    w.add_tensor("token_embd.weight", mat(V, H))
    w.add_tensor("output_norm.weight", ones(H))
    w.add_tensor("output.weight", mat(V, H))
    for i, c in enumerate(pattern):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(H))
        if c == "M":
            w.add_tensor(p + "ssm_in.weight", mat(d_in_proj, H))
            w.add_tensor(p + "ssm_conv1d.weight", mat(conv_dim, d_conv, dtype=np.float32))
            w.add_tensor(p + "ssm_conv1d.bias", np.zeros(conv_dim, dtype=np.float32))
            w.add_tensor(p + "ssm_dt.bias", np.full(n_head, -2.0, dtype=np.float32))
            w.add_tensor(p + "ssm_a", -np.arange(1, n_head + 1, dtype=np.float32).reshape(n_head, 1))
            w.add_tensor(p + "ssm_d", ones(n_head).reshape(n_head, 1))
            w.add_tensor(p + "ssm_norm.weight", ones(d_inner).reshape(n_group, d_inner // n_group))
            w.add_tensor(p + "ssm_out.weight", mat(H, d_inner))
        elif c == "*":
            w.add_tensor(p + "attn_q.weight", mat(heads * hd, H))
            w.add_tensor(p + "attn_k.weight", mat(kv * hd, H))
            w.add_tensor(p + "attn_v.weight", mat(kv * hd, H))
            w.add_tensor(p + "attn_output.weight", mat(H, heads * hd))
        else:
            w.add_tensor(p + "ffn_up.weight", mat(F, H))
            w.add_tensor(p + "ffn_down.weight", mat(H, F))
else:
    H, L, V, heads, kv, hd, F = 960, a.layers or 32, 49152, 15, 5, 64, 2560
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_context_length(1 << 16)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1e5)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    vocab(w, V)
    w.add_tensor("token_embd.weight", mat(V, H))
    w.add_tensor("output_norm.weight", ones(H))
    w.add_tensor("output.weight", mat(V, H))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(H))
        w.add_tensor(p + "ffn_norm.weight", ones(H))
        w.add_tensor(p + "attn_q.weight", mat(heads * hd, H))
        w.add_tensor(p + "attn_k.weight", mat(kv * hd, H))
        w.add_tensor(p + "attn_v.weight", mat(kv * hd, H))
        w.add_tensor(p + "attn_output.weight", mat(H, heads * hd))
        w.add_tensor(p + "ffn_gate.weight", mat(F, H))
        w.add_tensor(p + "ffn_up.weight", mat(F, H))
        w.add_tensor(p + "ffn_down.weight", mat(H, F))
w.add_name(f"synthetic-{a.shape}")
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file(progress=False)
w.close()
print("wrote", a.out)
