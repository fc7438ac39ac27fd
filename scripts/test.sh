#!/usr/bin/env bash
# Runs every check CI runs: fetches the real test models and NVRTC (idempotent), then formatting,
# clippy with warnings as errors, and the whole test suite in release mode (the real-model
# tests would take minutes unoptimised).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-models.sh
# NVRTC without a GPU or toolkit, so the CUDA kernels compile in every test run
# (crates/ffai-kernels/tests/cuda_nvrtc.rs).
python3 -m pip install -q --disable-pip-version-check nvidia-cuda-nvrtc==13.0.88
# The official OpenAI Python client, driven against `ffai serve` (crates/ffai-cli/tests/openai_client.rs).
python3 -m pip install -q --disable-pip-version-check openai==3.63.0
NVRTC_LIB=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))")
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo test --workspace --release
# No test may depend on the CPU it runs on: the kernel oracles and SmolLM2's greedy tests
# again with the kernels capped at the portable and the AVX2 level (FFAI_CPU_LEVEL,
# ARCHITECTURE.md "CPU levels"); `--workspace` reuses the binaries built above. About a
# minute in all.
for level in portable avx2; do
  FFAI_CPU_LEVEL=$level cargo test --workspace --release --test q8 --test ops --test affine --test float_gemm --test paged
  FFAI_CPU_LEVEL=$level cargo test --workspace --release --test smollm2 -- \
    greedy_continuations_match_llama_cpp capital_of_france_is_paris chunked_prefill_matches_token_by_token_logits
done
# aarch64: the workspace builds without the x86 kernels. `ring` (hf-hub's TLS) compiles C in
# its build script, so this needs the target's standard library and a C cross compiler.
aarch64=aarch64-unknown-linux-gnu
rustup target list --installed 2>/dev/null | grep -x $aarch64 >/dev/null || rustup target add $aarch64 || true
if ! command -v aarch64-linux-gnu-gcc >/dev/null && command -v apt-get >/dev/null; then
  sudo=""; [[ $(id -u) != 0 ]] && sudo="sudo -n"
  { $sudo apt-get install -y -q gcc-aarch64-linux-gnu || { $sudo apt-get update -q && $sudo apt-get install -y -q gcc-aarch64-linux-gnu; }; } >/dev/null 2>&1 || true
fi
if rustup target list --installed 2>/dev/null | grep -x $aarch64 >/dev/null && command -v aarch64-linux-gnu-gcc >/dev/null; then
  RUSTFLAGS="-D warnings" cargo check --workspace --all-targets --target $aarch64
else
  echo "SKIPPED: cargo check --target $aarch64 (could not install the rust target or gcc-aarch64-linux-gnu here)"
fi
