#!/usr/bin/env python3
"""Make MLX-quantized fixtures with MLX-LM itself, and check ffai's own output in MLX.

Fixture mode (default). For each entry of FIXTURES below this takes a tiny parity
fixture (tests/fixtures/parity/<family>, made by make_parity_fixtures.py), quantizes
it with MLX-LM's own code and writes into <out>/<name>/:

  config.json                  as MLX-LM's save_config writes it (with "quantization"
                               and "quantization_config")
  model.safetensors            as MLX-LM's save_model writes it (packed uint32
  model.safetensors.index.json weights, scales and biases in the chosen dtype)
  reference.safetensors        "input_ids" I64 [T]: the parity fixture's ids;
                               "logits" F32 [T, vocab]: MLX-LM's forward pass on the
                               checkpoint it wrote, loaded by mlx_lm.utils.load_model,
                               with every float parameter (scales, biases, norms)
                               cast to float32 first (lossless), so the reference is
                               MLX's float32 math on exactly the stored weights;
                               for entries with dequant=True also
                               "dequant.<module>" F32: mx.dequantize of every
                               quantized matrix (scales/biases cast to float32)
  meta.json                    versions, bits, group size, recipe, dtype, and the
                               max abs difference of MLX's *unquantized* float32
                               logits from transformers' (the parity reference), which
                               shows MLX-LM reads the translated config as the same
                               model transformers built

Also (name "ffai_convert", needs target/release/ffai): <out>/ffai_convert/<name>/
reference.safetensors + meta.json, MLX-LM's float32 logits on what `ffai convert`
writes for a parity fixture (the command is in meta.json); crates/ffai/tests/
mlx_real.rs converts again and compares. Rerun it when convert.rs's quantizer changes.

The steps are those of `mlx_lm.convert` (load_model, cast to --dtype, quantize_model
with q_bits / q_group_size / quant_predicate, save_model, save_config) without the
tokenizer: the parity fixtures have none, and neither MLX-LM's model loading nor ffai
needs one. transformers >= 5 nests rope settings under "rope_parameters", which the
MLX-LM model classes used here do not read (they would silently run plain RoPE), so the
config is first rewritten in the older flat form (rope_theta, rope_scaling,
rope_local_base_freq) that mlx-community checkpoints carry.

Check mode (--check-ffai-output). Converts with target/release/ffai (the parity
fixtures MLX-LM models correctly, at bf16, 8-bit g64 and 4-bit g32;
~/.cache/ffai/models/SmolLM2-135M-Instruct.Q4_1.gguf at 4-bit g64, 8-bit g64 and bf16;
gemma-3-270m-q4_k_m.gguf at 8-bit g64), loads every output with mlx_lm, and compares
MLX's float32 logits with the transformers reference of the parity fixture, and with
`ffai inspect --json`'s top 20 of the last position for the real models; then greedy
generation of 20 tokens from SmolLM2 8-bit: the `mlx_lm.generate` CLI (bfloat16 math),
MLX-LM's generate_step with float32 parameters, and `ffai generate --json`. Prints a
summary; nothing is written into the repository. Known, not ffai's: MLX-LM's Gemma 3
rounds the embedding scale sqrt(hidden_size) to bfloat16 (25.25 for 640), which moves
Gemma 3 270M's logits by ~5e-3; the CLI's bfloat16 activations change SmolLM2's greedy
text after two tokens, while float32 MLX and ffai agree on all 20.

Usage (MLX and MLX-LM on CPU are enough; tested with mlx 0.32.4, mlx-lm 0.32.2):

  /tmp/mlxenv/bin/python scripts/make_mlx_fixtures.py --out tests/fixtures/mlx [--only NAME,..]
  /tmp/mlxenv/bin/python scripts/make_mlx_fixtures.py --check-ffai-output [--work /tmp/ffai-mlx-check]

MLX quantization is deterministic (round to nearest per group), so reruns reproduce the
same files.
"""

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

import mlx_lm
from mlx_lm.convert import mixed_quant_predicate_builder
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model, quantize_model, save_config, save_model

ROOT = Path(__file__).resolve().parent.parent
PARITY = ROOT / "tests" / "fixtures" / "parity"

# name -> source parity fixture, bits, group size, mixed recipe, dtype of the
# converted checkpoint (what `mlx_lm.convert --dtype` would cast to before quantizing;
# it is the dtype of the scales, biases and unquantized parameters), dequant matrices.
# Not here: mistral, starcoder2 and gemma2, whose MLX-LM model classes (0.32.2) do not
# reproduce the parity fixtures' sliding windows / soft-caps (their unquantized logits
# differ from transformers' by ~5), so MLX's logits would not be a reference for them.
FIXTURES = {
    "llama_q4_g64": dict(src="llama", bits=4, group=64, recipe=None, dtype="bfloat16"),
    "llama_mixed_3_6": dict(src="llama", bits=3, group=64, recipe="mixed_3_6", dtype="float16", dequant=True),
    "qwen3_q8_g32": dict(src="qwen3", bits=8, group=32, recipe=None, dtype="bfloat16"),
    "gemma3_q3_g32": dict(src="gemma3", bits=3, group=32, recipe=None, dtype="bfloat16"),
    "qwen2_q6_g64": dict(src="qwen2", bits=6, group=64, recipe=None, dtype="float32"),
    "olmo2_q5_g32": dict(src="olmo2", bits=5, group=32, recipe=None, dtype="float16"),
    "granite_q4_g32": dict(src="granite", bits=4, group=32, recipe=None, dtype="float16"),
    "phi3_q2_g32": dict(src="phi3", bits=2, group=32, recipe=None, dtype="bfloat16"),
}


def legacy_config(cfg):
    """Rewrites transformers-5 "rope_parameters" as the flat keys MLX-LM reads."""
    cfg = copy.deepcopy(cfg)
    rp = cfg.pop("rope_parameters", None)
    if rp is None:
        return cfg
    if "full_attention" in rp or "sliding_attention" in rp:
        # Gemma 3: global layers' theta and scaling, local layers' base frequency.
        full = rp["full_attention"]
        cfg["rope_theta"] = full["rope_theta"]
        if full.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
        cfg["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
        return cfg
    cfg["rope_theta"] = rp["rope_theta"]
    kind = rp.get("rope_type", "default")
    if kind != "default":
        scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
        # Older configs (and MLX-LM's Phi-3) name it "type".
        scaling["type"] = kind
        cfg["rope_scaling"] = scaling
    if "partial_rotary_factor" in rp:
        cfg["partial_rotary_factor"] = rp["partial_rotary_factor"]
    return cfg


def read_reference(src):
    ref = mx.load(str(PARITY / src / "reference.safetensors"))
    return ref["input_ids"], ref["logits"]


def forward_f32(model, ids):
    """MLX-LM's forward pass on one sequence, every float parameter in float32, with a
    prompt cache as mlx_lm.generate uses (sliding-window layers get their rotating
    caches and masks from it)."""

    def to_f32(_, v):
        return v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v

    model.update(tree_map_with_path(to_f32, model.parameters()))
    cache = make_prompt_cache(model)
    logits = model(ids.astype(mx.int32)[None], cache=cache)[0]
    return logits.astype(mx.float32)


def max_abs(a, b):
    return float(mx.max(mx.abs(a - b)).item())


def argmax_agree(a, b):
    return int(mx.sum(mx.argmax(a, axis=-1) == mx.argmax(b, axis=-1)).item())


def make_fixture(name, spec, out):
    src = spec["src"]
    ids, hf_logits = read_reference(src)
    dst = out / name
    if dst.exists():
        shutil.rmtree(dst)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = json.loads((PARITY / src / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps(legacy_config(cfg), indent=2))
        shutil.copy(PARITY / src / "model.safetensors", tmp / "model.safetensors")

        # MLX reads the translated config as transformers' model: unquantized logits.
        model, _ = load_model(tmp)
        plain = forward_f32(model, ids)
        plain_diff = max_abs(plain, hf_logits)
        plain_agree = argmax_agree(plain, hf_logits)
        assert plain_diff < 1e-3 and plain_agree == ids.size, (
            f"{name}: MLX's unquantized model differs from transformers by {plain_diff} "
            f"(argmax agrees at {plain_agree}/{ids.size}): config translation is wrong"
        )

        # mlx_lm.convert's steps: load, cast, quantize, save.
        model, config = load_model(tmp, lazy=True)
        dtype = getattr(mx, spec["dtype"])
        cast_predicate = getattr(model, "cast_predicate", lambda _: True)

        def set_dtype(k, v):
            if cast_predicate(k) and mx.issubdtype(v.dtype, mx.floating):
                return v.astype(dtype)
            return v

        model.update(tree_map_with_path(set_dtype, model.parameters()))
        predicate = None
        if spec["recipe"]:
            predicate = mixed_quant_predicate_builder(spec["recipe"], model, spec["group"])
        model, config = quantize_model(
            model, config, spec["group"], spec["bits"], quant_predicate=predicate
        )
        save_model(dst, model, donate_model=True)
        save_config(config, config_path=dst / "config.json")

    # The reference: MLX-LM loads what it wrote and runs it.
    model, config = load_model(dst)
    tensors = {"input_ids": ids.astype(mx.int64)}
    quantized = {}
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            quantized[path] = (m.bits, m.group_size)
            if spec.get("dequant"):
                w = mx.dequantize(
                    m.weight,
                    m.scales.astype(mx.float32),
                    m.biases.astype(mx.float32),
                    group_size=m.group_size,
                    bits=m.bits,
                )
                tensors[f"dequant.{path}"] = w.astype(mx.float32)
    logits = forward_f32(model, ids)
    tensors["logits"] = logits
    mx.eval(tensors)
    mx.save_safetensors(str(dst / "reference.safetensors"), tensors)
    q_diff = max_abs(logits, hf_logits)
    meta = {
        "name": name,
        "source_fixture": f"tests/fixtures/parity/{src}",
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
        "bits": spec["bits"],
        "group_size": spec["group"],
        "recipe": spec["recipe"],
        "dtype": spec["dtype"],
        "quantized_modules": {p: {"bits": b, "group_size": g} for p, (b, g) in sorted(quantized.items())},
        "seq_len": int(ids.size),
        "mlx_unquantized_vs_transformers_max_abs_diff": plain_diff,
        "mlx_quantized_vs_transformers_max_abs_diff": q_diff,
        "mlx_quantized_vs_transformers_argmax_agree": argmax_agree(logits, hf_logits),
        "notes": "logits: MLX-LM forward pass (float32 parameters) on this checkpoint, loaded by "
        "mlx_lm.utils.load_model; config rope keys rewritten from transformers-5 rope_parameters "
        "to the flat form before conversion",
    }
    (dst / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in dst.iterdir())
    print(
        f"{name}: {len(quantized)} quantized modules, {size / 1024:.0f} KiB; MLX unquantized vs "
        f"transformers {plain_diff:.2e}; quantized vs transformers {q_diff:.3f} "
        f"(argmax {meta['mlx_quantized_vs_transformers_argmax_agree']}/{ids.size})"
    )


# ---------------------------------------------------------------------------
# --check-ffai-output


def run(cmd, **kw):
    print("$", " ".join(str(c) for c in cmd), flush=True)
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        print(r.stdout)
        print(r.stderr)
        raise SystemExit(f"command failed ({r.returncode})")
    return r.stdout


def ffai_convert(ffai, src, bits, out, group=64):
    if out.exists():
        shutil.rmtree(out)
    cmd = [ffai, "convert", src, "--bits", bits, "-o", out]
    if bits not in ("f16", "bf16"):
        cmd += ["--group-size", str(group)]
    run(cmd)


def ffai_top(ffai, model_dir, ids, k, activations):
    out = run(
        [
            ffai, "inspect", "-m", model_dir, "--prompt-ids", ",".join(map(str, ids)), "--top-k", str(k),
            "--json", "--kv-cache", "f32", "--activations", activations, "--threads", "2",
        ]
    )
    j = json.loads(out)
    top = j.get("top") or j.get("top_k") or j.get("logits")
    return [(t["id"], t["logit"]) for t in top]


# ffai's own output, read by MLX-LM: name -> parity fixture, --bits, --group-size.
FFAI_CONVERTED = {
    "llama_q4_g32": ("llama", "4", 32),
    "gemma3_q6_g64": ("gemma3", "6", 64),
    "phi3_q8_g64": ("phi3", "8", 64),
}


def mlx_on_ffai_output(ffai, src, bits, group, out):
    """Converts parity fixture `src` with `ffai convert`, loads the output with MLX-LM
    and returns (input ids, MLX's float32 logits, transformers' logits of the original)."""
    ffai_convert(ffai, PARITY / src, bits, out, group)
    ids, hf = read_reference(src)
    model, _ = load_model(out)
    return ids, forward_f32(model, ids), hf


def make_ffai_convert_fixtures(out):
    """tests/fixtures/mlx/ffai_convert/<name>/: MLX-LM's logits on what `ffai convert`
    writes for a parity fixture (the test converts again and compares)."""
    ffai = ROOT / "target" / "release" / "ffai"
    assert ffai.exists(), f"{ffai} missing: cargo build --release first"
    for name, (src, bits, group) in FFAI_CONVERTED.items():
        dst = out / "ffai_convert" / name
        dst.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            ids, logits, hf = mlx_on_ffai_output(ffai, src, bits, group, Path(tmp) / "out")
        mx.save_safetensors(str(dst / "reference.safetensors"), {"input_ids": ids.astype(mx.int64), "logits": logits})
        meta = {
            "name": name,
            "source_fixture": f"tests/fixtures/parity/{src}",
            "ffai_convert": f"ffai convert tests/fixtures/parity/{src} --bits {bits} --group-size {group}",
            "mlx_version": mx.__version__,
            "mlx_lm_version": mlx_lm.__version__,
            "bits": int(bits),
            "group_size": group,
            "mlx_vs_transformers_max_abs_diff": max_abs(logits, hf),
            "mlx_vs_transformers_argmax_agree": argmax_agree(logits, hf),
            "notes": "logits: MLX-LM forward pass (float32 parameters) on ffai convert's output, loaded by "
            "mlx_lm.utils.load_model",
        }
        (dst / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"ffai_convert/{name}: MLX vs transformers {meta['mlx_vs_transformers_max_abs_diff']:.3f}")


def check_ffai_output(work):
    ffai = ROOT / "target" / "release" / "ffai"
    assert ffai.exists(), f"{ffai} missing: cargo build --release first"
    work.mkdir(parents=True, exist_ok=True)
    results = {}

    # 1. Parity fixtures (float32 transformers checkpoints): MLX's logits on ffai's
    #    output against transformers' on the original. bf16 must be close (only the
    #    weights' rounding); a wrong config reading shows as a diff of several units.
    for src in ("llama", "qwen2", "qwen3", "phi3", "gemma3", "olmo2", "granite"):
        for bits, group in (("bf16", 0), ("8", 64), ("4", 32)):
            ids, logits, hf = mlx_on_ffai_output(ffai, src, bits, group, work / f"parity-{src}-{bits}")
            d, agree = max_abs(logits, hf), argmax_agree(logits, hf)
            print(f"parity {src} {bits}: MLX on ffai's output vs transformers: max abs {d:.3e}, argmax {agree}/{ids.size}")
            results[f"parity {src} {bits}: MLX vs transformers max abs, argmax agree"] = (d, agree)

    # 2. SmolLM2 from GGUF at 4-bit, 8-bit and bf16 (and Gemma 3 270M at 8-bit): MLX's
    #    last-position logits against
    #    ffai inspect's top 20 (f32 activations: same math; q8: ffai's default).
    models = Path.home() / ".cache" / "ffai" / "models"
    prompt = "The capital of France is Paris. The capital of Germany is"
    runs = [("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", b) for b in ("4", "8", "bf16")]
    runs.append(("gemma3-270m", "gemma-3-270m-q4_k_m.gguf", "8"))
    for tag, file, bits in runs:
        out = work / f"{tag}-{bits}"
        ffai_convert(ffai, models / file, bits, out, 64)
        model, tok = mlx_lm.load(str(out))
        ids = tok.encode(prompt)
        logits = forward_f32(model, mx.array(ids))[-1]
        mlx_top = int(mx.argmax(logits).item())
        for act in ("f32", "q8"):
            top = ffai_top(ffai, out, ids, 20, act)
            d = max(abs(v - logits[i].item()) for i, v in top)
            print(
                f"{tag} {bits} ({act} activations): {len(ids)} prompt tokens; ffai top-1 {top[0][0]}, MLX top-1 "
                f"{mlx_top}; max abs diff over ffai's top 20 logits {d:.3e} (MLX top logit {logits[mlx_top].item():.3f})"
            )
            results[f"{tag} {bits} {act} activations: max abs over top 20, top-1 equal"] = (d, top[0][0] == mlx_top)

    # 3. Greedy generation, SmolLM2 8-bit, 20 tokens: the mlx_lm.generate CLI (which
    #    computes in the checkpoint's bfloat16), MLX-LM's generate_step with float32
    #    parameters, and ffai generate (default q8 activations and f32).
    out = work / "smollm2-8"
    mlx_text = run(
        [
            Path(sys.executable).parent / "mlx_lm.generate", "--model", out, "--prompt", prompt,
            "--max-tokens", "20", "--temp", "0", "--ignore-chat-template", "--verbose", "False",
        ]
    )
    model, tok = mlx_lm.load(str(out))
    ids = tok.encode(prompt)
    bf16_ids = [int(t) for (t, _), _ in zip(generate_step(mx.array(ids), model), range(20))]
    f32_model, _ = mlx_lm.load(str(out))
    forward_f32(f32_model, mx.array(ids))  # casts the parameters to float32
    f32_ids = [int(t) for (t, _), _ in zip(generate_step(mx.array(ids), f32_model), range(20))]
    print("mlx_lm.generate (bfloat16):", repr(mlx_text))
    print("MLX generate_step bfloat16:", bf16_ids)
    print("MLX generate_step float32: ", f32_ids)
    for act in ("q8", "f32"):
        j = json.loads(
            run(
                [
                    ffai, "generate", "-m", out, "-p", prompt, "--max-tokens", "20", "--temperature", "0",
                    "--threads", "2", "--activations", act, "--json",
                ]
            )
        )
        assert j["prompt_ids"] == ids, f"prompt tokenized differently: ffai {j['prompt_ids']}, MLX {ids}"
        got = j["generated_ids"]
        print(f"ffai generate ({act} activations):", got, repr(j["text"]))
        for name, ref in (("MLX float32", f32_ids), ("MLX bfloat16", bf16_ids)):
            same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
            results[f"greedy: ffai ({act}) and {name} agree on the first N of 20 tokens"] = same
    print(json.dumps(results, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "mlx")
    ap.add_argument("--only", default=None)
    ap.add_argument("--check-ffai-output", action="store_true")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ffai-mlx-check")
    a = ap.parse_args()
    mx.set_default_device(mx.cpu)
    if a.check_ffai_output:
        check_ffai_output(a.work)
        return
    names = a.only.split(",") if a.only else list(FIXTURES) + ["ffai_convert"]
    a.out.mkdir(parents=True, exist_ok=True)
    for n in names:
        if n == "ffai_convert":
            make_ffai_convert_fixtures(a.out)
        else:
            make_fixture(n, FIXTURES[n], a.out)


if __name__ == "__main__":
    main()
