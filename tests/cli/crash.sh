#!/bin/bash
# Crash safety, short run: SIGKILL at 5 random points of each of shard, reshard and export (with
# --force over a committed result, or into nothing); the previous result survives whole or the new
# one is committed whole, and rerunning the command completes; then SIGKILL exactly on entry to each
# commit rename and to the call after it (strace -e inject; skipped where strace is missing).
# tests/crash/crash_long.sh runs the same checks at 60 random points per command and at every
# file-system call of the commit (results in tests/crash/RESULTS.md).
. "$(dirname "$0")/common.bash"
. "$(dirname "$0")/../crash/crash.bash"
CRASH_RERUN_VERIFY=0 CRASH_SYSCALL_POINTS=${CRASH_SYSCALL_POINTS:-commit}
crash_run "${CRASH_POINTS:-5}" "${CRASH_SEED:-20261125}"
finish
