#!/bin/bash
# Corrupt input: a flipped byte in a chunk or in the manifest, a truncated or empty file, a missing
# rank file, a file or manifest from another checkpoint, files of another model. Every reader
# (verify, export, reshard, load, inspect DIR, compare) fails with exit 3 and a message naming the
# file (and the tensor, for chunk data); nothing is committed; the good checkpoint still reads.
. "$(dirname "$0")/common.bash"
LAYOUT=dp=2,tp=2,pp=2,zero=1
expect 0 "$MPSHARD" synth --config "$SMALL" --format safetensors --seed 5 -o "$T/m"
expect 0 "$MPSHARD" synth --config "n_layer=2,n_embd=64,n_head=4,vocab=1000,n_positions=64" --format llmc -o "$T/other"
# the reference, an identical second checkpoint (same file sizes, another id), another model's
expect 0 "$MPSHARD" shard "$T/m/model.safetensors" --layout $LAYOUT -o "$T/ref" -q
expect 0 "$MPSHARD" shard "$T/m/model.safetensors" --layout $LAYOUT -o "$T/twin" -q
expect 0 "$MPSHARD" shard "$T/other/model_00000000.bin" --layout $LAYOUT -o "$T/om" -q
cmp -s "$T/ref/rank-00003.h5" "$T/twin/rank-00003.h5" && bad "twin checkpoint files are byte-identical" || ok
[ "$(stat -c %s "$T/ref/rank-00003.h5")" = "$(stat -c %s "$T/twin/rank-00003.h5")" ] && ok || bad "twin sizes differ"

# readers CASE FILE_PATTERN [TENSOR_PATTERN] [skip-inspect]: every reader of the damaged copy $T/x
readers() {
  local case=$1 pat=$2 tensor=${3:-} skip=${4:-}
  run_reader "$case" "$pat" "$tensor" verify "$MPSHARD" verify "$T/x" -q
  run_reader "$case" "$pat" "$tensor" export "$MPSHARD" export "$T/x" --format llmc -o "$T/ex" -q
  [ ! -e "$T/ex/model_00000000.bin" ] && [ -z "$(ls -A "$T/ex" 2>/dev/null)" ] && ok || bad "$case: export left $(ls "$T/ex")"
  run_reader "$case" "$pat" "$tensor" reshard "$MPSHARD" reshard "$T/x" --layout tp=2,dp=3 -o "$T/rs" -q
  [ ! -e "$T/rs" ] && [ ! -e "$T/rs.partial" ] && [ ! -e "$T/rs.lock" ] && ok || bad "$case: reshard left output"
  run_reader "$case" "$pat" "$tensor" load "$MPSHARD" load "$T/x" --layout dp=1 --rank 0
  [ "$skip" = skip-inspect ] || run_reader "$case" "$pat" "" inspect "$MPSHARD" inspect "$T/x"
  if [ "${COMPARE_DIFFERS:-}" ]; then # the manifests already differ in the model: that is the answer
    expect 1 "$MPSHARD" compare "$T/ref" "$T/x"
    grep -q "models differ" "$T/out" && ok || bad "$case: compare: $(cat "$T/out")"
  else
    run_reader "$case" "$pat" "$tensor" compare "$MPSHARD" compare "$T/ref" "$T/x"
  fi
  rm -rf "$T/ex" "$T/rs"
}
run_reader() {
  local case=$1 pat=$2 tensor=$3 name=$4; shift 4
  "$@" >"$T/out" 2>"$T/err"; local rc=$?
  if [ "$rc" != 3 ]; then bad "$case: $name exit $rc (wanted 3): $(head -c 300 "$T/err")"; return; fi
  grep -q -e "$pat" "$T/err" && ok || bad "$case: $name message does not name $pat: $(head -c 300 "$T/err")"
  [ -z "$tensor" ] || { grep -q -e "$tensor" "$T/err" && ok || bad "$case: $name message lacks tensor: $(head -c 300 "$T/err")"; }
  grep -q "^mpshard $name: " "$T/err" && ok || bad "$case: $name message not prefixed"
}
fresh() { rm -rf "$T/x" "$T/ex" "$T/rs"; cp -r "$T/ref" "$T/x"; }
F=rank-00005.h5

# 1. a flipped byte in chunk data. Adam moments are zeros (they compress to almost nothing), so the
#    middle of the file is parameter data, which every reader reads.
fresh; sz=$(stat -c %s "$T/x/$F"); off=$((sz / 2))
orig=$(od -An -tu1 -j $off -N1 "$T/x/$F" | tr -d ' ')
printf "\\$(printf %03o $(( (orig ^ 0x10) & 255 )))" | dd of="$T/x/$F" bs=1 seek=$off conv=notrunc 2>/dev/null
cmp -s "$T/x/$F" "$T/ref/$F" && bad "byte not flipped" || ok
readers "flipped chunk byte" "$F" "tensor h[0-9]*\.\|tensor w[tp]e\|tensor ln" skip-inspect
# inspect reads no chunk data: it still describes the checkpoint (verify is the integrity check)
expect 0 "$MPSHARD" inspect "$T/x"

# 2. a flipped byte in the manifest (a digit of the step), an empty and a truncated manifest
fresh; sed -i 's/"step": 0/"step": 1/' "$T/x/manifest.json"
readers "flipped manifest byte" "manifest.json.*checksum mismatch"
fresh; : >"$T/x/manifest.json"
readers "empty manifest" "manifest.json"
fresh; head -c 700 "$T/ref/manifest.json" >"$T/x/manifest.json"
readers "truncated manifest" "manifest.json"

# 3. a truncated, an empty and a missing rank file
fresh; truncate -s $(( $(stat -c %s "$T/x/$F") / 3 )) "$T/x/$F"
readers "truncated rank file" "$F.*truncated"
fresh; : >"$T/x/$F"
readers "empty rank file" "$F"
fresh; rm "$T/x/$F"
readers "missing rank file" "$F.*missing"

# 4. a rank file of another checkpoint (same size), the manifest of another checkpoint
fresh; cp "$T/twin/$F" "$T/x/$F"
readers "file of another checkpoint" "$F.*another checkpoint"
fresh; cp "$T/twin/manifest.json" "$T/x/manifest.json"
readers "manifest of another checkpoint" "rank-0000[0-7].h5.*another checkpoint"

# 5. another model: one of its rank files, its manifest; compare of two models says they differ
fresh; cp "$T/om/$F" "$T/x/$F"
readers "file of another model" "$F"
fresh; cp "$T/om/manifest.json" "$T/x/manifest.json"
COMPARE_DIFFERS=1 readers "manifest of another model" "rank-0000[0-7].h5"
expect 1 "$MPSHARD" compare "$T/ref" "$T/om"
grep -q "models differ" "$T/out" && ok || bad "compare of two models: $(cat "$T/out")"

# 6. a stale staging directory is not a checkpoint: readers refuse it, naming manifest.json
rm -rf "$T/x"; mkdir "$T/x"; cp "$T/ref/"rank-*.h5 "$T/x/"
readers "no manifest" "manifest.json.*not a committed"

# the reference is untouched and still reads
expect 0 "$MPSHARD" verify "$T/ref" -q
expect 0 "$MPSHARD" compare "$T/ref" "$T/twin"
finish
