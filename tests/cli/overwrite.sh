#!/bin/bash
# Writers of single files (export, synth, tokens) never replace an existing output without
# --force: exit 2, one line naming the path and --force, every file byte for byte as before.
# And export writes config.json back byte for byte as it was imported.
. "$(dirname "$0")/common.bash"
sums() { (cd "$1" && sha256sum * 2>/dev/null); }
untouched() { # untouched WHAT DIR SUMS_BEFORE
  [ "$(sums "$2")" = "$3" ] && ok || bad "$1: $2 changed: $(ls -l "$2")"
}

expect 0 "$MPSHARD" synth --config "$SMALL" --format safetensors -o "$T/hub" -q
# an original config.json: numbers a JSON round trip rewrites (0.1 -> 0.10000000000000001), its own
# spacing, key order and a trailing newline
cat >"$T/hub/config.json" <<'JSON'
{"model_type": "gpt2",   "n_layer": 3, "n_embd": 96, "n_head": 6, "vocab_size": 1000,
  "n_positions": 64, "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1,
  "layer_norm_epsilon": 1e-05, "initializer_range": 0.02, "activation_function": "gelu_new",
  "architectures": ["GPT2LMHeadModel"], "note": "caf\u00e9 \"quoted\""}
JSON
expect 0 "$MPSHARD" shard "$T/hub/model.safetensors" --layout dp=2,tp=2 -o "$T/ck" -q

# export into a copy of the model it came from: refused, the copy untouched
cp -r "$T/hub" "$T/hubcopy"
before=$(sums "$T/hubcopy")
expect 2 "$MPSHARD" export "$T/ck" --format safetensors -o "$T/hubcopy" -q
expect_err "^mpshard export: $T/hubcopy/model.safetensors: already exists; pass --force to replace it$"
untouched "export safetensors" "$T/hubcopy" "$before"
# config.json alone is an output too
mkdir "$T/conf"; cp "$T/hub/config.json" "$T/conf/"; before=$(sums "$T/conf")
expect 2 "$MPSHARD" export "$T/ck" --format safetensors -o "$T/conf" -q; expect_err "conf/config.json: already exists; pass --force"
untouched "export, config.json" "$T/conf" "$before"
[ "$(ls "$T/conf")" = config.json ] && ok || bad "refused export left files: $(ls "$T/conf")"
# --force replaces it, and config.json comes back byte for byte as imported
expect 0 "$MPSHARD" export "$T/ck" --format safetensors -o "$T/hubcopy" -q --force
cmp -s "$T/hub/config.json" "$T/hubcopy/config.json" && ok || bad "config.json not written back byte for byte: $(diff "$T/hub/config.json" "$T/hubcopy/config.json" | head -5)"
expect 0 "$MPSHARD" compare "$T/hub/model.safetensors" "$T/hubcopy/model.safetensors"
expect 0 "$MPSHARD" export "$T/ck" --format safetensors -o "$T/fresh" -q
cmp -s "$T/hub/config.json" "$T/fresh/config.json" && ok || bad "config.json of a fresh export differs"

# llm.c: the model file, and with --processes DONE and the step's state files
expect 0 "$MPSHARD" export "$T/ck" --format llmc -o "$T/l" -q
before=$(sums "$T/l")
expect 2 "$MPSHARD" export "$T/ck" --format llmc -o "$T/l" -q; expect_err "l/model_00000000.bin: already exists; pass --force"
untouched "export llmc" "$T/l" "$before"
mkdir "$T/st"; echo x >"$T/st/DONE_00000000"; before=$(sums "$T/st")
expect 2 "$MPSHARD" export "$T/ck" --format llmc --processes 2 -o "$T/st" -q; expect_err "st/DONE_00000000: already exists; pass --force"
untouched "export --processes, DONE" "$T/st" "$before"
rm "$T/st/DONE_00000000"; echo x >"$T/st/state_00000000_00002.bin"; before=$(sums "$T/st")
expect 2 "$MPSHARD" export "$T/ck" --format llmc --processes 2 -o "$T/st" -q; expect_err "st/state_00000000_00002.bin: already exists; pass --force"
untouched "export --processes, another rank's state file" "$T/st" "$before"
expect 0 "$MPSHARD" export "$T/ck" --format llmc --processes 2 -o "$T/st" -q --force
[ "$(ls "$T/st" | tr '\n' ' ')" = "DONE_00000000 model_00000000.bin state_00000000_00000.bin state_00000000_00001.bin " ] && ok ||
  bad "export --processes --force left: $(ls "$T/st")"

# synth: both formats
before=$(sums "$T/hub")
expect 2 "$MPSHARD" synth --config "$SMALL" --format safetensors --seed 2 -o "$T/hub" -q
expect_err "^mpshard synth: $T/hub/model.safetensors: already exists; pass --force to replace it$"
untouched "synth safetensors" "$T/hub" "$before"
before=$(sums "$T/l")
expect 2 "$MPSHARD" synth --config "$SMALL" --format llmc --seed 2 -o "$T/l" -q; expect_err "l/model_00000000.bin: already exists"
untouched "synth llmc" "$T/l" "$before"
expect 0 "$MPSHARD" synth --config "$SMALL" --format llmc --seed 2 -o "$T/l" -q --force
[ "$(sums "$T/l")" != "$before" ] && ok || bad "synth --force did not replace the model"

# a model in parts and an index (--max-shard-size): each of them is an output
expect 0 "$MPSHARD" synth --config "$SMALL" --format safetensors --max-shard-size 600KB -o "$T/parts" -q
rm "$T/parts/config.json" "$T/parts/model.safetensors.index.json"; before=$(sums "$T/parts")
expect 2 "$MPSHARD" export "$T/ck" --format safetensors --max-shard-size 600KB -o "$T/parts" -q
expect_err "parts/model-0000[0-9]-of-0000[0-9].safetensors: already exists; pass --force"
untouched "export in parts" "$T/parts" "$before"
expect 0 "$MPSHARD" export "$T/ck" --format safetensors --max-shard-size 600KB -o "$T/parts" -q --force
cmp -s "$T/hub/config.json" "$T/parts/config.json" && ok || bad "config.json of an export in parts differs"

# tokens
expect 0 "$MPSHARD" tokens --count 1000 --vocab 100 -o "$T/tok.bin"
before=$(sha256sum <"$T/tok.bin")
expect 2 "$MPSHARD" tokens --count 2000 --vocab 100 -o "$T/tok.bin"
expect_err "^mpshard tokens: $T/tok.bin: already exists; pass --force to replace it$"
[ "$(sha256sum <"$T/tok.bin")" = "$before" ] && ok || bad "tokens replaced a file without --force"
expect 0 "$MPSHARD" tokens --count 2000 --vocab 100 -o "$T/tok.bin" --force
[ "$(stat -c %s "$T/tok.bin")" = $((1024 + 2 * 2000)) ] && ok || bad "tokens --force: size $(stat -c %s "$T/tok.bin")"
finish
