#!/bin/bash
# Bench: the CUDA trainer on Llama-family shapes against ../shared/bench/torch_llama.py in the same
# command, measured the way that script measures: tokens over the wall time of steps 6..N (from the
# training log's elapsed_s: bench/lib.sh), never a median of per-step figures; the ratio and the
# MFU of both (torch_llama.py's flop count). Then, for tinyllama-1.1b: the time to the first step
# when resuming from shards written under another layout, and the training stall of each
# background save.
# usage: bench/train_bench_llama.sh [WORKDIR] [NAME ...]
# NAME: llama-125m, tinyllama-1.1b, llama-1b-hs128 (default: the three, torch_llama.py's shapes,
#       batch and seq), or LABEL=CONFIG (a --config, for tiny shapes on the CPU); "none": only the
#       resume and save part
# env: MPSHARD (the binary), SHARED (the directory of torch_llama.py; TORCH=0: no PyTorch run),
#      STEPS (timed steps after the 5 warm-up ones; default 30, as torch_llama.py), BACKEND (cuda),
#      BATCH and SEQ (override each name's), PEAK_TFLOPS (the MFU's peak, default 989),
#      MICRO_BATCH (default: the batch, one micro-batch a step) and TRAIN_OPTS (e.g. --recompute):
#      for a shape whose activations do not fit the GPU at torch_llama.py's batch,
#      RESUME (the model of the resume and save part, a NAME; default tinyllama-1.1b; empty: none),
#      RESUME_LAYOUT (the layout its shards are written under; default dp=4,zero=3),
#      SAVE_EVERY (default 10: background saves 10 and 20 steps into the run), DROP_CACHES=0
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
M=${MPSHARD:-$here/../build/mpshard}
SHARED=${SHARED:-$here/../../shared/bench}
[ -f "$SHARED/torch_llama.py" ] || [ ! -f "$SHARED/bench/torch_llama.py" ] || SHARED=$SHARED/bench
W=${1:-/tmp/llama-bench}; shift || true
NAMES=${*:-llama-125m tinyllama-1.1b llama-1b-hs128}
[ "$NAMES" != none ] || NAMES= # the resume and save part alone
RESUME=${RESUME-tinyllama-1.1b}
RESUME_LAYOUT=${RESUME_LAYOUT:-dp=4,zero=3}
SAVE_EVERY=${SAVE_EVERY:-10}
STEPS=${STEPS:-30}
N=$((STEPS + 5))
BACKEND=${BACKEND:-cuda}
mkdir -p "$W"
gpu_name
declare -A B=([llama-125m]=32 [tinyllama-1.1b]=8 [llama-1b-hs128]=8) T=([llama-125m]=1024 [tinyllama-1.1b]=2048 [llama-1b-hs128]=2048)
batch() { echo "${BATCH:-${B[$(spec_label "$1")]:-8}}"; }
seq_len() { echo "${SEQ:-${T[$(spec_label "$1")]:-2048}}"; }
vocab=''
for spec in $NAMES $RESUME; do
  s=$(spec_shape "$spec")
  [ -n "$s" ] || { echo "$spec: not a model mpshard knows"; exit 1; }
  v=$(shape_get "$s" vocab); [ -z "$vocab" ] || [ "$v" -lt "$vocab" ] && vocab=$v
done
"$M" tokens --count 8000000 --vocab "$vocab" -o "$W/tok.bin" --force >/dev/null || exit 1

# run_train TAG CKPT STEPS SPEC [train options]: a run under dp=1 with SPEC's batch and seq, logged
# to $W/TAG.jsonl, its output directory $W/run-TAG, its stderr in $W/TAG.err (stdout dropped)
run_train() {
  local tag=$1 ck=$2 steps=$3 b t; b=$(batch "$4"); t=$(seq_len "$4"); shift 4
  rm -rf "$W/run-$tag" "$W/$tag.jsonl"
  # shellcheck disable=SC2086 # TRAIN_OPTS: options, split
  "$M" train --ckpt "$ck" --layout dp=1 --data "$W/tok.bin" --steps "$steps" --global-batch "$b" \
    --micro-batch "${MICRO_BATCH:-$b}" --seq "$t" --backend "$BACKEND" --out "$W/run-$tag" --log "$W/$tag.jsonl" \
    ${TRAIN_OPTS:-} "$@" 2>"$W/$tag.err" >/dev/null \
    || { echo "$tag: mpshard train failed: $(run_error "$W/$tag.err")"; return 1; }
}
# the run's options beside the torch script's (none by default)
opts_note() { echo "${MICRO_BATCH:+ in micro-batches of $MICRO_BATCH}${TRAIN_OPTS:+ $TRAIN_OPTS}"; }
for spec in $NAMES; do
  name=$(spec_label "$spec") s=$(spec_shape "$spec") b=$(batch "$spec") t=$(seq_len "$spec")
  rm -rf "$W/${name:?}"
  "$M" init $(spec_model_opt "$spec") --layout dp=1 -o "$W/$name" -q || exit 1
  run_train "$name" "$W/$name" "$N" "$spec" -q
  ours=$(log_tps "$W/$name.jsonl" $((b * t)))
  rm -rf "$W/${name:?}" "$W/run-$name" # (a 1B model's checkpoint is 13 GB: the disk is not endless)
  if [ "${TORCH:-1}" != 0 ] && [ -f "$SHARED/torch_llama.py" ]; then
    python3 "$SHARED/torch_llama.py" "$name" >"$W/torch-$name.txt" 2>"$W/torch-$name.err" || tail -3 "$W/torch-$name.err"
    cat "$W/torch-$name.txt"
  else
    echo "(PyTorch not run: TORCH=0 or no $SHARED/torch_llama.py)"; : >"$W/torch-$name.txt"
  fi
  theirs=$(torch_tps "$W/torch-$name.txt") tp=$(torch_params "$W/torch-$name.txt")
  printf 'mpshard %s B=%s T=%s%s: %s tok/s (tokens of steps 6-%s over their wall time); PyTorch (same run) %s tok/s; ratio %s (target >= 1.1x)\n' \
    "$name" "$b" "$t" "$(opts_note)" "$(fmt0 "$ours")" "$N" "$(fmt0 "${theirs:-?}")" "$(ratio "$ours" "$theirs")"
  echo "MFU $name (6 n + 12 L C T flops per token, n = $(params_m "$s"); torch_llama.py: params ${tp:-?}; of $PEAK_TFLOPS TFLOP/s): mpshard $(mfu "$s" "$t" "$ours"), PyTorch $(mfu "$s" "$t" "${theirs:-?}")"
done
[ -n "$RESUME" ] || exit 0

# Resume from another layout's shards: the time from the launch of mpshard train to the end of
# its first step (the load reading every rank's file of RESUME_LAYOUT under dp=1, the page cache
# dropped when root)
name=$(spec_label "$RESUME")
rm -rf "$W/resume-init"
"$M" init $(spec_model_opt "$RESUME") --layout "$RESUME_LAYOUT" -o "$W/resume-init" -q || exit 1
dropped=$(drop_caches)
run_train resume "$W/resume-init" 1 "$RESUME"
grep -E "loaded in" "$W/resume.err"
echo "time to first step ($name$(opts_note), shards of $RESUME_LAYOUT -> dp=1, $dropped): $(first_step_s "$W/resume.jsonl") s"
rm -rf "$W/resume-init"
# The training stall of each background save: the run resumed at step 1 saves at SAVE_EVERY and
# 2 SAVE_EVERY in the background (the stall: the copy into the host snapshot, plus any wait for
# the previous save's write), then its last step directly. --keep-last 1: two checkpoints on disk.
run_train save "$W/run-resume" $((2 * SAVE_EVERY + 1)) "$RESUME" --save-every "$SAVE_EVERY" --keep-last 1
save_report "$name$(opts_note)" "$W/save.jsonl" "$W/save.err"
awk -v a="$SAVE_EVERY" -v b=$((2 * SAVE_EVERY)) '/"loss"/ { e = $0; sub(/.*"elapsed_s": /, "", e); sub(/[,}].*/, "", e)
    s = $0; sub(/^\{"step": /, "", s); sub(/,.*/, "", s); t[s + 0] = e }
  END { if ((a in t) && (b in t)) printf "(from the end of step %d to the end of step %d: %.2f s, the first stall included; a write that takes longer makes the next save wait)\n", a, b, t[b] - t[a] }' "$W/save.jsonl"
rm -rf "$W/run-resume" "$W/run-save"
