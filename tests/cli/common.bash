# Shared helpers of the CLI tests: $MPSHARD is the binary, $T a fresh scratch directory.
set -u
: "${MPSHARD:?MPSHARD must point to the mpshard binary}"
T="${MPS_TEST_TMP:-/tmp}/$(basename "$0" .sh).$$"
rm -rf "$T"; mkdir -p "$T"
trap 'rm -rf "$T"' EXIT
PASS=0; FAIL=0
ok() { PASS=$((PASS+1)); }
bad() { FAIL=$((FAIL+1)); echo "FAIL: $*" >&2; }
# expect CODE CMD...: runs CMD, checks its exit code, keeps stderr in $T/err
expect() {
  local want=$1; shift
  "$@" >"$T/out" 2>"$T/err"; local got=$?
  if [ "$got" = "$want" ]; then ok; else bad "exit $got (wanted $want): $* :: $(head -c 400 "$T/err")"; fi
}
# expect_err PATTERN: the last command's stderr matches PATTERN, in one line
expect_err() {
  if grep -qE -e "$1" "$T/err" && [ "$(wc -l <"$T/err")" -le 2 ]; then ok; else bad "stderr lacks /$1/: $(head -c 400 "$T/err")"; fi
}
finish() { echo "$PASS passed, $FAIL failed"; [ "$FAIL" = 0 ]; }
SMALL="n_layer=3,n_embd=96,n_head=6,vocab=1000,n_positions=64"
