#!/bin/bash
# A/B of trainer builds on one GPU: each build trains the same model from its own `init` for 35
# steps, the builds taking turns, and prints tokens/s as ../shared/bench/torch_gpt.py measures it
# (tokens of steps 6..35 over their wall time, from the log's elapsed_s) and the median of the
# per-step rates (the log's tokens_per_s), to tell a change's effect from card-to-card spread.
# usage: bench/train_ab.sh LABEL=BINARY...
# env: MODELS (NAME:BATCH ..., default "gpt2:32 gpt2-medium:16"), ROUNDS (default 2), SEQ (1024),
#      BACKEND (cuda), W (work directory, default /tmp/train_ab), OUT (where the logs are copied,
#      e.g. the device machine's $OUT; default W)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh" # log_tps, fmt0
[ $# -ge 1 ] || { echo "usage: bench/train_ab.sh LABEL=BINARY..." >&2; exit 2; }
W=${W:-/tmp/train_ab}; rm -rf "$W"; mkdir -p "$W"
ROUNDS=${ROUNDS:-2} MODELS=${MODELS:-"gpt2:32 gpt2-medium:16"} T=${SEQ:-1024} BACKEND=${BACKEND:-cuda}
first=${1#*=}
"$first" tokens --count 4000000 --vocab 50257 -o "$W/tok.bin" >/dev/null || exit 1
median_tps() { awk '/"loss"/ { n++; if (n > 5) { t = $0; sub(/.*"tokens_per_s": /, "", t); sub(/[,}].*/, "", t); print t } }' "$1" |
  sort -n | awk '{ v[NR] = $1 } END { if (NR) printf "%.0f", v[int(NR / 2) + 1] }'; }
# the steps' own times (ms, from tokens_per_s): mean, fastest, slowest; their sum against the wall
# time tells time between steps from slow steps
step_ms() { awk -v bt="$1" '/"loss"/ { n++; if (n > 5) { t = $0; sub(/.*"tokens_per_s": /, "", t); sub(/[,}].*/, "", t)
    ms = 1000 * bt / t; s += ms; k++; if (!lo || ms < lo) lo = ms; if (ms > hi) hi = ms } }
  END { if (k) printf "steps %.2f ms mean, %.2f-%.2f", s / k, lo, hi }' "$2"; }
for mb in $MODELS; do
  m=${mb%:*} B=${mb#*:}
  for spec in "$@"; do
    "${spec#*=}" init --model "$m" --layout dp=1 -o "$W/ck-${spec%%=*}-$m" -q || exit 1
  done
  for r in $(seq "$ROUNDS"); do
    for spec in "$@"; do
      l=${spec%%=*} bin=${spec#*=} log=$W/${spec%%=*}-$m-$r.jsonl
      rm -rf "$W/run"
      "$bin" train --ckpt "$W/ck-$l-$m" --layout dp=1 --data "$W/tok.bin" --steps 35 --global-batch "$B" \
        --micro-batch "$B" --seq "$T" --backend "$BACKEND" --out "$W/run" --log "$log" -q >/dev/null 2>"$W/err" ||
        { echo "$m $l: train failed: $(tail -1 "$W/err")"; continue; }
      echo "$m B=$B $l round $r: $(fmt0 "$(log_tps "$log" $((B * T)))") tok/s (wall time of steps 6-35), median step $(median_tps "$log") tok/s; $(step_ms $((B * T)) "$log")"
      cp "$log" "${OUT:-$W}/" 2>/dev/null
    done
  done
done
rm -rf "$W/run"
