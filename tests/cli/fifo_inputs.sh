#!/bin/bash
# FIFOs where inputs are expected (issue 22): RUNDIR/latest, train --data and --val-data, eval
# --data, shard --state. Every command refuses at once with one line naming the path and the
# documented exit code (3 for a run directory's latest: the run directory is damaged; 2 for a
# path named on the command line), instead of blocking in open() forever. Each command runs under
# `timeout`: a hang is exit 124.
. "$(dirname "$0")/common.bash"
export OMP_NUM_THREADS=1
CFG="n_layer=1,n_embd=32,n_head=2,vocab=256,n_positions=16"
expect 0 "$MPSHARD" init --config "$CFG" --layout dp=1 -o "$T/init" -q
expect 0 "$MPSHARD" tokens --count 5000 --vocab 256 -o "$T/tok.bin"
mkdir "$T/run" && mkfifo "$T/run/latest" "$T/fifo.bin"
TR=(--layout dp=1 --steps 1 --global-batch 2 --micro-batch 2 --seq 8 -q)

# RUNDIR/latest a FIFO: every command that reads a checkpoint
for cmd in "verify $T/run -q" "inspect $T/run" "export $T/run --format llmc -o $T/ex -q" "compare $T/run $T/init" \
           "load $T/run --layout dp=1" "reshard $T/run --layout dp=1 -o $T/rs -q" \
           "train --ckpt $T/run --data $T/tok.bin --out $T/out1 ${TR[*]}" "eval --ckpt $T/run --data $T/tok.bin"; do
  # shellcheck disable=SC2086
  expect 3 timeout 60 "$MPSHARD" $cmd
  expect_err "run/latest: not a regular file"
done
[ ! -e "$T/ex/model_00000000.bin" ] && [ ! -e "$T/rs" ] && [ ! -e "$T/out1" ] && ok || bad "a refused reader wrote output"

# FIFOs given as data files and optimizer-state files
expect 2 timeout 60 "$MPSHARD" train --ckpt "$T/init" --data "$T/fifo.bin" --out "$T/out2" "${TR[@]}"
expect_err "fifo.bin: not a regular file"
expect 2 timeout 60 "$MPSHARD" train --ckpt "$T/init" --data "$T/tok.bin" --val-data "$T/fifo.bin" --out "$T/out3" "${TR[@]}"
expect_err "fifo.bin: not a regular file"
expect 2 timeout 60 "$MPSHARD" eval --ckpt "$T/init" --data "$T/fifo.bin" --seq 8 --micro-batch 2
expect_err "fifo.bin: not a regular file"
expect 0 "$MPSHARD" synth --config "$CFG" --format llmc -o "$T/ll"
expect 2 timeout 60 "$MPSHARD" shard "$T/ll/model_00000000.bin" --state "$T/fifo.bin" --layout dp=1 -o "$T/c" -q
expect_err "fifo.bin: not a regular file"
[ ! -e "$T/out2" ] && [ ! -e "$T/out3" ] && [ ! -e "$T/c" ] && [ ! -e "$T/c.lock" ] && ok || bad "a refused command wrote output"
finish
