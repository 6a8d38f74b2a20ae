#!/bin/bash
# make demo: the main job on a small embedded default model, in a few readable lines.
set -euo pipefail
BUILD=${1:-build}
M="$BUILD/mpshard"
D=$(mktemp -d "${TMPDIR:-/tmp}/mpshard-demo.XXXXXX")
trap 'rm -rf "$D"' EXIT
CFG="n_layer=4,n_embd=128,n_head=8,vocab=1000,n_positions=64"
say() { printf '\n== %s\n' "$*"; }

say "1. a small GPT-2 ($CFG) written as Hugging Face safetensors (deterministic values)"
"$M" synth --config "$CFG" --format safetensors -o "$D/hf" -q
ls -l "$D/hf" | tail -n +2

say "2. shard it for dp=2 x pp=2 x tp=2 with ZeRO-1 (8 ranks)"
"$M" shard "$D/hf/model.safetensors" --layout dp=2,pp=2,tp=2,zero=1 -o "$D/ck" -q
ls "$D/ck"
"$M" verify "$D/ck" -q

say "3. what each rank holds (fp32 training, micro-batch 4 x 64 tokens)"
"$M" inspect "$D/ck" --micro-batch 4 --seq 64 | head -20

say "4. reshard to dp=4 x tp=2 with ZeRO-3 (weights and optimizer state) and back to the first layout"
"$M" reshard "$D/ck" --layout dp=4,tp=2,zero=3 -o "$D/ck2" -q
"$M" reshard "$D/ck2" --layout dp=2,pp=2,tp=2,zero=1 -o "$D/ck3" -q
"$M" compare "$D/ck" "$D/ck3"

say "5. export the shards back to safetensors and to llm.c, and compare with the original"
"$M" export "$D/ck" --format safetensors -o "$D/out-hf" -q
"$M" compare "$D/hf/model.safetensors" "$D/out-hf/model.safetensors"
"$M" export "$D/ck" --format llmc -o "$D/out-llmc" -q
"$M" compare "$D/hf/model.safetensors" "$D/out-llmc/model_00000000.bin"

say "6. train it: 6 steps on 4 processes (dp=2 x tp=2), starting straight from the dp=2,pp=2,tp=2 shards of step 2"
export OMP_NUM_THREADS=1 OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
"$M" tokens --count 200000 --vocab 1000 -o "$D/tokens.bin"
TR=(--data "$D/tokens.bin" --global-batch 8 --micro-batch 2 --seq 64 --lr 1e-3 --lr-min 1e-4 --decay-steps 10)
mpirun -np 4 "$M" train --ckpt "$D/ck" --layout dp=2,tp=2 --steps 6 --out "$D/run" "${TR[@]}" 2>/dev/null
echo "saved: $D/run/$(cat "$D/run/latest")"

say "7. resume that run on 2 processes with another layout (pp=2, ZeRO-3): the loss curve goes on"
mpirun -np 2 "$M" train --ckpt "$D/run" --layout pp=2,zero=3 --steps 10 --out "$D/run" "${TR[@]}" 2>/dev/null
LCFG="arch=llama,n_layer=4,n_embd=128,n_head=8,n_kv_head=2,ffn=352,vocab=1000,n_positions=64,tied=0"
say "8. a Llama-family model as Hugging Face safetensors (grouped-query attention, untied head): shard for
   pp=2 x tp=2, reshard to dp=2 x tp=2 ZeRO-3, train 3 steps there, resume on pp=2 x tp=2 ($LCFG)"
"$M" synth --config "$LCFG" --format safetensors -o "$D/llama-hf"
"$M" shard "$D/llama-hf" --layout pp=2,tp=2 -o "$D/llama-ck" -q
"$M" inspect "$D/llama-ck" --micro-batch 2 --seq 64 | head -4
"$M" reshard "$D/llama-ck" --layout dp=2,tp=2,zero=3 -o "$D/llama-ck2" -q
mpirun -np 4 "$M" train --ckpt "$D/llama-ck2" --layout dp=2,tp=2,zero=3 --steps 3 --out "$D/llama-run" "${TR[@]}" 2>/dev/null
mpirun -np 4 "$M" train --ckpt "$D/llama-run" --layout pp=2,tp=2 --steps 6 --out "$D/llama-run" "${TR[@]}" 2>/dev/null
printf '\ndemo done: shard -> reshard -> export is exact, bit for bit; training resumed on another layout.\n'
