#!/bin/bash
# Resources: a file size limit (RLIMIT_FSIZE), a full disk (a small tmpfs) and an unwritable output,
# for shard, reshard and export (and a full disk under the trainer's background save): a clean I/O
# error (exit 4, one line naming the file), nothing committed, temporary files removed, a
# checkpoint or model file being replaced (the trainer's latest) left intact.
# mpshard ignores SIGXFSZ itself (cli/mpshard.c), so over the size limit write() fails with EFBIG.
# The tmpfs and read-only cases run in a user + mount namespace (unshare -rm), where an
# unprivileged user may mount; they are skipped, saying so, where namespaces are not allowed.
. "$(dirname "$0")/common.bash"
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_rmaps_base_oversubscribe=1

# nothing_left DIR NAME: no NAME, NAME.partial, NAME.lock, NAME.old-* and no *.tmp in DIR
nothing_left() {
  local left
  left=$(cd "$1" && ls -d "$2" "$2.partial" "$2.lock" "$2".old-* 2>/dev/null)
  [ -z "$left" ] && ok || bad "$3: left behind: $left"
}
no_tmp() {
  local left
  left=$(find "$1" -name '*.tmp' 2>/dev/null)
  [ -z "$left" ] && ok || bad "$2: temporary files left: $left"
}
# fails_io WHAT PATTERN CMD...: exit 4 and one line naming PATTERN
fails_io() {
  local what=$1 pat=$2; shift 2
  "$@" >"$T/out" 2>"$T/err"; local rc=$?
  [ "$rc" = 4 ] && ok || bad "$what: exit $rc (wanted 4): $(head -c 300 "$T/err")"
  grep -q -e "$pat" "$T/err" && [ "$(wc -l <"$T/err")" = 1 ] && ok || bad "$what: message: $(head -c 300 "$T/err")"
}

in_namespace() {
  # here we may mount: $1 is the directory holding the model and reference checkpoints
  local S=$1 mnt need_c need_r pct
  mnt="$T/mnt"; mkdir -p "$mnt"
  # the space each output takes (du: blocks, as tmpfs counts them)
  need_c=$(du -sk "$S/sized-c" | cut -f1) need_r=$(du -sk "$S/sized-r" | cut -f1)
  [ -n "$need_c" ] && [ -n "$need_r" ] || { bad "the reference outputs are missing"; return; }
  # a full disk at several points: before the first file is done, in the middle, near the end
  # (rank files written, manifest or rename left)
  for pct in 5 50 97; do
    mount -t tmpfs -o size=$(( need_c * pct / 100 + 4 ))k tmpfs "$mnt" || { bad "mount tmpfs"; break; }
    fails_io "shard, disk full at $pct%" "$mnt/c" "$MPSHARD" shard "$S/m/model.safetensors" --layout dp=2,tp=2 -o "$mnt/c" -q
    nothing_left "$mnt" c "shard, disk full at $pct%"
    umount "$mnt"
    mount -t tmpfs -o size=$(( need_r * pct / 100 + 4 ))k tmpfs "$mnt"
    fails_io "reshard, disk full at $pct%" "$mnt/r" "$MPSHARD" reshard "$S/ref" --layout tp=3,dp=2 -o "$mnt/r" -q
    nothing_left "$mnt" r "reshard, disk full at $pct%"
    [ "$(find "$mnt" -mindepth 1 | wc -l)" = 0 ] && ok || bad "disk full at $pct%: $(ls -A "$mnt")"
    umount "$mnt"
  done
  # export into a full disk: no model file, no temporary file
  mount -t tmpfs -o size=300k tmpfs "$mnt"
  fails_io "export, disk full" "$mnt/e" "$MPSHARD" export "$S/ref" --format safetensors -o "$mnt/e" -q
  [ ! -e "$mnt/e/model.safetensors" ] && ok || bad "export into a full disk left a model file"
  no_tmp "$mnt" "export, disk full"
  umount "$mnt"
  # replacing with --force on a full disk: the old checkpoint stays committed and whole
  mount -t tmpfs -o size=$(( $(du -sk "$S/ref" | cut -f1) * 3 / 2 ))k tmpfs "$mnt"
  cp -r "$S/ref" "$mnt/c"
  fails_io "shard --force, disk full" "$mnt/c" "$MPSHARD" shard "$S/m/model.safetensors" --layout tp=3 -o "$mnt/c" -q --force \
    --synthetic-optimizer 8
  expect 0 "$MPSHARD" verify "$mnt/c" -q
  expect 0 "$MPSHARD" compare "$mnt/c" "$S/ref"
  [ ! -e "$mnt/c.partial" ] && ok || bad "shard --force, disk full: c.partial left"
  umount "$mnt"
  # an unwritable output: a read-only file system
  mount -t tmpfs -o ro,size=1m tmpfs "$mnt"
  fails_io "shard, read-only" "$mnt/c" "$MPSHARD" shard "$S/m/model.safetensors" --layout dp=2 -o "$mnt/c" -q
  fails_io "reshard, read-only" "$mnt/r" "$MPSHARD" reshard "$S/ref" --layout dp=1 -o "$mnt/r" -q
  fails_io "export, read-only" "$mnt/e" "$MPSHARD" export "$S/ref" --format llmc -o "$mnt/e" -q
  grep -q "Read-only file system" "$T/err" && ok || bad "read-only: message lacks the cause: $(cat "$T/err")"
  umount "$mnt"
  # the trainer: room for one checkpoint and a half, a save every step. The save of step 2 runs in
  # the background and its writer hits the full disk: the run fails with the writer's line, its
  # staging and lock are removed, latest still names step 1, which verifies
  local tr=(--data "$S/tok.bin" --global-batch 8 --micro-batch 2 --seq 16 --steps 4 --save-every 1 -q)
  need_c=$(du -sk "$S/tr1/step-00000001" | cut -f1)
  for np in 1 2; do
    [ "$np" = 1 ] || command -v mpirun >/dev/null || continue
    mount -t tmpfs -o size=$(( need_c * 3 / 2 + 8 ))k tmpfs "$mnt"
    if [ "$np" = 1 ]; then
      # (the disk fills during a data write, "No space left on device", or during the metadata
      # flush, where HDF5 gives no errno: "writing metadata failed (disk full?)"; which one depends on
      # the sizes and the timing of the writers)
      fails_io "train, disk full" "step-00000002.partial/rank-00000.h5: writing .*\(No space left on device\|disk full\)" \
        "$MPSHARD" train --ckpt "$S/trinit" --layout dp=1 "${tr[@]}" --out "$mnt/run"
    else # (each rank prints the writer's line, mpirun adds its own)
      # (leak checking off under mpirun: OpenMPI's components leak by design)
      ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0" mpirun -np 2 "$MPSHARD" train --ckpt "$S/trinit" --layout dp=2 "${tr[@]}" --out "$mnt/run" >"$T/out" 2>"$T/err"
      [ "$?" = 4 ] && grep -q "^mpshard train: .*step-00000002.partial/rank-0000[01].h5: .*\(No space left on device\|disk full\)" "$T/err" \
        && ok || bad "train np 2, disk full: $(head -c 300 "$T/err")"
    fi
    [ "$(cat "$mnt/run/latest" 2>/dev/null)" = step-00000001 ] && ok || bad "train np $np, disk full: latest $(cat "$mnt/run/latest")"
    nothing_left "$mnt/run" step-00000002 "train np $np, disk full"
    no_tmp "$mnt/run" "train np $np, disk full"
    expect 0 "$MPSHARD" verify "$mnt/run/step-00000001" -q
    umount "$mnt"
  done
}
# (two statements: an error that aborts in_namespace must not fall through to the outer part)
if [ "${1:-}" = --in-namespace ]; then in_namespace "$2"; fi
if [ "${1:-}" = --in-namespace ]; then finish; exit; fi

expect 0 "$MPSHARD" synth --config "$SMALL" --format safetensors --seed 9 -o "$T/m"
expect 0 "$MPSHARD" shard "$T/m/model.safetensors" --layout dp=2,pp=2,zero=1 -o "$T/ref" -q --synthetic-optimizer 4
expect 0 "$MPSHARD" export "$T/ref" --format safetensors -o "$T/refex" -q

# 1. a file size limit of 64 KiB: every command fails with EFBIG (not killed by SIGXFSZ)
lim() { (ulimit -f 64; exec "$@"); }
fails_io "shard, size limit" "rank-0000[0-9].h5.*\(File too large\|failed\)" lim "$MPSHARD" shard "$T/m/model.safetensors" --layout dp=2 -o "$T/c" -q
nothing_left "$T" c "shard, size limit"
fails_io "reshard, size limit" "rank-0000[0-9].h5" lim "$MPSHARD" reshard "$T/ref" --layout tp=2 -o "$T/r" -q
nothing_left "$T" r "reshard, size limit"
mkdir "$T/e"
fails_io "export, size limit" "model.safetensors.tmp.*File too large" lim "$MPSHARD" export "$T/ref" --format safetensors -o "$T/e" -q
[ -z "$(ls -A "$T/e")" ] && ok || bad "export, size limit: left $(ls -A "$T/e")"
fails_io "export llmc, size limit" "model_00000000.bin.tmp.*File too large" lim "$MPSHARD" export "$T/ref" --format llmc -o "$T/e" -q
[ -z "$(ls -A "$T/e")" ] && ok || bad "export llmc, size limit: left $(ls -A "$T/e")"
# replacing: the committed checkpoint and the exported model stay as they were
cp -r "$T/ref" "$T/old"
fails_io "shard --force, size limit" "rank-0000[0-9].h5" lim "$MPSHARD" shard "$T/m/model.safetensors" --layout tp=3 -o "$T/old" -q --force
expect 0 "$MPSHARD" verify "$T/old" -q
expect 0 "$MPSHARD" compare "$T/old" "$T/ref"
fails_io "reshard --force, size limit" "rank-0000[0-9].h5" lim "$MPSHARD" reshard "$T/ref" --layout tp=3 -o "$T/old" -q --force
expect 0 "$MPSHARD" compare "$T/old" "$T/ref"
[ ! -e "$T/old.partial" ] && [ ! -e "$T/old.lock" ] && ok || bad "replace under a size limit left staging or lock"
cp -r "$T/refex" "$T/oldex"
fails_io "export over a model, size limit" "model.safetensors.tmp" lim "$MPSHARD" export "$T/ref" --format safetensors -o "$T/oldex" -q --force
cmp -s "$T/oldex/model.safetensors" "$T/refex/model.safetensors" && ok || bad "export under a size limit damaged the old model"
no_tmp "$T/oldex" "export over a model, size limit"
# and the same commands complete once the limit is lifted
expect 0 "$MPSHARD" shard "$T/m/model.safetensors" --layout dp=2 -o "$T/c" -q
expect 0 "$MPSHARD" verify "$T/c" -q

# 2. an output whose parent is a regular file (works whatever the user)
: >"$T/afile"
fails_io "shard, parent is a file" "afile" "$MPSHARD" shard "$T/m/model.safetensors" --layout dp=2 -o "$T/afile/c" -q
fails_io "export, parent is a file" "afile" "$MPSHARD" export "$T/ref" --format llmc -o "$T/afile/e" -q
# an unwritable directory, where permissions bind (not root)
if [ "$(id -u)" != 0 ]; then
  mkdir "$T/ro"; chmod 555 "$T/ro"
  fails_io "shard, unwritable" "Permission denied" "$MPSHARD" shard "$T/m/model.safetensors" --layout dp=2 -o "$T/ro/c" -q
  fails_io "reshard, unwritable" "Permission denied" "$MPSHARD" reshard "$T/ref" --layout dp=1 -o "$T/ro/r" -q
  fails_io "export, unwritable" "Permission denied" "$MPSHARD" export "$T/ref" --format llmc -o "$T/ro/e" -q
  [ -z "$(ls -A "$T/ro")" ] && ok || bad "unwritable: left $(ls -A "$T/ro")"
  chmod 755 "$T/ro"
fi

# 3. a full disk and a read-only file system, in a mount namespace
mkdir -p "$T/probe"
if [ -z "${MPS_RESOURCES_INNER:-}" ] && unshare -rm sh -c "mount -t tmpfs -o size=1m tmpfs '$T/probe'" 2>/dev/null; then
  expect 0 "$MPSHARD" shard "$T/m/model.safetensors" --layout dp=2,tp=2 -o "$T/sized-c" -q
  expect 0 "$MPSHARD" reshard "$T/ref" --layout tp=3,dp=2 -o "$T/sized-r" -q
  expect 0 "$MPSHARD" tokens --count 20000 --vocab 250 -o "$T/tok.bin"
  expect 0 "$MPSHARD" init --config "n_layer=2,n_embd=48,n_head=6,vocab=250,n_positions=32" --layout dp=1 -o "$T/trinit" -q
  expect 0 "$MPSHARD" train --ckpt "$T/trinit" --layout dp=1 --data "$T/tok.bin" --global-batch 8 \
    --micro-batch 2 --seq 16 --steps 1 --out "$T/tr1" -q
  MPS_RESOURCES_INNER=1 unshare -rm bash "$0" --in-namespace "$T" >"$T/ns.out" 2>&1; rc=$?
  [ "$rc" = 0 ] && ok || bad "namespace part: $(cat "$T/ns.out")"
  tail -1 "$T/ns.out"
else
  echo "SKIP: cannot mount a tmpfs in a user namespace here (unshare -rm): the disk-full and read-only cases did not run"
fi
finish
