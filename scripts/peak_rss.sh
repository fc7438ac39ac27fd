#!/usr/bin/env bash
# Peak resident set size (GNU time's "Maximum resident set size") of `ffai generate` and of
# llama.cpp's llama-completion on the same prompt, 32 greedy tokens, 2 threads. Memory, not
# speed: fine on a busy machine. Usage:
#   scripts/peak_rss.sh FFAI_BIN [LLAMA_COMPLETION_BIN] -- NAME=MODEL[,GGUF_FOR_LLAMA_CPP] ...
# MODEL is what ffai loads (a .gguf or a Hugging Face directory); GGUF_FOR_LLAMA_CPP (default:
# MODEL when it is a .gguf) is what llama.cpp loads, at -c 512 (the prompt and the tokens fit).
set -euo pipefail
ffai=$1; shift
llama=""
if [[ $# -gt 0 && $1 != "--" ]]; then llama=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
prompt="The capital of France is"
rss() { /usr/bin/time -v "$@" 2>&1 >/dev/null | awk '/Maximum resident/ { printf "%d", $6 / 1024 }'; }
echo "| model | ffai peak RSS (MiB) | llama.cpp peak RSS (MiB) |"
echo "|---|---:|---:|"
for spec in "$@"; do
  name=${spec%%=*}; rest=${spec#*=}
  model=${rest%%,*}; gguf=""
  [[ $rest == *,* ]] && gguf=${rest#*,}
  [[ -z $gguf && $model == *.gguf ]] && gguf=$model
  ours=$(rss "$ffai" generate -m "$model" -p "$prompt" --max-tokens 32 --temperature 0 --threads 2)
  theirs="—"
  if [[ -n $llama && -n $gguf ]]; then
    theirs=$(rss "$llama" -m "$gguf" -p "$prompt" -n 32 --temp 0 -t 2 -c 512 -no-cnv --no-warmup)
  fi
  echo "| $name | $ours | $theirs |"
done
