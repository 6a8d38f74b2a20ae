#!/bin/bash
# Bad input and bad options: one clear line naming the thing, the documented exit code, nothing committed.
. "$(dirname "$0")/common.bash"
expect 0 "$MPSHARD" synth --config "$SMALL" --format safetensors -o "$T/m"
M="$T/m/model.safetensors"
expect 2 "$MPSHARD" shard "$M" --layout tp=4 -o "$T/c1";           expect_err "tp=4 must divide the model's n_head=6"
[ ! -e "$T/c1" ] && ok || bad "failed shard left $T/c1"
expect 2 "$MPSHARD" shard "$M" --layout pp=4 -o "$T/c1";           expect_err "pp=4 exceeds the model's n_layer=3"
expect 2 "$MPSHARD" shard "$M" --layout dp=2,foo=1 -o "$T/c1";     expect_err "unknown key 'foo'"
expect 2 "$MPSHARD" shard "$M" -o "$T/c1";                         expect_err "--layout is required"
expect 2 "$MPSHARD" shard "$M" --layout dp=1 -o "$T/c1" --level x; expect_err "--level 'x'"
expect 2 "$MPSHARD" frobnicate;                                    expect_err "unknown command"
expect 0 "$MPSHARD" shard "$M" --layout dp=1 -o "$T/c1" -q
expect 2 "$MPSHARD" shard "$M" --layout dp=2 -o "$T/c1" -q;        expect_err "committed checkpoint.*--force"
expect 0 "$MPSHARD" shard "$M" --layout dp=2 -o "$T/c1" -q --force
grep -q '"dp": 2' "$T/c1/manifest.json" && ok || bad "--force did not replace the checkpoint"
# missing config.json
mkdir -p "$T/noconf"; cp "$M" "$T/noconf/"
expect 2 "$MPSHARD" shard "$T/noconf/model.safetensors" --layout dp=1 -o "$T/c2"
grep -q -- "--config" "$T/err" && ok || bad "missing config.json message lacks --config: $(cat "$T/err")"
# an unsupported config option is named
sed 's/"gelu_new"/"relu"/' "$T/m/config.json" >"$T/relu.json"
"$MPSHARD" shard "$M" --config "$T/relu.json" --layout dp=1 -o "$T/c3" 2>"$T/err"; rc=$?
[ "$rc" = 6 ] && ok || bad "relu config exit $rc"; expect_err "activation_function"
# not a model file
echo "hello" >"$T/junk.bin"
"$MPSHARD" shard "$T/junk.bin" --layout dp=1 -o "$T/c4" 2>"$T/err"; rc=$?
[ "$rc" = 3 ] || [ "$rc" = 2 ] && ok || bad "junk input exit $rc"; expect_err "junk.bin"
# verify and export of something that is not a checkpoint
expect 3 "$MPSHARD" verify "$T/m";                                 expect_err "manifest.json"
expect 3 "$MPSHARD" export "$T/m" --format llmc -o "$T/e";         expect_err "manifest.json"
expect 2 "$MPSHARD" export "$T/c1" --format onnx -o "$T/e";        expect_err "--format 'onnx'"
# --help of every command
for c in shard export verify synth compare; do expect 0 "$MPSHARD" $c --help; done
expect 0 "$MPSHARD" --version
finish
