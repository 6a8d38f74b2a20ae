#!/bin/sh
# Installs the Debian packages mpshard needs when one is missing (as root), or prints the apt line.
set -e
# clang + libclang-rt-14-dev (the libFuzzer runtime, only recommended by clang) + libomp-dev (OpenMP
# for a clang configure): the fuzz targets of tests/fuzz, run briefly by the suite (fuzz.short).
PKGS="cmake make gcc libhdf5-dev libzstd-dev libopenmpi-dev openmpi-bin libjansson-dev libxxhash-dev hdf5-tools jq"
PKGS="$PKGS clang libclang-rt-14-dev libomp-dev"
# strace: the crash test kills on entry to each commit system call (tests/cli/crash.sh; SKIP without it)
PKGS="$PKGS strace"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then
  echo "installing:$missing" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq $missing >/dev/null
else
  echo "missing packages:$missing" >&2
  echo "run: sudo apt-get install -y$missing" >&2
  exit 1
fi
