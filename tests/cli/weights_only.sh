#!/bin/bash
# shard --weights-only: the parameters alone (no Adam moments); readers take it as any checkpoint,
# and the trainer starts it with zero moments: the same losses and the same checkpoint, bit for bit,
# as a run from a normal shard (whose moments are zero).
. "$(dirname "$0")/common.bash"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_rmaps_base_oversubscribe=1
export ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0" # OpenMPI's components leak by design
CFG="n_layer=2,n_embd=48,n_head=6,vocab=250,n_positions=32"
expect 0 "$MPSHARD" synth --config "$CFG" --format safetensors -o "$T/hf" -q
M="$T/hf/model.safetensors"
expect 0 "$MPSHARD" shard "$M" --layout dp=2,tp=2,zero=1 --weights-only -o "$T/w" -q
expect 0 "$MPSHARD" shard "$M" --layout dp=2,tp=2,zero=1 -o "$T/full" -q
tr -d ' \n' <"$T/w/manifest.json" | grep -q '"kinds":{"param":"f32"}' && ok || bad "kinds of a --weights-only checkpoint: $(grep -A4 '"kinds"' "$T/w/manifest.json")"
expect 0 "$MPSHARD" ls "$T/w" --json
[ "$(jq -c '[.pieces[].kind] | unique' "$T/out")" = '["param"]' ] && ok || bad "ls: $(jq -c '[.pieces[].kind] | unique' "$T/out")"
expect 0 "$MPSHARD" verify "$T/w" -q
expect 0 "$MPSHARD" compare "$T/w" "$M"
[ "$(du -sb "$T/w" | cut -f1)" -lt "$(du -sb "$T/full" | cut -f1)" ] && ok || bad "the weights-only checkpoint is not smaller"
# a reshard keeps what there is; export writes the model; the llm.c state files need the moments
expect 0 "$MPSHARD" reshard "$T/w" --layout pp=2 -o "$T/w2" -q
expect 0 "$MPSHARD" compare "$T/w2" "$T/w"
expect 2 "$MPSHARD" export "$T/w" --format llmc --processes 2 -o "$T/st" -q; expect_err "stores no adam_m"
expect 2 "$MPSHARD" shard "$M" --layout dp=2 --weights-only --synthetic-optimizer 3 -o "$T/x" -q
expect_err "^mpshard shard: --weights-only stores no optimizer state: it excludes --synthetic-optimizer$"

# train 2 steps from either checkpoint, on one process and on two (ZeRO-1 over dp=2)
expect 0 "$MPSHARD" tokens --count 20000 --vocab 250 -o "$T/tok.bin"
TR=(--data "$T/tok.bin" --steps 2 --global-batch 4 --micro-batch 2 --seq 16 --lr 1e-3 -q)
for run in "1 dp=1" "2 dp=2,zero=1"; do
  set -- $run
  for src in w full; do
    cmd=("$MPSHARD" train --ckpt "$T/$src" --layout "$2" --out "$T/run-$1-$src" --log "$T/$1-$src.jsonl" "${TR[@]}")
    [ "$1" = 1 ] || cmd=(mpirun -np "$1" "${cmd[@]}")
    OMP_NUM_THREADS=1 "${cmd[@]}" >"$T/out" 2>"$T/err" && ok || bad "train $2 from $src: $(tail -3 "$T/err")"
  done
  [ "$(wc -l <"$T/$1-w.jsonl")" = 2 ] && ok || bad "$2: log lines: $(cat "$T/$1-w.jsonl")"
  cmp -s <(sed -E 's/.*"loss": ([^,]*), "lr": ([^,]*), "grad_norm": ([^,]*),.*/\1 \2 \3/' "$T/$1-w.jsonl") \
         <(sed -E 's/.*"loss": ([^,]*), "lr": ([^,]*), "grad_norm": ([^,]*),.*/\1 \2 \3/' "$T/$1-full.jsonl") && ok ||
    bad "$2: losses differ from a normal shard's: $(paste "$T/$1-w.jsonl" "$T/$1-full.jsonl")"
  # the runs' checkpoints: moments, weights and state the same, bit for bit
  expect 0 "$MPSHARD" compare "$T/run-$1-w" "$T/run-$1-full"
  tr -d ' \n' <"$T/run-$1-w/step-00000002/manifest.json" | grep -q '"kinds":{"param":"f32","adam_m":"f32","adam_v":"f32"}' &&
    ok || bad "$2: the run's checkpoint lacks the moments"
done
finish
