#!/bin/bash
# reshard: chains A -> B -> C -> A are bit-exact for every state kind (non-zero Adam moments),
# over layouts with odd sizes, empty pieces and every ZeRO stage; reshard then export equals the
# original model; the rules (DST == SRC, existing DST, SRC untouched); mpirun -np 3 == one process.
. "$(dirname "$0")/common.bash"
expect 0 "$MPSHARD" synth --config "$SMALL" --format safetensors --seed 11 -o "$T/m"
M="$T/m/model.safetensors"
chain() { # A B C: shard in A (synthetic optimizer), reshard A->B->C->A, compare every kind
  rm -rf "$T"/a "$T"/b "$T"/c "$T"/a2
  expect 0 "$MPSHARD" shard "$M" --layout "$1" -o "$T/a" -q --synthetic-optimizer 5
  expect 0 "$MPSHARD" reshard "$T/a" --layout "$2" -o "$T/b" -q --threads 2
  expect 0 "$MPSHARD" reshard "$T/b" --layout "$3" -o "$T/c" -q --threads 3
  expect 0 "$MPSHARD" reshard "$T/c" --layout "$1" -o "$T/a2" -q
  expect 0 "$MPSHARD" compare "$T/a" "$T/b"
  expect 0 "$MPSHARD" compare "$T/a" "$T/a2"
  grep -q '"dp": ' "$T/c/manifest.json" && ok
}
chain dp=2,tp=3,zero=1 dp=3,pp=3,tp=2,zero=3 dp=4,tp=6,zero=2
chain dp=1 tp=6,pp=2,zero=0 dp=5,pp=3,zero=3
chain pp=3,dp=2,zero=2 pp=2,stages=1:2,tp=3,dp=2,zero=1 dp=7,tp=2,zero=3
chain dp=3,tp=2,zero=3 dp=2,zero=0 tp=3,dp=3,pp=2,zero=2
# the A -> A2 files are identical in content; the ZeRO-stage switch keeps the rest of the layout
rm -rf "$T/z"
expect 0 "$MPSHARD" reshard "$T/a" --zero 1 -o "$T/z" -q
grep -q '"zero": 1' "$T/z/manifest.json" && grep -q '"tp": 2' "$T/z/manifest.json" && grep -q '"dp": 3' "$T/z/manifest.json" \
  && ok || bad "--zero changed the layout"
expect 0 "$MPSHARD" compare "$T/a" "$T/z"
# reshard then export equals the original model
expect 0 "$MPSHARD" export "$T/z" --format safetensors -o "$T/ex" -q
expect 0 "$MPSHARD" compare "$M" "$T/ex/model.safetensors"
# empty pieces: a tiny model where dp exceeds dimensions
expect 0 "$MPSHARD" synth --config n_layer=2,n_embd=4,n_head=2,vocab=10,n_positions=3 --format llmc -o "$T/tiny"
expect 0 "$MPSHARD" shard "$T/tiny/model_00000000.bin" --layout dp=7,tp=2,zero=3 -o "$T/t1" -q --synthetic-optimizer 2
expect 0 "$MPSHARD" reshard "$T/t1" --layout dp=5,pp=2,zero=1 -o "$T/t2" -q
expect 0 "$MPSHARD" reshard "$T/t2" --layout dp=1 -o "$T/t3" -q
expect 0 "$MPSHARD" compare "$T/t1" "$T/t3"
expect 0 "$MPSHARD" export "$T/t3" --format llmc -o "$T/tex" -q
cmp -s "$T/tiny/model_00000000.bin" "$T/tex/model_00000000.bin" && ok || bad "tiny llm.c round trip"
# rules: DST == SRC, committed DST without --force, SRC never modified
sum_src() { (cd "$T/a" && sha256sum manifest.json rank-*.h5 | sha256sum); }
before=$(sum_src)
expect 2 "$MPSHARD" reshard "$T/a" --layout dp=2 -o "$T/a";      expect_err "destination is the source"
expect 2 "$MPSHARD" reshard "$T/a" --layout dp=2 -o "$T/b";      expect_err "--force"
expect 0 "$MPSHARD" reshard "$T/a" --layout dp=2 -o "$T/b" -q --force
[ "$before" = "$(sum_src)" ] && ok || bad "SRC was modified"
expect 2 "$MPSHARD" reshard "$T/a" -o "$T/q";                    expect_err "--layout or --zero"
expect 2 "$MPSHARD" reshard "$T/a" --layout tp=4 -o "$T/q";      expect_err "tp=4"
[ ! -e "$T/q" ] && [ ! -e "$T/q.partial" ] && ok || bad "failed reshard left output"
# a corrupt source is refused with its file and tensor, nothing committed
cp -r "$T/a" "$T/bad"
f=$(ls -S "$T"/bad/rank-*.h5 | head -1); sz=$(stat -c %s "$f"); badf=$(basename "$f")
printf '\xff\xff\xff\xff' | dd of="$f" bs=1 seek=$((sz * 2 / 3)) conv=notrunc 2>/dev/null
"$MPSHARD" reshard "$T/bad" --layout dp=1 -o "$T/q" -q 2>"$T/err"; rc=$?
[ "$rc" = 3 ] && ok || bad "corrupt source: exit $rc: $(cat "$T/err")"
[ ! -e "$T/q" ] && [ ! -e "$T/q.partial" ] && ok || bad "corrupt source left output"
# under mpirun the processes split the target files; the result equals the one-process run
if command -v mpirun >/dev/null; then
  rm -rf "$T/mp"
  # (leak checking off for this run only: OpenMPI's unloaded components leak by design)
  ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0" \
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none \
    mpirun --oversubscribe -np 3 "$MPSHARD" reshard "$T/a" --layout dp=3,pp=3,tp=2,zero=3 -o "$T/mp" -q --threads 1 \
    >"$T/out" 2>"$T/err" && ok || bad "mpirun reshard failed: $(tail -5 "$T/err")"
  expect 0 "$MPSHARD" verify "$T/mp" -q
  expect 0 "$MPSHARD" compare "$T/mp" "$T/a"
  rm -rf "$T/sp"
  expect 0 "$MPSHARD" reshard "$T/a" --layout dp=3,pp=3,tp=2,zero=3 -o "$T/sp" -q
  # same layout: the same datasets in the same files, so every file has the same tensor contents
  for r in $(seq 0 17); do
    f=$(printf 'rank-%05d.h5' $r)
    h5ls -r "$T/mp/$f" | sort >"$T/l1"; h5ls -r "$T/sp/$f" | sort >"$T/l2"
    cmp -s "$T/l1" "$T/l2" || bad "$f lists different datasets"
  done; ok
  # a corrupt source under mpirun: every process ends with the failing one's exit code (3), and one
  # line names the damaged file, whichever process mpirun hears from first
  for np in 2 3; do
    ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0" \
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none \
      mpirun --oversubscribe -np $np "$MPSHARD" reshard "$T/bad" --layout dp=1 -o "$T/q" -q --threads 1 >"$T/out" 2>"$T/err"
    rc=$?
    [ "$rc" = 3 ] && ok || bad "mpirun -np $np reshard of a corrupt source: exit $rc: $(grep mpshard "$T/err")"
    [ "$(grep -c '^mpshard reshard: ' "$T/err")" = 1 ] && grep -q "^mpshard reshard: .*$badf" "$T/err" \
      && ok || bad "mpirun -np $np reshard of a corrupt source: messages: $(grep mpshard "$T/err")"
    [ ! -e "$T/q" ] && [ ! -e "$T/q.partial" ] && [ ! -e "$T/q.lock" ] && ok || bad "mpirun reshard left output"
  done
else
  bad "mpirun not installed"
fi
finish
