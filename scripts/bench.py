#!/usr/bin/env python3
"""ffai vs llama.cpp, side by side on this machine: prefill (pp512), decode (tg128) and
peak RSS for each test model at each thread count. The two engines alternate, one
repetition at a time, for ROUNDS rounds; the table reports medians and the ratio.

usage: scripts/bench.py [--rounds 3] [--threads 1,2] [--models smollm2,gemma3] [--ffai-args '...']
       scripts/bench.py --models smollm2-bf16,smollm2-mlx4,smollm2-mlx8   (other formats:
       ffai runs the HF directory `ffai convert` writes from the GGUF, llama.cpp the GGUF
       `ffai quantize` writes in the nearest GGUF type; made once under target/bench-formats)
Prints a markdown table (paste into BENCHMARKS.md) and writes raw numbers as JSON
to target/bench.json.
"""
import argparse, datetime, json, os, platform, statistics, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.environ.get("FFAI_MODELS_DIR", os.path.expanduser("~/.cache/ffai/models"))
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct Q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": ("Gemma-3-270M Q4_K_M", "gemma-3-270m-q4_k_m.gguf"),
}
# key -> (label, base model, `ffai convert --bits`, llama.cpp's GGUF type)
FORMATS = {
    f"{m}-{tag}": (f"{MODELS[m][0].split()[0]} {label}", m, bits, ty)
    for m in MODELS
    for tag, label, bits, ty in [
        ("bf16", "bf16 (ffai: HF dir; llama.cpp: BF16 GGUF)", "bf16", "BF16"),
        ("mlx4", "4-bit (ffai: MLX 4-bit g64; llama.cpp: Q4_0)", "4", "Q4_0"),
        ("mlx8", "8-bit (ffai: MLX 8-bit g64; llama.cpp: Q8_0)", "8", "Q8_0"),
    ]
}
LLAMA_WORK = os.environ.get("LLAMACPP_WORK", "/tmp/llamacpp")
LLAMA_BENCH = os.path.join(LLAMA_WORK, "build/bin/llama-bench")
FFAI = os.path.join(ROOT, "target/release/ffai")


def run(cmd):
    """Runs cmd, returns its stdout."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    out, err = p.stdout, p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.strip()[-500:]}")
    return out


def rss_of(cmd):
    """Runs cmd under wait4 so we get its own max RSS."""
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execv(cmd[0], cmd)
    _, status, ru = os.wait4(pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {status}")
    return ru.ru_maxrss * 1024


def llama_once(model, threads):
    out = run([LLAMA_BENCH, "-m", model, "-t", str(threads), "-p", "512", "-n", "128", "-r", "1", "-o", "json"])
    rows = json.loads(out)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == 512 and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] == 128 and r["n_prompt"] == 0)
    return pp, tg


FFAI_ARGS = []  # extra `ffai bench` arguments (--ffai-args)


def ffai_once(model, threads):
    out = run([FFAI, "bench", "-m", model, "--threads", str(threads), "--prompt-tokens", "512",
               "--gen-tokens", "128", "--repetitions", "1", "--json"] + FFAI_ARGS)
    j = json.loads(out)
    return j["prefill_tokens_per_s"], j["decode_tokens_per_s"], j["peak_rss_bytes"], j["load_seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--ffai-args", default="", help="extra `ffai bench` arguments, e.g. '--activations bf16'")
    a = ap.parse_args()
    FFAI_ARGS.extend(a.ffai_args.split())
    if not os.path.exists(LLAMA_BENCH):
        subprocess.check_call(["bash", os.path.join(ROOT, "../shared/tools/llamacpp-baseline.sh")],
                              env={**os.environ, "WORK": LLAMA_WORK})
    subprocess.check_call(["cargo", "build", "--release", "-q", "--bin", "ffai"], cwd=ROOT)
    results = []
    for key in a.models.split(","):
        if key in FORMATS:
            label, base, bits, ty = FORMATS[key]
            src = os.path.join(MODELS_DIR, MODELS[base][1])
            work = os.path.join(ROOT, "target/bench-formats")
            os.makedirs(work, exist_ok=True)
            ffai_path, path = os.path.join(work, key), os.path.join(work, f"{key}.gguf")
            if not os.path.exists(ffai_path):
                run([FFAI, "convert", src, "--bits", bits, "--group-size", "64", "--output", ffai_path])
            if not os.path.exists(path):
                run([FFAI, "quantize", src, path, "--type", ty])
        else:
            label, file = MODELS[key]
            path = ffai_path = os.path.join(MODELS_DIR, file)
        for t in [int(x) for x in a.threads.split(",")]:
            r = {"model": label, "threads": t, "llama": [], "ffai": [], "ffai_error": None}
            for _ in range(a.rounds):
                pp, tg = llama_once(path, t)
                rss = rss_of([LLAMA_BENCH, "-m", path, "-t", str(t), "-p", "512", "-n", "0", "-r", "1"])
                r["llama"].append({"pp": pp, "tg": tg, "rss": rss})
                try:
                    pp, tg, rss, load = ffai_once(ffai_path, t)
                    r["ffai"].append({"pp": pp, "tg": tg, "rss": rss, "load": load})
                except RuntimeError as e:
                    r["ffai_error"] = str(e).splitlines()[-1][-160:]
                    break
            results.append(r)
            print(f"done: {label} t={t}", file=sys.stderr)
    os.makedirs(os.path.join(ROOT, "target"), exist_ok=True)
    with open(os.path.join(ROOT, "target/bench.json"), "w") as f:
        json.dump(results, f, indent=1)

    med = lambda rows, k: statistics.median(x[k] for x in rows)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    print(f"{datetime.date.today()} · {cpu} · {os.cpu_count()} cores · medians of {a.rounds} alternating rounds\n")
    print("| model | threads | ffai pp512 | llama.cpp pp512 | ratio | ffai tg128 | llama.cpp tg128 | ratio | ffai peak RSS | llama.cpp peak RSS | ffai load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        lp, lt, lr = med(r["llama"], "pp"), med(r["llama"], "tg"), med(r["llama"], "rss")
        if not r["ffai"]:
            print(f"| {r['model']} | {r['threads']} | — | {lp:.1f} | — | — | {lt:.1f} | — | — | {lr/2**20:.0f} MiB | — |"
                  f" <!-- ffai: {r['ffai_error']} -->")
            continue
        fp, ft, fr, fl = med(r["ffai"], "pp"), med(r["ffai"], "tg"), med(r["ffai"], "rss"), med(r["ffai"], "load")
        print(f"| {r['model']} | {r['threads']} | {fp:.1f} | {lp:.1f} | {fp/lp:.2f}× | {ft:.1f} | {lt:.1f} | {ft/lt:.2f}× "
              f"| {fr/2**20:.0f} MiB | {lr/2**20:.0f} MiB | {fl:.2f} s |")


if __name__ == "__main__":
    main()
