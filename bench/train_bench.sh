#!/bin/bash
# Trainer throughput on one GPU against PyTorch (../shared/bench/torch_gpt.py: torch.compile, bf16
# autocast, SDPA, fused AdamW) in the same run: GPT-2 124M (B=32, T=1024) and 350M (B=16, T=1024),
# tokens/s and the ratio. Also: the time to the first step when resuming 350M from shards written
# under another layout (dp=4, ZeRO-3), the training stall of a background save, and the
# throughput of --recompute.
# usage: bench/train_bench.sh WORKDIR   (SHARED: the shared bench directory)
set -uo pipefail
W=${1:-/tmp/tbench}; rm -rf "$W"; mkdir -p "$W"
M=${MPSHARD:-build/mpshard}
SHARED=${SHARED:-../shared/bench}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$M" tokens --count 4000000 --vocab 50257 -o "$W/tok.bin" || exit 1
median_tps() { # median tokens/s of the steps after the first two
  sed -E 's/.*"tokens_per_s": ([0-9.]+).*/\1/' "$1" | tail -n +3 | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'
}
declare -A OURS
for spec in "gpt2 32" "gpt2-medium 16"; do
  set -- $spec; model=$1; B=$2
  "$M" init --model "$model" --layout dp=1 -o "$W/$model" -q || exit 1
  /usr/bin/time -v "$M" train --ckpt "$W/$model" --layout dp=1 --data "$W/tok.bin" --steps 12 --global-batch "$B" \
    --micro-batch "$B" --seq 1024 --backend cuda --out "$W/run-$model" --log "$W/$model.jsonl" -q \
    2>"$W/$model.time" || { tail -5 "$W/$model.time"; exit 1; }
  OURS[$model]=$(median_tps "$W/$model.jsonl")
  echo "mpshard $model B=$B T=1024: $(printf '%.0f' "${OURS[$model]}") tok/s (median of steps 3-12), peak host RSS $(awk '/Maximum resident/ { print $6 }' "$W/$model.time") KiB"
done
# the same with one feature off, to show what it gives in this run:
#  MPS_CUDA_GEMM_TUNE=0: cuBLASLt's first heuristic choice for every GEMM instead of the fastest of
#    its first 8 candidates (timed once per machine, kept in a cache file);
#  MPS_CUDA_ATTENTION=mma: the mma.sync attention kernels (attention_fast.cu) instead of the wgmma
#    ones, the default on H100 / H200 (attention_wgmma.cu)
for var in MPS_CUDA_GEMM_TUNE=0 MPS_CUDA_ATTENTION=mma; do
  tag=$(echo "$var" | tr 'A-Z=' 'a-z-')
  for spec in "gpt2 32" "gpt2-medium 16"; do
    set -- $spec; model=$1; B=$2
    env "$var" "$M" train --ckpt "$W/$model" --layout dp=1 --data "$W/tok.bin" --steps 12 --global-batch "$B" \
      --micro-batch "$B" --seq 1024 --backend cuda --out "$W/run-$tag-$model" --log "$W/$tag-$model.jsonl" -q \
      2>"$W/$tag-$model.err" || tail -3 "$W/$tag-$model.err"
    echo "mpshard $model B=$B T=1024 with $var: $(printf '%.0f' "$(median_tps "$W/$tag-$model.jsonl")") tok/s"
  done
done
# activation recompute (the layer forward replayed in the backward): the throughput it costs
"$M" train --ckpt "$W/gpt2-medium" --layout dp=1 --data "$W/tok.bin" --steps 12 --global-batch 16 --micro-batch 16 \
  --seq 1024 --backend cuda --recompute --out "$W/run-rc" --log "$W/rc.jsonl" -q 2>"$W/rc.err" || tail -3 "$W/rc.err"
echo "mpshard gpt2-medium B=16 T=1024 --recompute: $(printf '%.0f' "$(median_tps "$W/rc.jsonl")") tok/s"
# the training stall of a background save (350M: param + Adam m, v, 4.3 GB): saves at steps 3 and
# 6 of 8 (the last save of a run is written directly: nothing is left to overlap)
"$M" train --ckpt "$W/gpt2-medium" --layout dp=1 --data "$W/tok.bin" --steps 8 --global-batch 16 --micro-batch 16 \
  --seq 1024 --backend cuda --save-every 3 --out "$W/run-save" --log "$W/save.jsonl" 2>"$W/save.err" >/dev/null \
  || tail -3 "$W/save.err"
grep "saved" "$W/save.err"
echo "save stall (350M, background): $(grep -o '"save_stall_s": [0-9.]*' "$W/save.jsonl" | head -2 | tr '\n' ' ')"
python3 "$SHARED/torch_gpt.py" 2>&1 | tee "$W/torch.txt"
t124=$(grep "L=12 " "$W/torch.txt" | sed -E 's/.* ([0-9,]+) tok\/s.*/\1/' | tr -d ,)
t350=$(grep "L=24 " "$W/torch.txt" | sed -E 's/.* ([0-9,]+) tok\/s.*/\1/' | tr -d ,)
awk -v a="${OURS[gpt2]}" -v b="$t124" 'BEGIN { printf "124M: mpshard %.0f tok/s / PyTorch %.0f tok/s = %.2fx (target >= 1.1x)\n", a, b, a / b }'
awk -v a="${OURS[gpt2-medium]}" -v b="$t350" 'BEGIN { printf "350M: mpshard %.0f tok/s / PyTorch %.0f tok/s = %.2fx (target >= 1.1x)\n", a, b, a / b }'
# MFU with torch_gpt.py's count: 6 n + 12 L C T flops per token (n with the padded vocab 50304,
# as both models have), against 989 TFLOP/s (H100/H200 SXM dense bf16)
mfu() { # L C tok/s
  awk -v L="$1" -v C="$2" -v t="$3" 'BEGIN { n = 50304 * C + 1024 * C + L * (12 * C * C + 13 * C) + 2 * C;
    printf "%.1f%%", 100 * t * (6 * n + 12 * L * C * 1024) / 989e12 }'
}
echo "MFU: 124M mpshard $(mfu 12 768 "${OURS[gpt2]}"), PyTorch $(mfu 12 768 "$t124"); 350M mpshard $(mfu 24 1024 "${OURS[gpt2-medium]}"), PyTorch $(mfu 24 1024 "$t350")"
# resume 350M from another layout's shards: time from launch to the end of the first step
"$M" init --model gpt2-medium --layout dp=4,zero=3 -o "$W/m-dp4" -q || exit 1
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || echo "(page cache not dropped: not root)"
"$M" train --ckpt "$W/m-dp4" --layout dp=1 --data "$W/tok.bin" --steps 2 --global-batch 16 --micro-batch 16 \
  --seq 1024 --backend cuda --out "$W/run-resume" --log "$W/resume.jsonl" 2>"$W/resume.err" >/dev/null || tail -3 "$W/resume.err"
grep -E "loaded in|saved" "$W/resume.err"
echo "time to first step (350M, shards of dp=4 zero=3 -> dp=1, caches dropped): $(head -1 "$W/resume.jsonl" | sed -E 's/.*"elapsed_s": ([0-9.]+).*/\1/') s"
# several GPUs on this host: DP weak scaling, TP and PP throughput, the save and load with all ranks
[ "$(nvidia-smi -L | wc -l)" -ge 2 ] && MPSHARD="$M" bash "$(dirname "$0")/train_bench_multi.sh" "$W/multi"
