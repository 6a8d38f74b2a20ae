#!/bin/bash
# Where a training step's GPU time goes: Nsight Compute (ncu) times every kernel of steps 2-3 of
# GPT-2 124M (B=32, T=1024) on one GPU; kernels are summed by name, largest first, with the step
# time from the trainer's log beside them. Not a bench of record: ncu serialises kernels, so the
# sum is the busy time without overlap or launch gaps.
# usage: bench/train_profile.sh WORKDIR   env: MPSHARD, MODEL (gpt2), B (32), T (1024)
set -uo pipefail
W=${1:-/tmp/prof}; rm -rf "$W"; mkdir -p "$W"
M=${MPSHARD:-build/mpshard}; MODEL=${MODEL:-gpt2}; B=${B:-32}; T=${T:-1024}
"$M" tokens --count 400000 --vocab 32000 -o "$W/tok.bin" || exit 1
"$M" init --model "$MODEL" --layout dp=1 -o "$W/ck" -q || exit 1
run() { "$M" train --ckpt "$W/ck" --layout dp=1 --data "$W/tok.bin" --steps "$1" --global-batch "$B" --micro-batch "$B" \
  --seq "$T" --backend cuda --out "$W/run" --log "$2" -q; }
MPS_CUDA_VERBOSE=1 run 6 "$W/plain.jsonl" 2>"$W/plain.err" || { tail -5 "$W/plain.err"; exit 1; }
echo "GEMM plans (MPS_CUDA_VERBOSE=1):"; grep "gemm plan" "$W/plain.err" | sort -u
echo "tokens/s without the profiler:"; sed -E 's/.*"tokens_per_s": ([0-9.]+).*/\1/' "$W/plain.jsonl" | tr '\n' ' '; echo
# profile everything of a 3-step run and keep the third step's launches (from its embedding forward on)
ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
  "$M" train --ckpt "$W/ck" --layout dp=1 --data "$W/tok.bin" --steps 3 --global-batch "$B" --micro-batch "$B" \
  --seq "$T" --backend cuda --out "$W/run2" -q >"$W/ncu.csv" 2>"$W/ncu.err" || { tail -5 "$W/ncu.err"; exit 1; }
python3 - "$W/ncu.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
hdr = rows[0]; rows = rows[1:]
ki, mi, vi, ii = hdr.index("Kernel Name"), hdr.index("Metric Name"), hdr.index("Metric Value"), hdr.index("ID")
launches = [(int(r[ii]), r[ki], float(r[vi].replace(",", ""))) for r in rows if r[mi] == "gpu__time_duration.sum"]
launches.sort()
# the third step: from its first kernel (the embedding's forward) on; without one, the last third
starts = [i for i, (_, k, _) in enumerate(launches) if k.startswith("k_embed_fwd")]
last = launches[starts[-1]:] if len(starts) >= 3 else launches[2 * len(launches) // 3:]
tot = collections.defaultdict(float); cnt = collections.Counter()
for _, k, ns in last:
    key = k.split("(")[0][:90]; tot[key] += ns; cnt[key] += 1
s = sum(tot.values())
print(f"kernels of one step: {len(last)} launches, {s/1e6:.1f} ms busy")
for k, ns in sorted(tot.items(), key=lambda x: -x[1])[:40]:
    print(f"{ns/1e6:9.2f} ms {100*ns/s:5.1f}% {cnt[k]:5d}x  {k}")
PY
