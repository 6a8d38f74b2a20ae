# Crash safety: SIGKILL at random points of a writing command, then check what is on disk.
# Sourced by tests/cli/crash.sh (the suite's short run) and tests/crash/crash_long.sh (50+ points
# per command); needs common.bash's helpers ($MPSHARD, $T, ok, bad, expect).
#
# For each point: the output holds a committed result (or, one point in three, nothing); the
# command that replaces it is started, killed with SIGKILL after a random delay (a fraction of its
# measured duration; one point in four near the end, where the commit happens), then:
#  - the output is either the previous result, whole (verify; compare with its reference), or the
#    new one, whole (verify; compare with the new reference); never anything else;
#  - besides it only the command's own staging (DIR.partial, DIR.lock, FILE.tmp) may be left;
#  - rerunning the same command completes (exit 0) without any clean-up, gives the new result and
#    leaves no staging behind.
# Points are drawn from a seeded generator: the same seed gives the same delays (printed).
# CRASH_RERUN_VERIFY=0 checks the rerun's result with compare only (the suite's short run: every
# command start costs a fraction of a second under ASan).
#
# A command is one entry: crash_entry_NAME I sets CMD (an array), OUT, KIND (ckpt or file),
# FILE (kind file: the file inside OUT), NEW and OLD (directories holding the expected new and
# previous results). Adding `train` is one more entry function and its name in CRASH_COMMANDS.

CRASH_CONFIG=${CRASH_CONFIG:-"n_layer=4,n_embd=128,n_head=4,vocab=3000,n_positions=64"}  # tp=4 and pp=4 must fit
CRASH_COMMANDS=${CRASH_COMMANDS:-"shard reshard export"}
X="$T/crash"

crash_rand() { # next value in [0, 1000000) of the seeded generator (LCG, same on every bash)
  CRASH_STATE=$(( (CRASH_STATE * 1103515245 + 12345) % 2147483648 ))
  RAND=$(( CRASH_STATE % 1000000 ))
}

# ---- the commands: point I alternates between two variants (A/B) so that old and new differ ----
crash_setup() {
  mkdir -p "$X"
  "$MPSHARD" synth --config "$CRASH_CONFIG" --format safetensors --seed 1 -o "$X/m" || return 1
  "$MPSHARD" synth --config "$CRASH_CONFIG" --format safetensors --seed 2 -o "$X/m2" || return 1
  # shard: two layouts, two optimizer seeds
  "$MPSHARD" shard "$X/m/model.safetensors" --layout dp=2,tp=2,pp=2,zero=1 --synthetic-optimizer 7 -o "$X/shard-0" -q &&
  "$MPSHARD" shard "$X/m/model.safetensors" --layout dp=4,tp=2,zero=3 --synthetic-optimizer 8 -o "$X/shard-1" -q &&
  # reshard: one source, two target layouts
  "$MPSHARD" reshard "$X/shard-0" --layout tp=4,pp=2,zero=2 -o "$X/reshard-0" -q &&
  "$MPSHARD" reshard "$X/shard-0" --layout dp=2,tp=1,pp=4,zero=0 -o "$X/reshard-1" -q &&
  # export: two source checkpoints of two models
  "$MPSHARD" shard "$X/m2/model.safetensors" --layout tp=2 -o "$X/src2" -q &&
  "$MPSHARD" export "$X/shard-0" --format safetensors -o "$X/export-0" -q &&
  "$MPSHARD" export "$X/src2" --format safetensors -o "$X/export-1" -q
}
crash_entry_shard() {
  local a=$(($1 % 2))
  local layouts=("dp=2,tp=2,pp=2,zero=1" "dp=4,tp=2,zero=3")
  KIND=ckpt OUT="$X/out-shard" NEW="$X/shard-$a" OLD="$X/shard-$((1 - a))"
  CMD=("$MPSHARD" shard "$X/m/model.safetensors" --layout "${layouts[a]}" --synthetic-optimizer $((7 + a))
       -o "$OUT" --force -q)
}
crash_entry_reshard() {
  local a=$(($1 % 2))
  local layouts=("tp=4,pp=2,zero=2" "dp=2,tp=1,pp=4,zero=0")
  KIND=ckpt OUT="$X/out-reshard" NEW="$X/reshard-$a" OLD="$X/reshard-$((1 - a))"
  CMD=("$MPSHARD" reshard "$X/shard-0" --layout "${layouts[a]}" -o "$OUT" --force -q)
}
crash_entry_export() {
  local a=$(($1 % 2))
  local srcs=("$X/shard-0" "$X/src2")
  KIND=file OUT="$X/out-export" FILE=model.safetensors NEW="$X/export-$a" OLD="$X/export-$((1 - a))"
  CMD=("$MPSHARD" export "${srcs[a]}" --format safetensors -o "$OUT" -q --force)
}

# ---- checks ----
layout_of() { tr -d ' \n' <"$1/manifest.json" | grep -o '"layout":{[^}]*}'; }
id_of() { tr -d ' \n' <"$1/manifest.json" | grep -o '"checkpoint_id":"[0-9a-f]*"'; }
# same_result WHAT DIR REF [noverify]: DIR is a whole result equal to REF. (compare alone reads,
# and so checksums, every chunk of every kind; verify also checks every file against the manifest)
same_result() {
  if [ "$KIND" = ckpt ]; then
    if [ "${4:-}" != noverify ]; then
      "$MPSHARD" verify "$2" -q >"$T/c.out" 2>&1 || { bad "$1: verify: $(head -c 300 "$T/c.out")"; return 1; }
    fi
    "$MPSHARD" compare "$2" "$3" >"$T/c.out" 2>&1 || { bad "$1: compare with $3: $(head -c 300 "$T/c.out")"; return 1; }
    [ "$(layout_of "$2")" = "$(layout_of "$3")" ] || { bad "$1: layout $(layout_of "$2"), wanted $(layout_of "$3")"; return 1; }
  else
    cmp -s "$2/$FILE" "$3/$FILE" || { bad "$1: $2/$FILE differs from $3/$FILE"; return 1; }
    if [ -e "$3/config.json" ]; then cmp -s "$2/config.json" "$3/config.json" || { bad "$1: config.json differs"; return 1; }; fi
  fi
  return 0
}
# leftovers: what exists besides the result ("" when nothing)
leftovers() {
  if [ "$KIND" = ckpt ]; then
    (cd "$(dirname "$OUT")" && ls -d "$(basename "$OUT")".* 2>/dev/null | tr '\n' ' ')
  else
    (cd "$OUT" 2>/dev/null && ls -A | grep -v -x -e "$FILE" -e config.json | tr '\n' ' ')
  fi
}
allowed_leftovers() { # after a kill: only the command's own staging
  local l
  for l in $(leftovers); do
    case "$KIND:$l" in
      ckpt:"$(basename "$OUT")".partial|ckpt:"$(basename "$OUT")".lock|file:"$FILE".tmp|file:config.json.tmp) ;;
      *) bad "$1: unexpected leftover $l"; return 1 ;;
    esac
  done
  return 0
}
present() { if [ "$KIND" = ckpt ]; then [ -e "$OUT/manifest.json" ]; else [ -e "$OUT/$FILE" ]; fi; }

# check_point WHAT RC: the command of the current entry ended with RC (137: killed); checks what
# is on disk ($fresh, $before describe the state before it ran), reruns it, checks again
check_point() {
  local what=$1 rc=$2 state
  if [ "$rc" != 137 ] && [ "$rc" != 0 ]; then bad "$what: the command failed by itself (exit $rc): $(head -c 300 "$T/crash.err")"; fi
  [ "$rc" = 0 ] && n_done=$((n_done + 1))
  # what is there now: the previous result, the new one, or (fresh output) nothing
  if ! present; then
    if [ $fresh = 1 ] && [ "$rc" = 137 ]; then n_none=$((n_none + 1)); state=none
    else bad "$what: the output is gone"; state=bad; fi
    [ "$KIND" = ckpt ] && [ -e "$OUT" ] && bad "$what: $OUT exists without a manifest"
  elif [ "$KIND" = ckpt ] && [ $fresh = 0 ] && [ "$(id_of "$OUT")" = "$before" ]; then
    same_result "$what: previous checkpoint" "$OUT" "$OLD" && ok; n_old=$((n_old + 1)); state=old
  elif [ "$KIND" = file ] && [ $fresh = 0 ] && cmp -s "$OUT/$FILE" "$OLD/$FILE"; then
    same_result "$what: previous file" "$OUT" "$OLD" && ok; n_old=$((n_old + 1)); state=old
  else
    same_result "$what: new result" "$OUT" "$NEW" && ok; state=new
    [ "$rc" = 137 ] && n_new=$((n_new + 1))
  fi
  allowed_leftovers "$what" && ok
  # rerun: completes with no clean-up, gives the new result, leaves nothing behind
  "${CMD[@]}" >/dev/null 2>"$T/crash.err"; rc=$?
  [ "$rc" = 0 ] && ok || bad "$what: rerun exit $rc: $(head -c 300 "$T/crash.err")"
  same_result "$what: rerun" "$OUT" "$NEW" $([ "${CRASH_RERUN_VERIFY:-1}" = 1 ] || echo noverify) && ok
  [ -z "$(leftovers)" ] && ok || bad "$what: rerun left $(leftovers)"
  [ -n "${CRASH_VERBOSE:-}" ] && echo "  $what -> $state" >&2
  return 0
}
before_point() { # sets $fresh and $before from what is on disk now
  fresh=0; present || fresh=1
  before=""; [ "$KIND" = ckpt ] && [ $fresh = 0 ] && before=$(id_of "$OUT")
  return 0
}
summary() { # NAME KIND-OF-POINTS COUNT
  echo "crash $1: $3 $2: killed with the previous result kept $n_old, killed with the new result" \
       "committed $n_new, killed before a first result $n_none, completed before the kill $n_done;" \
       "failures $((FAIL - fails_before))" >&2
}

# crash_command NAME POINTS: measures the command, then runs POINTS random kill points
crash_command() {
  local name=$1 points=$2 i t0 t1 dur delay u pid rc fresh before
  crash_entry_$name 1   # variant 1 on disk: point 1 writes variant 0 over it
  rm -rf "$OUT" "$OUT".*
  # the duration: of a second run (the first one also warms the page cache), replacing the first
  "${CMD[@]}" >/dev/null 2>"$T/crash.err" || { bad "$name: clean run failed: $(cat "$T/crash.err")"; return; }
  t0=$(date +%s%N); "${CMD[@]}" >/dev/null 2>"$T/crash.err" || { bad "$name: clean run failed: $(cat "$T/crash.err")"; return; }
  t1=$(date +%s%N); dur=$(( (t1 - t0) / 1000 ))   # microseconds
  n_old=0 n_new=0 n_none=0 n_done=0 fails_before=$FAIL
  echo "crash $name: clean run $((dur / 1000)) ms; $points random points" >&2
  for i in $(seq 1 "$points"); do
    crash_entry_$name $((i + 1))   # the state now on disk is variant i, the command writes variant i+1
    if [ $((i % 3)) = 0 ]; then rm -rf "$OUT"; fi # one point in three: no previous result
    before_point
    crash_rand; u=$RAND
    if [ $((i % 4)) = 0 ]; then delay=$(( dur * (800000 + u / 4) / 1000000 )); else delay=$(( dur * u * 11 / 10 / 1000000 )); fi
    "${CMD[@]}" >/dev/null 2>"$T/crash.err" &
    pid=$!
    sleep "$(printf '%d.%06d' $((delay / 1000000)) $((delay % 1000000)))"
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null; rc=$?   # (no "Killed" notice)
    check_point "$name point $i (delay $((delay / 1000)) ms of $((dur / 1000)), seed $CRASH_SEED)" $rc
  done
  summary "$name" "random points" "$points"
}

# Syscall points: SIGKILL on entering the Nth call (of the main thread, which commits) of each
# file-system syscall below, so that every step of the commit is hit exactly, whatever the timing
# (strace -e inject=SYSCALL:signal=KILL:when=N; the syscall does not run). Variant 0 replaces
# variant 1 each time. CRASH_SYSCALL_POINTS=all: every call; =commit: the renames and the call
# after each (the suite); =none.
CRASH_SYSCALLS="fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,rmdir,mkdir,ftruncate"
crash_syscall_command() {
  local name=$1 sel=${CRASH_SYSCALL_POINTS:-all} rc fresh before line sc n k
  [ "$sel" = none ] && return
  if ! strace -qq -o /dev/null -e trace=fsync true 2>/dev/null; then
    echo "SKIP crash $name: syscall points need strace (and ptrace): not available" >&2; return
  fi
  n_old=0 n_new=0 n_none=0 n_done=0 fails_before=$FAIL
  # the calls, in order, of one run of variant 0 over variant 1: "fsync:1 fsync:2 renameat2:1 .."
  crash_entry_$name 1; "${CMD[@]}" >/dev/null 2>&1
  crash_entry_$name 0
  # (LeakSanitizer stops the process with ptrace at exit, which a traced process cannot: off under strace)
  local lsan_off="${ASAN_OPTIONS:-}:detect_leaks=0"
  ASAN_OPTIONS=$lsan_off strace -qq -o "$T/trace" -e trace="$CRASH_SYSCALLS" "${CMD[@]}" >/dev/null 2>"$T/crash.err" \
    || { bad "$name: strace run failed: $(tail -3 "$T/crash.err")"; return; }
  local -A seen=()
  local points=() prev_rename=0
  while read -r line; do
    sc=${line%%(*}
    case $sc in *[!a-z0-9_]*|"") continue ;; esac
    seen[$sc]=$(( ${seen[$sc]:-0} + 1 ))
    case "$sel:$sc" in
      all:*) points+=("$sc:${seen[$sc]}") ;;
      commit:rename|commit:renameat|commit:renameat2) points+=("$sc:${seen[$sc]}"); prev_rename=1 ;;
      commit:*) [ $prev_rename = 1 ] && points+=("$sc:${seen[$sc]}"); prev_rename=0 ;;
    esac
  done <"$T/trace"
  echo "crash $name: ${#points[@]} syscall points: ${points[*]}" >&2
  for k in "${points[@]}"; do
    crash_entry_$name 1; "${CMD[@]}" >/dev/null 2>"$T/crash.err" || bad "$name: preparing variant 1 failed"
    crash_entry_$name 0
    before_point
    # (the injected syscall must also be traced, else strace does not stop at it)
    { ASAN_OPTIONS=$lsan_off strace -qq -o /dev/null -e trace="${k%%:*}" -e inject="${k%%:*}:signal=KILL:when=${k##*:}" "${CMD[@]}" \
        >/dev/null 2>"$T/crash.err"; } 2>/dev/null
    rc=$?
    check_point "$name syscall point $k" $rc
  done
  summary "$name" "syscall points" "${#points[@]}"
}

crash_run() { # POINTS SEED
  CRASH_SEED=$2 CRASH_STATE=$2
  echo "crash: seed $CRASH_SEED, $1 points per command, commands: $CRASH_COMMANDS, model $CRASH_CONFIG" >&2
  crash_setup || { bad "crash setup failed"; return; }
  local c
  for c in $CRASH_COMMANDS; do crash_command "$c" "$1"; crash_syscall_command "$c"; done
}
