#!/bin/bash
# Concurrency: two commands writing the same output (shard, reshard, export; with and without
# --force): the second fails at once (exit 4, naming the lock) and the first completes. The first
# is stopped (SIGSTOP) while it holds the output, so the outcome does not depend on timing.
. "$(dirname "$0")/common.bash"
MID="n_layer=4,n_embd=256,n_head=8,vocab=4000,n_positions=128"
expect 0 "$MPSHARD" synth --config "$MID" --format safetensors --seed 2 -o "$T/m"
M="$T/m/model.safetensors"
expect 0 "$MPSHARD" shard "$M" --layout dp=2,tp=2 -o "$T/ref" -q --synthetic-optimizer 1

# hold PATH CMD...: starts CMD in the background and stops it once PATH exists (non-empty for a
# file); sets $pid. Fails if CMD ends first.
hold() {
  local path=$1; shift
  "$@" >"$T/first.out" 2>"$T/first.err" &
  pid=$!
  for _ in $(seq 2000); do
    if [ -d "$path" ] || [ -s "$path" ]; then kill -STOP $pid; return 0; fi
    kill -0 $pid 2>/dev/null || break
    sleep 0.005
  done
  wait $pid; bad "first command ended before $path appeared: $(cat "$T/first.err")"; return 1
}
release() { # the first command goes on and must succeed
  kill -CONT $pid; wait $pid; local rc=$?
  [ "$rc" = 0 ] && ok || bad "$1: the first command failed (exit $rc): $(cat "$T/first.err")"
}
second_fails() { # WHAT CMD...: exit 4, one line about the other process
  local what=$1; shift
  "$@" >"$T/out" 2>"$T/err"; local rc=$?
  [ "$rc" = 4 ] && ok || bad "$what: second writer exit $rc (wanted 4): $(head -c 300 "$T/err")"
  grep -q "another mpshard process is writing" "$T/err" && [ "$(wc -l <"$T/err")" = 1 ] && ok \
    || bad "$what: message: $(head -c 300 "$T/err")"
}
clean_after() { [ ! -e "$1.partial" ] && [ ! -e "$1.lock" ] && ok || bad "$1: staging or lock left: $(ls -d "$1".*)"; }

# 1. two shards into the same new directory
if hold "$T/c.partial" "$MPSHARD" shard "$M" --layout dp=2,tp=2 -o "$T/c" -q --threads 1 --synthetic-optimizer 1; then
  second_fails "shard + shard" "$MPSHARD" shard "$M" --layout tp=4 -o "$T/c" -q
  second_fails "shard + shard --force" "$MPSHARD" shard "$M" --layout tp=4 -o "$T/c" -q --force
  second_fails "shard + reshard" "$MPSHARD" reshard "$T/ref" --layout dp=4 -o "$T/c" -q --force
  [ -d "$T/c.partial" ] && ok || bad "the second writer removed the first one's staging directory"
  release "shard + shard"
  expect 0 "$MPSHARD" verify "$T/c" -q
  expect 0 "$MPSHARD" compare "$T/c" "$T/ref"
  grep -q '"tp": 2' "$T/c/manifest.json" && ok || bad "the first shard's layout is not the one committed"
  clean_after "$T/c"
fi

# 2. a reshard replacing a checkpoint (--force), and a second reshard into it
if hold "$T/c.partial" "$MPSHARD" reshard "$T/ref" --layout pp=2,tp=4 -o "$T/c" -q --threads 1 --force; then
  second_fails "reshard + reshard" "$MPSHARD" reshard "$T/ref" --layout dp=4 -o "$T/c" -q --force
  # while the first is held, DIR is still the old checkpoint, whole
  expect 0 "$MPSHARD" verify "$T/c" -q
  release "reshard + reshard"
  expect 0 "$MPSHARD" verify "$T/c" -q
  expect 0 "$MPSHARD" compare "$T/c" "$T/ref"
  grep -q '"pp": 2' "$T/c/manifest.json" && ok || bad "the first reshard's layout is not the one committed"
  clean_after "$T/c"
fi

# 3. two exports into the same directory (the temporary file is the lock), both formats
for fmt in safetensors llmc; do
  case $fmt in safetensors) f=model.safetensors ;; llmc) f=model_00000000.bin ;; esac
  rm -rf "$T/e"
  if hold "$T/e/$f.tmp" "$MPSHARD" export "$T/ref" --format $fmt -o "$T/e" -q --threads 1 --memory-mb 1; then
    second_fails "export + export ($fmt)" "$MPSHARD" export "$T/ref" --format $fmt -o "$T/e" -q
    [ ! -e "$T/e/$f" ] && ok || bad "export: the second writer committed a file"
    release "export + export ($fmt)"
    expect 0 "$MPSHARD" compare "$M" "$T/e/$f"
    [ -z "$(find "$T/e" -name '*.tmp')" ] && ok || bad "export: temporary files left: $(ls "$T/e")"
  fi
done
# 4. readers while a writer replaces the checkpoint (--force) again and again: each read is of the
#    old or of the new checkpoint, whole (exit 0), or fails cleanly naming a file that changed under
#    it (exit 3); never a checksum failure (which would be data of two checkpoints mixed)
rm -rf "$T/c"; cp -r "$T/ref" "$T/c"
( for i in 1 2 3 4; do "$MPSHARD" shard "$M" --layout "dp=$((i % 2 + 1)),tp=2" -o "$T/c" -q --force --threads 1 \
    --synthetic-optimizer 1 || exit 1; done ) &
wpid=$!
reads=0 clean=0
while kill -0 $wpid 2>/dev/null; do
  "$MPSHARD" verify "$T/c" -q --threads 1 >"$T/out" 2>"$T/err"; rc=$?
  reads=$((reads + 1))
  if [ "$rc" = 0 ]; then clean=$((clean + 1))
  elif [ "$rc" = 3 ] && ! grep -v -e "another checkpoint" -e "missing" -e "truncated or replaced" -e "replaced while" \
       -e "not a committed" -e "problems\? found" "$T/err" | grep -q .; then :
  else bad "reader during a replace: exit $rc: $(head -c 400 "$T/err")"; fi
done
wait $wpid && ok || bad "the writer failed while being read"
echo "readers during replaces: $reads reads, $clean whole"
expect 0 "$MPSHARD" verify "$T/c" -q
expect 0 "$MPSHARD" compare "$T/c" "$T/ref"
# after all that, a writer runs normally
expect 0 "$MPSHARD" export "$T/ref" --format safetensors -o "$T/e" -q
expect 0 "$MPSHARD" shard "$M" --layout dp=4 -o "$T/c" -q --force
expect 0 "$MPSHARD" verify "$T/c" -q
finish
