#!/usr/bin/env bash
# Runs on the GPU machine (see DEVELOPERS.md / BENCHMARKS.md): the binary and the test
# executables built here travel xz-compressed in .gpu/bin (the working tree that travels
# is limited to 64 MiB). Usage: bash scripts/gpu-run.sh STAGE...
#   unpack   decompress .gpu/bin/*.xz
#   kernels  the CUDA kernel and backend tests (FFAI_REQUIRE_GPU=1)
#   parity   every parity fixture on the GPU
#   models   the real-model GPU tests (FFAI_MODELS_DIR must hold the checkpoints)
set -uo pipefail
cd "$(dirname "$0")/.."
NV=$(python3 -c "import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],'cu13','lib'))" 2>/dev/null)
export LD_LIBRARY_PATH="$NV:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export FFAI_REQUIRE_GPU=1 FFAI_CUDA_CACHE=/tmp/ffai-cuda-cache
B=.gpu/bin
out=${OUT:-/tmp}
for stage in "$@"; do
  case $stage in
  unpack)
    for f in $B/*.xz; do xz -d -f -k "$f"; chmod +x "${f%.xz}"; done
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv ;;
  kernels)
    for t in cuda_nvrtc cuda_ops cuda_quant cuda_backend; do
      echo "== $t"; $B/$t --test-threads=1 2>&1 | tee -a "$out/kernels.log" | grep -E "^test |panicked|error|FAILED|test result" | head -40
    done ;;
  parity)
    echo "== parity on cuda"; $B/parity every_fixture_on_cuda --nocapture 2>&1 | tee -a "$out/parity.log" | tail -30 ;;
  models)
    echo "== cuda_models"; $B/cuda_models --test-threads=1 --nocapture 2>&1 | tee -a "$out/models.log" | tail -60 ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
