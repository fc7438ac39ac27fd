#!/usr/bin/env python3
"""Serving benchmark: `ffai serve` against llama.cpp's `llama-server`, same model, same
machine, same run.

Each server is started on 127.0.0.1, waited for (GET /health), then driven by C
concurrent clients (C in --concurrency) that each send --requests streaming completion
requests one after another (distinct prompts cut from a long text, greedy, --max-tokens
each). Per level: output tokens per second over the level's wall time, time to first token
(median, p90) and the mean inter-token latency, from the server-sent events as they
arrive. Every loop is bounded (requests, a per-request timeout); nothing listens beyond
loopback. The servers are stopped at the end.

usage: python3 scripts/bench_serve.py --model GGUF [--ffai target/release/ffai]
         [--llama-server /tmp/llamacpp/build/bin/llama-server] [--concurrency 1,8,32,64]
         [--requests 2] [--max-tokens 64] [--context 1024] [--threads 2]
Needs aiohttp (`python3 -m pip install aiohttp`).
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import aiohttp

TEXT = "/usr/share/common-licenses/GPL-3"


def prompts(n):
    words = open(TEXT).read().split()
    out = []
    for i in range(n):
        start = (i * 97) % (len(words) - 200)
        out.append(" ".join(words[start : start + 40 + (i * 13) % 80]))
    return out


async def wait_ready(session, base, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            async with session.get(base + "/health") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{base} did not become ready in {timeout} s")


async def one_request(session, base, prompt, max_tokens, timeout):
    """Returns (ttft, inter-token gaps, completion tokens) of one streaming request."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.monotonic()
    first, last, gaps, chunks, usage = None, None, [], 0, None
    async with session.post(base + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        if r.status != 200:
            raise RuntimeError(f"{base}: HTTP {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            msg = json.loads(data)
            if msg.get("usage"):
                usage = msg["usage"]
            if any(c.get("text") for c in msg.get("choices", [])):
                now = time.monotonic()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
    tokens = usage["completion_tokens"] if usage else chunks
    return (first - t0) if first else None, gaps, tokens


async def level(base, concurrency, requests, max_tokens, texts, timeout):
    # A fresh connection per request (llama-server closes idle keep-alive connections).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as session:
        await wait_ready(session, base)
        results = []

        async def client(c):
            for k in range(requests):
                p = texts[(c * requests + k) % len(texts)]
                results.append(await one_request(session, base, p, max_tokens, timeout))

        t0 = time.monotonic()
        await asyncio.gather(*(client(c) for c in range(concurrency)))
        wall = time.monotonic() - t0
    ttfts = sorted(r[0] for r in results if r[0] is not None)
    gaps = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    return {
        "tok_s": tokens / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "itl_ms": 1e3 * statistics.mean(gaps) if gaps else float("nan"),
        "tokens": tokens,
        "wall": wall,
    }


def start(cmd, log):
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ffai", default="target/release/ffai")
    ap.add_argument("--llama-server", default="/tmp/llamacpp/build/bin/llama-server")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--only", choices=["ffai", "llama"], default=None)
    a = ap.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    slots = max(levels)
    texts = prompts(slots * a.requests)
    servers = {
        "ffai": [a.ffai, "serve", "-m", a.model, "--host", "127.0.0.1", "--port", str(a.port),
                 "--threads", str(a.threads), "--max-sequences", str(slots), "--context", str(a.context)],
        "llama": [a.llama_server, "-m", a.model, "--host", "127.0.0.1", "--port", str(a.port + 1),
                  "-t", str(a.threads), "-np", str(slots), "-c", str(a.context * slots), "--no-webui",
                  "--threads-http", str(slots + 4)],
    }
    rows = []
    for name, cmd in servers.items():
        if a.only and a.only != name:
            continue
        base = f"http://127.0.0.1:{a.port + (0 if name == 'ffai' else 1)}"
        with open(f"/tmp/bench_serve_{name}.log", "w") as log:
            proc = start(cmd, log)
            try:
                for c in levels:
                    r = asyncio.run(level(base, c, a.requests, a.max_tokens, texts, a.timeout))
                    rows.append((name, c, r))
                    print(f"{name} c={c}: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']*1e3:.0f} ms "
                          f"p90 {r['ttft_p90']*1e3:.0f} ms, ITL {r['itl_ms']:.1f} ms "
                          f"({r['tokens']} tokens in {r['wall']:.1f} s)", file=sys.stderr)
            finally:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)
    print("| server | clients | output tok/s | TTFT p50 ms | TTFT p90 ms | inter-token ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, c, r in rows:
        print(f"| {name} | {c} | {r['tok_s']:.1f} | {r['ttft_p50']*1e3:.0f} | {r['ttft_p90']*1e3:.0f} | {r['itl_ms']:.1f} |")


if __name__ == "__main__":
    main()
