#!/bin/bash
# mpshard ls: every stored piece with its file, dataset, box and bytes (the file it names is the one
# h5dump reads the tensor from); mpshard extract: one tensor of any layout, bit for bit the tensor
# an export writes (safetensors: same bytes, Conv1D weights transposed), in bands of --memory-mb.
. "$(dirname "$0")/common.bash"
command -v jq >/dev/null || { echo "jq not installed (apt-get install jq)"; exit 1; }
# wte (5120 x 96 f32, 1.9 MiB) takes two bands of --memory-mb 1
CFG="n_layer=2,n_embd=96,n_head=6,vocab=5000,n_positions=64"
expect 0 "$MPSHARD" synth --config "$CFG" --format safetensors -o "$T/m" -q
M="$T/m/model.safetensors"
expect 0 "$MPSHARD" shard "$M" --layout dp=2,pp=2,tp=2,zero=1 --synthetic-optimizer 5 -o "$T/ck" -q
expect 0 "$MPSHARD" shard "$M" --layout dp=1 --synthetic-optimizer 5 -o "$T/one" -q
expect 0 "$MPSHARD" export "$T/ck" --format safetensors -o "$T/ex" -q

# ls: wpe's parameter is stored once, by stage 0's rank chosen as owner; h5dump reads it from that file
expect 0 "$MPSHARD" ls "$T/ck" --tensor wpe --kind param
[ "$(sed -n 1p "$T/out" | tr -s ' ')" = "tensor kind file dataset box elements bytes" ] && ok || bad "ls header: $(sed -n 1p "$T/out")"
[ "$(wc -l <"$T/out")" = 2 ] && ok || bad "ls --tensor wpe --kind param: $(cat "$T/out")"
read -r name kind file dset box1 box2 elems bytes < <(sed -n 2p "$T/out")
[ "$name $kind $dset $box1 $box2 $elems $bytes" = "wpe param /param/wpe [0:64, 0:96] all 24576" ] && ok || bad "ls row: $(sed -n 2p "$T/out")"
# every kind of every tensor: the pieces' bytes add up to the tensor's, each piece in a listed file
expect 0 "$MPSHARD" ls "$T/ck" --json
jq -e '[.pieces[] | select(.tensor == "wte" and .kind == "adam_v") | .bytes] | add == 5120 * 96 * 4' "$T/out" >/dev/null && ok ||
  bad "wte adam_v pieces do not add up"
[ "$(jq -c '[.pieces[].kind] | unique' "$T/out")" = '["adam_m","adam_v","param"]' ] && ok || bad "ls --json kinds: $(jq -c '[.pieces[].kind] | unique' "$T/out")"
jq -e '[.pieces[] | select(.kind == "adam_m" and .tensor == "h.1.fcw")] | length == 4 and all(.shape == [.flat_range[1] - .flat_range[0]])' \
  "$T/out" >/dev/null && ok || bad "h.1.fcw adam_m: 4 ZeRO pieces of 1-D datasets expected"
files=$(jq -r '.pieces[].file' "$T/out" | sort -u | tr '\n' ' ')
[ "$files" = "rank-00000.h5 rank-00001.h5 rank-00002.h5 rank-00003.h5 rank-00004.h5 rank-00005.h5 rank-00006.h5 rank-00007.h5 " ] &&
  ok || bad "ls files: $files"
if command -v h5dump >/dev/null; then
  HDF5_PLUGIN_PATH="$MPS_PLUGIN_DIR" h5dump -d /param/wpe -b LE -o "$T/wpe.h5dump" "$T/ck/$file" >/dev/null 2>"$T/err" &&
    ok || bad "h5dump -d /param/wpe $file (named by ls): $(cat "$T/err")"
fi

# the bytes of tensor KEY of a safetensors file
st_bytes() { # st_bytes FILE KEY OUT
  local n off
  n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
  off=$(dd if="$1" bs=1 skip=8 count="$n" 2>/dev/null | jq -r --arg k "$2" '.[$k].data_offsets | "\(.[0]) \(.[1])"')
  set -- "$1" "$2" "$3" $off "$n"
  tail -c +$((8 + $6 + $4 + 1)) "$1" | head -c $(($5 - $4)) >"$3"
}
# extract from the 8-rank layout == the exported tensor, bit for bit
for pair in wpe:transformer.wpe.weight h.1.ln1w:transformer.h.1.ln_1.weight h.0.qkvb:transformer.h.0.attn.c_attn.bias \
            h.1.fcprojb:transformer.h.1.mlp.c_proj.bias lnfb:transformer.ln_f.bias; do
  t=${pair%%:*} key=${pair#*:}
  expect 0 "$MPSHARD" extract "$T/ck" --tensor "$t" -o "$T/$t.safetensors" -q
  st_bytes "$T/$t.safetensors" "$t" "$T/$t.got"
  st_bytes "$T/ex/model.safetensors" "$key" "$T/$t.want"
  [ -s "$T/$t.want" ] && cmp -s "$T/$t.got" "$T/$t.want" && ok || bad "extract $t differs from the exported $key"
done
[ -n "${file:-}" ] && command -v h5dump >/dev/null && { cmp -s "$T/wpe.got" "$T/wpe.h5dump" && ok || bad "h5dump of wpe differs from extract"; }
# wte: all 5120 padded rows, in two bands of 1 MiB; the export holds the 5000 real ones, the rest is 0
expect 0 "$MPSHARD" extract "$T/ck" --tensor wte -o "$T/wte.npy" -q --memory-mb 1
[ "$(head -c 128 "$T/wte.npy" | tail -c +11 | tr -d '\n' | sed 's/ *$//')" = "{'descr': '<f4', 'fortran_order': False, 'shape': (5120, 96), }" ] &&
  ok || bad "npy header: $(head -c 128 "$T/wte.npy" | od -c | head -3)"
st_bytes "$T/ex/model.safetensors" transformer.wte.weight "$T/wte.want"
tail -c +129 "$T/wte.npy" >"$T/wte.got"
[ "$(stat -c %s "$T/wte.got")" = $((5120 * 96 * 4)) ] && ok || bad "wte.npy holds $(stat -c %s "$T/wte.got") data bytes"
cmp -s <(head -c $((5000 * 96 * 4)) "$T/wte.got") "$T/wte.want" && ok || bad "extract wte differs from the export"
[ -z "$(tail -c $((120 * 96 * 4)) "$T/wte.got" | tr -d '\0' | head -c 1)" ] && ok || bad "padded rows of wte are not zero"
# a Conv1D weight: the export stores h.0.fcw (384, 96) transposed, as c_fc.weight (96, 384)
expect 0 "$MPSHARD" extract "$T/ck" --tensor h.0.fcw -o "$T/fcw.npy" -q
tail -c +129 "$T/fcw.npy" | od -An -v -t x4 -w4 >"$T/fcw.got"
st_bytes "$T/ex/model.safetensors" transformer.h.0.mlp.c_fc.weight "$T/fcw.raw"
od -An -v -t x4 -w4 "$T/fcw.raw" | awk '{ v[NR - 1] = $1 } END { for (o = 0; o < 384; o++) for (i = 0; i < 96; i++) print v[i * 384 + o] }' \
  >"$T/fcw.want"
[ "$(wc -l <"$T/fcw.got")" = 36864 ] && cmp -s "$T/fcw.got" <(sed 's/^/ /' "$T/fcw.want") && ok || bad "extract h.0.fcw differs from the exported c_fc.weight transposed"
# optimizer state: the 8-rank layout's ZeRO pieces == the one-rank checkpoint's, and .npy == .safetensors
for k in adam_m adam_v; do
  expect 0 "$MPSHARD" extract "$T/ck" --tensor h.1.qkvw --kind $k -o "$T/$k.a.safetensors" -q
  expect 0 "$MPSHARD" extract "$T/one" --tensor h.1.qkvw --kind $k -o "$T/$k.b.npy" -q
  st_bytes "$T/$k.a.safetensors" h.1.qkvw "$T/$k.a"
  cmp -s "$T/$k.a" <(tail -c +129 "$T/$k.b.npy") && ok || bad "$k of h.1.qkvw differs between layouts"
  [ "$(stat -c %s "$T/$k.a")" = $((3 * 96 * 96 * 4)) ] && ok || bad "$k: $(stat -c %s "$T/$k.a") bytes"
done
n=$(od -An -t u8 -N 8 "$T/adam_m.a.safetensors" | tr -d ' ')
dd if="$T/adam_m.a.safetensors" bs=1 skip=8 count="$n" 2>/dev/null | jq -e '.__metadata__.kind == "adam_m" and .["h.1.qkvw"].shape == [3, 96, 96]' >/dev/null &&
  ok || bad "safetensors header of an extract"

# refusals: one line each, exit 2, nothing written
expect 2 "$MPSHARD" extract "$T/ck" --tensor h.9.qkvw -o "$T/x.npy"; expect_err "^mpshard extract: --tensor 'h.9.qkvw': the model has no such tensor"
expect 2 "$MPSHARD" extract "$T/ck" --tensor wte --kind master -o "$T/x.npy"; expect_err "stores no master"
expect 2 "$MPSHARD" extract "$T/ck" --tensor wte -o "$T/x.bin"; expect_err "must end in .npy or .safetensors"
expect 2 "$MPSHARD" extract "$T/ck" --tensor wte -o "$T/wte.npy"; expect_err "wte.npy: already exists; pass --force"
[ ! -e "$T/x.npy" ] && [ ! -e "$T/x.bin" ] && ok || bad "a refused extract wrote a file"
expect 2 "$MPSHARD" ls "$T/ck" --tensor nope; expect_err "^mpshard ls: --tensor 'nope'"
expect 3 "$MPSHARD" ls "$T/m"; expect_err "manifest.json"
finish
