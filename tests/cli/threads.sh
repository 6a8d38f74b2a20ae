#!/bin/bash
# The trainer's OpenMP threads per rank: OMP_NUM_THREADS when set, else the host's cores divided
# by the job's processes on it (never fewer than 1), as its first line says.
. "$(dirname "$0")/common.bash"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_rmaps_base_oversubscribe=1
export ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0" # OpenMPI's components leak by design
unset OMP_NUM_THREADS
command -v mpirun >/dev/null || { bad "mpirun not installed"; finish; exit 1; }
expect 0 "$MPSHARD" init --config "n_layer=1,n_embd=32,n_head=2,vocab=100,n_positions=16" --layout dp=1 -o "$T/init" -q
expect 0 "$MPSHARD" tokens --count 5000 --vocab 100 -o "$T/tok.bin"
TR=(--ckpt "$T/init" --data "$T/tok.bin" --steps 1 --seq 8 --micro-batch 2 --backend cpu)
cores=$(nproc)
threads() { grep -oE "[0-9]+ CPU threads? per rank" "$T/err" | head -1; }
per() { local n=$(($1 > 0 ? $1 : 1)); [ "$n" = 1 ] && echo "1 CPU thread per rank" || echo "$n CPU threads per rank"; }
"$MPSHARD" train "${TR[@]}" --layout dp=1 --out "$T/r1" >"$T/out" 2>"$T/err"
[ "$(threads)" = "$(per "$cores")" ] && ok || bad "one process: '$(threads)', wanted '$(per "$cores")': $(head -2 "$T/err")"
for np in 2 4; do
  # (and no more than the cores mpirun lets a process run on, where it binds them)
  want=$((cores / np)) bound=$(mpirun -np $np nproc | sort -n | head -1)
  [ "$bound" -lt "$want" ] && want=$bound
  mpirun -np $np "$MPSHARD" train "${TR[@]}" --layout dp=$np --global-batch $((2 * np)) --out "$T/r$np" >"$T/out" 2>"$T/err"
  [ "$(threads)" = "$(per $want)" ] && ok || bad "$np processes: '$(threads)', wanted '$(per $want)': $(head -2 "$T/err")"
done
OMP_NUM_THREADS=3 mpirun -np 2 "$MPSHARD" train "${TR[@]}" --layout dp=2 --global-batch 4 --out "$T/r5" >"$T/out" 2>"$T/err"
[ "$(threads)" = "3 CPU threads per rank" ] && ok || bad "OMP_NUM_THREADS=3: '$(threads)'"
finish
