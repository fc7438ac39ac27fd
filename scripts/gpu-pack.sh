#!/usr/bin/env bash
# Builds the binary and the GPU test executables here and packs them (stripped,
# xz-compressed) into .gpu/bin for scripts/gpu-run.sh on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
mkdir -p .gpu/bin && rm -f .gpu/bin/*
exe() { cargo test --release -q -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null \
  | python3 -c "import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get('executable') and m.get('target',{}).get('name')=='$2': print(m['executable'])"; }
for t in cuda_backend cuda_nvrtc cuda_ops cuda_quant; do cp "$(exe ffai-kernels $t)" .gpu/bin/$t; done
for t in parity cuda_models cuda_moe_graphs; do cp "$(exe ffai $t)" .gpu/bin/$t; done
cargo build --release -q -p ffai-kernels --example cuda_mv_bench
cp target/release/examples/cuda_mv_bench .gpu/bin/cuda_mv_bench
cp target/release/ffai .gpu/bin/ffai
strip .gpu/bin/*
xz -T2 -6 -f .gpu/bin/*
du -sh .gpu
