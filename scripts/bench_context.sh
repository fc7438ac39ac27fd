#!/usr/bin/env bash
# Decode speed as the context grows: ffai and llama.cpp on the same GGUF files, one after
# the other in one run. For each file and each context D: ffai prefills D tokens and
# decodes N (`ffai bench --prompt-tokens D --gen-tokens N`); llama-bench decodes N after a
# depth of D (`-p 0 -n N -d D`). Prints one line per run; BENCHMARKS.md has the table.
#   bash scripts/bench_context.sh LLAMA_BENCH "512 8192 32768" FILE.gguf...
# Env: THREADS (default 2), GEN (default 64).
set -uo pipefail
lb=$1; depths=$2; shift 2
ffai=${FFAI:-$(dirname "$0")/../target/release/ffai}
t=${THREADS:-2}; n=${GEN:-64}
for f in "$@"; do for d in $depths; do
  ours=$( { /usr/bin/time -f "rss_kib=%M" "$ffai" bench -m "$f" --threads "$t" --prompt-tokens "$d" --gen-tokens "$n" --repetitions 1; } 2>&1 \
    | grep -E "^(prefill|decode)|rss_kib" | tr '\n' ' ')
  peer=$( { /usr/bin/time -f "rss_kib=%M" "$lb" -m "$f" -t "$t" -p 0 -n "$n" -d "$d" -r 1 -o csv; } 2>&1 \
    | grep -E "^\"|rss_kib" | tail -2 | tr '\n' ' ')
  echo "$(basename "$f") D=$d | ffai: $ours | llama.cpp: $peer"
done; done
