#!/bin/bash
# Error messages: getopt's errors in the form of every other usage error, a missing input file with
# the exit code README gives (3), and under mpirun one line per job, never a doubled prefix.
. "$(dirname "$0")/common.bash"
# one line, exactly: expect_line LINE
expect_line() {
  if [ "$(cat "$T/err")" = "$1" ]; then ok; else bad "stderr is not the one line '$1': $(head -c 600 "$T/err")"; fi
}
expect 2 "$MPSHARD" shard --bogus;         expect_line "mpshard shard: unknown option '--bogus' (see mpshard shard --help)"
expect 2 "$MPSHARD" shard m --layout;      expect_line "mpshard shard: option '--layout' needs a value (see mpshard shard --help)"
expect 2 "$MPSHARD" verify -x d;           expect_line "mpshard verify: unknown option '-x' (see mpshard verify --help)"
expect 2 "$MPSHARD" verify --quiet=1 d;    expect_line "mpshard verify: option '--quiet' takes no value (see mpshard verify --help)"
expect 2 "$MPSHARD" verify --json -qx d;    expect_line "mpshard verify: unknown option '-x' (see mpshard verify --help)"
expect 2 "$MPSHARD" verify --thr;          expect_line "mpshard verify: option '--threads' needs a value (see mpshard verify --help)"
expect 2 "$MPSHARD" export d --format;     expect_line "mpshard export: option '--format' needs a value (see mpshard export --help)"
expect 2 "$MPSHARD" train --ckpt;          expect_line "mpshard train: option '--ckpt' needs a value (see mpshard train --help)"
for c in reshard synth compare inspect init tokens load eval ls extract; do
  expect 2 "$MPSHARD" $c --bogus;          expect_line "mpshard $c: unknown option '--bogus' (see mpshard $c --help)"
done

# a missing input file: exit 3, naming it
expect 3 "$MPSHARD" shard "$T/none/model.safetensors" --layout dp=1 -o "$T/c"
expect_line "mpshard shard: $T/none/model.safetensors: cannot open: No such file or directory"
expect 3 "$MPSHARD" compare "$T/a.bin" "$T/b.bin"; expect_err "a.bin: cannot open"
expect 0 "$MPSHARD" init --config "n_layer=2,n_embd=32,n_head=2,vocab=100,n_positions=16" --layout dp=1 -o "$T/init" -q
TR=(--steps 2 --seq 8 --micro-batch 2 --out "$T/run")
expect 3 "$MPSHARD" train --ckpt "$T/init" --layout dp=1 --data "$T/none.bin" "${TR[@]}"
expect_line "mpshard train: $T/none.bin: cannot open: No such file or directory"

# under mpirun: once per job
if command -v mpirun >/dev/null; then
  export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
  export ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0" # OpenMPI's components leak by design
  ours() { grep -c '^mpshard' "$T/err"; }
  once() { # once WHAT LINE: the job printed LINE, and no other line of ours
    [ "$(ours)" = 1 ] && grep -qxF -e "$2" "$T/err" && ok || bad "$1: not once: $(grep '^mpshard\|mpshard .*mpshard' "$T/err" | head -5)"
  }
  # a usage error every process finds: printed by the first only
  mpirun -np 4 "$MPSHARD" train --ckpt "$T/init" --layout dp=4 --data x --steps 2 >"$T/out" 2>"$T/err"
  once "usage error" "mpshard train: --ckpt, --layout, --data, --steps and --out are required (see mpshard train --help)"
  mpirun -np 2 "$MPSHARD" train --bogus >"$T/out" 2>"$T/err"
  once "unknown option" "mpshard train: unknown option '--bogus' (see mpshard train --help)"
  # an error every process meets while training starts: one line, exit code 3, the job ends cleanly
  mpirun -np 4 "$MPSHARD" train --ckpt "$T/init" --layout dp=4 --data "$T/none.bin" "${TR[@]}" >"$T/out" 2>"$T/err"; rc=$?
  once "missing data" "mpshard train: $T/none.bin: cannot open: No such file or directory"
  [ "$rc" = 3 ] && ok || bad "mpirun train, missing data: exit $rc"
  grep -q MPI_ABORT "$T/err" && bad "a failure of every process aborted the job" || ok
  # reshard into an existing checkpoint: process 0 fails, the others only learn that it did
  expect 0 "$MPSHARD" reshard "$T/init" --layout dp=2 -o "$T/r" -q
  mpirun -np 3 "$MPSHARD" reshard "$T/init" --layout dp=3 -o "$T/r" -q >"$T/out" 2>"$T/err"
  once "reshard" "mpshard reshard: $T/r: a committed checkpoint is already there; pass --force to replace it"
  # a failure of one process only (rank 0 writes the log) while the others train on: it prints it
  expect 0 "$MPSHARD" tokens --count 20000 --vocab 100 -o "$T/tok.bin"
  mpirun -np 2 "$MPSHARD" train --ckpt "$T/init" --layout dp=2 --data "$T/tok.bin" "${TR[@]}" --log "$T/no/log.jsonl" \
    >"$T/out" 2>"$T/err"; rc=$?
  once "one process" "mpshard train: --log $T/no/log.jsonl: No such file or directory"
  [ "$rc" = 4 ] && ok || bad "mpirun train, unwritable log: exit $rc"
else
  bad "mpirun not installed"
fi
finish
