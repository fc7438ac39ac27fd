#!/usr/bin/env python3
"""Writes crates/ffai/tests/fixtures/tool_tokenizer/tokenizer.json: a byte-level BPE
vocabulary of the 256 bytes (no merges) plus the tool-call and reasoning markers of the
families ffai knows as added special tokens, as Mistral's `[TOOL_CALLS]` and gpt-oss's
harmony markers are in their real vocabularies (crates/ffai/tests/tools.rs)."""
import json
import pathlib

# GPT-2's byte-to-unicode map: every byte is one vocabulary character.
bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
cs = bs[:]
n = 0
for b in range(256):
    if b not in bs:
        bs.append(b)
        cs.append(256 + n)
        n += 1
m = dict(zip(bs, cs))
vocab = {chr(m[b]): b for b in range(256)}
markers = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>",
           "[TOOL_CALLS]", "<|tool_call|>", "<|start|>", "<|channel|>", "<|message|>",
           "<|constrain|>", "<|end|>", "<|call|>"]
added = []
for i, t in enumerate(markers):
    vocab[t] = 256 + i
    added.append({"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True})
tok = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": added,
    "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": None,
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": vocab, "merges": []},
}
out = pathlib.Path(__file__).resolve().parent.parent / "crates/ffai/tests/fixtures/tool_tokenizer/tokenizer.json"
out.write_text(json.dumps(tok, ensure_ascii=False, indent=1) + "\n")
