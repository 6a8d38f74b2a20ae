#!/bin/bash
# Trainer throughput on the GPUs of one host (NCCL; run by train_bench.sh when there are >= 2):
#  - DP weak scaling, 124M, B=32 per GPU: tokens/s on all GPUs over n x tokens/s on one, with the
#    gradient sums under the backward (the default) and after it (--no-overlap), and with ZeRO 1-3;
#    COUNTS="2 4" runs it on 2 GPUs too (the scaling curve);
#  - 124M with tp=2 and pp=2 (global batch 32 in micro-batches of 8), pipeline messages over NCCL
#    (the default; pp=2 also over MPI through host memory, --comm mpi); with 4 GPUs tp=4, pp=4 and
#    the pairs dp=2 x tp=2, dp=2 x pp=2, tp=2 x pp=2 (global batch 32 per DP replica);
#  - the save with all ranks writing (all GPUs: tp=2, or tp=2 x pp=2 on 4), and the load of that
#    checkpoint under another layout (dp = all GPUs, ZeRO-1).
# usage: [SECTIONS="dp model io"] bench/train_bench_multi.sh WORKDIR
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
has() { case " ${SECTIONS:-dp model io} " in *" $1 "*) return 0 ;; esac; return 1; }
if has dp || has model; then
"$M" train --ckpt "$W/gpt2" --layout dp=1 $TR --global-batch 32 --micro-batch 32 -q --out "$W/run-1" --log "$W/one.jsonl" \
  2>"$W/one.err" || tail -5 "$W/one.err"
one=$(median_tps "$W/one.jsonl")
dp_run() { # dp_run NGPU NAME EXTRA...: DP weak scaling on NGPU GPUs
  local n=$1 name=$2; shift 2
  timeout 180 mpirun -np "$n" "$M" train --ckpt "$W/gpt2" --layout "dp=$n$LAYX" $TR --global-batch $((32 * n)) --micro-batch 32 \
    "$@" -q --out "$W/run-$n-$name" --log "$W/$n-$name.jsonl" 2>"$W/$n-$name.err" || tail -5 "$W/$n-$name.err"
  awk -v a="$(median_tps "$W/$n-$name.jsonl")" -v b="$one" -v n="$n" -v m="$name" \
    'BEGIN { printf "DP weak scaling 124M on %d GPUs (NCCL, %s): %.0f tok/s vs %.0f on one = %.1f%% efficiency\n", n, m, a, b, 100 * a / (n * b) }'
}
counts=${COUNTS:-$ngpu}; has dp || counts=""
for n in $counts; do
  LAYX="" dp_run "$n" overlap
  LAYX="" dp_run "$n" no-overlap --no-overlap
  for zero in 1 2 3; do LAYX=",zero=$zero" dp_run "$n" "ZeRO-$zero"; done
done
model_run() { # model_run LAYOUT NGPU COMM: 124M, global batch 32 per DP replica in micro-batches of 8
  local lay=$1 n=$2 comm=$3 dp
  dp=$(echo "$lay" | sed -nE 's/.*dp=([0-9]+).*/\1/p'); dp=${dp:-1}
  timeout 180 mpirun -np "$n" "$M" train --ckpt "$W/gpt2" --layout "$lay" $TR --global-batch $((32 * dp)) --micro-batch 8 \
    --comm "$comm" -q --out "$W/run-$lay-$comm" --log "$W/$lay-$comm.jsonl" 2>"$W/$lay-$comm.err" || tail -3 "$W/$lay-$comm.err"
  awk -v a="$(median_tps "$W/$lay-$comm.jsonl")" -v b="$one" -v n="$n" -v l="$lay" -v c="$comm" 'BEGIN {
    printf "124M %s on %d GPUs (B=8 micro-batches, --comm %s): %.0f tok/s = %.1f%% of %d x one GPU\n", l, n, c, a, 100 * a / (n * b), n }'
}
if has model; then
  model_run tp=2 2 nccl
  model_run pp=2 2 nccl
  [ "${PP_MPI:-1}" = 1 ] && model_run pp=2 2 mpi
  if [ "$ngpu" -ge 4 ]; then
    for lay in tp=4 pp=4 dp=2,tp=2 dp=2,pp=2 tp=2,pp=2; do model_run "$lay" 4 nccl; done
  fi
  if [ "$ngpu" -ge 8 ]; then # (not yet run: no 8-GPU machine lent so far)
    for lay in dp=2,tp=2,pp=2 tp=4,pp=2 dp=2,pp=4 dp=4,tp=2; do model_run "$lay" 8 nccl; done
  fi
fi
fi
has io || exit 0
# the save with all ranks writing (the end-of-run save of a run on every GPU) and its load under
# dp = every GPU, ZeRO-1
save_lay=tp=2; [ "$ngpu" -ge 4 ] && save_lay=tp=2,pp=2; [ "$ngpu" -ge 8 ] && save_lay=dp=2,tp=2,pp=2
np=2; [ "$ngpu" -ge 4 ] && np=4; [ "$ngpu" -ge 8 ] && np=8
mpirun -np $np "$M" train --ckpt "$W/gpt2" --layout $save_lay $TR --steps 2 --global-batch 32 --micro-batch 8 \
  --out "$W/run-save" --log "$W/save.jsonl" 2>"$W/save.err" >/dev/null || tail -3 "$W/save.err"
echo "save of $save_lay ($np ranks writing):"; grep saved "$W/save.err"
bytes=$(du -sb "$W/run-save/step-00000002" | cut -f1)
wrote=$(sed -nE -e 's/.*written in the background in ([0-9.]+) s.*/\1/p' -e 's/.* in ([0-9.]+) s \(training stalls.*/\1/p' \
  "$W/save.err" | tail -1)
awk -v b="$bytes" -v t="${wrote:-0}" 'BEGIN { printf "checkpoint of 124M (param + Adam m, v): %.2f GB, written in %.2f s = %.2f GB/s\n", b / 1e9, t, (t > 0 ? b / 1e9 / t : 0) }'
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null
mpirun -np $np "$M" train --ckpt "$W/run-save" --layout dp=$np,zero=1 --data "$W/tok.bin" --steps 3 --global-batch $((32 * np)) \
  --micro-batch 32 --seq 1024 --backend cuda --out "$W/run-load" --log "$W/load.jsonl" 2>"$W/load.err" >/dev/null
loaded=$(sed -nE 's/.*loaded in ([0-9.]+) s.*/\1/p' "$W/load.err")
awk -v b="$bytes" -v t="${loaded:-0}" -v np=$np 'BEGIN { printf "load under dp=%d,zero=1 (all ranks reading): %.2f s = %.2f GB/s\n", np, t, (t > 0 ? b / 1e9 / t : 0) }'
