#!/bin/bash
# Where the wall time of a training step goes, at the clock the card runs: mpshard train and
# ../shared/bench/torch_llama.py (or torch_gpt.py) each traced with bench/cupti_trace.c (every
# kernel, copy and CUDA runtime call; no replay, unlike ncu), then bench/timeline.py: per step the
# wall time, the GPU's busy time, its idle gaps and what the host did during the largest ones.
# usage: bench/train_timeline.sh WORKDIR [NAME]   NAME: a torch_llama.py shape (default
#        tinyllama-1.1b) or gpt2 / gpt2-medium (against torch_gpt.py)
# env: MPSHARD, SHARED (the directory of the torch scripts), STEPS (mpshard's, default 15),
#      CUPTI (the directory of libcupti.so; default: searched under /usr/local/cuda)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
W=${1:-/tmp/timeline}; NAME=${2:-tinyllama-1.1b}
M=${MPSHARD:-$here/../build/mpshard}; SHARED=${SHARED:-$here/../../shared/bench}; STEPS=${STEPS:-15}
rm -rf "$W"; mkdir -p "$W"
cuda=/usr/local/cuda
CUPTI=${CUPTI:-$(dirname "$(find -L "$cuda/" -name 'libcupti.so' 2>/dev/null | head -1)")}
cc -std=c11 -O2 -shared -fPIC -I"$cuda/include" -I"$cuda/extras/CUPTI/include" "$here/cupti_trace.c" \
  -L"$CUPTI" -Wl,-rpath,"$CUPTI" -lcupti -o "$W/libcupti_trace.so" || exit 1
case $NAME in
  gpt2) B=32 T=1024 script=torch_gpt.py arg=124M topts="--steps 35" ;; # (it trains 124M, then 350M)
  gpt2-medium) B=16 T=1024 script=torch_gpt.py arg=350M topts="--skip 40" ;; # (its steps follow 124M's 35)
  llama-125m) B=32 T=1024 script=torch_llama.py arg=$NAME topts= ;;
  *) B=8 T=2048 script=torch_llama.py arg=$NAME topts= ;;
esac
"$M" tokens --count 2000000 --vocab 32000 -o "$W/tok.bin" >/dev/null || exit 1
"$M" init --model "$NAME" --layout dp=1 -o "$W/ck" -q || exit 1
run_ours() {
  "$M" train --ckpt "$W/ck" --layout dp=1 --data "$W/tok.bin" --steps "$STEPS" --global-batch "$B" --micro-batch "$B" \
    --seq "$T" --backend cuda --out "$W/run-$1" --log "$W/$1.jsonl" -q >/dev/null 2>"$W/$1.err" || { tail -3 "$W/$1.err"; exit 1; }
  rm -rf "$W/run-$1"
}
run_ours plain
CUDA_INJECTION64_PATH=$W/libcupti_trace.so MPS_TRACE_OUT=$W/mpshard.trace run_ours traced
step_ms() { awk '/"loss"/ { n++; if (n > 5) { t = $0; sub(/.*"tokens_per_s": /, "", t); sub(/[,}].*/, "", t); s += '"$B * $T"' / t; k++ } }
  END { if (k) printf "%.2f", 1000 * s / k }' "$1"; }
echo "== mpshard $NAME B=$B T=$T: ms per step (steps 6-$STEPS, from the log) untraced $(step_ms "$W/plain.jsonl"), traced $(step_ms "$W/traced.jsonl")"
python3 "$here/timeline.py" "$W/mpshard.trace"
if [ -f "$SHARED/$script" ]; then
  echo; echo "== PyTorch ($script $arg), untraced:"; python3 "$SHARED/$script" "$arg" 2>&1 | tail -2
  echo "traced:"; CUDA_INJECTION64_PATH=$W/libcupti_trace.so MPS_TRACE_OUT=$W/torch.trace python3 "$SHARED/$script" "$arg" 2>&1 | tail -2
  # shellcheck disable=SC2086 # topts: options, split
  python3 "$here/timeline.py" $topts "$W/torch.trace"
fi
