#!/usr/bin/env python3
"""Convert parity fixtures (tests/fixtures/parity/<family>) to GGUF with llama.cpp's own
convert_hf_to_gguf.py, for `cargo test -p ffai --test moe_gguf -- --ignored` (and
`--test gemma4_gguf` for gemma4, gemma4_dense) with FFAI_LLAMA_CPP_GGUF=<out dir>.

The fixtures have no tokenizer, so the converter's set_vocab is replaced by one that writes
`vocab_size` dummy tokens (ffai's check loads only the config and the weights).

Usage (needs torch, transformers and a llama.cpp checkout, e.g. the one vendored in the
llama-cpp-python source package from PyPI):

  python3 scripts/convert_parity_gguf.py --llama-cpp DIR --out OUT mixtral olmoe
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
        sys.argv = ["convert_hf_to_gguf.py", src, "--outtype", "f32", "--outfile", os.path.join(args.out, fam + ".gguf")]
        conv.main()


if __name__ == "__main__":
    main()
