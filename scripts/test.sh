#!/usr/bin/env bash
# Runs every check CI runs: fetches the real test models (idempotent), then formatting,
# clippy with warnings as errors, and the whole test suite in release mode (the real-model
# tests would take minutes unoptimised).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-models.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo test --workspace --release
