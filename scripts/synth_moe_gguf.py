#!/usr/bin/env python3
"""Writes a random-weight GGUF in a real mixture-of-experts model's shape (all its layers,
or fewer), so ffai and llama.cpp can be timed on the same file. Values do not matter for
speed: weights are slices of one random pool; routing over random weights spreads tokens
over the experts.

  python3 scripts/synth_moe_gguf.py GGUF_PY_DIR OUT.gguf [--shape qwen3-30b-a3b]
          [--layers N] [--type F16|Q4_0|Q8_0|Q4_K|MXFP4]

--type F16 (the default) writes floats, to quantize with llama-quantize. The other types are
written directly as random blocks of that type with fixed, moderate scales (no F16 file in
between: the full-size shapes are 40-60 GB in F16), every matrix in that type except:
  MXFP4: the experts in MXFP4 and the other matrices in Q8_0 (as the released gpt-oss files).
Norms, biases, sinks and the router stay F32.

Shapes (--layers defaults to the real count):
  qwen3-30b-a3b  arch qwen3moe: 48 layers, hidden 2048, 32 heads / 4 KV heads of 128,
                 128 experts of 768, top 8, vocab 151936, per-head q/k norms.
  gpt-oss-20b    arch gpt-oss: 24 layers, hidden 2880, 64 heads / 8 KV heads of 64, 32 experts
                 of 2880, top 4, vocab 201088, biased q/k/v/o and experts, attention sinks,
                 sliding window 128 on every other layer, YaRN (factor 32 over 4096)."""
import argparse
import sys

import numpy as np

SHAPES = {
    "qwen3-30b-a3b": dict(arch="qwen3moe", layers=48, hidden=2048, heads=32, kv_heads=4,
                          head_dim=128, experts=128, used=8, expert_ffn=768, vocab=151936,
                          rope_base=1e6),
    "gpt-oss-20b": dict(arch="gpt-oss", layers=24, hidden=2880, heads=64, kv_heads=8,
                        head_dim=64, experts=32, used=4, expert_ffn=2880, vocab=201088,
                        rope_base=150000.0),
}
TYPES = ("F16", "Q4_0", "Q8_0", "Q4_K", "MXFP4")

ap = argparse.ArgumentParser()
ap.add_argument("gguf_py")
ap.add_argument("out")
ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
ap.add_argument("--layers", type=int, default=0, help="0: the model's own count")
ap.add_argument("--type", default="F16", choices=TYPES)
a = ap.parse_args()
sys.path.insert(0, a.gguf_py)
import gguf  # noqa: E402

s = SHAPES[a.shape]
oss = s["arch"] == "gpt-oss"
L = a.layers or s["layers"]
H, V, E, F, hd = s["hidden"], s["vocab"], s["experts"], s["expert_ffn"], s["head_dim"]
qd, kvd = s["heads"] * hd, s["kv_heads"] * hd
Q = gguf.GGMLQuantizationType
# The type of the expert matrices and of every other matrix.
EXPERT_TYPE = {"F16": None, "Q4_0": Q.Q4_0, "Q8_0": Q.Q8_0, "Q4_K": Q.Q4_K, "MXFP4": Q.MXFP4}[a.type]
OTHER_TYPE = Q.Q8_0 if a.type == "MXFP4" else EXPERT_TYPE
FILE_TYPE = {
    "F16": gguf.LlamaFileType.MOSTLY_F16, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "MXFP4": gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
}[a.type]

w = gguf.GGUFWriter(a.out, s["arch"])
w.add_name(f"synthetic-{a.shape}-{L}-layers-{a.type}")
w.add_context_length(131072 if oss else 32768)
w.add_embedding_length(H)
w.add_block_count(L)
w.add_feed_forward_length(F)
w.add_head_count(s["heads"])
w.add_head_count_kv(s["kv_heads"])
w.add_key_length(hd)
w.add_value_length(hd)
w.add_rope_freq_base(s["rope_base"])
w.add_layer_norm_rms_eps(1e-5 if oss else 1e-6)
w.add_expert_count(E)
w.add_expert_used_count(s["used"])
w.add_expert_feed_forward_length(F)
if oss:
    w.add_sliding_window(128)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(32.0)
    w.add_rope_scaling_orig_ctx_len(4096)
w.add_vocab_size(V)
w.add_file_type(FILE_TYPE)
toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
toks += [f"t{i}" for i in range(V - len(toks))]
w.add_tokenizer_model("llama")
w.add_token_list(toks)
w.add_token_scores([0.0] * V)
w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (V - 259))
w.add_bos_token_id(1)
w.add_eos_token_id(2)
w.add_unk_token_id(0)

rng = np.random.default_rng(0)
ones = np.ones(H, dtype=np.float32)
ones_hd = np.ones(hd, dtype=np.float32)
biggest = max(V * H, E * F * H)
small = (rng.standard_normal(max(E * F, V, qd), dtype=np.float32) * 0.02)


def quant_pool(ty):
    """Random blocks of type ty, enough for the biggest matrix, with each block's scale
    bytes set so the decoded weights have a standard deviation of about 0.02."""
    block, size = gguf.GGML_QUANT_SIZES[ty]
    raw = rng.integers(0, 256, size=(biggest // block, size), dtype=np.uint8)
    if ty == Q.Q4_0:  # f16 d, 16 bytes of 4-bit levels (-8..7)
        raw[:, 0:2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    elif ty == Q.Q8_0:  # f16 d, 32 int8 levels
        raw[:, 0:2] = np.frombuffer(np.float16(0.0003).tobytes(), np.uint8)
    elif ty == Q.Q4_K:  # f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 of levels
        raw[:, 0:4] = np.frombuffer(np.array([1e-4, 1e-4], np.float16).tobytes(), np.uint8)
    elif ty == Q.MXFP4:  # E8M0 exponent, 16 bytes of E2M1 pairs
        raw[:, 0] = 120
    return raw.reshape(-1), size / block


pools = {}
if EXPERT_TYPE is None:
    f16_pool = (rng.standard_normal(biggest, dtype=np.float32) * 0.02).astype(np.float16)
else:
    for ty in {EXPERT_TYPE, OTHER_TYPE}:
        pools[ty] = quant_pool(ty)


def mat(*shape, ty=None):
    """A [.., rows, cols] matrix: F16 floats, or bytes of type ty (raw_dtype set)."""
    n = int(np.prod(shape))
    if ty is None:
        return dict(tensor=f16_pool[:n].reshape(shape))
    raw, bytes_per = pools[ty]
    nbytes = int(n * bytes_per)
    return dict(tensor=raw[:nbytes].reshape(*shape[:-1], int(shape[-1] * bytes_per)), raw_dtype=ty)


def vec(*shape):
    return small[: int(np.prod(shape))].reshape(shape)


w.add_tensor("token_embd.weight", **mat(V, H, ty=OTHER_TYPE))
w.add_tensor("output_norm.weight", ones)
w.add_tensor("output.weight", **mat(V, H, ty=OTHER_TYPE))
for i in range(L):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", ones)
    # gpt-oss files the norm before the experts as post_attention_norm.
    w.add_tensor(p + ("post_attention_norm.weight" if oss else "ffn_norm.weight"), ones)
    w.add_tensor(p + "attn_q.weight", **mat(qd, H, ty=OTHER_TYPE))
    w.add_tensor(p + "attn_k.weight", **mat(kvd, H, ty=OTHER_TYPE))
    w.add_tensor(p + "attn_v.weight", **mat(kvd, H, ty=OTHER_TYPE))
    w.add_tensor(p + "attn_output.weight", **mat(H, qd, ty=OTHER_TYPE))
    if oss:
        for t, d in (("attn_q", qd), ("attn_k", kvd), ("attn_v", kvd), ("attn_output", H)):
            w.add_tensor(p + t + ".bias", vec(d))
        w.add_tensor(p + "attn_sinks.weight", vec(s["heads"]))
        w.add_tensor(p + "ffn_gate_inp.bias", vec(E))
        w.add_tensor(p + "ffn_gate_exps.bias", vec(E, F))
        w.add_tensor(p + "ffn_up_exps.bias", vec(E, F))
        w.add_tensor(p + "ffn_down_exps.bias", vec(E, H))
    else:
        w.add_tensor(p + "attn_q_norm.weight", ones_hd)
        w.add_tensor(p + "attn_k_norm.weight", ones_hd)
    # The router in f32 (as converters write it), the experts stacked [E, rows, cols].
    w.add_tensor(p + "ffn_gate_inp.weight", (rng.standard_normal((E, H), dtype=np.float32) * 0.02))
    w.add_tensor(p + "ffn_gate_exps.weight", **mat(E, F, H, ty=EXPERT_TYPE))
    w.add_tensor(p + "ffn_up_exps.weight", **mat(E, F, H, ty=EXPERT_TYPE))
    w.add_tensor(p + "ffn_down_exps.weight", **mat(E, H, F, ty=EXPERT_TYPE))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file(progress=False)
w.close()
print("wrote", a.out)
