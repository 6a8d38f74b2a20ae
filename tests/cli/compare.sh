#!/bin/bash
# compare: a checkpoint against a model file; the tolerance mode (--rtol/--atol: the tensors
# outside it, then one summary line with the largest errors); element counts without the padded
# vocab rows a side does not store.
. "$(dirname "$0")/common.bash"
# SMALL: 440160 parameters with the 1024 padded vocab rows, 437856 with the 1000 real ones; 40 tensors
ALL=440160 REAL=437856
expect 0 "$MPSHARD" synth --config "$SMALL" --format safetensors -o "$T/hf" -q
expect 0 "$MPSHARD" shard "$T/hf/model.safetensors" --layout dp=2,tp=2,zero=1 -o "$T/ck" -q
expect 0 "$MPSHARD" export "$T/ck" --format llmc -o "$T/l" -q
line() { # line WANT: stdout is exactly this one line
  [ "$(cat "$T/out")" = "$1" ] && ok || bad "stdout is not '$1': $(head -c 800 "$T/out")"
}

# a checkpoint against a model file, either order: its parameters, the padding where both store it
expect 0 "$MPSHARD" compare "$T/ck" "$T/hf/model.safetensors"
line "identical: the checkpoint's parameters and the model file's tensors, bit for bit (40 tensors, $REAL elements)"
expect 0 "$MPSHARD" compare "$T/hf" "$T/ck"
line "identical: the checkpoint's parameters and the model file's tensors, bit for bit (40 tensors, $REAL elements)"
expect 0 "$MPSHARD" compare "$T/ck" "$T/l/model_00000000.bin"
line "identical: the checkpoint's parameters and the model file's tensors, bit for bit (40 tensors, $ALL elements)"
expect 2 "$MPSHARD" compare "$T/ck" "$T/l"
expect_err "^mpshard compare: $T/l is neither a checkpoint nor a safetensors model directory; to compare its llm.c model file, name it: $T/l/model_00000000.bin$"
# two safetensors files store no padding: it is not counted
expect 0 "$MPSHARD" export "$T/ck" --format safetensors -o "$T/ex" -q
expect 0 "$MPSHARD" compare "$T/hf" "$T/ex"
line "identical: every tensor of the two model files, bit for bit (40 tensors, $REAL elements)"
expect 0 "$MPSHARD" compare "$T/ck" "$T/ck"
line "identical: every stored state kind of every tensor, bit for bit (120 tensors, $((3 * ALL)) elements)"

# values that agree to bf16's rounding: bit for bit they differ in (nearly) every tensor...
expect 0 "$MPSHARD" export "$T/ck" --format safetensors --dtype bf16 -o "$T/bf" -q
expect 1 "$MPSHARD" compare "$T/bf" "$T/hf"
[ "$(wc -l <"$T/out")" = 22 ] && ok || bad "bit-for-bit compare printed $(wc -l <"$T/out") lines, wanted 20 + 2"
grep -q "^\.\.\. [0-9]* more lines$" "$T/out" && ok || bad "no '... more lines': $(tail -3 "$T/out")"
tail -1 "$T/out" | grep -qE "^differ: (39|40) of 40 tensors, [0-9]+ of $REAL elements \(max abs diff" && ok || bad "summary: $(tail -1 "$T/out")"
# ... and within a relative 2^-8 (bf16 keeps 8 significant bits): one line, the largest errors
expect 0 "$MPSHARD" compare "$T/bf" "$T/hf" --rtol 0.004
[ "$(wc -l <"$T/out")" = 1 ] && ok || bad "tolerance mode printed $(wc -l <"$T/out") lines: $(head -3 "$T/out")"
sum=$(cat "$T/out")
re="^within tolerance \(rtol 0.004, atol 0\): 0 of 40 tensors, 0 of $REAL elements outside; max abs error ([0-9.e-]+) \(([a-z0-9.]+) \(param\)\), max rel error ([0-9.e-]+) \(([a-z0-9.]+) \(param\)\)$"
if [[ $sum =~ $re ]]; then
  ok
  awk -v a="${BASH_REMATCH[1]}" -v r="${BASH_REMATCH[3]}" 'BEGIN { exit !(a > 1e-4 && a < 0.01 && r > 0.003 && r <= 0.00390625) }' &&
    ok || bad "max errors out of bf16's range: $sum"
else
  bad "tolerance summary: $sum"
fi
# a tolerance too tight: the tensors outside it (with their errors), then the summary; exit 1
expect 1 "$MPSHARD" compare "$T/bf" "$T/hf" --rtol 1e-3 --atol 1e-4
grep -qE "^lnfw \(param\): max abs error [0-9.e-]+, max rel error [0-9.e-]+; [0-9]+ of 96 elements outside tolerance$" "$T/out" &&
  ok || bad "no lnfw line: $(head -3 "$T/out")"
tail -1 "$T/out" | grep -qE "^outside tolerance \(rtol 0.001, atol 0.0001\): [0-9]+ of 40 tensors, [0-9]+ of $REAL elements outside; max abs error" &&
  ok || bad "summary: $(tail -1 "$T/out")"
# two checkpoints of different layouts, the same way; --per-tensor: a line for every tensor too
expect 0 "$MPSHARD" shard "$T/bf/model.safetensors" --layout pp=3,tp=2 -o "$T/ckbf" -q
expect 0 "$MPSHARD" compare "$T/ckbf" "$T/ck" --atol 1e-7 --rtol 0.004
grep -qE "^within tolerance \(rtol 0.004, atol 1e-07\): 0 of 120 tensors, 0 of $((3 * ALL)) elements outside; max abs error .* \(param\)\), max rel error .* \(param\)\)$" "$T/out" &&
  ok || bad "checkpoints within tolerance: $(cat "$T/out")"
expect 0 "$MPSHARD" compare "$T/ckbf" "$T/ck" --rtol 0.004 --per-tensor
[ "$(wc -l <"$T/out")" = 121 ] && ok || bad "--per-tensor: $(wc -l <"$T/out") lines"
grep -qE "^h.2.fcw \(adam_m\): max abs error 0, max rel error 0; 0 of 36864 elements outside tolerance$" "$T/out" && ok ||
  bad "--per-tensor line of h.2.fcw adam_m: $(grep 'h.2.fcw (adam_m)' "$T/out")"
# a Llama model with its own head: the head's padded rows count as the embedding's do (2 x 6 rows of 64)
LC="arch=llama,n_layer=2,n_embd=64,n_head=4,n_kv_head=2,ffn=160,vocab=250,n_positions=32,tied=0"
expect 0 "$MPSHARD" synth --config "$LC" --format safetensors -o "$T/ll" -q
expect 0 "$MPSHARD" shard "$T/ll" --layout tp=2,pp=2 -o "$T/llck" -q
expect 0 "$MPSHARD" ls "$T/llck" --json --kind param
all=$(jq '[.pieces[].bytes] | add / 4' "$T/out")
expect 0 "$MPSHARD" compare "$T/llck" "$T/ll"
line "identical: the checkpoint's parameters and the model file's tensors, bit for bit (21 tensors, $((all - 2 * 6 * 64)) elements)"
# a model saved in parts with an index: its directory is a model file too
expect 0 "$MPSHARD" synth --config "$SMALL" --format safetensors --max-shard-size 600KB -o "$T/parts" -q
[ -e "$T/parts/model.safetensors.index.json" ] && ok || bad "no index: $(ls "$T/parts")"
expect 0 "$MPSHARD" compare "$T/ck" "$T/parts"
line "identical: the checkpoint's parameters and the model file's tensors, bit for bit (40 tensors, $REAL elements)"
expect 2 "$MPSHARD" compare "$T/ck" "$T/hf" --rtol x; expect_err "^mpshard compare: --rtol 'x': expected a number >= 0"
finish
