#!/usr/bin/env python3
"""Batched decode, ffai vs llama.cpp, side by side on this machine: N sequences of
PP prompt tokens each, prefilled and then decoded TG tokens each, all at once, for
N in --sequences. ffai: `ffai bench --sequences N`; llama.cpp: `llama-batched-bench`
(built by ../shared/tools/llamacpp-baseline.sh into $LLAMACPP_WORK, default
/tmp/llamacpp). The engines alternate, one run at a time, for ROUNDS rounds; the table
reports medians of the aggregate decode rate (tokens/s over all sequences) and of the
prefill rate, and the ratio.

usage: scripts/bench_batched.py [--rounds 3] [--threads 2] [--models smollm2,gemma3]
                                [--sequences 1,4,16,64] [--pp 128] [--tg 128]
Prints a markdown table (paste into BENCHMARKS.md); raw numbers go to
target/bench_batched.json.
"""
import argparse, json, os, re, statistics, subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.environ.get("FFAI_MODELS_DIR", os.path.expanduser("~/.cache/ffai/models"))
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct Q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": ("Gemma-3-270M Q4_K_M", "gemma-3-270m-q4_k_m.gguf"),
}
LLAMA_WORK = os.environ.get("LLAMACPP_WORK", "/tmp/llamacpp")
LLAMA_BB = os.path.join(LLAMA_WORK, "build/bin/llama-batched-bench")
FFAI = os.path.join(ROOT, "target/release/ffai")


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()[-500:]}")
    return p.stdout


def ffai_once(model, n, threads, pp, tg):
    out = run([FFAI, "bench", "-m", model, "--threads", str(threads), "--sequences", str(n),
               "--prompt-tokens", str(pp), "--gen-tokens", str(tg), "--repetitions", "1", "--json"])
    j = json.loads(out)
    return j["prefill_tokens_per_s"], j["decode_tokens_per_s"]


def llama_once(model, n, threads, pp, tg):
    # One parallel level per run; a context big enough for all sequences at once.
    ctx = n * (pp + tg) + 64
    out = run([LLAMA_BB, "-m", model, "-t", str(threads), "-c", str(ctx), "-b", "2048", "-ub", "512",
               "-npp", str(pp), "-ntg", str(tg), "-npl", str(n)])
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"\d+", cells[0] or "x") and int(cells[2]) == n:
            return float(cells[5]), float(cells[7])
    raise RuntimeError(f"no result row in llama-batched-bench output:\n{out[-800:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--sequences", default="1,4,16,64")
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=128)
    a = ap.parse_args()
    for exe in (FFAI, LLAMA_BB):
        if not os.path.exists(exe):
            raise SystemExit(f"missing {exe} (cargo build --release; ../shared/tools/llamacpp-baseline.sh)")
    ns = [int(x) for x in a.sequences.split(",")]
    rows, raw = [], {}
    for key in a.models.split(","):
        label, file = MODELS[key]
        path = os.path.join(MODELS_DIR, file)
        for n in ns:
            f, l = [], []
            for _ in range(a.rounds):
                f.append(ffai_once(path, n, a.threads, a.pp, a.tg))
                l.append(llama_once(path, n, a.threads, a.pp, a.tg))
            med = lambda v, i: statistics.median(x[i] for x in v)
            r = dict(model=label, n=n, ffai_pp=med(f, 0), ffai_tg=med(f, 1), llama_pp=med(l, 0), llama_tg=med(l, 1))
            raw[f"{key}/{n}"] = dict(ffai=f, llama=l)
            rows.append(r)
            print(f"# {label} N={n}: ffai tg {r['ffai_tg']:.1f} llama.cpp tg {r['llama_tg']:.1f}", flush=True)
    os.makedirs(os.path.join(ROOT, "target"), exist_ok=True)
    with open(os.path.join(ROOT, "target/bench_batched.json"), "w") as fh:
        json.dump(raw, fh, indent=1)
    print(f"\n| model | N | ffai decode (aggregate) | llama.cpp decode | ratio | ffai prefill | llama.cpp prefill | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['n']} | {r['ffai_tg']:.1f} | {r['llama_tg']:.1f} | {r['ffai_tg'] / r['llama_tg']:.2f}× "
              f"| {r['ffai_pp']:.1f} | {r['llama_pp']:.1f} | {r['ffai_pp'] / r['llama_pp']:.2f}× |")


if __name__ == "__main__":
    main()
