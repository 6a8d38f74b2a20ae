#!/bin/bash
# One device call: build on the GPU host (deps/ carried: scripts/fetch-host-deps.sh), run the
# suite, then the benches. Output goes to $OUT when set; MPS_CUDA=OFF builds without the CUDA
# backend (for runs that train nothing on the GPU).
# usage: bench/gpu_host_run.sh [tests|shard|llamashard|hf|reshard|gpuunit|gputrain|gpullama|trainbench|llamabench|multibench|profile|llamaprofile|plan|timeline|ab|release]...
# ab: bench/train_ab.sh of this tree against the sources in .mainsrc (carried: `git archive main |
# tar -x -C .mainsrc` here, the directory git-ignored locally), built here first; AB_MODELS, AB_ROUNDS.
# llamabench: bench/train_bench_llama.sh on LLAMA_NAMES (default its three, torch_llama.py's), then
# tinyllama's resume and save part (to split it over two calls: RESUME= leaves that part out,
# LLAMA_NAMES=none runs it alone).
set -uo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nproc; nvidia-smi --query-gpu=name --format=csv,noheader; df -h /tmp | tail -1
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMPS_CUDA="${MPS_CUDA:-ON}" >"$OUT/cmake.log" 2>&1 || { tail -20 "$OUT/cmake.log"; exit 1; }
cmake --build build -j "$(nproc)" >"$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -20; exit 1; }
for what in "$@"; do
  case $what in
    tests) (cd build && ctest -j 8 --output-on-failure 2>&1 | tail -15) ;;
    shard) bash bench/shard_bench.sh /tmp/sbench 2>&1 | tee "$OUT/shard_bench.txt" ;;
    llamashard) CONFIG=n_layer=30,n_embd=2048,n_head=16,vocab=32000,n_positions=2048,arch=llama,n_kv_head=4,ffn=5632,tied=0 \
      DTYPE=bf16 MAX_SHARD=1GB LAYOUT=dp=2,pp=2,tp=4 MPS_TRACE=0 bash bench/shard_bench.sh /tmp/lbench 2>&1 | tee "$OUT/llama_shard_bench.txt" ;;
    hf) python3 tests/gpu/hf_roundtrip.py build/mpshard /tmp/hfrt 2>&1 | tee "$OUT/hf_roundtrip.txt" ;;
    reshard) bash bench/reshard_bench.sh /tmp/rbench 2>&1 | tee "$OUT/reshard_bench.txt" ;;
    gpuunit) MPS_TEST_BENCH=1 build/test_backend_cuda 2>&1 | tee "$OUT/gpuunit.txt" | grep -vE "^ *ok" | tail -60 ;;
    gputrain) MPSHARD=build/mpshard bash tests/gpu/train_gpu.sh /tmp/gputest 2>&1 | tee "$OUT/gputrain.txt" | tail -40 ;;
    gpullama) (build/test_backend_cuda rmsnorm && build/test_backend_cuda rope && build/test_backend_cuda swiglu && \
        build/test_backend_cuda gqa) 2>&1 | tee "$OUT/gpuunit_llama.txt" | grep -vE "^ *ok" | tail -30
      SECTIONS=llama MPSHARD=build/mpshard bash tests/gpu/train_gpu.sh /tmp/gputest 2>&1 | tee "$OUT/gputrain_llama.txt" | tail -40 ;;
    trainbench) MPSHARD=build/mpshard SHARED="${SHARED:-../shared}/bench" bash bench/train_bench.sh /tmp/tbench 2>&1 \
      | tee "$OUT/trainbench.txt" | tail -25 ;;
    llamabench) MPSHARD=build/mpshard SHARED="${SHARED:-../shared}/bench" bash bench/train_bench_llama.sh /tmp/tbench-llama \
      ${LLAMA_NAMES:-} 2>&1 | tee "$OUT/llamabench.txt" | tail -30 ;;
    multibench) MPSHARD=build/mpshard bash bench/train_bench_multi.sh /tmp/mbench 2>&1 | tee "$OUT/multibench.txt" | tail -20 ;;
    profile) bash bench/train_profile.sh /tmp/prof 2>&1 | tee "$OUT/profile.txt" | tail -45 ;;
    llamaprofile) MODEL=llama-125m bash bench/train_profile.sh /tmp/lprof 2>&1 | tee "$OUT/llama_profile.txt" | tail -45 ;;
    plan) bash bench/plan_vs_measured.sh /tmp/plan 2>&1 | tee "$OUT/plan_vs_measured.txt" ;;
    # CUPTI timelines of mpshard train and the PyTorch baseline at the card's own clock
    timeline) for name in ${TIMELINE_NAMES:-tinyllama-1.1b gpt2}; do
        MPSHARD=build/mpshard SHARED="${SHARED:-../shared}/bench" bash bench/train_timeline.sh "/tmp/timeline-$name" \
          "$name" 2>&1 | tee "$OUT/timeline-$name.txt" | head -60
      done ;;
    ab) if [ -f .mainsrc/CMakeLists.txt ]; then
        ln -sfn "$PWD/deps" .mainsrc/deps
        (cd .mainsrc && cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMPS_CUDA="${MPS_CUDA:-ON}" \
          >"$OUT/cmake-main.log" 2>&1 && cmake --build build -j "$(nproc)" --target mpshard >"$OUT/build-main.log" 2>&1) \
          || { echo "ab: the build of .mainsrc failed"; continue; }
        OUT=$OUT MODELS=${AB_MODELS:-gpt2:32 gpt2-medium:16} ROUNDS=${AB_ROUNDS:-2} bash bench/train_ab.sh \
          main=.mainsrc/build/mpshard tree=build/mpshard 2>&1 | tee "$OUT/ab.txt"
      else echo "ab: no .mainsrc (carry a git archive of main there)"; fi ;;
    # a Release build (users' flags: no -Werror) of these sources in a fresh build directory, GCC of this host
    release) gcc --version | head -1
      (cmake -S . -B /tmp/relbuild -DCMAKE_BUILD_TYPE=Release && cmake --build /tmp/relbuild -j "$(nproc)") \
        >"$OUT/release.log" 2>&1 && echo "Release build: ok ($(grep -c warning "$OUT/release.log") warnings)" \
        || { echo "Release build: FAILED"; grep -E "error|warning" "$OUT/release.log" | head; } ;;
  esac
done
