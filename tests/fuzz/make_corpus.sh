#!/bin/bash
# Regenerates the seed corpora of tests/fuzz/corpus/ (committed; run by hand after a format
# change). Needs the CLI ($MPSHARD), the fuzz build ($MPS_FUZZ_BUILD, for the HDF5 seeds: the
# h5 targets write their own base file), zstd and python3.
#   MPSHARD=build/mpshard MPS_FUZZ_BUILD=build-fuzz tests/fuzz/make_corpus.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${MPSHARD:?MPSHARD must point to the mpshard binary}"
: "${MPS_FUZZ_BUILD:?MPS_FUZZ_BUILD must point to the fuzz build directory}"
C=$here/corpus
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
rm -rf "$C"
mkdir -p "$C"/{safetensors,llmc,manifest,layout,config,chunk,h5file,h5attr}
TINY=n_layer=1,n_embd=4,n_head=1,vocab=8,n_positions=4
TWO=n_layer=2,n_embd=8,n_head=2,vocab=10,n_positions=3

# model files from the CLI
"$MPSHARD" synth --config "$TINY" --format safetensors -o "$T/st"
"$MPSHARD" synth --config "$TWO" --format safetensors --dtype bf16 -o "$T/st2"
"$MPSHARD" synth --config "$TINY" --format llmc -o "$T/ll"
"$MPSHARD" synth --config "$TWO" --format llmc --dtype bf16 -o "$T/ll2"
cp "$T/ll/model_00000000.bin" "$C/llmc/tiny_f32"
cp "$T/ll2/model_00000000.bin" "$C/llmc/two_bf16"
# checkpoints for manifests
"$MPSHARD" shard "$T/st/model.safetensors" --layout dp=2,zero=1 -o "$T/c1" -q
"$MPSHARD" shard "$T/st2/model.safetensors" --layout pp=2,tp=2,zero=3,dp=2 -o "$T/c2" -q
cp "$T/c1/manifest.json" "$C/manifest/dp2_zero1"
cp "$T/c2/manifest.json" "$C/manifest/pp2_tp2_dp2_zero3"

python3 - "$T" "$C" <<'PY'
import json, struct, sys
T, C = sys.argv[1], sys.argv[2]
def w(path, data):
    open(C + "/" + path, "wb").write(data)

# safetensors target input: u16 config length, config.json, model.safetensors
def st_input(cfg, model):
    return struct.pack("<H", len(cfg)) + cfg + model
def st_file(header, data):
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data
for name, d in (("tiny_f32", "st"), ("two_bf16", "st2")):
    cfg = open(f"{T}/{d}/config.json", "rb").read()
    model = open(f"{T}/{d}/model.safetensors", "rb").read()
    w(f"safetensors/{name}", st_input(cfg, model))
cfg = open(f"{T}/st/config.json", "rb").read()
model = open(f"{T}/st/model.safetensors", "rb").read()
hlen = struct.unpack("<Q", model[:8])[0]
header = json.loads(model[8:8 + hlen])
data = model[8 + hlen:]
w("safetensors/header_len_2_63", st_input(cfg, struct.pack("<Q", 1 << 63) + model[8:]))
w("safetensors/truncated", st_input(cfg, model[:len(model) // 2]))
w("safetensors/bad_json", st_input(cfg, model[:8] + b"{\"x\":[1,2" + b" " * (hlen - 9) + data))
h = json.loads(json.dumps(header)); k = "transformer.wpe.weight"
h[k]["data_offsets"] = [h["transformer.wte.weight"]["data_offsets"][0] + 4, h["transformer.wte.weight"]["data_offsets"][0] + 4 + 64]
w("safetensors/overlap", st_input(cfg, st_file(h, data)))
h = json.loads(json.dumps(header)); h[k]["data_offsets"] = [len(data) - 8, len(data) + 56]
w("safetensors/past_eof", st_input(cfg, st_file(h, data)))
h = json.loads(json.dumps(header)); h[k]["dtype"] = "F16"
w("safetensors/dtype_shape_mismatch", st_input(cfg, st_file(h, data)))
h = json.loads(json.dumps(header)); h["lm_head.weight"] = h["transformer.wte.weight"]
w("safetensors/lm_head_alias", st_input(cfg, st_file(h, data)))
c = json.loads(cfg); c["n_layer"] = 100000
w("safetensors/config_100000_layers", st_input(json.dumps(c).encode(), model))
w("safetensors/empty_config", st_input(b"", model))

# llm.c: a header claiming huge sizes
ll = bytearray(open(f"{T}/ll/model_00000000.bin", "rb").read())
for name, field, value in (("huge_L", 4, 100000), ("huge_V", 3, 1 << 30), ("huge_Vp", 7, 1 << 30),
                           ("negative_C", 6, -4)):
    b = bytearray(ll); struct.pack_into("<i", b, 4 * field, value); w(f"llmc/{name}", bytes(b))
w("llmc/header_only", bytes(ll[:1024]))

# manifests: hostile field values (the harness fixes the checksum)
m = json.loads(open(f"{C}/manifest/dp2_zero1").read())
def mani(name, obj):
    w(f"manifest/{name}", (json.dumps(obj, indent=1) + "\n").encode())
x = json.loads(json.dumps(m)); x["files"] = x["files"] * 3; mani("many_files", x)
x = json.loads(json.dumps(m)); x["files"][0]["bytes"] = -1; mani("negative_bytes", x)
x = json.loads(json.dumps(m)); x["files"][1]["rank"] = 1 << 40; mani("huge_rank", x)
x = json.loads(json.dumps(m)); del x["layout"]["stage_layers"]; mani("missing_stages", x)
x = json.loads(json.dumps(m)); x["model"]["n_layer"] = 1 << 20; mani("huge_n_layer", x)
x = json.loads(json.dumps(m)); x["layout"]["dp"] = 65536; x["layout"]["tp"] = 65536; mani("huge_world", x)
x = json.loads(json.dumps(m)); x["storage"]["chunk_bytes"] = 1 << 40; mani("huge_chunk", x)
x = json.loads(json.dumps(m)); del x["kinds"]; mani("missing_kinds", x)

# layout and config strings
for i, s in enumerate(["dp=2,pp=2,tp=2,zero=1", "pp=3,stages=1:1:1", "stages=2:1", "dp=99999999999", "dp=2,dp=3",
                       "tp=0", "zero=4", "tp=3,zero=2,dp=2", "pp=256", "stages=" + ":".join(["1"] * 256)]):
    w(f"layout/{i:02d}", s.encode())
for i, s in enumerate(["n_layer=3,n_embd=96,n_head=6,vocab=1000,n_positions=64",
                       "n_layer=1,n_embd=4,n_head=1,vocab=8,n_positions=4,padded_vocab=8",
                       "n_layer=100000,n_embd=1048576,n_head=1,vocab=2147483648,n_positions=16777216",
                       "n_layer=1,n_layer=2", "gpt2-xl", "n_embd=-1", "vocab=2147483649"]):
    w(f"config/{i:02d}", s.encode())
PY

# chunks: byte 0 mode (bits 0-1 filter mask, bit 2 element size 2, bit 3 grid), bytes 1-3 size
head -c 4000 "$T/ll/model_00000000.bin" >"$T/raw"
zstd -q -1 -c "$T/raw" >"$T/raw.zst"
python3 - "$T" "$C" <<'PY'
import struct, sys
T, C = sys.argv[1], sys.argv[2]
z = open(f"{T}/raw.zst", "rb").read()
raw = open(f"{T}/raw", "rb").read()
def w(name, b): open(f"{C}/chunk/{name}", "wb").write(b)
def sz(n): return struct.pack("<I", n)[:3]
w("valid", b"\x00" + sz(4000) + z)
w("valid_2byte", b"\x04" + sz(4000) + z)
# filter mask 1 (shuffle skipped; bit 5 unused): the stored frame is the raw bytes unshuffled.
# A finding of fuzz.short (the harness re-decoded its own mask-0 encoding with mask 1).
w("shuffle_skipped", b"\x21" + sz(4000) + z)
w("stored_raw", b"\x02" + sz(4000) + raw)
w("wrong_size", b"\x00" + sz(4096) + z)
# a frame header claiming 2^40 bytes (single segment, 8-byte content size), one RLE block
frame = b"\x28\xb5\x2f\xfd" + bytes([0xe0]) + struct.pack("<Q", 1 << 40) + struct.pack("<I", 1 | (1 << 1) | (131072 << 3))[:3] + b"\x00"
w("claims_2_40", b"\x00" + sz(4000) + frame)
# grid mode: ndim, then (dim u32, chunk i64) per dimension
g = b"\x08\x01" + struct.pack("<Iq", 1000, 1) + struct.pack("<Iq", 96, 96) + struct.pack("<Iq", 1, 1) + struct.pack("<Iq", 1, 1)
w("grid_2d", g)
g = b"\x08\x00" + struct.pack("<Iq", 7, 1 << 62) + b"\x00" * 36
w("grid_huge_chunk", g)
PY

# HDF5: the base shard file of the h5 targets, and a few edit scripts
MPS_FUZZ_WRITE_SEED="$C/h5file/rank0" "$MPS_FUZZ_BUILD/fuzz_h5file" >/dev/null 2>&1
printf '\x00' >"$C/h5attr/layout0"
printf '\x01' >"$C/h5attr/layout1"
printf '\x02' >"$C/h5attr/layout2"
printf '\x00\x00\x00\x00\x01\x00\x01\x03' >"$C/h5attr/root_rank"
printf '\x01\x01\x03\x00\x01\x01\x05' >"$C/h5attr/box_offset"
printf '\x01\x02\x03\x02\x00\x00\x10\x00%s' "0123456789abcdef" >"$C/h5attr/chunk_bytes"
printf '\x02\x05\x07\x03\x00\x01\x02\x00\x03\x00\x01' >"$C/h5attr/recreate"
printf '\x00\x05\x03\x07\x00\x01' >"$C/h5attr/copy_chunk"
# datasets that are not what they seem (layout dp=1; dataset indices in the harness's order, HDF5's
# native one: /param/h.0.ln1w 8, wte 9, wpe 10, h.0.ln1b 15): op 6 a link (dataset, target, variant:
# 0 external link to the FIFO, 1 the group an external link, 2 soft, 3 hard link to the target),
# op 7 the data in the FIFO (dataset, variant: odd external storage, even virtual)
printf '\x00\x06\x09\x00\x00' >"$C/h5attr/external_link"
printf '\x00\x06\x09\x00\x01' >"$C/h5attr/external_group"
printf '\x00\x06\x08\x0f\x02' >"$C/h5attr/soft_link"
printf '\x00\x06\x08\x0f\x03' >"$C/h5attr/swapped_dataset"
printf '\x00\x07\x0a\x01' >"$C/h5attr/external_storage"
printf '\x00\x07\x0a\x00' >"$C/h5attr/virtual_dataset"
# the same shard files as whole-file seeds of fuzz_h5file
for s in external_link external_group soft_link swapped_dataset external_storage virtual_dataset; do
  MPS_FUZZ_WRITE_H5FILE="$C/h5file/$s" "$MPS_FUZZ_BUILD/fuzz_h5attr" "$C/h5attr/$s" >/dev/null 2>&1
done
# the virtual dataset's global heap collection with a free-space object of size 0, on which
# libhdf5 1.10 loops forever inside H5Dopen2 (a fuzz_h5file finding, RESULTS.md)
python3 - "$C/h5file/virtual_dataset" "$C/h5file/virtual_dataset_bad_heap" <<'PY'
import struct, sys
b = bytearray(open(sys.argv[1], "rb").read())
assert b.count(b"GCOL") == 1
obj = b.find(b"GCOL") + 16  # objects: index u16, references u16, 4 reserved, size u64, data padded to 8
while struct.unpack_from("<H", b, obj)[0] != 0:
    obj += 16 + (struct.unpack_from("<Q", b, obj + 8)[0] + 7) // 8 * 8
struct.pack_into("<Q", b, obj + 8, 0)
open(sys.argv[2], "wb").write(b)
PY
find "$C" -type f | wc -l
