#!/bin/bash
# Crash safety, long run: SIGKILL at POINTS (default 60) random points per command, with a bigger
# model than the suite's (each command runs about a second), then on entry to every file-system
# call of the committing thread (fsync, rename, unlink, ...; strace -e inject). Prints the seed and
# a summary per command; record the summary in tests/crash/RESULTS.md.
#   MPSHARD=build/mpshard nice -n 19 tests/crash/crash_long.sh [POINTS [SEED]]
# CRASH_COMMANDS="shard" limits the commands; CRASH_VERBOSE=1 prints every point's outcome.
. "$(dirname "$0")/../cli/common.bash"
CRASH_CONFIG=${CRASH_CONFIG:-"n_layer=8,n_embd=512,n_head=8,vocab=8000,n_positions=256"}
. "$(dirname "$0")/crash.bash"
crash_run "${1:-60}" "${2:-$(date +%s)}"
finish
