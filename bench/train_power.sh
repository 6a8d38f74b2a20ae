#!/bin/bash
# The card's SM clock and power while mpshard trains and while PyTorch (torch_llama.py) trains the
# same model, sampled by nvidia-smi every 200 ms; only samples at >90% utilisation count (not the
# start-up, the checkpoint load or torch.compile). An H100 SXM training a 1B Llama runs at its
# power limit, where the clock, and so the speed of compute-bound kernels, follows the energy
# each step takes; the kernel times of bench/train_profile.sh (ncu, one kernel at a time) are at
# the unthrottled clock.
# usage: bench/train_power.sh WORKDIR   env: MPSHARD, SHARED (../shared/bench), MODEL (tinyllama-1.1b),
#        B (8), T (2048), STEPS (70)
set -uo pipefail
W=${1:-/tmp/power}; rm -rf "$W"; mkdir -p "$W"
M=${MPSHARD:-build/mpshard}; SHARED=${SHARED:-../shared/bench}; MODEL=${MODEL:-tinyllama-1.1b}
B=${B:-8}; T=${T:-2048}; STEPS=${STEPS:-70}
"$M" tokens --count 400000 --vocab 32000 -o "$W/tok.bin" || exit 1
"$M" init --model "$MODEL" --layout dp=1 -o "$W/ck" -q || exit 1
under_load() { # under_load TAG COMMAND...: COMMAND's output, then the mean clock and power under load
  local tag=$1; shift
  nvidia-smi --query-gpu=clocks.sm,power.draw,utilization.gpu --format=csv,noheader,nounits -lms 200 >"$W/$tag.csv" &
  local p=$!
  "$@"; local rc=$?
  kill $p; wait $p 2>/dev/null
  awk -F, -v t="$tag" '$3 + 0 > 90 {c += $1; w += $2; n++}
    END {if (n) printf "%s under load: SM clock %.0f MHz, power %.0f W (%d samples)\n", t, c / n, w / n, n;
         else printf "%s: no samples under load\n", t}' "$W/$tag.csv"
  return $rc
}
under_load mpshard "$M" train --ckpt "$W/ck" --layout dp=1 --data "$W/tok.bin" --steps "$STEPS" --global-batch "$B" \
  --micro-batch "$B" --seq "$T" --backend cuda --out "$W/run" --log "$W/run.jsonl" -q || exit 1
echo "mpshard tokens/s, last steps: $(sed -E 's/.*"tokens_per_s": ([0-9.]+).*/\1/' "$W/run.jsonl" | tail -3 | tr '\n' ' ')"
under_load torch python3 "$SHARED/torch_llama.py" "$MODEL" 2>&1 | grep -E "tok/s|under load"
