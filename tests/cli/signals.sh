#!/bin/bash
# SIGTERM and SIGINT (issue 22). train: every rank stops at the next step boundary, the steps since
# the last save are saved (a background save in flight committed first), one line says so, exit 0,
# and the run resumed from RUNDIR continues the uninterrupted run's losses bit for bit; a second
# signal ends it at once, every committed save intact; under mpirun a signal to one rank stops all.
# shard, reshard and export stopped by a signal remove their staging (DIR.partial, DIR.lock,
# FILE.tmp), leave the previous output as it was and exit 128 + the signal. Where a command must be
# signalled in the middle of its work it is stopped (SIGSTOP) first, so nothing depends on timing.
. "$(dirname "$0")/common.bash"
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0"
CFG="n_layer=2,n_embd=64,n_head=4,vocab=512,n_positions=32"
expect 0 "$MPSHARD" tokens --count 50000 --vocab 512 -o "$T/tok.bin"
expect 0 "$MPSHARD" init --config "$CFG" --layout dp=1 -o "$T/init" -q
# a constant learning rate: the schedule does not depend on --steps
TR=(--data "$T/tok.bin" --global-batch 4 --micro-batch 2 --seq 16 --lr 1e-3 -q)
lines() { if [ -f "$1" ]; then wc -l <"$1"; else echo 0; fi; }
wait_lines() { # FILE N PID: until FILE has N lines (or PID ended)
  for _ in $(seq 6000); do [ "$(lines "$1")" -ge "$2" ] && return 0; kill -0 "$3" 2>/dev/null || return 1; sleep 0.01; done
  return 1
}
last_step() { tail -1 "$1" | sed 's/^{"step": \([0-9]*\),.*/\1/'; }
losses() { grep '"loss"' "$1" | sed 's/.*"step": \([0-9]*\), "loss": \([^,]*\),.*/\1 \2/'; }
# check_stop RUN LOG LAYOUT NP WHO: the run stopped after the log's last step, saved it and resumes it bit for bit
check_stop() {
  local run=$1 log=$2 layout=$3 np=$4 who=$5 n
  n=$(last_step "$log")
  grep -q "^train: stopped by $who at step $n of 100000: $run/step-$(printf %08d "$n") saved and committed" "$T/err" \
    && [ "$(grep -c . "$T/err")" = 1 ] && ok || bad "stop line for step $n: $(cat "$T/err")"
  [ "$(cat "$run/latest")" = "step-$(printf %08d "$n")" ] && ok || bad "latest is $(cat "$run/latest"), not step $n"
  expect 0 "$MPSHARD" verify "$run" -q
  [ -z "$(ls -d "$run"/*.partial "$run"/*.lock 2>/dev/null)" ] && ok || bad "staging left in $run: $(ls "$run")"
  local launch=()
  [ "$np" -gt 1 ] && launch=(mpirun -np "$np")
  expect 0 "${launch[@]}" "$MPSHARD" train --ckpt "$run" --layout "$layout" --steps $((n + 2)) --out "$run" "${TR[@]}" \
    --log "$T/resumed.jsonl"
  expect 0 "${launch[@]}" "$MPSHARD" train --ckpt "$T/init" --layout "$layout" --steps $((n + 2)) --out "$T/ref" "${TR[@]}" \
    --log "$T/ref.jsonl"
  [ "$(losses "$T/resumed.jsonl")" = "$(losses "$T/ref.jsonl" | tail -2)" ] && ok \
    || bad "resumed after the stop: $(losses "$T/resumed.jsonl" | tr '\n' ' ') vs $(losses "$T/ref.jsonl" | tail -2 | tr '\n' ' ')"
  rm -rf "$T/ref" "$T/ref.jsonl" "$T/resumed.jsonl"
}

# 1. SIGTERM with saves in the background, SIGINT with synchronous saves
for sig in TERM INT; do
  run="$T/run_$sig"; log="$T/$sig.jsonl"
  extra=(--save-every 5); [ $sig = INT ] && extra=(--save-every 3 --save-sync)
  "$MPSHARD" train --ckpt "$T/init" --layout dp=1 --steps 100000 --out "$run" --log "$log" "${TR[@]}" "${extra[@]}" \
    >"$T/out" 2>"$T/err" &
  pid=$!
  wait_lines "$log" 8 $pid && kill -$sig $pid
  wait $pid; rc=$?
  [ "$rc" = 0 ] && ok || bad "train stopped by SIG$sig: exit $rc: $(cat "$T/err")"
  check_stop "$run" "$log" dp=1 1 SIG$sig
done

# 2. a second signal ends the run at once: the process dies by it, the last committed save intact
run="$T/run2"; log="$T/run2.jsonl"
"$MPSHARD" train --ckpt "$T/init" --layout dp=1 --steps 100000 --out "$run" --log "$log" "${TR[@]}" --save-every 2 \
  --save-sync >"$T/out" 2>"$T/err" &
pid=$!
if wait_lines "$log" 4 $pid; then
  kill -STOP $pid; kill -INT $pid; kill -TERM $pid; kill -CONT $pid
fi
wait $pid; rc=$?
[ "$rc" = 143 ] || [ "$rc" = 130 ] && ok || bad "train with two signals: exit $rc: $(cat "$T/err")"
! grep -q "stopped by" "$T/err" && ok || bad "train with two signals went on to stop cleanly: $(cat "$T/err")"
expect 0 "$MPSHARD" verify "$run" -q
for d in "$run"/step-*; do
  case $d in *.partial|*.lock) continue ;; esac
  "$MPSHARD" verify "$d" -q >/dev/null 2>&1 && ok || bad "$d does not verify"
done

# 3. under mpirun, SIGTERM to one rank: both stop at the same step boundary and save
if command -v mpirun >/dev/null; then
  run="$T/run3"; log="$T/run3.jsonl"
  mpirun -np 2 "$MPSHARD" train --ckpt "$T/init" --layout dp=2 --steps 100000 --out "$run" --log "$log" "${TR[@]}" \
    --save-every 4 >"$T/out" 2>"$T/err" &
  pid=$!
  if wait_lines "$log" 6 $pid; then
    for p in $(pgrep -P $pid); do
      tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx OMPI_COMM_WORLD_RANK=1 && kill -TERM "$p"
    done
  fi
  wait $pid; rc=$?
  [ "$rc" = 0 ] && ok || bad "mpirun train, SIGTERM to rank 1: exit $rc: $(cat "$T/err")"
  check_stop "$run" "$log" dp=2 2 "a signal to another rank"
else
  bad "mpirun not installed"
fi

# 4. shard, reshard and export stopped in the middle: staging removed, the previous output intact
MID="n_layer=4,n_embd=256,n_head=8,vocab=4000,n_positions=128"
expect 0 "$MPSHARD" synth --config "$MID" --format safetensors --seed 2 -o "$T/m"
M="$T/m/model.safetensors"
expect 0 "$MPSHARD" shard "$M" --layout dp=2 -o "$T/ref" -q --synthetic-optimizer 1
hold() { # PATH CMD...: CMD in the background, stopped once PATH exists (non-empty for a file)
  local path=$1; shift
  "$@" >"$T/out" 2>"$T/err" &
  pid=$!
  for _ in $(seq 4000); do
    if [ -d "$path" ] || [ -s "$path" ]; then kill -STOP $pid; return 0; fi
    kill -0 $pid 2>/dev/null || break
    sleep 0.005
  done
  wait $pid; bad "the command ended before $path appeared: $(cat "$T/err")"; return 1
}
stopped_by() { # SIG CODE OUT WHAT: signal the held command, which must exit CODE naming OUT
  kill -"$1" $pid; kill -CONT $pid; wait $pid; local rc=$?
  [ "$rc" = "$2" ] && ok || bad "$4 stopped by SIG$1: exit $rc (wanted $2): $(cat "$T/err")"
  grep -q "^mpshard .*: stopped by SIG$1: $3 not written" "$T/err" && [ "$(grep -c . "$T/err")" = 1 ] && ok \
    || bad "$4 stopped by SIG$1: $(cat "$T/err")"
}
if hold "$T/c.partial" "$MPSHARD" shard "$M" --layout dp=2,tp=2 -o "$T/c" -q --threads 1; then
  stopped_by TERM 143 "$T/c" shard
  [ ! -e "$T/c" ] && [ ! -e "$T/c.partial" ] && [ ! -e "$T/c.lock" ] && ok || bad "shard left $(ls -d "$T"/c*)"
fi
# a second signal ends it at once, as a kill: its staging is left, and the rerun completes
if hold "$T/c.partial" "$MPSHARD" shard "$M" --layout dp=2,tp=2 -o "$T/c" -q --threads 1; then
  kill -INT $pid; kill -TERM $pid; kill -CONT $pid; wait $pid; rc=$?
  [ "$rc" = 130 ] || [ "$rc" = 143 ] && ! grep -q "stopped by" "$T/err" && ok \
    || bad "shard with two signals: exit $rc: $(cat "$T/err")"
  expect 0 "$MPSHARD" shard "$M" --layout dp=2,tp=2 -o "$T/c" -q
  expect 0 "$MPSHARD" verify "$T/c" -q
  [ ! -e "$T/c.partial" ] && [ ! -e "$T/c.lock" ] && ok || bad "the rerun left staging"
fi
cp -r "$T/ref" "$T/old"
if hold "$T/old.partial" "$MPSHARD" reshard "$T/ref" --layout tp=4 -o "$T/old" -q --threads 1 --force; then
  stopped_by INT 130 "$T/old" reshard
  [ ! -e "$T/old.partial" ] && [ ! -e "$T/old.lock" ] && ok || bad "reshard left $(ls -d "$T"/old*)"
  expect 0 "$MPSHARD" verify "$T/old" -q
  grep -q '"dp": 2' "$T/old/manifest.json" && ok || bad "the previous checkpoint was replaced"
fi
expect 0 "$MPSHARD" export "$T/ref" --format safetensors -o "$T/e" -q
cp "$T/e/model.safetensors" "$T/prev.safetensors"
# (on a busy machine the export can finish between two polls of hold: then it is run again, at
# most three times, until the signal lands while it works)
erc=
for attempt in 1 2 3; do
  hold "$T/e/model.safetensors.tmp" "$MPSHARD" export "$T/ref" --format safetensors -o "$T/e" -q --force --threads 1 \
    --memory-mb 1 || break
  kill -TERM $pid; kill -CONT $pid; wait $pid; erc=$?
  [ "$erc" = 0 ] || break
done
if [ -n "$erc" ]; then
  [ "$erc" = 143 ] && ok || bad "export stopped by SIGTERM: exit $erc (wanted 143): $(cat "$T/err")"
  grep -q "^mpshard .*: stopped by SIGTERM: $T/e not written" "$T/err" && [ "$(grep -c . "$T/err")" = 1 ] && ok \
    || bad "export stopped by SIGTERM: $(cat "$T/err")"
  [ ! -e "$T/e/model.safetensors.tmp" ] && cmp -s "$T/e/model.safetensors" "$T/prev.safetensors" && ok \
    || bad "export left $(ls "$T/e") or changed the previous file"
fi
finish
