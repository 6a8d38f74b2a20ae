#!/bin/bash
# Stock HDF5 tools read the shards through the project's filter plugin: h5dump's raw output of
# a tensor equals that tensor's bytes in the llm.c source file (same (out, in) layout, f32).
. "$(dirname "$0")/common.bash"
command -v h5dump >/dev/null || { echo "h5dump not installed (hdf5-tools)"; exit 1; }
expect 0 "$MPSHARD" synth --config "$SMALL" --format llmc -o "$T/m"
expect 0 "$MPSHARD" shard "$T/m/model_00000000.bin" --layout dp=1 -o "$T/ck" -q
# wpe (64, 96) sits right after the header (256 int32) and wte (1024, 96)
dd if="$T/m/model_00000000.bin" of="$T/wpe.ref" bs=1 skip=$((1024 + 1024*96*4)) count=$((64*96*4)) 2>/dev/null
HDF5_PLUGIN_PATH="$MPS_PLUGIN_DIR" h5dump -d /param/wpe -b LE -o "$T/wpe.bin" "$T/ck/rank-00000.h5" >/dev/null 2>"$T/err"
cmp -s "$T/wpe.ref" "$T/wpe.bin" && ok || bad "h5dump output differs from the source tensor: $(cat "$T/err")"
# without the plugin the data cannot be decoded (so the plugin is what made it work)
HDF5_PLUGIN_PATH=/nonexistent h5dump -d /param/wpe -b LE -o "$T/wpe2.bin" "$T/ck/rank-00000.h5" >/dev/null 2>&1
cmp -s "$T/wpe.ref" "$T/wpe2.bin" 2>/dev/null && bad "decoded without the plugin?" || ok
# text output of a small tensor through the plugin shows the values
HDF5_PLUGIN_PATH="$MPS_PLUGIN_DIR" h5dump -d /param/h.0.ln1b "$T/ck/rank-00000.h5" >"$T/out" 2>&1
grep -q "(0): " "$T/out" && ok || bad "h5dump printed no data"
finish
