#!/bin/bash
# llm.c optimizer state: export with N processes -> shard --state into another layout -> export
# with another N -> ... -> back to the first N gives the same files byte for byte (model, every
# state file, DONE), for f32 and bf16 models, ZeRO-1 and whole-copy files; and the refusals
# (missing rank, mixed steps, truncated file, a process count that does not divide a tensor).
. "$(dirname "$0")/common.bash"
CFG="n_layer=2,n_embd=48,n_head=4,vocab=250,n_positions=32"
S0=state_00000000
same_files() { # same_files DIR_A DIR_B: the same file names and bytes
  local a=$1 b=$2 f
  [ "$(cd "$a" && ls)" = "$(cd "$b" && ls)" ] && ok || bad "$a and $b hold different files: $(ls "$a") / $(ls "$b")"
  for f in "$a"/*; do cmp -s "$f" "$b/$(basename "$f")" && ok || bad "$b/$(basename "$f") differs from $f"; done
}
for dtype in f32 bf16; do
  d="$T/$dtype"; mkdir -p "$d"
  expect 0 "$MPSHARD" synth --config "$CFG" --format llmc --dtype "$dtype" --seed 3 -o "$d/src"
  expect 0 "$MPSHARD" shard "$d/src/model_00000000.bin" --layout dp=2 --synthetic-optimizer 7 -o "$d/ck0" -q
  expect 0 "$MPSHARD" export "$d/ck0" --format llmc --processes 2 -o "$d/e2" -q
  [ "$(cd "$d/e2" && ls | tr '\n' ' ')" = "DONE_00000000 model_00000000.bin ${S0}_00000.bin ${S0}_00001.bin " ] && ok ||
    bad "export --processes 2 wrote: $(ls "$d/e2")"
  [ -s "$d/e2/DONE_00000000" ] && bad "DONE is not empty" || ok
  # header: magic, version, num_processes, rank, use_master_weights=1, should_shuffle=0
  [ "$(od -An -t d4 -N 24 "$d/e2/${S0}_00001.bin" | tr -s ' \n' ' ')" = " 20240527 1 2 1 1 0 " ] && ok ||
    bad "state header: $(od -An -t d4 -N 24 "$d/e2/${S0}_00001.bin")"
  # ZeRO-1: m, v, master of 70464/2 parameters each
  [ "$(stat -c %s "$d/e2/${S0}_00000.bin")" = $((1024 + 3 * 4 * 35232)) ] && ok || bad "state file size"
  # 2 -> dp=2,tp=2,zero=1 (pattern form) -> 3 -> pp=2,tp=2,dp=2,zero=2 (one --state per file) -> 2
  expect 0 "$MPSHARD" shard "$d/e2/model_00000000.bin" --state "$d/e2/${S0}_*.bin" --layout dp=2,tp=2,zero=1 -o "$d/ck1" -q
  # the llm.c record (FORMAT.md): what export without one writes, rng_state 13371337 + rank, no sample drawn yet
  tr -d ' \n' <"$d/ck1/manifest.json" | grep -q '"train":{"llmc":{"num_processes":2,"zero_stage":1,"use_master_weights":1,"should_shuffle":0,"ranks":\[{"rng_state":"13371337","rng_state_last_update":"13371337","current_shard_idx":"0","current_sample_idx":"18446744073709551615"},{"rng_state":"13371338",' &&
    ok || bad "manifest lacks the llmc record: $(tr -d ' \n' <"$d/ck1/manifest.json" | grep -o '"train".*' | head -c 400)"
  grep -q '"master": "f32"' "$d/ck1/manifest.json" && ok || bad "no master kind in $d/ck1"
  expect 0 "$MPSHARD" verify "$d/ck1" -q
  expect 0 "$MPSHARD" export "$d/ck1" --format llmc --processes 3 -o "$d/e3" -q
  expect 0 "$MPSHARD" shard "$d/e3/model_00000000.bin" --state "$d/e3/${S0}_00002.bin" --state "$d/e3/${S0}_00000.bin" \
    --state "$d/e3/${S0}_00001.bin" --layout pp=2,tp=2,dp=2,zero=2 -o "$d/ck2" -q
  expect 0 "$MPSHARD" compare "$d/ck1" "$d/ck2"
  expect 0 "$MPSHARD" export "$d/ck2" --format llmc --processes 2 -o "$d/e2b" -q
  same_files "$d/e2" "$d/e2b"
  # whole copies (--zero 0) with a process count that ZeRO-1 cannot use, and back
  expect 2 "$MPSHARD" export "$d/ck2" --format llmc --processes 5 -o "$d/e5" -q
  expect_err "tensor wte: 12288 elements per layer do not divide by 5 processes"
  [ -e "$d/e5" ] && bad "a refused export left $d/e5" || ok
  expect 0 "$MPSHARD" export "$d/ck2" --format llmc --processes 5 --zero 0 -o "$d/e5" -q
  [ "$(stat -c %s "$d/e5/${S0}_00004.bin")" = $((1024 + 3 * 4 * 70464)) ] && ok || bad "whole-copy state file size"
  expect 0 "$MPSHARD" shard "$d/e5/model_00000000.bin" --state "$d/e5/${S0}_0000*.bin" --layout tp=4 -o "$d/ck5" -q
  expect 0 "$MPSHARD" compare "$d/ck1" "$d/ck5"
  expect 0 "$MPSHARD" export "$d/ck5" --format llmc --processes 2 -o "$d/e2c" -q
  same_files "$d/e2" "$d/e2c"
done

d="$T/f32"
# a re-export with fewer processes into the same directory leaves no state file of another rank count
expect 0 "$MPSHARD" export "$d/ck2" --format llmc --processes 3 -o "$d/x" -q
expect 0 "$MPSHARD" export "$d/ck2" --format llmc --processes 2 -o "$d/x" -q --force
same_files "$d/e2" "$d/x"
# without master weights (llm.c -w 0): m and v only
expect 0 "$MPSHARD" export "$d/ck2" --format llmc --processes 2 --master-weights 0 -o "$d/w0" -q
[ "$(stat -c %s "$d/w0/${S0}_00000.bin")" = $((1024 + 2 * 4 * 35232)) ] && ok || bad "-w 0 state file size"
cmp -s -n $((8 * 35232)) <(tail -c +1025 "$d/w0/${S0}_00001.bin") <(tail -c +1025 "$d/e2/${S0}_00001.bin") &&
  ok || bad "m and v differ between --master-weights 0 and 1"

# refusals, each naming the file
E="$d/e2"
expect 3 "$MPSHARD" shard "$E/model_00000000.bin" --state "$E/${S0}_00001.bin" --layout dp=2 -o "$T/bad" -q
expect_err "${S0}_00001.bin: header num_processes=2 but 1 state file was given"
mkdir -p "$T/s7"; cp "$E/${S0}_00000.bin" "$E/${S0}_00001.bin" "$T/s7/"
printf '\007' | dd of="$T/s7/${S0}_00001.bin" bs=1 seek=40 conv=notrunc status=none   # header[10] = step 7
expect 3 "$MPSHARD" shard "$E/model_00000000.bin" --state "$T/s7/${S0}_*.bin" --layout dp=2 -o "$T/bad" -q
expect_err "s7/${S0}_00001.bin: header step=7 but .*${S0}_00000.bin has step=0"
mkdir -p "$T/tr"; cp "$E/${S0}_00000.bin" "$T/tr/"; head -c -4 "$E/${S0}_00001.bin" >"$T/tr/${S0}_00001.bin"
expect 3 "$MPSHARD" shard "$E/model_00000000.bin" --state "$T/tr/${S0}_*.bin" --layout dp=2 -o "$T/bad" -q
expect_err "tr/${S0}_00001.bin: file is 423804 bytes but its header"
cp "$E/model_00000000.bin" "$T/tr/model_00000009.bin"
expect 3 "$MPSHARD" shard "$T/tr/model_00000009.bin" --state "$E/${S0}_*.bin" --layout dp=2 -o "$T/bad" -q
expect_err "${S0}_0000[01].bin: header step=0 but the model file is of step 9"
expect 2 "$MPSHARD" shard "$E/model_00000000.bin" --state "$T/none_*.bin" --layout dp=2 -o "$T/bad"
expect_err "matches no file"
[ -e "$T/bad" ] && bad "a refused shard left $T/bad" || ok
finish
