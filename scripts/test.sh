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
