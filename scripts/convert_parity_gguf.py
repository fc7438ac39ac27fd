#!/usr/bin/env python3
"""Convert parity fixtures (tests/fixtures/parity/<family>) to GGUF with llama.cpp's own
convert_hf_to_gguf.py, for `cargo test -p ffai --test moe_gguf -- --ignored`,
`cargo test -p ffai --test hybrid_gguf -- --ignored` and `--test gemma4_gguf` (gemma4,
gemma4_dense), with FFAI_LLAMA_CPP_GGUF=<out dir>.

The fixtures have no tokenizer, so the converter's set_vocab is replaced by one that writes
`vocab_size` dummy tokens (ffai's check loads only the config and the weights).

Usage (needs torch, transformers and a llama.cpp checkout, e.g. the one vendored in the
llama-cpp-python source package from PyPI):

  python3 scripts/convert_parity_gguf.py --llama-cpp DIR --out OUT mixtral olmoe
  python3 scripts/convert_parity_gguf.py --llama-cpp DIR --out OUT qwen3_next qwen3_next_moe \
      qwen3_5 qwen3_5_moe nemotron_h nemotron_h_moe granite4 granite4_moe lfm2_moe falcon_h1 jamba
"""

import argparse
import importlib
import json
import os
import pkgutil
import shutil
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# Keys of the released checkpoints' config.json that transformers 5's config classes do
# not keep (so the fixtures lack them) but llama.cpp's converter reads. And DeepSeek-V3's
# YaRN as released (mscale = mscale_all_dim): the fixture has them differ, a ratio on cos
# and sin that this converter's GGUF cannot carry (it writes `yarn_log_multiplier` only).
# The patched copy is also written to OUT/<family>.hf, the directory the GGUF is compared
# with.
RELEASED_KEYS = {
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "mscale_equal": True},
    # Granite 4 as released: layer types spelled "mamba" / "attention" (the converter
    # finds the attention layers by that name; transformers 5 writes "full_attention") and
    # no positional embeddings (the converter writes RoPE off for every hybrid).
    "granite4": {"released_layer_types": True, "position_embedding_type": "nope"},
    "granite4_moe": {"released_layer_types": True, "position_embedding_type": "nope"},
}

# Converter flags per family. The Qwen3-Next / Qwen3.5 converters count multi-token
# prediction layers from `mtp.*` tensors and refuse a checkpoint with none unless told
# there are none to export.
EXTRA_ARGS = {
    "qwen3_next": ["--no-mtp"],
    "qwen3_next_moe": ["--no-mtp"],
    "qwen3_5": ["--no-mtp"],
    "qwen3_5_moe": ["--no-mtp"],
}

# Families whose converter reads tokenizer.json outside set_vocab (Gemma 3/4 cut the
# embedding rows to the tokenizer's size): their copy in OUT/<family>.hf gets a stub
# tokenizer.json of `vocab_size` tokens, so no row is cut.
STUB_TOKENIZER_JSON = {"gemma4", "gemma4_dense"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source directory (has convert_hf_to_gguf.py)")
    ap.add_argument("--out", required=True)
    ap.add_argument("families", nargs="+")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(args.llama_cpp, "gguf-py"))
    sys.path.insert(0, args.llama_cpp)
    import convert_hf_to_gguf as conv
    import gguf

    def dummy_vocab(self):
        n = self.hparams["vocab_size"]
        self.gguf_writer.add_tokenizer_model("gpt2")
        self.gguf_writer.add_tokenizer_pre("default")
        self.gguf_writer.add_token_list([f"<t{i}>" for i in range(n)])
        self.gguf_writer.add_token_types([gguf.TokenType.NORMAL] * n)
        self.gguf_writer.add_token_merges([])

    # Newer converters keep the model classes in a `conversion` package, older ones in
    # the script itself.
    modules = [conv]
    try:
        import conversion

        for m in pkgutil.iter_modules(conversion.__path__):
            try:
                modules.append(importlib.import_module("conversion." + m.name))
            except Exception:
                pass
    except ImportError:
        pass
    for mod in modules:
        for cls in list(vars(mod).values()):
            if isinstance(cls, type) and "set_vocab" in vars(cls):
                cls.set_vocab = dummy_vocab

    # llama.cpp's qwen3next has experts in every layer; both Qwen3-Next fixtures have dense
    # MLP layers (`mlp_only_layers`), which its tensor map lacks. Let the map name them as
    # every other architecture does (`ffn_{gate,up,down}`): the converter's own transforms
    # of everything else stay as they are (llama.cpp itself would not load such a file).
    qn = gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3NEXT]
    for t in (gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP, gguf.MODEL_TENSOR.FFN_DOWN):
        if t not in qn:
            qn.append(t)

    os.makedirs(args.out, exist_ok=True)
    for fam in args.families:
        src = os.path.join(ROOT, "tests", "fixtures", "parity", fam)
        if fam in RELEASED_KEYS or fam in STUB_TOKENIZER_JSON:
            # transformers 5 writes no such key, so the converter would write a GGUF that
            # llama.cpp (and ffai) read as a softmax router: convert a copy carrying the
            # keys as the released config.json has them.
            tmp = os.path.join(args.out, fam + ".hf")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for f in os.listdir(src):
                shutil.copy(os.path.join(src, f), tmp)
            with open(os.path.join(tmp, "config.json")) as fh:
                cfg = json.load(fh)
            keys = dict(RELEASED_KEYS.get(fam, {}))
            if keys.pop("released_layer_types", False):
                spell = {"full_attention": "attention", "linear_attention": "mamba"}
                cfg["layer_types"] = [spell.get(t, t) for t in cfg["layer_types"]]
            if keys.pop("mscale_equal", False):
                rp = cfg["rope_parameters"]
                rp["mscale"] = rp["mscale_all_dim"]
            cfg.update(keys)
            with open(os.path.join(tmp, "config.json"), "w") as fh:
                json.dump(cfg, fh, indent=2)
            if fam in STUB_TOKENIZER_JSON:
                vocab = {f"<t{i}>": i for i in range(cfg["vocab_size"])}
                with open(os.path.join(tmp, "tokenizer.json"), "w") as fh:
                    json.dump({"model": {"vocab": vocab}, "added_tokens": []}, fh)
            src = tmp
        out = os.path.join(args.out, fam + ".gguf")
        sys.argv = ["convert_hf_to_gguf.py", src, "--outtype", "f32", "--outfile", out] + EXTRA_ARGS.get(fam, [])
        conv.main()


if __name__ == "__main__":
    main()
