#!/bin/bash
# Trainer throughput on one GPU against PyTorch (../shared/bench/torch_gpt.py: torch.compile, bf16
# autocast, SDPA, fused AdamW) in the same run: GPT-2 124M (B=32, T=1024) and 350M (B=16, T=1024),
# tokens/s measured as that script measures (tokens of steps 6..N over their wall time, from the
# training log's elapsed_s: bench/lib.sh), the ratio and the MFU of both. Also: the same with one
# feature off, the throughput of --recompute, the training stall of each background save and the
# time to the first step when resuming 350M from shards written under another layout (dp=4, ZeRO-3).
# usage: bench/train_bench.sh [WORKDIR]
# env: MPSHARD (the binary), SHARED (the directory of torch_gpt.py; TORCH=0: no PyTorch run),
#      STEPS (timed steps after the 5 warm-up ones; default 30, as torch_gpt.py), BACKEND (cuda),
#      MODELS (default "gpt2 gpt2-medium": names, or LABEL=CONFIG for tiny shapes on the CPU; the
#      last one is the model of the recompute, save and resume parts), BATCH and SEQ (override
#      32 / 16 and 1024), TOKENS (token file size), PEAK_TFLOPS (the MFU's peak, default 989)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
W=${1:-/tmp/tbench}; rm -rf "$W"; mkdir -p "$W"
M=${MPSHARD:-$here/../build/mpshard}
SHARED=${SHARED:-$here/../../shared/bench}
STEPS=${STEPS:-30}
N=$((STEPS + 5))
BACKEND=${BACKEND:-cuda}
MODELS=${MODELS:-gpt2 gpt2-medium}
T=${SEQ:-1024}
declare -A DEFAULT_B=([gpt2]=32 [gpt2-medium]=16)
gpu_name

# run_train TAG CKPT STEPS B [train options]: a run under dp=1 logged to $W/TAG.jsonl, its output
# directory $W/run-TAG, its stderr in $W/TAG.err (stdout dropped); $WRAP: a command prefix
# (/usr/bin/time -v, env VAR=VALUE)
run_train() {
  local tag=$1 ck=$2 steps=$3 b=$4; shift 4
  rm -rf "$W/run-$tag" "$W/$tag.jsonl"
  ${WRAP:-} "$M" train --ckpt "$ck" --layout dp=1 --data "$W/tok.bin" --steps "$steps" --global-batch "$b" \
    --micro-batch "$b" --seq "$T" --backend "$BACKEND" --out "$W/run-$tag" --log "$W/$tag.jsonl" "$@" \
    2>"$W/$tag.err" >/dev/null || { echo "$tag: mpshard train failed: $(run_error "$W/$tag.err")"; return 1; }
}
declare -A OURS SHAPE BS
LABELS='' vocab=''
for spec in $MODELS; do
  label=$(spec_label "$spec"); LABELS="$LABELS $label"; last=$label last_spec=$spec
  SHAPE[$label]=$(spec_shape "$spec")
  [ -n "${SHAPE[$label]}" ] || { echo "$spec: not a model mpshard knows"; exit 1; }
  v=$(shape_get "${SHAPE[$label]}" vocab); [ -z "$vocab" ] || [ "$v" -lt "$vocab" ] && vocab=$v
done
"$M" tokens --count "${TOKENS:-4000000}" --vocab "$vocab" -o "$W/tok.bin" >/dev/null || exit 1
for spec in $MODELS; do
  label=$(spec_label "$spec")
  B=${BATCH:-${DEFAULT_B[$label]:-8}}; BS[$label]=$B
  "$M" init $(spec_model_opt "$spec") --layout dp=1 -o "$W/$label" -q || exit 1
  WRAP=$([ -x /usr/bin/time ] && echo "/usr/bin/time -v") run_train "$label" "$W/$label" "$N" "$B" -q
  OURS[$label]=$(log_tps "$W/$label.jsonl" $((B * T)))
  echo "mpshard $label B=$B T=$T: $(fmt0 "${OURS[$label]}") tok/s (tokens of steps 6-$N over their wall time), peak host RSS $(awk '/Maximum resident/ { print $6 }' "$W/$label.err") KiB"
  rm -rf "$W/run-$label"
done
# the same with one feature off, to show what it gives in this run:
#  MPS_CUDA_GEMM_TUNE=0: cuBLASLt's first heuristic choice for every GEMM instead of the fastest of
#    its first 8 candidates (timed once per machine, kept in a cache file);
#  MPS_CUDA_ATTENTION=mma: the mma.sync attention kernels (attention_fast.cu) instead of the wgmma
#    ones, the default on H100 / H200 (attention_wgmma.cu)
for var in MPS_CUDA_GEMM_TUNE=0 MPS_CUDA_ATTENTION=mma; do
  tag=$(echo "$var" | tr 'A-Z=' 'a-z-')
  for label in $LABELS; do
    B=${BS[$label]}
    WRAP="env $var" run_train "$tag-$label" "$W/$label" "$N" "$B" -q
    echo "mpshard $label B=$B T=$T with $var: $(fmt0 "$(log_tps "$W/$tag-$label.jsonl" $((B * T)))") tok/s"
    rm -rf "$W/run-$tag-$label"
  done
done
# activation recompute (the layer forward replayed in the backward): the throughput it costs
B=${BS[$last]}
run_train rc "$W/$last" "$N" "$B" -q --recompute
echo "mpshard $last B=$B T=$T --recompute: $(fmt0 "$(log_tps "$W/rc.jsonl" $((B * T)))") tok/s"
rm -rf "$W/run-rc"
# the training stall of each background save (350M: param + Adam m, v, 4.3 GB): saves at steps 3
# and 6 of 8 (the last save of a run is written directly: nothing is left to overlap); the second
# waits for the first's write when the disk is slower than 3 steps
run_train save "$W/$last" 8 "$B" --save-every 3
save_report "$last" "$W/save.jsonl" "$W/save.err"
rm -rf "$W/run-save"
if [ "${TORCH:-1}" != 0 ] && [ -f "$SHARED/torch_gpt.py" ]; then
  python3 "$SHARED/torch_gpt.py" >"$W/torch.txt" 2>"$W/torch.err" || tail -3 "$W/torch.err"
  cat "$W/torch.txt"
else
  echo "(PyTorch not run: TORCH=0 or no $SHARED/torch_gpt.py)"; : >"$W/torch.txt"
fi
# the ratio and the MFU with torch_gpt.py's count (bench/lib.sh), n printed beside torch's
for label in $LABELS; do
  s=${SHAPE[$label]}
  L=$(shape_get "$s" n_layer); C=$(shape_get "$s" n_embd)
  grep -E "^torch L=$L C=$C " "$W/torch.txt" | head -1 >"$W/torch-$label.txt"
  theirs=$(torch_tps "$W/torch-$label.txt")
  echo "$label B=${BS[$label]} T=$T: mpshard $(fmt0 "${OURS[$label]}") tok/s / PyTorch $(fmt0 "${theirs:-?}") tok/s = $(ratio "${OURS[$label]}" "$theirs") (target >= 1.1x)"
  echo "MFU $label (6 n + 12 L C T flops per token, n = $(params_m "$s"); torch_gpt.py: params $(tp=$(torch_params "$W/torch-$label.txt"); echo "${tp:-?}"); of $PEAK_TFLOPS TFLOP/s): mpshard $(mfu "$s" "$T" "${OURS[$label]}"), PyTorch $(mfu "$s" "$T" "${theirs:-?}")"
done
# resume the last model from another layout's shards: time from launch to the end of the first step
"$M" init $(spec_model_opt "$last_spec") --layout dp=4,zero=3 -o "$W/m-dp4" -q || exit 1
dropped=$(drop_caches)
run_train resume "$W/m-dp4" 1 "$B"
grep -E "loaded in" "$W/resume.err"
echo "time to first step ($last, shards of dp=4 zero=3 -> dp=1, $dropped): $(first_step_s "$W/resume.jsonl") s"
rm -rf "$W/run-resume" "$W/m-dp4"
# several GPUs on this host: DP weak scaling, TP and PP throughput, the save and load with all ranks
[ "$BACKEND" = cuda ] && [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ] && MPSHARD="$M" bash "$here/train_bench_multi.sh" "$W/multi"
exit 0
