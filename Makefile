# The two Quick start commands (`make demo`, `make test`) and the usual targets.
# Every target first makes sure the system packages are there (scripts/install-deps.sh); the
# build prints one line (or the compiler's errors), its whole log is DIR/build.log.
BUILD ?= build
ASAN_BUILD ?= build-asan
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: all deps build demo test asan valgrind crash-long clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	@scripts/build.sh $(BUILD) $(JOBS) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMPS_WERROR=ON

demo: build
	@scripts/demo.sh $(BUILD)

test: build
	@cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# The suite under AddressSanitizer + UndefinedBehaviorSanitizer (leaks included; any UB aborts).
# fuzz.short is left out: it builds its own clang + ASan/UBSan/libFuzzer binaries in `make test`.
asan: deps
	@scripts/build.sh $(ASAN_BUILD) $(JOBS) -DCMAKE_BUILD_TYPE=Debug -DMPS_SANITIZE=ON -DMPS_WERROR=ON
	@cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j $(JOBS) -E '^fuzz\.short$$'

# The main CLI paths (and failure paths) of a tiny model under valgrind: no error, no definite or
# indirect leak (tests/valgrind.sh; a few minutes).
valgrind: build
	@tests/valgrind.sh $(BUILD)/mpshard

# SIGKILL at 60 random points per command (shard, reshard, export) and at every file-system call of
# the commit (needs strace), at nice 19; tens of minutes.
# POINTS=.. SEED=.. to change; record the summary in tests/crash/RESULTS.md.
crash-long: build
	@MPSHARD=$(abspath $(BUILD))/mpshard nice -n 19 tests/crash/crash_long.sh $(or $(POINTS),60) $(SEED)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
