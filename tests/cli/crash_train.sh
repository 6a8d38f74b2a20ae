#!/bin/bash
# SIGKILL during the trainer's saves (issue 8): a run saving every step is killed at random
# points; afterwards RUNDIR/latest names a checkpoint that verifies, every step-* directory that
# exists is a complete checkpoint (an interrupted save is only ever a step-*.partial), and rerunning
# the same command resumes from latest and completes. Seeded: the points reproduce. Then a kill
# while a background save's writer is in flight (its rank file being written, training going on):
# latest still names the previous checkpoint and the resumed run has the uninterrupted run's losses.
. "$(dirname "$0")/common.bash"
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0"
POINTS=${CRASH_POINTS:-5}
SEED=${CRASH_SEED:-20261125}
echo "crash_train: $POINTS points, seed $SEED"
RANDOM=$SEED
CFG="n_layer=4,n_embd=256,n_head=8,vocab=5000,n_positions=32"
expect 0 "$MPSHARD" tokens --count 50000 --vocab 5000 -o "$T/tok.bin"
expect 0 "$MPSHARD" init --config "$CFG" --layout dp=1 -o "$T/init" -q
TR=(--data "$T/tok.bin" --global-batch 4 --micro-batch 2 --seq 16 --save-every 1 -q --keep-last 3)
# how long an uninterrupted run of 6 steps takes (ms), to spread the kill points over it
t0=$(date +%s%N)
"$MPSHARD" train --ckpt "$T/init" --layout dp=1 --steps 6 --out "$T/ref" "${TR[@]}" --log "$T/ref.jsonl" >/dev/null 2>&1 \
  && ok || bad "reference run"
dur=$(( ($(date +%s%N) - t0) / 1000000 ))
# (a dp=2 run reduces in another order: its own reference, bit for bit)
if command -v mpirun >/dev/null; then
  mpirun -np 2 "$MPSHARD" train --ckpt "$T/init" --layout dp=2 --steps 6 --out "$T/ref2" "${TR[@]}" --log "$T/ref2.jsonl" \
    >/dev/null 2>&1 && ok || bad "reference run dp=2"
fi
# SIGKILL to every process of the run: mpirun puts each rank in a process group of its own (they
# would outlive a kill of mpirun's group and go on saving), the session started by setsid holds all
kill_run() {
  pkill -KILL -s "$1" 2>/dev/null; wait "$1" 2>/dev/null
  while pgrep -s "$1" >/dev/null; do sleep 0.01; done
}
check_run() { # the invariants after a kill
  local run=$1
  for d in "$run"/step-*; do
    [ -e "$d" ] || continue
    case $d in *.partial|*.lock|*.removing) continue ;; esac
    "$MPSHARD" verify "$d" -q >/dev/null 2>&1 || { bad "point $2: $d exists but does not verify"; return; }
  done
  if [ -e "$run/latest" ]; then
    "$MPSHARD" verify "$run/$(cat "$run/latest")" -q >/dev/null 2>&1 || { bad "point $2: latest $(cat "$run/latest") does not verify"; return; }
  fi
  ok
}
for p in $(seq 1 "$POINTS"); do
  run="$T/run$p"; rm -rf "$run"
  delay=$(( RANDOM % (dur + 1) ))
  if [ $((p % 2)) = 0 ] && command -v mpirun >/dev/null; then
    # two ranks of dp=2: rank 1's file may be half-written when rank 0 dies
    setsid mpirun -np 2 "$MPSHARD" train --ckpt "$T/init" --layout dp=2 --steps 6 --out "$run" "${TR[@]}" >/dev/null 2>&1 &
    layout=dp=2; np=2; ref=ref2
  else
    setsid "$MPSHARD" train --ckpt "$T/init" --layout dp=1 --steps 6 --out "$run" "${TR[@]}" >/dev/null 2>&1 &
    layout=dp=1; np=1; ref=ref
  fi
  pid=$!
  sleep "$(awk -v d="$delay" 'BEGIN { printf "%.3f", d / 1000 }')"
  kill_run "$pid"
  check_run "$run" "$p (after ${delay} ms of ${dur})"
  # rerun: resume from latest if there is one, and complete
  from="$T/init"; [ -e "$run/latest" ] && from="$run"
  if [ "$np" = 2 ]; then
    mpirun -np 2 "$MPSHARD" train --ckpt "$from" --layout $layout --steps 6 --out "$run" "${TR[@]}" >"$T/out" 2>"$T/err"
  else
    "$MPSHARD" train --ckpt "$from" --layout $layout --steps 6 --out "$run" "${TR[@]}" >"$T/out" 2>"$T/err"
  fi && ok || bad "point $p: rerun failed: $(tail -2 "$T/err")"
  [ "$(cat "$run/latest" 2>/dev/null)" = step-00000006 ] && ok || bad "point $p: latest after the rerun: $(cat "$run/latest" 2>/dev/null)"
  check_run "$run" "$p (after the rerun)"
  # the completed run equals the uninterrupted one: same data order, same state
  "$MPSHARD" compare "$run/step-00000006" "$T/$ref/step-00000006" >"$T/out" 2>&1 && ok \
    || bad "point $p: the resumed run differs from the uninterrupted one: $(head -3 "$T/out")"
done

# A kill while the background write of step 4 is in flight (saves at 2 and 4, the step-2 one
# committed before step 4's began): latest names step-00000002, step-00000004 is only a .partial,
# and resuming from latest gives the uninterrupted run's loss at every step and its final state.
steps_of() { sed -E 's/.*"step": ([0-9]+),.*/\1/' "$1" | tr '\n' ' '; }
losses_of() { sed -E 's/.*"step": ([0-9]+), "loss": ([^,]*),.*/\1 \2/' "$1"; }
inflight() { # NP LAYOUT REF
  local np=$1 layout=$2 ref=$3 run="$T/inflight$1" try pid caught=0 cmd
  cmd=("$MPSHARD" train --ckpt "$T/init" --layout "$layout" --steps 6 --save-every 2 "${TR[@]:0:8}" -q)
  [ "$np" = 1 ] || cmd=(mpirun -np "$np" "${cmd[@]}")
  for try in 1 2 3; do # the commit may win the race with the kill: try again
    rm -rf "$run" "$run.jsonl"
    setsid "${cmd[@]}" --out "$run" --log "$run.jsonl" >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 1 3000); do
      [ -e "$run/step-00000004.partial/rank-00000.h5" ] && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.01
    done
    kill_run "$pid"
    [ ! -e "$run/step-00000004" ] && [ -e "$run/step-00000004.partial" ] && { caught=1; break; }
  done
  [ "$caught" = 1 ] || { bad "np $np: no kill landed while step 4 was being written (3 tries)"; return; }
  [ "$(cat "$run/latest" 2>/dev/null)" = step-00000002 ] && ok || bad "np $np: latest after the kill: $(cat "$run/latest" 2>/dev/null)"
  check_run "$run" "in flight, np $np"
  "${cmd[@]}" --ckpt "$run" --out "$run" --log "$run.jsonl" >"$T/out" 2>"$T/err" && ok \
    || bad "np $np: resume after the kill: $(tail -2 "$T/err")"
  # the log holds the steps before the kill, then 3..6 again from the resume: the last of each step
  # must be the uninterrupted run's loss, bit for bit (same layout, same order of reduction)
  [ "$(steps_of "$run.jsonl" | grep -oE '3 4 5 6 $')" = "3 4 5 6 " ] && ok || bad "np $np: resumed steps: $(steps_of "$run.jsonl")"
  diff <(losses_of "$run.jsonl" | awk '{ last[$1] = $2 } END { for (s = 1; s <= 6; s++) print s, last[s] }') \
       <(losses_of "$T/$ref.jsonl") >"$T/out" && ok || bad "np $np: losses after the resume differ: $(cat "$T/out")"
  "$MPSHARD" compare "$run/step-00000006" "$T/$ref/step-00000006" >"$T/out" 2>&1 && ok \
    || bad "np $np: the resumed run differs from the uninterrupted one: $(head -3 "$T/out")"
}
inflight 1 dp=1 ref
command -v mpirun >/dev/null && inflight 2 dp=2 ref2
finish
