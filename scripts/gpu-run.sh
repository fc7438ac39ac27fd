#!/usr/bin/env bash
# Runs on the GPU machine (see DEVELOPERS.md / BENCHMARKS.md): the binary and the test
# executables built here travel xz-compressed in .gpu/bin (the working tree that travels
# is limited to 64 MiB). Usage: bash scripts/gpu-run.sh STAGE...
#   unpack   decompress .gpu/bin/*.xz
#   kernels  the CUDA kernel and backend tests (FFAI_REQUIRE_GPU=1), plain and with
#            FFAI_CUDA_OLDER_KERNELS=1 (the first-generation kernels, kept for A/B timing)
#   parity   every parity fixture on the GPU, both ways
#   models   the real-model GPU tests (FFAI_MODELS_DIR must hold the checkpoints)
#   lcbuild  llama.cpp with CUDA (.gpulc, from ../shared/tools/gpu-llamacpp.sh prepare), in
#            the background, and the random-weight Llama-3-8B-shaped F16 GGUF in /tmp/synth
#   lcstart  the llama.cpp build alone, in the background
#   lcwait   wait for that build, then quantize the F16 file to Q4_K_M, Q4_0, Q8_0
#   bench    ffai and llama.cpp on the same files: pp512/tg128 per type, batched decode
#   quick    the same pp512/tg128 with two repetitions, no batched decode
#   mvbench  candidate decode products against q8x.cu's (examples/cuda_mv_bench.rs)
#   ab       ffai's decode (tg128 after 512) with the default and the older kernels
#   parity0  every parity fixture on the GPU with the default kernels only
#   moe      recorded MoE decode steps against eager ones (cuda_moe_graphs)
#   kernels0 the kernel tests with the default kernels only
#   synthq   the 8B F16 file and ffai's re-encodings of it (SYNTH_TYPES), no llama.cpp build
#   envab    ffai bench on AB_FILE under each environment setting in AB_ENVS
#   pdl      decode with programmatic dependent launch off and on (FFAI_CUDA_PDL)
#   skipab   decode on the 8B Q4_0 with each of SKIP_SETS' kernels not launched
#            (FFAI_CUDA_SKIP_KERNELS): what each costs inside the replayed graph
#   lcbb     llama-batched-bench on /tmp/synth/$LCBB_TYPE (default Q4_0), 1 and 64 sequences
#   stagedk  the staged Q4_K tensor-core product (FFAI_CUDA_MMQ_STAGED_K=1, the default): the
#            product tests with it, then 64 sequences on /tmp/synth/Q4_K_M.gguf without and
#            with it (needs lcwait's Q4_K_M file)
#   moesynth random-weight MoE GGUFs of real shapes, all layers (or MOE_LAYERS_Q3 /
#            MOE_LAYERS_OSS of them), written directly quantized (scripts/synth_moe_gguf.py):
#            Qwen3-30B-A3B in Q4_K, gpt-oss-20b with MXFP4 experts
#   moeff    ffai on them (MOE_FILES): pp512/tg128, then 32 sequences x (128+128)
#   moelc    llama.cpp on them: llama-bench pp512/tg128, llama-batched-bench at 1 and 32
#   cstrb    constrained decoding's cost for batched sequences each with its own grammar:
#            `ffai batch` of 32 lines (128 tokens, greedy) on the 8B Q4_0, free and with
#            json_object / regex / json_schema lines in turn, two rounds
#   moetests the product and MoE kernel tests with the tensor-core products up to 100 rows
#            (FFAI_CUDA_MMQ_MAX=100), then recorded MoE steps against eager ones
#   moegroup 32 sequences on each MoE file with MoE steps of 16+ rows grouped (the default)
#            and gathered up to 64 rows (FFAI_CUDA_MOE_GROUP_MIN=65)
#   cstr     constrained decoding's cost on the 8B Q4_0: generate 128 tokens greedy, free,
#            under a regex and under a JSON object (decode tok/s of each)
#   regs     session 16's opt-in MoE decode changes (FFAI_CUDA_ROUTE_REGS=1,
#            FFAI_CUDA_KEEP_SETS=1): their tests, then decode on the MoE files off / on
#   grouped  the grouped MoE products (moe_group + mmq_moe_*): their tests and the MoE
#            product tests with the defaults, FFAI_CUDA_MMQ_STAGED=0 (the unstaged split
#            kernels) and FFAI_CUDA_MOE_GROUPED=0 (the host grouping); then, when MOE_FILE
#            names a MoE GGUF of a grouped type (e.g. synth_moe_gguf.py's, quantized to
#            Q4_0 or Q4_K_M), pp512 with FFAI_CUDA_MOE_GROUPED=0 and 1
#   ncu      per-kernel durations (Nsight Compute) of ffai's and llama.cpp's decode on a
#            4-layer Llama-3-8B-shaped Q4_0 file (same per-layer shapes, small to make);
#            needs lcbuild started earlier for llama.cpp's half
set -uo pipefail
cd "$(dirname "$0")/.."
NV=$(python3 -c "import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],'cu13','lib'))" 2>/dev/null)
export LD_LIBRARY_PATH="$NV:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export FFAI_REQUIRE_GPU=1 FFAI_CUDA_CACHE=/tmp/ffai-cuda-cache
B=.gpu/bin
out=${OUT:-/tmp}
# Waits (at most 10 minutes) for the background llama.cpp build that lcbuild/lcstart
# began; fails at once when none was started.
# A build left by an earlier call is dead (the machine ends a call's background jobs):
# the build's pid file tells, and then it fails at once rather than wait out the limit.
lc_wait() {
  [ -f /tmp/lc-build.log ] || { echo "no llama.cpp build started (run lcstart first)" >&2; return 1; }
  for _ in $(seq 300); do
    grep -q '^done' /tmp/lc-build.log && return 0
    kill -0 "$(cat /tmp/lc-build.pid 2>/dev/null)" 2>/dev/null || { grep -q '^done' /tmp/lc-build.log && return 0; echo "the llama.cpp build is not running (started by an earlier call?): run lcstart in this call" >&2; return 1; }
    sleep 2
  done
  echo "llama.cpp build not done after 10 minutes" >&2; return 1
}
for stage in "$@"; do
  case $stage in
  unpack)
    for f in $B/*.xz; do xz -d -f -k "$f"; chmod +x "${f%.xz}"; done
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv ;;
  kernels)
    # Twice: the default kernels, then the older ones (FFAI_CUDA_OLDER_KERNELS=1).
    for u in 0 1; do for t in ${KERNEL_TESTS:-cuda_nvrtc cuda_ops cuda_quant cuda_backend}; do
      echo "== $t (FFAI_CUDA_OLDER_KERNELS=$u)"
      FFAI_CUDA_OLDER_KERNELS=$u $B/$t --test-threads=1 2>&1 | tee -a "$out/kernels.log" | grep -E "^test |panicked|error|FAILED|test result|relative" | head -40
    done; done ;;
  parity)
    for u in 0 1; do
      echo "== parity on cuda (FFAI_CUDA_OLDER_KERNELS=$u)"
      FFAI_CUDA_OLDER_KERNELS=$u $B/parity on_cuda --nocapture 2>&1 | tee -a "$out/parity.log" | tail -30
    done ;;
  models)
    echo "== cuda_models"; $B/cuda_models --test-threads=1 --nocapture 2>&1 | tee -a "$out/models.log" | tail -60 ;;
  lcbuild)
    mkdir -p /tmp/lc /tmp/synth; [ -d /tmp/lc/llama.cpp ] || tar xJf .gpulc/llamacpp-src.tar.xz -C /tmp/lc
    (bash .gpulc/gpu-llamacpp.sh build > /tmp/lc-build.log 2>&1; echo done >> /tmp/lc-build.log) &
    echo $! > /tmp/lc-build.pid
    [ -s /tmp/synth/f16.gguf ] || python3 .gpulc/synth_gguf.py /tmp/lc/llama.cpp/gguf-py /tmp/synth/f16.gguf
    ls -la /tmp/synth ;;
  lcstart)
    # llama.cpp's CUDA build only, in the background (lcwait or ncu waits for it).
    mkdir -p /tmp/lc; [ -d /tmp/lc/llama.cpp ] || tar xJf .gpulc/llamacpp-src.tar.xz -C /tmp/lc
    (bash .gpulc/gpu-llamacpp.sh build > /tmp/lc-build.log 2>&1; echo done >> /tmp/lc-build.log) &
    echo $! > /tmp/lc-build.pid ;;
  lcwait)
    lc_wait || exit 1; tail -3 /tmp/lc-build.log
    for t in ${LCQ_TYPES:-Q4_K_M Q8_0 Q4_0}; do
      [ -s /tmp/synth/$t.gguf ] || /tmp/lc/llama.cpp/build/bin/llama-quantize /tmp/synth/f16.gguf /tmp/synth/$t.gguf $t $(nproc) >/dev/null 2>&1 &
    done; wait; ls -la /tmp/synth ;;
  bench)
    for t in Q4_K_M Q4_0 Q8_0 f16; do
      echo "== ffai $t"; $B/ffai bench -m /tmp/synth/$t.gguf --device cuda --prompt-tokens 512 --gen-tokens 128 --repetitions 3 2>&1 | tail -4 | tee -a "$out/ffai-bench.txt"
    done
    bash .gpulc/gpu-llamacpp.sh bench 2>&1 | grep -E '^\|' ;;
  quick)
    # ffai and llama-bench (pp512, tg128) on the four files, two repetitions each.
    for t in ${QUICK_TYPES:-Q4_K_M Q4_0 Q8_0 f16}; do
      echo "== ffai $t"; timeout 120 $B/ffai bench -m /tmp/synth/$t.gguf --device cuda --prompt-tokens 512 --gen-tokens 128 --repetitions 2 2>&1 | tail -3 | tee -a "$out/ffai-bench.txt"
      timeout 120 /tmp/lc/llama.cpp/build/bin/llama-bench -m /tmp/synth/$t.gguf -ngl 99 -fa 1 -p 512 -n 128 -r 2 -o md 2>/dev/null | grep -E '^\| llama' | tee -a "$out/llamacpp-bench.md"
    done ;;
  profile)
    echo "== ffai Q4_0 per-kernel profile"; FFAI_CUDA_OLDER_KERNELS=${FFAI_CUDA_OLDER_KERNELS:-0} $B/ffai bench -m /tmp/synth/Q4_0.gguf --device cuda --prompt-tokens 512 --gen-tokens 32 --repetitions 1 --profile 2>&1 | tail -45 | tee -a "$out/ffai-profile.txt"
    for g in 0 1; do echo "== graphs $g"; FFAI_CUDA_GRAPHS=$g $B/ffai bench -m /tmp/synth/Q4_0.gguf --device cuda --prompt-tokens 16 --gen-tokens 64 --repetitions 2 2>&1 | tail -3; done ;;
  synth)
    # The F16 file and our own Q4_0 of it, without building llama.cpp (its gguf-py only).
    mkdir -p /tmp/lc /tmp/synth; [ -d /tmp/lc/llama.cpp/gguf-py ] || tar xJf .gpulc/llamacpp-src.tar.xz -C /tmp/lc llama.cpp/gguf-py
    [ -s /tmp/synth/f16.gguf ] || python3 .gpulc/synth_gguf.py /tmp/lc/llama.cpp/gguf-py /tmp/synth/f16.gguf
    [ -s /tmp/synth/Q4_0.gguf ] || $B/ffai quantize --type Q4_0 /tmp/synth/f16.gguf /tmp/synth/Q4_0.gguf
    ls -la /tmp/synth ;;
  ffbench)
    for t in ${FFB_TYPES:-Q4_0 f16}; do
      echo "== ffai $t"; $B/ffai bench -m /tmp/synth/$t.gguf --device cuda --prompt-tokens 512 --gen-tokens 128 --repetitions 2 2>&1 | tail -4 | tee -a "$out/ffai-bench.txt"
    done ;;
  parity0)
    echo "== parity on cuda (default kernels)"; $B/parity on_cuda --nocapture 2>&1 | tee -a "$out/parity.log" | grep -E "^test |panicked|test result|max" | tail -30 ;;
  moe)
    echo "== cuda_moe_graphs"; $B/cuda_moe_graphs --test-threads=1 2>&1 | tee -a "$out/moe.log" | grep -E "^test |panicked|test result" | tail -20 ;;
  mvbench)
    echo "== decode product candidates"; $B/cuda_mv_bench 2>&1 | tee -a "$out/mvbench.md" | tail -80 ;;
  ab)
    for t in ${AB_TYPES:-Q4_0 f16}; do for u in 0 1; do
      echo "== ffai $t FFAI_CUDA_OLDER_KERNELS=$u"; FFAI_CUDA_OLDER_KERNELS=$u timeout 120 $B/ffai bench -m /tmp/synth/$t.gguf --device cuda --prompt-tokens 512 --gen-tokens 128 --repetitions 2 2>&1 | tail -3 | tee -a "$out/ffai-ab.txt"
    done; done ;;
  bseq)
    for t in Q4_K_M f16; do for s in 1 8 32 64; do
      echo "== ffai $t sequences $s"; $B/ffai bench -m /tmp/synth/$t.gguf --device cuda --sequences $s --prompt-tokens 128 --gen-tokens 128 --repetitions 1 2>&1 | tail -2 | tee -a "$out/ffai-batched.txt"
    done; done ;;
  ncu)
    mkdir -p /tmp/lc /tmp/synth; [ -d /tmp/lc/llama.cpp/gguf-py ] || tar xJf .gpulc/llamacpp-src.tar.xz -C /tmp/lc llama.cpp/gguf-py
    [ -s /tmp/synth/l4.gguf ] || python3 .gpulc/synth_gguf.py /tmp/lc/llama.cpp/gguf-py /tmp/synth/l4.gguf --layers 4
    [ -s /tmp/synth/l4_q4_0.gguf ] || $B/ffai quantize --type Q4_0 /tmp/synth/l4.gguf /tmp/synth/l4_q4_0.gguf >/dev/null
    N="ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base"
    echo "== ncu ffai"; timeout 300 $N $B/ffai bench -m /tmp/synth/l4_q4_0.gguf --device cuda --prompt-tokens 512 --gen-tokens 6 --repetitions 1 > "$out/ncu-ffai.csv" 2>"$out/ncu-ffai.err"; tail -3 "$out/ncu-ffai.err"
    echo "== ncu ffai attention/norm sections"
    timeout 200 ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis -k regex:"attn_spans64|norm_q8|rope_kv|glu_q8|quantize_q8x32" --launch-skip 40 --launch-count 10 $B/ffai bench -m /tmp/synth/l4_q4_0.gguf --device cuda --prompt-tokens 512 --gen-tokens 6 --repetitions 1 > "$out/ncu-ffai-sections.txt" 2>&1; tail -2 "$out/ncu-ffai-sections.txt"
    lc_wait || exit 1; tail -2 /tmp/lc-build.log
    [ -s /tmp/synth/l4_lc_q4_0.gguf ] || /tmp/lc/llama.cpp/build/bin/llama-quantize /tmp/synth/l4.gguf /tmp/synth/l4_lc_q4_0.gguf Q4_0 >/dev/null 2>&1
    echo "== ncu llama.cpp"; timeout 300 $N /tmp/lc/llama.cpp/build/bin/llama-bench -m /tmp/synth/l4_lc_q4_0.gguf -ngl 99 -fa 1 -p 512 -n 6 -r 1 > "$out/ncu-llamacpp.csv" 2>"$out/ncu-llamacpp.err"; tail -3 "$out/ncu-llamacpp.err" ;;
  pdl)
    # Programmatic dependent launch off / on: decode after 512 positions (PDL_FILE, default
    # the ncu stage's 4-layer file; the 8B Q4_0 with PDL_FILE=/tmp/synth/Q4_0.gguf).
    for p in 0 1 0 1; do
      echo "== ffai FFAI_CUDA_PDL=$p ${PDL_FILE:-/tmp/synth/l4_q4_0.gguf}"
      FFAI_CUDA_PDL=$p timeout 120 $B/ffai bench -m ${PDL_FILE:-/tmp/synth/l4_q4_0.gguf} --device cuda --prompt-tokens 512 --gen-tokens 128 --repetitions 2 2>&1 | tail -2 | tee -a "$out/ffai-pdl.txt"
    done ;;
  kernels0)
    for t in ${KERNEL_TESTS:-cuda_nvrtc cuda_ops cuda_quant cuda_backend}; do
      echo "== $t"; $B/$t --test-threads=1 2>&1 | tee -a "$out/kernels.log" | grep -E "panicked|error|FAILED|test result|relative" | head -20
    done
    # The norms' cluster form (off by default) is checked only when it is on.
    echo "== cuda_backend (FFAI_CUDA_NORM=cl)"
    FFAI_CUDA_NORM=cl $B/cuda_backend --test-threads=1 elementwise 2>&1 | tee -a "$out/kernels.log" | grep -E "panicked|FAILED|test result" | head -5
    # The attention's fused 8-bit output (off by default) is checked only when it is on.
    echo "== cuda_backend (FFAI_CUDA_ATTN_Q8=1)"
    FFAI_CUDA_ATTN_Q8=1 $B/cuda_backend --test-threads=1 paged_step_ops 2>&1 | tee -a "$out/kernels.log" | grep -E "panicked|FAILED|test result" | head -5 ;;
  synthq)
    # The 8B F16 file and ffai's own re-encodings of it (SYNTH_TYPES, default Q4_0 Q4_K).
    mkdir -p /tmp/lc /tmp/synth; [ -d /tmp/lc/llama.cpp/gguf-py ] || tar xJf .gpulc/llamacpp-src.tar.xz -C /tmp/lc llama.cpp/gguf-py
    [ -s /tmp/synth/f16.gguf ] || python3 .gpulc/synth_gguf.py /tmp/lc/llama.cpp/gguf-py /tmp/synth/f16.gguf
    for t in ${SYNTH_TYPES:-Q4_0 Q4_K}; do
      [ -s /tmp/synth/ff_$t.gguf ] || $B/ffai quantize --type $t /tmp/synth/f16.gguf /tmp/synth/ff_$t.gguf > /dev/null &
    done; wait; ls -la /tmp/synth ;;
  envab)
    # ffai bench on AB_FILE under each setting of AB_ENVS (e.g. "FFAI_CUDA_PDL=0 FFAI_CUDA_PDL=1";
    # A=1+B=2 sets both), AB_ARGS.
    for e in ${AB_ENVS:-X=1}; do
      echo "== $e ${AB_FILE:-/tmp/synth/ff_Q4_0.gguf} ${AB_ARGS:-}"
      env ${e//+/ } timeout 150 $B/ffai bench -m ${AB_FILE:-/tmp/synth/ff_Q4_0.gguf} --device cuda ${AB_ARGS:---prompt-tokens 512 --gen-tokens 128 --repetitions 2} 2>&1 | tail -3 | grep -v RSS | tee -a "$out/ffai-envab.txt"
    done ;;
  skipab)
    for k in X ${SKIP_SETS:-attn_spans64 norm_q8 rope_kv_write_step glu_q8 quantize_q8x32 mv_q8x_q4_0_n1}; do
      echo "== skip $k"
      FFAI_CUDA_SKIP_KERNELS=$k timeout 120 $B/ffai bench -m ${AB_FILE:-/tmp/synth/Q4_0.gguf} --device cuda --prompt-tokens 512 --gen-tokens 128 --repetitions 2 2>&1 | grep -E "tg|decode" | tail -2 | tee -a "$out/ffai-skip.txt"
    done ;;
  lcbb)
    lc_wait || exit 1
    timeout 200 /tmp/lc/llama.cpp/build/bin/llama-batched-bench -m /tmp/synth/${LCBB_TYPE:-Q4_0}.gguf -ngl 99 -fa on -c 40960 -npp 128 -ntg 128 \
      -npl 1,64 2>&1 | grep -E '^\|' | tee -a "$out/llamacpp-batched.md" ;;
  stagedk)
    echo "== products with FFAI_CUDA_MMQ_STAGED_K=1 (and FFAI_CUDA_MMQ_MAX=100)"
    FFAI_CUDA_MMQ_STAGED_K=1 FFAI_CUDA_MMQ_MAX=100 $B/cuda_backend --test-threads=1 products 2>&1 | tee -a "$out/kernels.log" | grep -E "panicked|FAILED|test result|relative" | head -10
    for k in 0 1; do
      echo "== FFAI_CUDA_MMQ_STAGED_K=$k, 64 sequences, Q4_K_M"
      FFAI_CUDA_MMQ_STAGED_K=$k timeout 150 $B/ffai bench -m /tmp/synth/Q4_K_M.gguf --device cuda --sequences 64 --prompt-tokens 128 --gen-tokens 128 --repetitions 1 2>&1 | grep -E "decode|prefill" | tee -a "$out/ffai-stagedk.txt"
    done ;;
  moesynth)
    mkdir -p /tmp/lc /tmp/synth; [ -d /tmp/lc/llama.cpp/gguf-py ] || tar xJf .gpulc/llamacpp-src.tar.xz -C /tmp/lc llama.cpp/gguf-py
    [ -s /tmp/synth/qwen3moe_Q4_K.gguf ] || python3 scripts/synth_moe_gguf.py /tmp/lc/llama.cpp/gguf-py /tmp/synth/qwen3moe_Q4_K.gguf --shape qwen3-30b-a3b --type Q4_K ${MOE_LAYERS_Q3:+--layers $MOE_LAYERS_Q3} &
    [ -s /tmp/synth/gptoss_MXFP4.gguf ] || python3 scripts/synth_moe_gguf.py /tmp/lc/llama.cpp/gguf-py /tmp/synth/gptoss_MXFP4.gguf --shape gpt-oss-20b --type MXFP4 ${MOE_LAYERS_OSS:+--layers $MOE_LAYERS_OSS} &
    wait; ls -la /tmp/synth ;;
  moeff)
    for f in ${MOE_FILES:-qwen3moe_Q4_K gptoss_MXFP4}; do
      echo "== ffai $f"; timeout 200 $B/ffai bench -m /tmp/synth/$f.gguf --device cuda --prompt-tokens 512 --gen-tokens 128 --repetitions 2 2>&1 | tail -4 | tee -a "$out/ffai-moe.txt"
      echo "== ffai $f, 32 sequences"; timeout 200 $B/ffai bench -m /tmp/synth/$f.gguf --device cuda --sequences 32 --prompt-tokens 128 --gen-tokens 128 --repetitions 1 2>&1 | grep -E "decode|prefill" | tee -a "$out/ffai-moe.txt"
    done ;;
  moelc)
    lc_wait || exit 1
    for f in ${MOE_FILES:-qwen3moe_Q4_K gptoss_MXFP4}; do
      echo "== llama.cpp $f"; timeout 200 /tmp/lc/llama.cpp/build/bin/llama-bench -m /tmp/synth/$f.gguf -ngl 99 -fa 1 -p 512 -n 128 -r 2 -o md 2>/dev/null | grep -E '^\| ' | tee -a "$out/llamacpp-moe.md"
      timeout 200 /tmp/lc/llama.cpp/build/bin/llama-batched-bench -m /tmp/synth/$f.gguf -ngl 99 -fa on -c 20480 -npp 128 -ntg 128 -npl 1,32 2>&1 | grep -E '^\|' | tee -a "$out/llamacpp-moe.md"
    done ;;
  moetests)
    FFAI_CUDA_MMQ_MAX=100 timeout 200 $B/cuda_backend --test-threads=1 products moe 2>&1 | tee -a "$out/kernels.log" | grep -E "^test |panicked|test result" | head -20
    timeout 60 $B/cuda_moe_graphs --test-threads=1 2>&1 | grep -E "^test |panicked|test result" | tail -5 ;;
  moegroup)
    for f in ${MOE_FILES:-qwen3moe_Q4_K gptoss_MXFP4}; do for g in 16 65; do
      echo "== $f, 32 sequences, FFAI_CUDA_MOE_GROUP_MIN=$g"
      FFAI_CUDA_MOE_GROUP_MIN=$g timeout 100 $B/ffai bench -m /tmp/synth/$f.gguf --device cuda --sequences 32 --prompt-tokens 128 --gen-tokens 128 --repetitions 1 2>&1 | grep -E "decode" | tee -a "$out/ffai-moegroup.txt"
    done; done ;;
  cstrb)
    python3 - <<'PY'
import json
base = {"prompt": "The list:", "max_tokens": 128, "temperature": 0}
fmts = [{"type": "json_object"}, {"type": "regex", "regex": "[a-z0-9,]{1,4000}"},
        {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object",
         "properties": {"a": {"type": "string"}, "b": {"type": "array", "items": {"type": "integer"}}}}}}]
with open("/tmp/free.jsonl", "w") as f, open("/tmp/cstr.jsonl", "w") as g:
    for i in range(32):
        f.write(json.dumps(base) + "\n")
        g.write(json.dumps(dict(base, response_format=fmts[i % 3])) + "\n")
PY
    for r in 1 2; do for f in free cstr; do
      echo "== $f, round $r"
      timeout 90 $B/ffai batch -m ${CSTR_FILE:-/tmp/synth/Q4_0.gguf} --device ${CSTR_DEVICE:-cuda} --input /tmp/$f.jsonl --max-sequences 32 --output /tmp/$f.out 2>&1 | tail -1 | tee -a "$out/ffai-cstrb.txt"
    done; done
    python3 -c "import json; print('finish reasons:', sorted({json.loads(l).get('finish_reason', '?') for l in open('/tmp/cstr.out')}))" ;;
  cstr)
    for c in "" "--regex=[a-z0-9,]{1,4000}" "--json-object"; do
      echo "== generate 128 tokens, constraint: ${c:-none}"
      timeout 120 $B/ffai generate -m ${CSTR_FILE:-/tmp/synth/Q4_0.gguf} --device cuda -p "The list:" --max-tokens 128 --temperature 0 --json $c 2>&1 | grep -o '"decode_tokens_per_s":[0-9.]*\|"stop_reason":"[A-Za-z]*"' | tr '\n' ' ' | tee -a "$out/ffai-cstr.txt"; echo
    done ;;
  regs)
    # Session 16's opt-in MoE decode changes (FFAI_CUDA_ROUTE_REGS=1: moe_route's picks in
    # registers; FFAI_CUDA_KEEP_SETS=1: the norm's 8-bit sets survive the router): the
    # routing, MoE and set tests with both on, then decode on MOE_FILES off and on.
    FFAI_CUDA_ROUTE_REGS=1 FFAI_CUDA_KEEP_SETS=1 timeout 200 $B/cuda_backend --test-threads=1 moe experts_after 2>&1 | tee -a "$out/kernels.log" | grep -E "^test |panicked|test result" | head -20
    FFAI_CUDA_ROUTE_REGS=1 FFAI_CUDA_KEEP_SETS=1 timeout 60 $B/cuda_moe_graphs --test-threads=1 2>&1 | grep -E "test result|panicked" | tail -3
    for f in ${MOE_FILES:-qwen3moe_Q4_K gptoss_MXFP4}; do for v in 0 1; do
      echo "== $f ROUTE_REGS=KEEP_SETS=$v"
      FFAI_CUDA_ROUTE_REGS=$v FFAI_CUDA_KEEP_SETS=$v timeout 100 $B/ffai bench -m /tmp/synth/$f.gguf --device cuda --prompt-tokens 64 --gen-tokens 128 --repetitions 2 2>&1 | grep -E "decode" | tee -a "$out/ffai-regs.txt"
    done; done ;;
  grouped)
    for e in X=1 FFAI_CUDA_MMQ_STAGED=0 FFAI_CUDA_MOE_GROUPED=0; do
      echo "== cuda_backend moe tests, $e"
      env $e $B/cuda_backend --test-threads=1 moe 2>&1 | tee -a "$out/kernels.log" | grep -E "^test |panicked|skipped|test result" | head -20
    done
    if [ -n "${MOE_FILE:-}" ]; then
      for v in 0 1; do
        echo "== FFAI_CUDA_MOE_GROUPED=$v $MOE_FILE"
        FFAI_CUDA_MOE_GROUPED=$v timeout 150 $B/ffai bench -m "$MOE_FILE" --device cuda --prompt-tokens 512 --gen-tokens 32 --repetitions 2 2>&1 | grep -E "pp|prefill|tg|decode" | tail -4 | tee -a "$out/ffai-grouped.txt"
      done
    fi ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
