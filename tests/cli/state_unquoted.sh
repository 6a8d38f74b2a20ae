#!/bin/bash
# shard --state with an unquoted pattern: the shell expands it into several arguments (the first
# is --state's value, the rest operands before or after INPUT); they are taken as the quoted pattern.
. "$(dirname "$0")/common.bash"
CFG="n_layer=2,n_embd=48,n_head=4,vocab=250,n_positions=32"
expect 0 "$MPSHARD" synth --config "$CFG" --format llmc -o "$T/src" -q
expect 0 "$MPSHARD" shard "$T/src/model_00000000.bin" --layout dp=2 --synthetic-optimizer 7 -o "$T/ck0" -q
expect 0 "$MPSHARD" export "$T/ck0" --format llmc --processes 3 -o "$T/e" -q
E="$T/e"
expect 0 "$MPSHARD" shard "$E/model_00000000.bin" --state "$E/state_00000000_*.bin" --layout tp=2 -o "$T/quoted" -q
# unquoted, after INPUT and before it
expect 0 "$MPSHARD" shard "$E/model_00000000.bin" --state $E/state_00000000_*.bin --layout tp=2 -o "$T/after" -q
expect 0 "$MPSHARD" compare "$T/after" "$T/quoted"
expect 0 "$MPSHARD" shard --state $E/state_00000000_*.bin "$E/model_00000000.bin" --layout tp=2 -o "$T/before" -q
expect 0 "$MPSHARD" compare "$T/before" "$T/quoted"
grep -q '"num_processes": 3' "$T/before/manifest.json" && ok || bad "the llm.c record does not list 3 processes"
# a second operand that is no state file is still an error, naming it
expect 2 "$MPSHARD" shard "$E/model_00000000.bin" --state $E/state_00000000_*.bin "$T/other.bin" --layout tp=2 -o "$T/x"
expect_err "^mpshard shard: expected one INPUT file, and '$T/other.bin' is a second one \(see mpshard shard --help\)$"
# state files without --state are not taken for it
expect 2 "$MPSHARD" shard "$E/model_00000000.bin" "$E/state_00000000_00000.bin" --layout tp=2 -o "$T/x"
expect_err "is a second one"
[ ! -e "$T/x" ] && ok || bad "a refused shard wrote $T/x"
finish
