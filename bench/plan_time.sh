#!/bin/bash
# Bench: how long `mpshard inspect` takes to plan gpt3-175b over 1024 GPUs (every rank's bytes by
# kind through mps_geometry, activations, the peak and the communication maximum). The target is
# under 100 ms; `--time` prints the fastest of --repeat runs, planning only (no table printing).
# usage: bench/plan_time.sh            env: MPSHARD (default build/mpshard), REPEAT (default 20)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
MPSHARD=${MPSHARD:-$here/../build/mpshard}
REPEAT=${REPEAT:-20}
# layouts of 1024 GPUs: 3D with each ZeRO stage, pure DP with ZeRO-3 (most distinct ranks), deep PP
for layout in dp=16,pp=8,tp=8,zero=0 dp=16,pp=8,tp=8,zero=1 dp=16,pp=8,tp=8,zero=3 dp=1024,zero=3 \
              dp=128,tp=8,zero=2 dp=8,pp=64,tp=2,zero=3; do
  "$MPSHARD" inspect --model gpt3-175b --precision mixed --layout "$layout" --time --repeat "$REPEAT"
done
# the whole --suggest search over 1024 GPUs (every dp x pp x tp x zero candidate planned)
start=$(date +%s%N)
"$MPSHARD" inspect --model gpt3-175b --precision mixed --recompute full --gpus 1024 --gpu-mem 80GiB --suggest --top 3 \
  | sed -n '3p'
echo "suggest over 1024 GPUs, whole command: $(( ($(date +%s%N) - start) / 1000000 )) ms"
