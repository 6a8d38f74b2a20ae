#!/bin/bash
# Bench: the CUDA trainer on Llama-family shapes against ../shared/bench/torch_llama.py in the same
# command, measured the way that script measures: tokens over the wall time of steps 6..N (from the
# training log's elapsed_s), never a median of per-step figures.
# usage: bench/train_bench_llama.sh [WORKDIR] [NAME ...]   env: MPSHARD, SHARED, STEPS (default 30)
# NAME: llama-125m (default), tinyllama-1.1b, llama-1b-hs128 (torch_llama.py's shapes, batch and seq)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
M=${MPSHARD:-$here/../build/mpshard}
SHARED=${SHARED:-$here/../../shared}
W=${1:-/tmp/llama-bench}; shift || true
NAMES=${*:-llama-125m}
STEPS=${STEPS:-30}
mkdir -p "$W"
nvidia-smi --query-gpu=name --format=csv,noheader
"$M" tokens --count 8000000 --vocab 32000 -o "$W/tok.bin" --force >/dev/null || exit 1
declare -A B=( [llama-125m]=32 [tinyllama-1.1b]=8 [llama-1b-hs128]=8 ) T=( [llama-125m]=1024 [tinyllama-1.1b]=2048 [llama-1b-hs128]=2048 )
for name in $NAMES; do
  rm -rf "$W/$name" "$W/run-$name"
  "$M" init --model "$name" --layout dp=1 -o "$W/$name" -q || exit 1
  "$M" train --ckpt "$W/$name" --layout dp=1 --data "$W/tok.bin" --steps $((STEPS + 5)) --global-batch "${B[$name]}" \
    --micro-batch "${B[$name]}" --seq "${T[$name]}" --backend cuda --out "$W/run-$name" --log "$W/$name.jsonl" -q \
    2>"$W/$name.err" || { tail -3 "$W/$name.err"; continue; }
  # tokens of steps 6..N over the wall time from the end of step 5 to the end of step N
  ours=$(awk -v tok=$(( ${B[$name]} * ${T[$name]} )) '/"loss"/ { n++; t[n] = $0; sub(/.*"elapsed_s": /, "", t[n]); sub(/[,}].*/, "", t[n]) }
    END { print tok * (n - 5) / (t[n] - t[5]) }' "$W/$name.jsonl")
  theirs=$(python3 "$SHARED/bench/torch_llama.py" "$name" 2>"$W/torch-$name.err" | tee "$W/torch-$name.txt" \
    | grep -oE '[0-9,]+ tok/s' | head -1 | cut -d' ' -f1 | tr -d ,)
  cat "$W/torch-$name.txt"
  printf 'mpshard %s B=%s T=%s: %.0f tok/s; PyTorch (same run) %s tok/s; ratio %s\n' "$name" "${B[$name]}" "${T[$name]}" \
    "$ours" "${theirs:-?}" "$(awk -v a="$ours" -v b="${theirs:-0}" 'BEGIN { if (b > 0) printf "%.3fx", a / b; else print "?" }')"
done
