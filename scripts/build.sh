#!/bin/bash
# make build / make asan: configure and build into DIR quietly. One line when it worked; the
# compiler's errors (and where the whole log is) when it did not.
# usage: scripts/build.sh DIR JOBS [cmake options...]
set -uo pipefail
dir=$1 jobs=$2
shift 2
mkdir -p "$dir"
log="$dir/build.log"
if ! cmake -S . -B "$dir" "$@" >"$log" 2>&1; then
  cat "$log" >&2
  echo "cmake configure failed (log: $log)" >&2
  exit 1
fi
if ! cmake --build "$dir" -j "$jobs" >>"$log" 2>&1; then
  # the compiler's messages: each error with the lines gcc/nvcc print around it
  grep -E -B2 -A6 '(error|Error)[: ]' "$log" | grep -v -E '^((g?make|gmake)\[[0-9]+\]|\[ *[0-9]+%\]|--$)' | head -80 >&2
  echo "build failed (whole log: $log)" >&2
  exit 1
fi
echo "built $dir/mpshard (log: $log)"
