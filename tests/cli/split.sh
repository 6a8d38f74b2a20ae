#!/bin/bash
# split: the layout chosen for 4 GPUs (the order worked out by hand in tests/unit/test_estimate.c
# for this very model: pp=2,tp=2 3.4 us, dp=2,tp=2 4.6 us, dp=2,pp=2 5.5 us, dp=4 7.8 us), --dry-run
# writes nothing, the result is `reshard --layout` of the same layout bit for bit (every state
# kind), --layout and --zero, the refusals (one line each, nothing written), mpirun; and
# inspect --gpu-mem's exit code and the budget as given in the SVG.
. "$(dirname "$0")/common.bash"
command -v jq >/dev/null || { echo "jq not installed (apt-get install jq)"; exit 1; }
S() { "$MPSHARD" split "$@"; }
layout_of() { jq -r '.layout | "dp=\(.dp),pp=\(.pp),tp=\(.tp),zero=\(.zero)"' "$1/manifest.json"; }
nothing_at() { [ ! -e "$1" ] && [ ! -e "$1.partial" ] && [ ! -e "$1.lock" ]; }

expect 0 "$MPSHARD" synth --config "$SMALL" --format safetensors --seed 3 -o "$T/m"
expect 0 "$MPSHARD" shard "$T/m/model.safetensors" --layout dp=2,zero=1 -o "$T/src" -q --synthetic-optimizer 5
sum_src() { (cd "$T/src" && sha256sum manifest.json rank-*.h5 | sha256sum); }
before=$(sum_src)

# --- the choice, and --dry-run writes nothing ---
expect 0 S "$T/src" --gpus 4 -o "$T/a" --dry-run
grep -q "^split      $T/src: dp=2,pp=1,tp=1,zero=1 (2 ranks) -> 4 GPUs of 80 GB; fp32, micro-batch 1 x 64 tokens" "$T/out" \
  && ok || bad "no split line: $(head -1 "$T/out")"
grep -q "^chosen     dp=1,pp=2,tp=2,zero=1 " "$T/out" && ok || bad "chose $(grep chosen "$T/out")"
[ "$(awk '/^runner-up/ { printf "%s ", $2 }' "$T/out")" = "dp=2,pp=1,tp=2,zero=1 dp=2,pp=2,tp=1,zero=1 dp=4,pp=1,tp=1,zero=1 " ] \
  && ok || bad "runners-up: $(grep runner-up "$T/out")"
grep -q "4 of 4 layouts of 4 GPUs at ZeRO-1 fit 80 GB" "$T/out" && grep -q "dry run: nothing written" "$T/out" && ok || bad "summary"
[ "$(wc -l <"$T/out")" -le 8 ] && ok || bad "split printed $(wc -l <"$T/out") lines"
nothing_at "$T/a" && [ "$(ls "$T")" = "$(printf 'err\nm\nout\nsrc')" ] && ok || bad "--dry-run wrote: $(ls "$T")"
expect 0 S "$T/src" --gpus 4 --dry-run --top 1   # -o is not needed to look
[ "$(grep -c '^runner-up' "$T/out")" = 1 ] && ok || bad "--top 1"

# --- --schedule gpipe plans what train --schedule gpipe holds: all 32 micro-batches a replica runs in
# a step of 64 sequences (6.51 -> 32.47 MB for dp=2,pp=2), so 10 MB that 1F1B fits is refused ---
expect 0 S "$T/src" --gpus 4 --dry-run --global-batch 64 --gpu-mem 10MB
grep -q "^chosen     dp=2,pp=2,tp=1,zero=1  *6.51 MB" "$T/out" && ok || bad "1f1b: $(grep chosen "$T/out")"
expect 1 S "$T/src" --gpus 4 --dry-run --global-batch 64 --gpu-mem 10MB --schedule gpipe
expect_err "no layout of 4 GPUs at ZeRO-1 fits --gpu-mem 10 MB"
expect 0 S "$T/src" --gpus 4 --dry-run --global-batch 64 --schedule gpipe
grep -q "global batch 64, GPipe schedule" "$T/out" && grep -q "^chosen     dp=2,pp=2,tp=1,zero=1  *32.47 MB" "$T/out" && ok \
  || bad "gpipe: $(head -3 "$T/out")"
expect 2 S "$T/src" --gpus 4 --dry-run --schedule 1F1B; expect_err "--schedule '1F1B': expected 1f1b or gpipe"

# --- the split equals reshard into the same layout, bit for bit ---
expect 0 S "$T/src" --gpus 4 -o "$T/a" -q
[ "$(layout_of "$T/a")" = dp=1,pp=2,tp=2,zero=1 ] && ok || bad "split wrote $(layout_of "$T/a")"
expect 0 "$MPSHARD" reshard "$T/src" --layout dp=1,pp=2,tp=2,zero=1 -o "$T/b" -q
expect 0 "$MPSHARD" compare "$T/a" "$T/b"      # every state kind, element by element
expect 0 "$MPSHARD" compare "$T/src" "$T/a"
expect 0 "$MPSHARD" verify "$T/a" -q
for r in 0 1 2 3; do   # the same datasets in the same files
  f=$(printf 'rank-%05d.h5' $r)
  h5ls -r "$T/a/$f" | sort >"$T/l1"; h5ls -r "$T/b/$f" | sort >"$T/l2"
  cmp -s "$T/l1" "$T/l2" || bad "$f lists different datasets"
done; ok
[ "$(jq -c '.layout' "$T/a/manifest.json")" = "$(jq -c '.layout' "$T/b/manifest.json")" ] && ok || bad "manifest layouts differ"
# an existing DST is refused without --force, as reshard refuses it
expect 2 S "$T/src" --gpus 4 -o "$T/a";                         expect_err "--force"
expect 0 S "$T/src" --gpus 4 -o "$T/a" -q --force

# --- --layout overrides the choice; the ZeRO stage is SRC's unless --zero or zero= ---
expect 0 S "$T/src" --gpus 4 --layout dp=4 -o "$T/c"
grep -q "^given      dp=4,pp=1,tp=1,zero=1 " "$T/out" && grep -q "^planner    dp=1,pp=2,tp=2,zero=1 " "$T/out" \
  && ok || bad "--layout lines: $(cat "$T/out")"
[ "$(layout_of "$T/c")" = dp=4,pp=1,tp=1,zero=1 ] && ok || bad "--layout wrote $(layout_of "$T/c")"
expect 0 "$MPSHARD" compare "$T/src" "$T/c"
expect 0 S "$T/src" --layout dp=2,tp=2,zero=3 -o "$T/d" -q     # --gpus follows from the layout
[ "$(layout_of "$T/d")" = dp=2,pp=1,tp=2,zero=3 ] && ok || bad "zero= wrote $(layout_of "$T/d")"
expect 0 S "$T/src" --gpus 4 --zero 3 -o "$T/e" -q
[ "$(layout_of "$T/e")" = dp=1,pp=2,tp=2,zero=3 ] && ok || bad "--zero 3 wrote $(layout_of "$T/e")"
expect 0 "$MPSHARD" compare "$T/src" "$T/e"
# over the budget, --layout is still written (the user's choice), and says so
expect 0 S "$T/src" --gpus 4 --layout dp=4 --gpu-mem 1MB --dry-run
grep -q "^given      dp=4,pp=1,tp=1,zero=1 .*over --gpu-mem" "$T/out" && ok || bad "no over note: $(cat "$T/out")"

# --- refusals: one line, exit code, nothing written ---
expect 1 S "$T/src" --gpus 4 --gpu-mem 1MB -o "$T/f"
expect_err "^mpshard split: no layout of 4 GPUs at ZeRO-1 fits --gpu-mem 1 MB with micro-batch 1 x 64 tokens \(the smallest peak: [0-9.]+ MB for dp=[0-9]+,pp=[0-9]+,tp=[0-9]+,zero=1\); try --zero 3"
nothing_at "$T/f" && ok || bad "a refused split left output"
expect 2 S "$T/src" --gpus 4 --layout dp=2 -o "$T/f";          expect_err "^mpshard split: --layout dp=2 has 2 ranks, --gpus 4$"
expect 2 S "$T/src" --gpus 4 --layout tp=4 -o "$T/f";          expect_err "^mpshard split: --layout tp=4: tp=4 must divide"
expect 2 S "$T/src" -o "$T/f";                                  expect_err "--gpus N is required"
expect 2 S "$T/src" --gpus 4;                                   expect_err "-o DST is required"
expect 2 S "$T/src" --gpus 4 --gpu-mem 80 -o "$T/f";           expect_err "--gpu-mem '80'"
expect 2 S "$T/src" --gpus 0 -o "$T/f";                         expect_err "--gpus '0'"
expect 2 S "$T/src" --gpus 4 --zero 4 -o "$T/f";               expect_err "--zero '4'"
expect 2 S "$T/src" --gpus 4 -o "$T/src";                       expect_err "destination is the source"
expect 3 S "$T/m" --gpus 2 -o "$T/f";                           expect_err "manifest.json"
nothing_at "$T/f" && ok || bad "a refused split left output"
[ "$before" = "$(sum_src)" ] && ok || bad "SRC was modified"
expect 0 S --help
grep -q "usage: mpshard split SRC --gpus N -o DST" "$T/out" && ok || bad "--help"
"$MPSHARD" --help | grep -q "^  split SRC --gpus N -o DST" && ok || bad "split missing from mpshard --help"

# --- under mpirun the processes split the files; the result equals the one-process split ---
if command -v mpirun >/dev/null; then
  ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0" \
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none \
    mpirun --oversubscribe -np 2 "$MPSHARD" split "$T/src" --gpus 4 -o "$T/mp" --threads 1 \
    >"$T/out" 2>"$T/err" && ok || bad "mpirun split failed: $(tail -5 "$T/err")"
  [ "$(grep -c '^chosen' "$T/out")" = 1 ] && ok || bad "the choice printed $(grep -c '^chosen' "$T/out") times"
  [ "$(layout_of "$T/mp")" = dp=1,pp=2,tp=2,zero=1 ] && ok || bad "mpirun split wrote $(layout_of "$T/mp")"
  expect 0 "$MPSHARD" verify "$T/mp" -q
  expect 0 "$MPSHARD" compare "$T/mp" "$T/b"
else
  bad "mpirun not installed"
fi

# --- inspect --gpu-mem: exit 1 when a rank is over the budget (for scripts), 0 when all fit ---
expect 0 "$MPSHARD" inspect "$T/a" --gpu-mem 80GB
grep -q "every rank fits" "$T/out" && ok || bad "fits"
expect 1 "$MPSHARD" inspect "$T/a" --gpu-mem 1MB
expect_err "^mpshard inspect: 4 of 4 ranks are over --gpu-mem 1MB$"
grep -q "4 of 4 ranks are over it" "$T/out" && ok || bad "the table is still printed"
expect 1 "$MPSHARD" inspect --config "$SMALL" --layout dp=2,pp=2,zero=1 --gpu-mem 1MB --json
[ "$(jq '.over_budget' "$T/out")" = 4 ] && ok || bad "--json over_budget"
expect 1 "$MPSHARD" inspect --config "$SMALL" --gpus 4 --gpu-mem 1MB --suggest
expect_err "^mpshard inspect: no layout of 4 GPUs fits --gpu-mem 1MB$"
# the SVG's budget line reads what was given
expect 0 "$MPSHARD" inspect --config "$SMALL" --layout dp=2 --gpu-mem 80GiB --svg "$T/c.svg"
grep -q ">GPU memory 80 GiB</text>" "$T/c.svg" && ! grep -q "85.9" "$T/c.svg" && ok || bad "svg budget label"
finish
