#!/usr/bin/env python3
"""Writes a random-weight F16 GGUF in a real mixture-of-experts model's shape with fewer
layers, so ffai and llama.cpp can be timed on the same file (quantize it with
llama-quantize for the quantized types). Values do not matter for speed: weights are
slices of one random pool; routing over random weights spreads tokens over the experts.

  python3 scripts/synth_moe_gguf.py GGUF_PY_DIR OUT.gguf [--shape qwen3-30b-a3b] [--layers 4]

Shapes: qwen3-30b-a3b (arch qwen3moe: hidden 2048, 32 heads / 4 KV heads of 128, 128
experts of 768, top 8, vocab 151936, per-head q/k norms)."""
import argparse
import sys

import numpy as np

SHAPES = {
    "qwen3-30b-a3b": dict(arch="qwen3moe", hidden=2048, heads=32, kv_heads=4, head_dim=128,
                          experts=128, used=8, expert_ffn=768, vocab=151936, rope_base=1e6),
}

ap = argparse.ArgumentParser()
ap.add_argument("gguf_py")
ap.add_argument("out")
ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
ap.add_argument("--layers", type=int, default=4)
a = ap.parse_args()
sys.path.insert(0, a.gguf_py)
import gguf  # noqa: E402

s = SHAPES[a.shape]
H, L, V, E, F, hd = s["hidden"], a.layers, s["vocab"], s["experts"], s["expert_ffn"], s["head_dim"]
qd, kvd = s["heads"] * hd, s["kv_heads"] * hd
w = gguf.GGUFWriter(a.out, s["arch"])
w.add_name(f"synthetic-{a.shape}-{L}-layers")
w.add_context_length(32768)
w.add_embedding_length(H)
w.add_block_count(L)
w.add_feed_forward_length(F)
w.add_head_count(s["heads"])
w.add_head_count_kv(s["kv_heads"])
w.add_key_length(hd)
w.add_value_length(hd)
w.add_rope_freq_base(s["rope_base"])
w.add_layer_norm_rms_eps(1e-6)
w.add_expert_count(E)
w.add_expert_used_count(s["used"])
w.add_expert_feed_forward_length(F)
w.add_vocab_size(V)
w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
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
pool = (rng.standard_normal(max(V * H, E * F * H), dtype=np.float32) * 0.02).astype(np.float16)
ones = np.ones(H, dtype=np.float32)
ones_hd = np.ones(hd, dtype=np.float32)


def mat(*shape):
    n = int(np.prod(shape))
    return pool[:n].reshape(shape)


w.add_tensor("token_embd.weight", mat(V, H))
w.add_tensor("output_norm.weight", ones)
w.add_tensor("output.weight", mat(V, H))
for i in range(L):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", ones)
    w.add_tensor(p + "ffn_norm.weight", ones)
    w.add_tensor(p + "attn_q.weight", mat(qd, H))
    w.add_tensor(p + "attn_k.weight", mat(kvd, H))
    w.add_tensor(p + "attn_v.weight", mat(kvd, H))
    w.add_tensor(p + "attn_output.weight", mat(H, qd))
    w.add_tensor(p + "attn_q_norm.weight", ones_hd)
    w.add_tensor(p + "attn_k_norm.weight", ones_hd)
    # The router in f32 (as converters write it), the experts stacked [E, rows, cols].
    w.add_tensor(p + "ffn_gate_inp.weight", mat(E, H).astype(np.float32))
    w.add_tensor(p + "ffn_gate_exps.weight", mat(E, F, H))
    w.add_tensor(p + "ffn_up_exps.weight", mat(E, F, H))
    w.add_tensor(p + "ffn_down_exps.weight", mat(E, H, F))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file(progress=False)
w.close()
print("wrote", a.out)
