#!/bin/bash
# usage: tests/fuzz/run.sh SECONDS [TARGET...]
#
# Builds the libFuzzer targets (clang, -DMPS_FUZZ=ON) in a build directory of their own
# ($MPS_FUZZ_BUILD, default build-fuzz/ in the repository) and runs each TARGET (default: all
# tests/fuzz/fuzz_*.c; "safetensors" and "fuzz_safetensors" both name one) for SECONDS, starting
# from a scratch copy of tests/fuzz/corpus/<name>/ (the committed corpus never grows). Prints one
# summary line per target; a finding's input is kept under $MPS_FUZZ_BUILD/artifacts/<target>/.
# Exit status: 0 no findings, 1 a finding or a build failure, 77 skipped (no clang with libFuzzer
# and MPS_SKIP_FUZZ=1).
#
# Environment: MPS_FUZZ_JOBS (targets run at once, default 1), MPS_FUZZ_BUILD_JOBS (compile
# jobs, default 2), MPS_SKIP_FUZZ=1 (skip instead of failing when clang is missing), and
# MPS_FUZZ_ARGS (extra libFuzzer options).
set -u
if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 SECONDS [TARGET...]" >&2
  exit 2
fi
secs=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=${MPS_FUZZ_BUILD:-$repo/build-fuzz}
jobs=${MPS_FUZZ_JOBS:-1}
cc=${MPS_FUZZ_CC:-clang}

# clang with the libFuzzer runtime (Debian 12: packages clang and libclang-rt-14-dev)
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' \
  >"$probe/p.c"
if ! command -v "$cc" >/dev/null 2>&1 || ! "$cc" -fsanitize=fuzzer,address,undefined "$probe/p.c" -o "$probe/p" \
     >"$probe/log" 2>&1; then
  if [ "${MPS_SKIP_FUZZ:-0}" = 1 ]; then
    echo "fuzz: skipped: no '$cc' with libFuzzer (MPS_SKIP_FUZZ=1)"
    exit 77
  fi
  if command -v "$cc" >/dev/null 2>&1; then
    why="'$cc -fsanitize=fuzzer' failed: $(head -c 200 "$probe/log" | tr '\n' ' ')"
  else
    why="'$cc' is not installed"
  fi
  echo "fuzz: error: the fuzz targets need clang with libFuzzer ($why)." >&2
  echo "fuzz: install it (Debian 12: apt-get install clang libclang-rt-14-dev libomp-dev, or" \
       "scripts/install-deps.sh) or set MPS_SKIP_FUZZ=1 to skip the fuzz tests." >&2
  exit 1
fi

all=()
for f in "$here"/fuzz_*.c; do all+=("$(basename "$f" .c)"); done
targets=()
if [ $# -eq 0 ]; then
  targets=("${all[@]}")
else
  for t in "$@"; do
    t=fuzz_${t#fuzz_}
    [ -f "$here/$t.c" ] || { echo "fuzz: unknown target '$t' (known: ${all[*]})" >&2; exit 2; }
    targets+=("$t")
  done
fi

# configure once, then build only the fuzz targets (not the rest of the project)
if [ ! -f "$build/CMakeCache.txt" ]; then
  if ! CC=$cc cmake -S "$repo" -B "$build" -DCMAKE_C_COMPILER="$cc" -DMPS_FUZZ=ON -DMPS_WERROR=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
       >"$probe/cmake.log" 2>&1; then
    echo "fuzz: cmake configure failed:" >&2; tail -20 "$probe/cmake.log" >&2
    rm -rf "$build"
    exit 1
  fi
fi
if ! cmake --build "$build" -j "${MPS_FUZZ_BUILD_JOBS:-2}" --target "${targets[@]}" >"$probe/build.log" 2>&1; then
  echo "fuzz: build failed:" >&2; grep -E "error|Error" "$probe/build.log" | head -20 >&2
  exit 1
fi

# one target: scratch corpus, run, summary line (in $probe/<target>.sum), status in the exit code
run_one() {
  local t=$1 name=${1#fuzz_} work art log
  work=$(mktemp -d "${TMPDIR:-/tmp}/mps-$t.XXXXXX")
  art="$build/artifacts/$t"
  log="$build/artifacts/$t.log"
  mkdir -p "$work/corpus" "$art"
  [ -d "$here/corpus/$name" ] && cp -r "$here/corpus/$name/." "$work/corpus/"
  local seeds
  seeds=$(find "$work/corpus" -type f | wc -l)
  # malloc_limit_mb: any single allocation above 256 MiB is a finding (sizes come from the input).
  # fuzz_h5file: libhdf5 itself leaks on damaged files (RESULTS.md), so leaks are not findings
  # there; fuzz_h5attr checks the project's own HDF5 paths with leak detection on.
  local extra="" asan=${ASAN_OPTIONS:-}
  [ "$t" = fuzz_h5file ] && extra="-detect_leaks=0" && asan="${asan:+$asan:}detect_leaks=0"
  # shellcheck disable=SC2086
  ASAN_OPTIONS=$asan TMPDIR="$work" "$build/$t" -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=256 -timeout=30 \
    -print_final_stats=1 -artifact_prefix="$art/" $extra ${MPS_FUZZ_ARGS:-} "$work/corpus" >"$log" 2>&1
  local rc=$? execs corpus status
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(find "$work/corpus" -type f | wc -l)
  if [ $rc = 0 ]; then
    status="no findings"
  else
    status="FINDING (exit $rc): $(ls -t "$art" 2>/dev/null | head -1) -- $(grep -m1 -E '^==[0-9]+==ERROR|runtime error|assertion failed|out-of-memory|timeout' "$log" | head -c 200) (log: $log)"
  fi
  printf '%-18s %5s s  %10s execs  corpus %4s -> %-5s  %s\n' "$t" "$secs" "${execs:-?}" "$seeds" "$corpus" "$status" \
    >"$probe/$t.sum"
  rm -rf "$work"
  echo $rc >"$probe/$t.rc"
}

for t in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
  run_one "$t" &
done
wait
failed=0
for t in "${targets[@]}"; do
  cat "$probe/$t.sum" 2>/dev/null || echo "$t: no result"
  [ "$(cat "$probe/$t.rc" 2>/dev/null)" = 0 ] || failed=1
done
exit $failed
