#!/usr/bin/env python3
"""Writes a random-weight F32/F16 GGUF in a real state-space or hybrid model's shape, laid out
as llama.cpp's converter writes it, so ffai and llama.cpp can be timed on the same file at
long contexts (quantize it with llama-quantize for other types; qwen3-next-80b-a3b and its
dense peer qwen2.5-3b are written in Q8_0 directly). Values do not matter for
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
  qwen3-next-80b-a3b  arch qwen3next: hidden 2048, 48 layers, every 4th (3, 7, 11, ..) gated
               attention (16 heads / 2 KV heads of 256, q_proj doubled for the output gate,
               per-head q/k norms, RoPE on a quarter of each head: 64 dims, base 1e7), the
               rest gated DeltaNet (16 key heads / 32 value heads of 128, conv 4); every
               layer MoE: 512 experts of 512, top 10, a shared expert of 512 with its
               sigmoid gate; FFN 5120, vocab 151936, untied head (Qwen/Qwen3-Next-80B-A3B's
               config.json). Written as `convert_hf_to_gguf.py --outtype q8_0 --no-mtp`
               writes it, see QWEN3NEXT below. --layers N takes the first N layers (N >= 4
               keeps an attention layer), --experts N keeps the first N experts.
  qwen2.5-3b   arch qwen2: the dense peer of Qwen3-Next's active size (about 3 B a token):
               hidden 2048, 36 layers, 16 heads / 2 KV heads of 128 with q/k/v biases, FFN
               11008, vocab 151936, tied embeddings (Qwen/Qwen2.5-3B); Q8_0 as qwen3-next.

  python3 scripts/synth_ssm_gguf.py GGUF_PY_DIR OUT.gguf --shape qwen3-next-80b-a3b --layers 4
"""
import argparse
import sys

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("gguf_py")
ap.add_argument("out")
ap.add_argument(
    "--shape",
    required=True,
    choices=["mamba2-370m", "lfm2-350m", "nemotron-h-4b", "llama-360m", "qwen3-next-80b-a3b", "qwen2.5-3b"],
)
ap.add_argument("--layers", type=int, default=0, help="fewer layers than the real model")
ap.add_argument("--experts", type=int, default=0, help="qwen3-next: fewer experts than the real 512")
a = ap.parse_args()
if a.experts and a.shape != "qwen3-next-80b-a3b":
    ap.error("--experts is for --shape qwen3-next-80b-a3b")
if a.shape == "qwen3-next-80b-a3b" and (0 < a.layers < 4 or 0 < a.experts < 10):
    # Layer 3 is the first attention layer; 10 experts are routed to each token.
    ap.error("qwen3-next-80b-a3b needs --layers >= 4 and --experts >= 10")
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


def q8_writer(largest):
    """A function giving Q8_0 [.., rows, cols] matrices as add_tensor's keyword arguments
    (raw bytes, raw_dtype set). Every matrix is a view of the start of one pool of random
    blocks, enough for `largest` values: each block an f16 scale of 0.0003 and 32 int8
    levels in -128..127 (uniform bytes), weights of standard deviation ~0.02 as the F16
    shapes'."""
    q8_type = gguf.GGMLQuantizationType.Q8_0
    block, block_bytes = gguf.GGML_QUANT_SIZES[q8_type]
    pool = rng.integers(0, 256, size=(largest // block, block_bytes), dtype=np.uint8)
    pool[:, 0:2] = np.frombuffer(np.float16(0.0003).tobytes(), np.uint8)
    pool = pool.reshape(-1)

    def q8(*shape):
        row = shape[-1] // block * block_bytes
        n = int(np.prod(shape[:-1])) * row
        return dict(tensor=pool[:n].reshape(*shape[:-1], row), raw_dtype=q8_type)

    return q8


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
elif a.shape == "qwen3-next-80b-a3b":
    # QWEN3NEXT: what llama.cpp's converter (conversion/qwen.py, Qwen3NextModel with
    # --no-mtp) writes for Qwen3-Next-80B-A3B, and what src/models/qwen3next.cpp loads:
    # - keys: the Qwen2-MoE ones (expert counts and sizes, key/value length 256) plus
    #   ssm.* (state_size = key head dim, group_count = key heads, time_step_rank = value
    #   heads, inner_size = value heads x value head dim), full_attention_interval (the
    #   released config has no layer_types, so no attention.recurrent_layers list) and
    #   rope.dimension_count = head_dim x partial_rotary_factor.
    # - DeltaNet layers: in_proj_qkvz split into attn_qkv ([q | k | v] of all heads) and
    #   attn_gate (z), in_proj_ba as ssm_ba, conv1d squeezed to [channels, kernel],
    #   ssm_a = -exp(A_log) (no ".weight"), dt_bias as ssm_dt.bias, the gated norm
    #   ssm_norm of one head's width, out_proj as ssm_out.
    # - attention layers: attn_q of 2 x heads x 256 rows (per head [q | output gate]),
    #   attn_k / attn_v / attn_output, per-head attn_q_norm / attn_k_norm.
    # - every layer: attn_norm, post_attention_norm (the norm before the MLP), the router
    #   ffn_gate_inp [experts, hidden], the experts stacked ffn_{gate,up,down}_exps
    #   [experts, rows, cols], the shared expert ffn_{gate,up,down}_shexp and its gate
    #   ffn_gate_inp_shexp kept [1, hidden] as transformers has it.
    # The (1 + w) norms are stored with the 1 added, so ones here are the released
    # initialisation. Matrices are Q8_0, as `--outtype q8_0` writes them: random blocks
    # with a fixed f16 scale (below), no F16 file in between (4 layers of 512 experts are
    # 6.4 B parameters: 13 GB in F16). What the converter keeps f32 stays f32: 1-D
    # tensors, norms, the router, the shared expert's gate, the conv, ssm_a, ssm_dt.
    H, L, V = 2048, a.layers or 48, 151936
    heads, kv, hd, rot, F = 16, 2, 256, 64, 5120
    E, used, Fe, Fs = a.experts or 512, 10, 512, 512
    kh, vh, dk, dv, d_conv = 16, 32, 128, 128, 4
    key_dim, value_dim = kh * dk, vh * dv
    conv_dim = 2 * key_dim + value_dim
    # One pool of random Q8_0 blocks for the largest matrix (the stacked experts or the
    # vocabulary).
    q8 = q8_writer(max(V * H, E * Fe * H))

    def f32(*shape, scale=0.02):
        """Random f32 values of standard deviation ~scale (the pool's, rescaled)."""
        return (mat(*shape, dtype=np.float32) * np.float32(scale / 0.02)).astype(np.float32)

    attn = [(i + 1) % 4 == 0 for i in range(L)]
    w = gguf.GGUFWriter(a.out, "qwen3next")
    w.add_block_count(L)
    w.add_context_length(262144)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1e7)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(E)
    w.add_expert_used_count(used)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_expert_feed_forward_length(Fe)
    w.add_expert_shared_feed_forward_length(Fs)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_state_size(dk)
    w.add_ssm_group_count(kh)
    w.add_ssm_time_step_rank(vh)
    w.add_ssm_inner_size(value_dim)
    w.add_full_attention_interval(4)
    w.add_rope_dimension_count(rot)
    w.add_vocab_size(V)
    vocab(w, V)
    w.add_tensor("token_embd.weight", **q8(V, H))
    w.add_tensor("output_norm.weight", ones(H))
    w.add_tensor("output.weight", **q8(V, H))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(H))
        w.add_tensor(p + "post_attention_norm.weight", ones(H))
        if attn[i]:
            w.add_tensor(p + "attn_q.weight", **q8(2 * heads * hd, H))
            w.add_tensor(p + "attn_k.weight", **q8(kv * hd, H))
            w.add_tensor(p + "attn_v.weight", **q8(kv * hd, H))
            w.add_tensor(p + "attn_output.weight", **q8(H, heads * hd))
            w.add_tensor(p + "attn_q_norm.weight", ones(hd))
            w.add_tensor(p + "attn_k_norm.weight", ones(hd))
        else:
            w.add_tensor(p + "attn_qkv.weight", **q8(conv_dim, H))
            w.add_tensor(p + "attn_gate.weight", **q8(value_dim, H))
            w.add_tensor(p + "ssm_ba.weight", **q8(2 * vh, H))
            # A conv of weights ~0.3 passes the projections on at a useful size (q and k
            # are L2-normalised after it; v and the gate are not).
            w.add_tensor(p + "ssm_conv1d.weight", f32(conv_dim, d_conv, scale=0.3))
            # Decay exp(ssm_a * softplus(alpha + dt_bias)): ssm_a = -exp(A_log) with A_log
            # = log(1..32) (transformers initialises A_log as log(U(0, 16))), dt_bias -2.
            w.add_tensor(p + "ssm_a", -np.arange(1, vh + 1, dtype=np.float32))
            w.add_tensor(p + "ssm_dt.bias", np.full(vh, -2.0, dtype=np.float32))
            w.add_tensor(p + "ssm_norm.weight", ones(dv))
            w.add_tensor(p + "ssm_out.weight", **q8(H, value_dim))
        w.add_tensor(p + "ffn_gate_inp.weight", f32(E, H))
        w.add_tensor(p + "ffn_gate_exps.weight", **q8(E, Fe, H))
        w.add_tensor(p + "ffn_up_exps.weight", **q8(E, Fe, H))
        w.add_tensor(p + "ffn_down_exps.weight", **q8(E, H, Fe))
        w.add_tensor(p + "ffn_gate_inp_shexp.weight", f32(1, H))
        w.add_tensor(p + "ffn_gate_shexp.weight", **q8(Fs, H))
        w.add_tensor(p + "ffn_up_shexp.weight", **q8(Fs, H))
        w.add_tensor(p + "ffn_down_shexp.weight", **q8(H, Fs))
elif a.shape == "qwen2.5-3b":
    # As convert_hf_to_gguf.py --outtype q8_0 writes Qwen2: biases and norms f32, the
    # head tied to token_embd (no output.weight).
    H, L, V, heads, kv, hd, F = 2048, a.layers or 36, 151936, 16, 2, 128, 11008
    q8 = q8_writer(V * H)
    w = gguf.GGUFWriter(a.out, "qwen2")
    w.add_block_count(L)
    w.add_context_length(32768)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_vocab_size(V)
    vocab(w, V)
    w.add_tensor("token_embd.weight", **q8(V, H))
    w.add_tensor("output_norm.weight", ones(H))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(H))
        w.add_tensor(p + "ffn_norm.weight", ones(H))
        for t, rows in (("attn_q", heads * hd), ("attn_k", kv * hd), ("attn_v", kv * hd)):
            w.add_tensor(p + t + ".weight", **q8(rows, H))
            w.add_tensor(p + t + ".bias", mat(rows, dtype=np.float32))
        w.add_tensor(p + "attn_output.weight", **q8(H, heads * hd))
        w.add_tensor(p + "ffn_gate.weight", **q8(F, H))
        w.add_tensor(p + "ffn_up.weight", **q8(F, H))
        w.add_tensor(p + "ffn_down.weight", **q8(H, F))
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
