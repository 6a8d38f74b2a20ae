#!/bin/bash
# The README's examples run as written: every ```sh block of README.md, in order, in one empty
# directory (as a reader following the guide would), with the built mpshard first on PATH. A block
# fails the test when any of its commands fails; then what the walkthrough says it produces is checked.
source "$(dirname "$0")/common.bash"
README="${MPS_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}/README.md"
[ -r "$README" ] || { bad "no README at $README"; finish; exit 1; }
command -v mpirun >/dev/null || { bad "mpirun not installed"; finish; exit 1; }
BIN="$T/bin"; mkdir -p "$BIN" "$T/work"
ln -s "$(cd "$(dirname "$MPSHARD")" && pwd)/$(basename "$MPSHARD")" "$BIN/mpshard"
export PATH="$BIN:$PATH"
export ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0" # the examples run mpirun: OpenMPI's components leak by design

# block-N.sh per ```sh fence; block-N.line: the README line it starts on
awk -v dir="$T" '
  /^```sh[[:space:]]*$/ { n++; f = sprintf("%s/block-%02d.sh", dir, n); print NR > (f ".line"); inblk = 1; next }
  inblk && /^```/ { inblk = 0; close(f); next }
  inblk { print > f }' "$README"
blocks=("$T"/block-*.sh)
# the walkthrough alone has six; fewer means the extraction (or the README) lost them
[ "${#blocks[@]}" -ge 6 ] && ok || bad "only ${#blocks[@]} sh blocks found in $README"

for b in "${blocks[@]}"; do
  line=$(cat "$b.line")
  if (cd "$T/work" && bash -euo pipefail "$b") >"$b.log" 2>&1; then ok
  else bad "README.md line $line: a command of this block failed: $(tail -5 "$b.log")"; fi
done

# What the walkthrough says: split writes the layout its train command uses, the checkpoint holds
# the model bit for bit, the resumed run reaches step 3, and the bf16 export restores config.json.
W="$T/work"
want=$(grep -o -- '--ckpt ck4 --layout [^ ]*' "$README" | head -1 | awk '{print $4}')
got=$(jq -r '.layout | "dp=\(.dp),pp=\(.pp),tp=\(.tp),zero=\(.zero)"' "$W/ck4/manifest.json" 2>/dev/null)
norm() { local d=1 p=1 t=1 z=0 kv; for kv in ${1//,/ }; do case $kv in dp=*) d=${kv#*=};; pp=*) p=${kv#*=};; tp=*) t=${kv#*=};; zero=*) z=${kv#*=};; esac; done; echo "dp=$d,pp=$p,tp=$t,zero=$z"; }
[ -n "$want" ] && [ "$(norm "$want")" = "$got" ] && ok || bad "split wrote $got, the README trains ck4 with --layout '$want'"
grep -q "identical: the checkpoint's parameters and the model file's tensors, bit for bit" "$T"/block-*.log \
  && ok || bad "compare mymodel ck4 did not report identical"
[ "$(cat "$W/run/latest" 2>/dev/null)" = step-00000003 ] && ok || bad "run/latest: $(cat "$W/run/latest" 2>&1)"
cmp -s "$W/mymodel/config.json" "$W/mymodel-tuned/config.json" && ok || bad "export did not restore config.json"
grep -q "within tolerance (rtol 0.01, atol 0): 0 of 39 tensors" "$T"/block-*.log && ok || bad "compare run mymodel-tuned --rtol 1e-2"
finish
