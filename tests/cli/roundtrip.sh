#!/bin/bash
# shard -> verify -> export is bit-exact, for both input formats, both dtypes, many layouts
# (odd sizes: n_embd 96, n_head 6, vocab 1000 padded to 1024, 3 layers), into both output formats.
. "$(dirname "$0")/common.bash"
LAYOUTS="dp=1 dp=2,tp=3,pp=3,zero=3 dp=3,pp=2,tp=2,zero=1 tp=6,dp=2,zero=2 dp=4,zero=3 pp=2,stages=1:2,tp=2"
for fmt in safetensors llmc; do
  for dtype in f32 bf16; do
    src="$T/src-$fmt-$dtype"
    expect 0 "$MPSHARD" synth --config "$SMALL" --format "$fmt" --dtype "$dtype" --seed 3 -o "$src"
    input=$(ls "$src"/model*.* | head -1)
    for layout in $LAYOUTS; do
      ck="$T/ck"; rm -rf "$ck"
      expect 0 "$MPSHARD" shard "$input" --layout "$layout" -o "$ck" -q
      expect 0 "$MPSHARD" verify "$ck" -q
      for out in safetensors llmc; do
        rm -rf "$T/ex"
        expect 0 "$MPSHARD" export "$ck" --format "$out" -o "$T/ex" -q
        expect 0 "$MPSHARD" compare "$input" "$(ls "$T"/ex/model*.* | head -1)"
        [ "$out" = safetensors ] && { [ -f "$T/ex/config.json" ] && ok || bad "no config.json"; }
      done
    done
    # the exported file of the same format and dtype is the same bytes as the input tensors:
    # re-exporting the export gives an identical file
    rm -rf "$T/ck" "$T/ex" "$T/ex2"
    expect 0 "$MPSHARD" shard "$input" --layout dp=2,tp=2 -o "$T/ck" -q
    expect 0 "$MPSHARD" export "$T/ck" --format "$fmt" -o "$T/ex" -q
    if [ "$fmt" = llmc ]; then
      cmp -s "$input" "$T/ex/model_00000000.bin" && ok || bad "llm.c export differs byte for byte from its input ($dtype)"
    else
      expect 0 "$MPSHARD" shard "$T/ex/model.safetensors" --layout tp=3 -o "$T/ck2" -q
      expect 0 "$MPSHARD" export "$T/ck2" --format safetensors -o "$T/ex2" -q
      cmp -s "$T/ex/model.safetensors" "$T/ex2/model.safetensors" && ok || bad "safetensors export is not stable"
      rm -rf "$T/ck2"
    fi
  done
done
# a small export memory budget streams in bands and gives the same bytes
rm -rf "$T/ck" "$T/ex" "$T/ex2"
expect 0 "$MPSHARD" shard "$T/src-safetensors-f32/model.safetensors" --layout dp=2,tp=3,zero=3 -o "$T/ck" -q
expect 0 "$MPSHARD" export "$T/ck" --format safetensors -o "$T/ex" -q
expect 0 "$MPSHARD" export "$T/ck" --format safetensors -o "$T/ex2" -q --memory-mb 1 --threads 3
cmp -s "$T/ex/model.safetensors" "$T/ex2/model.safetensors" && ok || bad "banded export differs"
# Conv1D matrices larger than the 4 MiB read band of a transposed read (fc: 768 x 3072 f32 = 9.4 MB),
# any number of reader threads, with the phase timeline on: the same checkpoint, bit for bit
rm -rf "$T/ck" "$T/ck2" "$T/ex" "$T/wide"
expect 0 "$MPSHARD" synth --config n_layer=1,n_embd=768,n_head=12,vocab=300,n_positions=32 --format safetensors \
  --seed 5 -o "$T/wide"
expect 0 "$MPSHARD" shard "$T/wide/model.safetensors" --layout dp=2,tp=2,zero=1 -o "$T/ck" -q --readers 1
expect 0 "$MPSHARD" export "$T/ck" --format safetensors -o "$T/ex" -q
expect 0 "$MPSHARD" compare "$T/wide/model.safetensors" "$T/ex/model.safetensors"
MPS_TRACE=1 MPS_TRACE_TENSORS="$T/tensors.tsv" "$MPSHARD" shard "$T/wide/model.safetensors" --layout dp=2,tp=2,zero=1 \
  -o "$T/ck2" -q --readers 5 --threads 3 2>"$T/trace" && ok || bad "shard with MPS_TRACE=1 failed: $(tail -3 "$T/trace")"
expect 0 "$MPSHARD" compare "$T/ck" "$T/ck2"
grep -q "committed" "$T/trace" && grep -q "^trace: reader 4:" "$T/trace" && grep -q "^trace: worker 2:" "$T/trace" \
  && ok || bad "MPS_TRACE=1 printed no timeline: $(head -3 "$T/trace")"
[ "$(grep -c 'h.0.fcw' "$T/tensors.tsv")" = 1 ] && ok || bad "MPS_TRACE_TENSORS wrote no line per tensor"
expect 2 "$MPSHARD" shard "$T/wide/model.safetensors" --layout dp=2 -o "$T/ck3" -q --readers 9
finish
