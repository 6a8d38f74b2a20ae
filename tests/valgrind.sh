#!/bin/bash
# The main CLI paths on a tiny model under valgrind (memcheck): no invalid access, no use of
# uninitialised memory, no definite or indirect leak. "Still reachable" blocks (HDF5's and
# OpenMPI's global state, kept until exit by design) are not leaks and not counted.
# Failure paths are included: a corrupt checkpoint and a full disk (RLIMIT_FSIZE).
#   tests/valgrind.sh [MPSHARD]        (make valgrind)
# tests/valgrind.supp holds the suppressions, each with the reason it is not ours.
set -u
MPSHARD=${1:-${MPSHARD:-build/mpshard}}
SUPP="$(cd "$(dirname "$0")" && pwd)/valgrind.supp"
command -v valgrind >/dev/null || { echo "valgrind is not installed: apt-get install -y valgrind" >&2; exit 1; }
T=$(mktemp -d "${TMPDIR:-/tmp}/mps-valgrind.XXXXXX")
trap 'rm -rf "$T"' EXIT
PASS=0 FAIL=0
VG=(valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect
    --error-exitcode=99 --track-origins=yes --suppressions="$SUPP" --log-file="$T/vg.%p")
# vg WANT ARGS...: runs mpshard ARGS under valgrind, expects exit WANT and a clean report
vg() {
  local want=$1; shift
  rm -f "$T"/vg.*
  "${VG[@]}" "$MPSHARD" "$@" >"$T/out" 2>"$T/err"; local rc=$?
  if [ "$rc" = "$want" ] && ! grep -q . "$T"/vg.* 2>/dev/null; then
    PASS=$((PASS + 1)); echo "ok    $*"
  else
    FAIL=$((FAIL + 1)); echo "FAIL  $* (exit $rc, wanted $want)"; cat "$T"/vg.* "$T/err" | head -60
    return 1
  fi
}
C="n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=16"
vg 0 synth --config "$C" --format safetensors -o "$T/m"
vg 0 synth --config "$C" --format llmc --dtype bf16 -o "$T/ml"
vg 0 shard "$T/m/model.safetensors" --layout dp=2,tp=2,pp=2,zero=1 -o "$T/a" -q --synthetic-optimizer 3 --threads 2
vg 0 shard "$T/ml/model_00000000.bin" --layout tp=2 -o "$T/b" -q
vg 0 verify "$T/a" -q --threads 2
vg 0 verify "$T/a" --json
vg 0 reshard "$T/a" --layout dp=3,tp=4,zero=3 -o "$T/r" -q --threads 2
vg 0 reshard "$T/r" --zero 0 -o "$T/a" -q --force
vg 0 export "$T/r" --format safetensors -o "$T/e" -q --threads 2
vg 0 export "$T/b" --format llmc -o "$T/el" -q
vg 0 inspect "$T/r"
vg 0 inspect "$T/r" --check --tensors --json
vg 0 inspect --model gpt2 --layout dp=2,tp=2 --svg "$T/p.svg"
vg 0 inspect --model gpt2-xl --gpus 8 --gpu-mem 80GiB --suggest --top 3
vg 0 compare "$T/a" "$T/r"
vg 0 compare "$T/m/model.safetensors" "$T/e/model.safetensors"
vg 1 compare "$T/m/model.safetensors" "$T/ml/model_00000000.bin"
vg 0 load "$T/r" --layout dp=2,pp=2 --rank 3 --checksum --threads 2
# failure paths: usage, corrupt input, a full disk
vg 2 shard "$T/m/model.safetensors" --layout tp=3 -o "$T/x" -q
vg 2 reshard "$T/a" --layout dp=2 -o "$T/r" -q
# (a model whose files are mostly chunk data, so that the flipped byte lands in a chunk)
vg 0 synth --config "n_layer=1,n_embd=64,n_head=4,vocab=2000,n_positions=16" --format llmc -o "$T/mc"
vg 0 shard "$T/mc/model_00000000.bin" --layout tp=2 -o "$T/bad" -q
cp -r "$T/bad" "$T/good"
f="$T/bad/rank-00000.h5"; sz=$(stat -c %s "$f")
printf '\xff\xff\xff\xff' | dd of="$f" bs=1 seek=$((sz / 2)) conv=notrunc 2>/dev/null
vg 3 verify "$T/bad" -q
grep -q "fails its checksum\|chunk" "$T/err" || { FAIL=$((FAIL + 1)); echo "FAIL  the flipped byte is not in a chunk: $(cat "$T/err")"; }
vg 3 export "$T/bad" --format llmc -o "$T/x1" -q
vg 3 reshard "$T/bad" --layout dp=1 -o "$T/x2" -q
vg 3 load "$T/bad" --layout dp=1 --rank 0
vg 3 compare "$T/good" "$T/bad"
rm "$T/bad/rank-00001.h5"
vg 3 inspect "$T/bad"
vg 3 verify "$T/bad" -q
(ulimit -f 16; vg 4 shard "$T/m/model.safetensors" --layout dp=2 -o "$T/full" -q) ; rc=$?
[ $rc = 0 ] && PASS=$((PASS + 1)) || FAIL=$((FAIL + 1))
(ulimit -f 16; vg 4 export "$T/a" --format safetensors -o "$T/fe" -q) ; rc=$?
[ $rc = 0 ] && PASS=$((PASS + 1)) || FAIL=$((FAIL + 1))
echo "valgrind: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
