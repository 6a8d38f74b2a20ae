#!/bin/bash
# Bench: `mpshard shard` of a GPT-2 XL-sized f32 checkpoint (1.56B parameters, synthetic values)
# against the disk floor measured in the same run by ../shared/bench/disk_bw.py:
#   floor = input bytes / read bandwidth + output bytes / write bandwidth.
# Caches are dropped before the timed step (needs root; otherwise the read is warm: said so).
# The timed run also prints its phase timeline (MPS_TRACE=1, formats/trace.h) after the ratio.
# usage: bench/shard_bench.sh [WORKDIR]   env: MPSHARD, MODEL (gpt2-xl) or CONFIG (a --config string), LAYOUT,
#        FORMAT (safetensors|llmc), DTYPE (f32|bf16), MAX_SHARD (synth --max-shard-size: an input of several
#        files and an index, as transformers saves large models), MPS_TRACE (1; 0: no timeline),
#        THREADS (--threads; default: all cores), READERS (--readers; default 2)
# The Llama-family run of record:
#   CONFIG=n_layer=30,n_embd=2048,n_head=16,vocab=32000,n_positions=2048,arch=llama,n_kv_head=4,ffn=5632,tied=0 \
#   DTYPE=bf16 MAX_SHARD=1GB LAYOUT=dp=2,pp=2,tp=4 bench/shard_bench.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
MPSHARD=${MPSHARD:-$here/../build/mpshard}
SHARED=${SHARED:-$here/../../shared}
W=${1:-/tmp/mpshard-bench}
MODEL=${MODEL:-gpt2-xl}
LAYOUT=${LAYOUT:-dp=2,pp=2,tp=5,zero=1}  # GPT-2 XL has 25 heads
FORMAT=${FORMAT:-safetensors}
CONFIG=${CONFIG:-}
DTYPE=${DTYPE:-f32}
MAX_SHARD=${MAX_SHARD:-}
PY=${PY:-python3}
MPS_TRACE=${MPS_TRACE:-1}
THREADS=${THREADS:-}
READERS=${READERS:-}
mkdir -p "$W"
drop() { sync; if echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then echo yes; else echo no; fi; }

echo "== disk floor (../shared/bench/disk_bw.py)"
(cd "$W" && $PY "$SHARED/bench/disk_bw.py") | tee "$W/disk.txt"
wbw=$(awk '/write\+fsync/ {print $3}' "$W/disk.txt")
rbw=$(awk '/disk read/ {print $(NF-1)}' "$W/disk.txt")

echo "== input: ${CONFIG:-$MODEL}, $FORMAT, $DTYPE${MAX_SHARD:+, files of at most $MAX_SHARD}"
rm -rf "$W/in" "$W/ck"
if [ -n "$CONFIG" ]; then model_arg=(--config "$CONFIG"); else model_arg=(--model "$MODEL"); fi
"$MPSHARD" synth "${model_arg[@]}" --format "$FORMAT" --dtype "$DTYPE" ${MAX_SHARD:+--max-shard-size "$MAX_SHARD"} -o "$W/in"
if [ -e "$W/in/model.safetensors.index.json" ]; then input=$W/in; else input=$(ls "$W"/in/model*.* | head -1); fi
in_bytes=$(find "$W/in" -type f \( -name 'model*.safetensors' -o -name 'model*.bin' \) -printf '%s\n' | awk '{s += $1} END {print s}')
ls -l "$W/in"

dropped=$(drop)
echo "== mpshard shard --layout $LAYOUT (caches dropped: $dropped)"
# The timing stays the bench of record with the trace on: tracing adds only clock reads (a few
# vDSO clock_gettime per chunk and per tensor, one thread-CPU-time call per job of 8 chunks, one
# read of /proc/self/statm per tensor).
MPS_TRACE=$MPS_TRACE MPS_TRACE_TENSORS="$W/tensors.tsv" /usr/bin/time -f "%e %M" -o "$W/time.txt" "$MPSHARD" shard "$input" --layout "$LAYOUT" \
    -o "$W/ck" -q ${THREADS:+--threads "$THREADS"} ${READERS:+--readers "$READERS"} 2>"$W/trace.txt" || { cat "$W/trace.txt" >&2; exit 1; }
read secs rss_kb <"$W/time.txt"
out_bytes=$(du -sb "$W/ck" | cut -f1)
$PY - "$in_bytes" "$out_bytes" "$rbw" "$wbw" "$secs" "$rss_kb" <<'PY'
import sys
inb, outb, rbw, wbw, secs, rss = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
floor = inb / 1e9 / rbw + outb / 1e9 / wbw
print(f"input {inb/1e9:.2f} GB, output {outb/1e9:.2f} GB (f32 params + zero Adam moments, compressed)")
print(f"disk floor {floor:.1f} s (read {rbw} GB/s, write {wbw} GB/s)")
print(f"mpshard shard: {secs:.1f} s = {secs/floor:.2f}x the disk floor (target <= 1.25x); peak RSS {rss/1024:.0f} MiB (target <= 1024)")
PY
if [ -s "$W/trace.txt" ]; then
    echo "== phase timeline of that run (MPS_TRACE=1; times in s from the start of the command)"
    cat "$W/trace.txt"
fi
# one line per tensor (read, queued, written, released): into $OUT when set (bench/gpu_host_run.sh)
if [ -s "$W/tensors.tsv" ] && [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    cp "$W/tensors.tsv" "$OUT/shard_tensors.tsv" && echo "per-tensor timeline: $OUT/shard_tensors.tsv"
fi
rm -rf "$W/in" "$W/ck"
