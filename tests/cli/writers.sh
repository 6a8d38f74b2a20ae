#!/bin/bash
# Writers never delete or overwrite what they did not create (issue 22): a stale DIR.partial is
# removed only when DIR.lock records it as a writer's (or when it is empty), never when it is the
# input; a DIR.lock that is not an mpshard lock is refused; temporary files are never written
# through a symbolic or hard link; an output that is a symbolic link is written where it points;
# a refused writer leaves no lock behind. Each refusal is exit 2 with one line naming the path,
# and what was there is byte for byte as it was.
. "$(dirname "$0")/common.bash"
MID="n_layer=4,n_embd=256,n_head=8,vocab=4000,n_positions=128"
expect 0 "$MPSHARD" synth --config "$SMALL" --format safetensors -o "$T/m"
M="$T/m/model.safetensors"
expect 0 "$MPSHARD" shard "$M" --layout dp=1 -o "$T/ck" -q --synthetic-optimizer 3
same_tree() { diff -r "$1" "$2" >/dev/null && ok || bad "$3: $1 changed"; }
cd "$T" || exit 1

# 1. a checkpoint copied to NAME.partial, resharded into NAME: the source is the staging directory
cp -r ck mine.partial
expect 2 "$MPSHARD" reshard mine.partial --layout tp=2 -o mine -q
expect_err "^mpshard reshard: mine.partial: the input mine.partial lies in this directory, which is the staging directory of this output"
same_tree ck mine.partial "reshard NAME.partial -o NAME"
[ ! -e mine ] && [ ! -e mine.lock ] && ok || bad "reshard NAME.partial -o NAME left $(ls -d mine mine.lock 2>/dev/null)"
# ... also when NAME.lock records it as a killed writer's staging directory (and the lock stays)
printf 'mpshard lock\nstaging %s\n' "$(stat -c '%d %i' mine.partial)" >mine.lock
expect 2 "$MPSHARD" reshard mine.partial --layout tp=2 -o mine -q; expect_err "the input mine.partial lies in"
same_tree ck mine.partial "reshard NAME.partial -o NAME, recorded in NAME.lock"
[ -f mine.lock ] && [ ! -e mine ] && ok || bad "reshard NAME.partial -o NAME removed the lock it found"
# a shard whose input is inside the staging directory
mkdir -p dst.partial && cp m/* dst.partial/
expect 2 "$MPSHARD" shard dst.partial/model.safetensors --layout dp=1 -o dst -q
expect_err "the input dst.partial/model.safetensors lies in this directory"
cmp -s m/model.safetensors dst.partial/model.safetensors && ok || bad "shard removed its input"

# 2. an unrelated NAME.partial and NAME.lock are left alone, without and with --force
mkdir -p results.partial/thesis; echo keep >results.partial/thesis/ch1.txt; echo notes >results.lock
expect 2 "$MPSHARD" reshard ck --layout tp=2 -o results -q
expect_err "^mpshard reshard: results.lock exists and is not an mpshard lock file: refusing to touch it"
expect 2 "$MPSHARD" reshard ck --layout tp=2 -o results -q --force
[ "$(cat results.lock)" = notes ] && [ "$(cat results.partial/thesis/ch1.txt)" = keep ] && ok || bad "results.* changed"
rm results.lock
expect 2 "$MPSHARD" shard "$M" --layout tp=2 -o results -q
expect_err "^mpshard shard: results.partial exists and is not a staging directory this program left \(results.lock does not record it\)"
[ "$(cat results.partial/thesis/ch1.txt)" = keep ] && [ ! -e results.lock ] && [ ! -e results ] && ok \
  || bad "shard into results touched results.partial or left a lock"
ln -s ck lockdir; ln -s notes-elsewhere results2.lock
expect 2 "$MPSHARD" reshard ck --layout tp=2 -o results2 -q; expect_err "results2.lock is a symbolic link"
[ -L results2.lock ] && ok || bad "the symbolic link results2.lock was removed"
# an empty NAME.partial holds nothing: it is taken
mkdir empty.partial
expect 0 "$MPSHARD" reshard ck --layout tp=2 -o empty -q
expect 0 "$MPSHARD" compare ck empty
# a staging directory left by a killed writer (the lock records it) is removed by the next writer
expect 0 "$MPSHARD" synth --config "$MID" --format safetensors --seed 2 -o big
"$MPSHARD" shard big/model.safetensors --layout dp=2,tp=2 -o killed -q --threads 1 --synthetic-optimizer 1 &
pid=$!
for _ in $(seq 2000); do [ -e killed.partial/rank-00000.h5 ] && break; sleep 0.005; done
kill -KILL $pid; wait $pid 2>/dev/null
[ -d killed.partial ] && [ -f killed.lock ] && ok || bad "the killed shard left no staging or lock"
expect 0 "$MPSHARD" shard big/model.safetensors --layout dp=2 -o killed -q
[ ! -e killed.partial ] && [ ! -e killed.lock ] && ok || bad "the rerun left the stale staging"
expect 0 "$MPSHARD" verify killed -q

# 3. temporary files: a symbolic link (or another hard link) in their place is refused, never written
echo victim >victim
mkdir ex && ln -s ../victim ex/model.safetensors.tmp
expect 2 "$MPSHARD" export ck --format safetensors -o ex -q
expect_err "^mpshard export: ex/model.safetensors.tmp is a symbolic link: refusing to write through it"
mkdir ex2 && ln -s ../victim ex2/config.json.tmp
expect 2 "$MPSHARD" export ck --format safetensors -o ex2 -q
expect_err "ex2/config.json.tmp is a symbolic link"
[ -L ex2/config.json.tmp ] && [ ! -e ex2/model.safetensors ] && [ ! -e ex2/model.safetensors.tmp ] && ok \
  || bad "export with a linked config.json.tmp: $(ls ex2)"
# a final file that is a symbolic link is replaced by the new file (--force: it exists), never written through
mkdir ex4 && ln -s ../victim ex4/model.safetensors
expect 0 "$MPSHARD" export ck --format safetensors -o ex4 -q --force
[ -f ex4/model.safetensors ] && [ ! -L ex4/model.safetensors ] && ok || bad "ex4/model.safetensors is still a link"
expect 0 "$MPSHARD" compare m/model.safetensors ex4/model.safetensors
mkdir sy && ln -s ../victim sy/config.json.tmp
expect 2 "$MPSHARD" synth --config "$SMALL" --format safetensors -o sy
ln -s victim tok.bin.tmp
expect 2 "$MPSHARD" tokens --count 1000 --vocab 100 -o tok.bin; expect_err "tok.bin.tmp is a symbolic link"
ln victim tok2.bin.tmp
expect 2 "$MPSHARD" tokens --count 1000 --vocab 100 -o tok2.bin; expect_err "tok2.bin.tmp: has other hard links"
mkfifo ex3.tmp.fifo; mkdir ex3 && mv ex3.tmp.fifo ex3/model_00000000.bin.tmp
expect 2 timeout 60 "$MPSHARD" export ck --format llmc -o ex3 -q; expect_err "model_00000000.bin.tmp is a FIFO"
expect 0 "$MPSHARD" tokens --count 20000 --vocab 1000 -o data.bin
mkdir run && ln -s ../victim run/latest.tmp
OMP_NUM_THREADS=1 "$MPSHARD" train --ckpt ck --layout dp=1 --data data.bin --steps 1 --global-batch 2 --micro-batch 2 \
  --seq 16 --out run -q >"$T/out" 2>"$T/err"; rc=$?
[ "$rc" = 2 ] && ok || bad "train with a linked latest.tmp: exit $rc: $(cat "$T/err")"
expect_err "run/latest.tmp is a symbolic link"
[ "$(cat victim)" = victim ] && [ "$(stat -c %h victim)" = 2 ] && ok || bad "victim was written: $(head -c 100 victim)"

# 4. an output that is a symbolic link: written where it points, the link left as it is
mkdir elsewhere && cp -r ck elsewhere/ckA && ln -s elsewhere/ckA link1
expect 0 "$MPSHARD" reshard ck --layout tp=2 -o link1 -q --force
[ "$(readlink link1)" = elsewhere/ckA ] && ok || bad "link1 is no longer the link: $(ls -ld link1)"
expect 0 "$MPSHARD" verify elsewhere/ckA -q
grep -q '"tp": 2' elsewhere/ckA/manifest.json && ok || bad "elsewhere/ckA is not the new checkpoint"
expect 0 "$MPSHARD" compare ck elsewhere/ckA
[ -z "$(ls -d link1.* elsewhere/ckA.* 2>/dev/null)" ] && ok || bad "staging or lock left: $(ls -d link1.* elsewhere/*)"
mkdir newdir && ln -s newdir link2
expect 0 "$MPSHARD" shard "$M" --layout dp=2 -o link2/ -q
[ -L link2 ] && [ -f newdir/manifest.json ] && ok || bad "shard -o LINK to an empty directory"
ln -s nowhere link3
expect 2 "$MPSHARD" reshard ck --layout tp=2 -o link3 -q; expect_err "link3 is a symbolic link to nothing"
[ -L link3 ] && [ ! -e nowhere ] && [ ! -e link3.lock ] && ok || bad "reshard -o a dangling link changed something"

# 11. a refused writer leaves no lock; a missing input file is exit 3
expect 2 "$MPSHARD" reshard ck --layout tp=2 -o empty -q; expect_err "pass --force"
[ ! -e empty.lock ] && ok || bad "the refused writer left empty.lock"
expect 2 "$MPSHARD" shard "$M" --layout dp=2 -o killed -q
[ ! -e killed.lock ] && ok || bad "the refused shard left killed.lock"
expect 3 "$MPSHARD" shard "$T/none/model.safetensors" --layout dp=1 -o never -q
expect_err "none/model.safetensors: cannot open: No such file or directory"
expect 3 "$MPSHARD" eval --ckpt ck --data "$T/none.bin"; expect_err "none.bin: cannot open"
[ ! -e never ] && [ ! -e never.lock ] && ok || bad "a failed shard left output"
finish
