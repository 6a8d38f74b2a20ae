#!/bin/bash
# Trainer throughput on the GPUs of one host (NCCL; run by train_bench.sh when there are >= 2):
#  - DP weak scaling, 124M, B=32 per GPU: tokens/s on all GPUs over n x tokens/s on one, with the
#    gradient sums under the backward (the default) and after it (--no-overlap), and with ZeRO 1-3;
#  - 124M with tp=2 and pp=2 (global batch 32 in micro-batches of 8), pipeline messages over NCCL
#    (the default) and over MPI through host memory (--comm mpi);
#  - the save with all ranks writing, and the load of that checkpoint under another layout.
# usage: bench/train_bench_multi.sh WORKDIR
set -uo pipefail
W=${1:-/tmp/tbench-multi}; rm -rf "$W"; mkdir -p "$W"
M=${MPSHARD:-build/mpshard}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
ngpu=$(nvidia-smi -L | wc -l)
[ "$ngpu" -ge 2 ] || { echo "train_bench_multi: needs 2 GPUs, this host has $ngpu"; exit 0; }
"$M" tokens --count 4000000 --vocab 50257 -o "$W/tok.bin" || exit 1
"$M" init --model gpt2 --layout dp=1 -o "$W/gpt2" -q || exit 1
median_tps() { # median tokens/s of the steps after the first two
  sed -E 's/.*"tokens_per_s": ([0-9.]+).*/\1/' "$1" | tail -n +3 | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'
}
TR="--data $W/tok.bin --steps 12 --seq 1024 --backend cuda"
"$M" train --ckpt "$W/gpt2" --layout dp=1 $TR --global-batch 32 --micro-batch 32 -q --out "$W/run-1" --log "$W/one.jsonl" \
  2>"$W/one.err" || tail -5 "$W/one.err"
one=$(median_tps "$W/one.jsonl")
for mode in overlap no-overlap; do
  extra=""; [ $mode = no-overlap ] && extra=--no-overlap
  timeout 180 mpirun -np "$ngpu" "$M" train --ckpt "$W/gpt2" --layout dp="$ngpu" $TR --global-batch $((32 * ngpu)) --micro-batch 32 \
    $extra -q --out "$W/run-dp-$mode" --log "$W/dp-$mode.jsonl" 2>"$W/dp-$mode.err" || tail -5 "$W/dp-$mode.err"
  awk -v a="$(median_tps "$W/dp-$mode.jsonl")" -v b="$one" -v n="$ngpu" -v m="$mode" \
    'BEGIN { printf "DP weak scaling 124M on %d GPUs (NCCL, %s): %.0f tok/s vs %.0f on one = %.1f%% efficiency\n", n, m, a, b, 100 * a / (n * b) }'
done
for zero in 1 2 3; do
  timeout 180 mpirun -np "$ngpu" "$M" train --ckpt "$W/gpt2" --layout dp="$ngpu",zero=$zero $TR --global-batch $((32 * ngpu)) \
    --micro-batch 32 -q --out "$W/run-z$zero" --log "$W/z$zero.jsonl" 2>"$W/z$zero.err" || tail -5 "$W/z$zero.err"
  awk -v a="$(median_tps "$W/z$zero.jsonl")" -v b="$one" -v n="$ngpu" -v z=$zero \
    'BEGIN { printf "DP weak scaling 124M on %d GPUs (NCCL, ZeRO-%d): %.0f tok/s = %.1f%% efficiency\n", n, z, a, 100 * a / (n * b) }'
done
for lay in tp=2 pp=2; do
  for comm in nccl mpi; do
    timeout 180 mpirun -np 2 "$M" train --ckpt "$W/gpt2" --layout $lay $TR --global-batch 32 --micro-batch 8 --comm $comm -q \
      --out "$W/run-$lay-$comm" --log "$W/$lay-$comm.jsonl" 2>"$W/$lay-$comm.err" || tail -3 "$W/$lay-$comm.err"
    echo "124M $lay on 2 GPUs (B=8 x 4 micro-batches, --comm $comm): $(median_tps "$W/$lay-$comm.jsonl") tok/s"
  done
done
# the save with all ranks writing (the end-of-run save of the tp=2 run) and its load under dp=2, ZeRO-1
mpirun -np 2 "$M" train --ckpt "$W/gpt2" --layout tp=2 $TR --steps 2 --global-batch 32 --micro-batch 8 \
  --out "$W/run-save" --log "$W/save.jsonl" 2>"$W/save.err" >/dev/null || tail -3 "$W/save.err"
grep saved "$W/save.err"
du -sb "$W/run-save/step-00000002" | awk '{ printf "checkpoint of 124M (param + Adam m, v): %.2f GB\n", $1 / 1e9 }'
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null
mpirun -np 2 "$M" train --ckpt "$W/run-save" --layout dp=2,zero=1 --data "$W/tok.bin" --steps 3 --global-batch 64 \
  --micro-batch 32 --seq 1024 --backend cuda --out "$W/run-load" --log "$W/load.jsonl" 2>"$W/load.err" >/dev/null
grep "loaded in" "$W/load.err"
