#!/bin/bash
# Bench: reshard of the DCP baseline's state (GPT-2 XL shapes, 1.56B parameters, f32 parameters +
# Adam m and v = 18.7 GB, non-zero values), in the same run as ../shared/bench/dcp_reshard.sh and
# ../shared/bench/disk_bw.py, caches dropped before each timed step.
#  offline:   mpshard reshard dp=4 zero=1 -> dp=2 tp=2 zero=2 (end to end, fsync included) vs the
#             disk floor (bytes read / read bw + bytes written / write bw) and dcp_to_torch_save
#  load-time: 2 processes each load their boxes of dp=2 zero=3 from a dp=4 zero=3 checkpoint
#             (mpshard load, the trainer's path) vs DCP's load-time resharding into world 2.
# GPT-2 XL has 25 heads; tp=2 needs an even head count: n_head=16 gives the same tensor shapes.
# usage: bench/reshard_bench.sh [WORKDIR]   env: MPSHARD, SHARED, SKIP_DCP=1
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
MPSHARD=${MPSHARD:-$here/../build/mpshard}
SHARED=${SHARED:-$here/../../shared}
W=${1:-/tmp/mpshard-rbench}
PY=${PY:-python3}
CFG="n_layer=48,n_embd=1600,n_head=16,vocab=50257,n_positions=1024"
mkdir -p "$W"; rm -rf "$W"/*
drop() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null && echo yes || echo no; }
now() { date +%s.%N; }

echo "== disk floor (disk_bw.py)"
(cd "$W" && $PY "$SHARED/bench/disk_bw.py") | tee "$W/disk.txt"
wbw=$(awk '/write\+fsync/ {print $3}' "$W/disk.txt"); rbw=$(awk '/disk read/ {print $(NF-1)}' "$W/disk.txt")

if [ "${SKIP_DCP:-0}" != 1 ]; then
  echo "== PyTorch DCP baseline (dcp_reshard.sh)"
  bash "$SHARED/bench/dcp_reshard.sh" 2>&1 | tee "$W/dcp.txt"
fi

echo "== state: $CFG, f32 param + adam_m + adam_v (non-zero)"
"$MPSHARD" synth --config "$CFG" --format llmc -o "$W/in"
"$MPSHARD" shard "$W/in/model_00000000.bin" --layout dp=4,zero=1 -o "$W/src" -q --synthetic-optimizer 9
rm -rf "$W/in"
src_bytes=$(du -sb "$W/src" | cut -f1)

d=$(drop); echo "== offline: reshard dp=4 zero=1 -> dp=2 tp=2 zero=2 (caches dropped: $d)"
/usr/bin/time -f "%e %M" -o "$W/t1" "$MPSHARD" reshard "$W/src" --layout dp=2,tp=2,zero=2 -o "$W/dst" -q
read secs rss <"$W/t1"
dst_bytes=$(du -sb "$W/dst" | cut -f1)
"$MPSHARD" compare "$W/src" "$W/dst" | tail -1
rm -rf "$W/dst"

echo "== load-time: write dp=4 zero=3, then 2 processes load dp=2 zero=3"
"$MPSHARD" reshard "$W/src" --layout dp=4,zero=3 -o "$W/z3" -q
rm -rf "$W/src"
d=$(drop); echo "(caches dropped: $d)"
t0=$(now)
"$MPSHARD" load "$W/z3" --layout dp=2,zero=3 --rank 0 >"$W/l0" &
"$MPSHARD" load "$W/z3" --layout dp=2,zero=3 --rank 1 >"$W/l1" &
wait
t1=$(now)
cat "$W/l0" "$W/l1"
z3_bytes=$(du -sb "$W/z3" | cut -f1)
rm -rf "$W/z3"

$PY - "$src_bytes" "$dst_bytes" "$rbw" "$wbw" "$secs" "$rss" "$t0" "$t1" "$z3_bytes" "$W/dcp.txt" <<'PY'
import sys, re, os
srcb, dstb, rbw, wbw, secs, rss, t0, t1, z3b = map(float, sys.argv[1:10])
floor = srcb / 1e9 / rbw + dstb / 1e9 / wbw
print(f"state 18.7 GB raw; source checkpoint {srcb/1e9:.2f} GB, target {dstb/1e9:.2f} GB on disk (shuffle+zstd)")
print(f"offline reshard: {secs:.1f} s, disk floor {floor:.1f} s -> {secs/floor:.2f}x the floor (target <= 1.25x); peak RSS {rss/1024:.0f} MiB (target <= 512)")
load = t1 - t0
print(f"load-time (2 processes, dp=4 zero=3 -> dp=2 zero=3): {load:.1f} s for {z3b/1e9:.2f} GB on disk, 18.7 GB of state")
dcp = open(sys.argv[10]).read() if os.path.exists(sys.argv[10]) else ""
m = re.search(r"dcp_to_torch_save.* in ([0-9.]+)s", dcp); l = re.search(r"DCP load world=2: .* in ([0-9.]+)s", dcp)
if m: print(f"vs dcp_to_torch_save {float(m.group(1)):.1f} s: mpshard reshard is {float(m.group(1))/secs:.2f}x faster")
if l: print(f"vs DCP load-time resharding {float(l.group(1)):.1f} s: mpshard load is {float(l.group(1))/load:.2f}x faster (target >= 1.4x)")
PY
