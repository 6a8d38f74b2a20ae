#!/bin/sh
# The GPU host has the jansson runtime but no jansson or xxhash headers, and no package registry:
# download the Debian -dev packages here and unpack them into deps/root (git-ignored), then carry
# deps/ to the host; CMake looks there (MPS_DEPS_PREFIX).
set -e
cd "$(dirname "$0")/.."
mkdir -p deps/debs deps/root
cd deps/debs
apt-get download libjansson-dev libxxhash-dev >/dev/null
for f in *.deb; do dpkg -x "$f" ../root; done
ls ../root/usr/include
