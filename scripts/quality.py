#!/usr/bin/env python3
"""What a quantization costs, for each test model: perplexity on an English text and the
KL divergence of the next-token distributions against the model's bf16 conversion (the
reference), for the original GGUF, MLX affine 8/6/4/3-bit conversions (MLX's min/max
quantizer; ffai's search quantizer; the search calibrated on other text) and GGUF
re-encodings of the original in each type `ffai quantize` writes.

usage: scripts/quality.py [--models smollm2,gemma3] [--file TEXT] [--context 512] [--max-windows 4]
Needs target/release/ffai (cargo build --release). Prints a markdown table per model
(paste into BENCHMARKS.md) and writes the raw numbers to target/quality.json.
Conversions go to target/quality/ (reused when present).
"""
import argparse, json, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.environ.get("FFAI_MODELS_DIR", os.path.expanduser("~/.cache/ffai/models"))
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct Q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": ("Gemma-3-270M Q4_K_M", "gemma-3-270m-q4_k_m.gguf"),
}
FFAI = os.path.join(ROOT, "target/release/ffai")
WORK = os.path.join(ROOT, "target/quality")
MLX_BITS = ["8", "6", "4", "3"]
SEARCH_BITS = ["8", "4", "3"]
CALIBRATED_BITS = ["8", "4", "3"]
# Calibration text: not the scored GPL-3.
CALIBRATION = ["/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/MPL-2.0"]
GGUF_TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K"]


def ffai(*args):
    p = subprocess.run([FFAI, *args], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"ffai {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


def size_mib(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**20
    return os.path.getsize(path) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--file", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--context", default="512")
    ap.add_argument("--max-windows", default="4", help="windows of --context tokens scored (0: all)")
    a = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    results = {}
    for key in a.models.split(","):
        title, file = MODELS[key]
        src = os.path.join(MODELS_DIR, file)
        ref = os.path.join(WORK, f"{key}-bf16")
        if not os.path.exists(ref):
            ffai("convert", src, "--bits", "bf16", "--output", ref)
        variants = [(f"original GGUF ({title.split()[-1]})", src, "q8")]
        calib = os.path.join(WORK, "calibration.txt")
        with open(calib, "w") as f:
            f.write("".join(open(c).read() for c in CALIBRATION))
        for bits in MLX_BITS:
            # From the bf16 conversion, as mlx-community checkpoints are made.
            out = os.path.join(WORK, f"{key}-mlx{bits}")
            if not os.path.exists(out):
                ffai("convert", ref, "--bits", bits, "--group-size", "64", "--quantizer", "minmax", "--output", out)
            variants.append((f"MLX {bits}-bit (group 64), MLX's min/max quantizer", out, "q8"))
            if bits == "8":
                variants.append(("MLX 8-bit (group 64), min/max, f32 activations", out, "f32"))
        for bits in SEARCH_BITS:
            out = os.path.join(WORK, f"{key}-search{bits}")
            if not os.path.exists(out):
                ffai("convert", ref, "--bits", bits, "--group-size", "64", "--output", out)
            variants.append((f"MLX {bits}-bit (group 64), ffai search quantizer", out, "q8"))
        for bits in CALIBRATED_BITS:
            out = os.path.join(WORK, f"{key}-calibrated{bits}")
            if not os.path.exists(out):
                ffai("convert", ref, "--bits", bits, "--group-size", "64", "--calibration", calib, "--output", out)
            variants.append((f"MLX {bits}-bit (group 64), search + calibration", out, "q8"))
            if bits == "8":
                variants.append(("MLX 8-bit (group 64), search + calibration, f32 activations", out, "f32"))
        for ty in GGUF_TYPES:
            out = os.path.join(WORK, f"{key}-{ty}.gguf")
            if not os.path.exists(out):
                ffai("quantize", src, out, "--type", ty)
            variants.append((f"GGUF {ty} (re-encoded original)", out, "q8"))
        rows = []
        win = ["--max-windows", a.max_windows] if a.max_windows != "0" else []
        ref_ppl = json.loads(ffai("perplexity", "-m", ref, "--file", a.file, "--context", a.context, *win, "--json"))
        rows.append({"variant": "bf16 conversion (reference)", "size_mib": size_mib(ref),
                     "perplexity": ref_ppl["perplexity"], "mean_kld": 0.0, "p99_kld": 0.0, "top1": 1.0,
                     "top1_decisive": 1.0})
        for name, path, acts in variants:
            d = json.loads(ffai("kld", "-m", path, "--ref", ref, "--file", a.file, "--context", a.context, *win,
                                "--activations", acts, "--json"))
            rows.append({"variant": name, "size_mib": size_mib(path), "perplexity": d["perplexity"],
                         "mean_kld": d["mean_kld"], "p99_kld": d["p99_kld"], "top1": d["top1_agreement"],
                         "top1_decisive": d["top1_agreement_decisive"]})
            print(f"  {name}: KLD {d['mean_kld']:.5f}", file=sys.stderr, flush=True)
        results[key] = {"title": title, "file": a.file, "context": a.context, "rows": rows,
                        "tokens_scored": d["tokens_scored"]}
        print(f"\n### {title}: {os.path.basename(a.file)}, context {a.context}, {d['tokens_scored']} positions\n")
        print("| weights | size (MiB) | perplexity | mean KLD | p99 KLD | top-1 agreement | top-1, decisive positions |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['size_mib']:.0f} | {r['perplexity']:.3f} | {r['mean_kld']:.5f} | "
                  f"{r['p99_kld']:.4f} | {100 * r['top1']:.2f}% | {100 * r['top1_decisive']:.2f}% |")
    with open(os.path.join(ROOT, "target/quality.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
