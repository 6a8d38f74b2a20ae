#!/bin/bash
# Bench: the planner's per-rank peak (`mpshard inspect --precision mixed --recompute selective`: the
# CUDA trainer's flash-style attention stores no scores) against the device memory a real training
# run uses at its peak, sampled by nvidia-smi every 50 ms (minus what the GPU held before the run).
# usage: bench/plan_vs_measured.sh [WORKDIR]   env: MPSHARD, SPECS ("model B" pairs; T = 1024; token ids < 32000)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
M=${MPSHARD:-$here/../build/mpshard}
W=${1:-/tmp/plan-bench}
SPECS=${SPECS:-"gpt2 16|gpt2-medium 16|llama-125m 16|tinyllama-1.1b 4"}
mkdir -p "$W"
"$M" tokens --count 4000000 --vocab 32000 -o "$W/tok.bin" --force >/dev/null || exit 1
used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }
IFS='|' read -ra specs <<<"$SPECS"
for spec in "${specs[@]}"; do
  set -- $spec; model=$1; B=$2
  rm -rf "$W/$model" "$W/run-$model"
  "$M" init --model "$model" --layout dp=1 -o "$W/$model" -q || exit 1
  plan=$("$M" inspect --model "$model" --layout dp=1 --precision mixed --recompute selective --micro-batch "$B" \
    --seq 1024 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ranks"][0]["total"])')
  base=$(used)
  (while :; do used; sleep 0.05; done) >"$W/used-$model.txt" &
  sampler=$!
  "$M" train --ckpt "$W/$model" --layout dp=1 --data "$W/tok.bin" --steps 6 --global-batch "$B" --micro-batch "$B" \
    --seq 1024 --backend cuda --out "$W/run-$model" -q 2>"$W/$model.err" || tail -3 "$W/$model.err"
  kill $sampler; wait $sampler 2>/dev/null
  peak=$(sort -n "$W/used-$model.txt" | tail -1)
  awk -v p="$plan" -v m="$peak" -v b="$base" -v name="$model" -v B="$B" 'BEGIN {
    meas = (m - b) * 1048576; printf "%s B=%s T=1024: planned %.2f GB, measured %.2f GB (peak %d MiB - %d MiB before): measured/planned %.3f\n",
      name, B, p / 1e9, meas / 1e9, m, b, meas / p }'
done
