#!/bin/bash
# The trainer on Llama-family models (CPU): a Llama (grouped-query attention, untied head) and a
# Qwen2 (q/k/v biases, tied head) give the same loss per step under every layout (same global
# batch), a run resumed on another layout continues the same curve, eval agrees, and a backend
# without the Llama kernels is refused by name.
. "$(dirname "$0")/common.bash"
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_rmaps_base_oversubscribe=1
export ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0"
command -v mpirun >/dev/null || { bad "mpirun not installed"; finish; exit 1; }
# 3 layers (uneven over pp=2), 8 query heads over 4 kv heads (tp=4 = n_kv_head), Llama 3's RoPE
# scaling; Qwen2: 4 query heads over 2 kv heads, biases, tied head, rope_theta 1e6
LLAMA="arch=llama,n_layer=3,n_embd=64,n_head=8,n_kv_head=4,ffn=96,vocab=250,n_positions=32,tied=0,rope_theta=500000,rope_llama3=8:1:4:16"
QWEN2="arch=llama,family=qwen2,n_layer=3,n_embd=32,n_head=4,n_kv_head=2,ffn=72,vocab=250,n_positions=32,tied=1,qkv_bias=1,rope_theta=1000000,norm_eps=1e-6"
TR="--data $T/tok.bin --global-batch 8 --micro-batch 2 --seq 16 --lr 1e-3 --lr-min 1e-4 --warmup 2 --decay-steps 6 -q"
expect 0 "$MPSHARD" tokens --count 20000 --vocab 250 -o "$T/tok.bin"
train() { local np=$1; shift; mpirun -np "$np" "$MPSHARD" train $TR "$@" >"$T/out" 2>"$T/err"; }
losses() { sed -E 's/.*"loss": ([^,]*),.*/\1/' "$1"; }
same_losses() {
  if paste <(losses "$1") <(losses "$2") | awk '{ d = $1 - $2; if (d < 0) d = -d; if (d > 1e-5 * $2 || NF != 2) bad = 1 }
      END { exit bad || NR != 6 }'; then ok; else bad "losses differ: $1 vs $2: $(paste <(losses "$1") <(losses "$2") | tr '\t\n' ' ;')"; fi
}
for model in llama qwen2; do
  cfg=$LLAMA; [ $model = qwen2 ] && cfg=$QWEN2
  rm -rf "$T/init"
  expect 0 "$MPSHARD" init --config "$cfg" --layout dp=1 -o "$T/init" -q
  rm -rf "$T/ref" "$T/ref.jsonl"
  train 1 --ckpt "$T/init" --layout dp=1 --steps 6 --out "$T/ref" --log "$T/ref.jsonl" && ok || bad "$model dp=1: $(cat "$T/err")"
  # the loss starts near log(250) = 5.52 and falls on this learnable text
  awk -F'"loss": ' 'NR == 1 { split($2, a, ","); first = a[1] } NR == 6 { split($2, a, ","); last = a[1] }
    END { exit !(NR == 6 && first > 5.4 && first < 5.7 && last < first - 0.2) }' "$T/ref.jsonl" && ok \
    || bad "$model: loss did not fall: $(losses "$T/ref.jsonl" | tr '\n' ' ')"
  tpmax=4; [ $model = qwen2 ] && tpmax=2
  i=0
  for spec in "2 dp=2" "2 tp=2" "$tpmax tp=$tpmax" "2 pp=2" "2 pp=2 --schedule gpipe" "3 pp=3" "2 dp=2,zero=1" \
              "2 dp=2,zero=2" "2 dp=2,zero=3" "4 dp=2,tp=2,zero=3 --comm-deferred" "1 dp=1 --recompute" \
              "4 pp=2,tp=2,zero=3 --recompute" "8 dp=2,pp=2,tp=2,zero=1" "8 dp=2,pp=2,tp=2,zero=3 --schedule gpipe"; do
    set -- $spec; np=$1; lay=$2; shift 2
    i=$((i + 1)); rm -rf "$T/r$i" "$T/r$i.jsonl"
    train "$np" --ckpt "$T/init" --layout "$lay" --steps 6 --out "$T/r$i" --log "$T/r$i.jsonl" "$@" && ok \
      || bad "$model $lay: $(tail -3 "$T/err")"
    same_losses "$T/r$i.jsonl" "$T/ref.jsonl"
  done
  # activation recompute replays the same kernels on the same values: the very same losses
  [ "$(losses "$T/r11.jsonl")" = "$(losses "$T/ref.jsonl")" ] && ok || bad "$model: --recompute changed the losses"
  # 3 steps in one layout, then the rest in another: the same curve
  rm -rf "$T/half" "$T/half2" "$T/ab.jsonl"
  train 4 --ckpt "$T/init" --layout dp=2,pp=2,zero=1 --steps 3 --out "$T/half" --log "$T/ab.jsonl" && ok \
    || bad "$model half: $(tail -3 "$T/err")"
  train 2 --ckpt "$T/half" --layout tp=2,zero=3 --steps 6 --out "$T/half2" --log "$T/ab.jsonl" && ok \
    || bad "$model resume: $(tail -3 "$T/err")"
  same_losses "$T/ab.jsonl" "$T/ref.jsonl"
  expect 0 "$MPSHARD" verify "$T/half2/step-00000006" -q
  # eval of the last checkpoint: the same figure on one process and over pp=3
  EV="--data $T/tok.bin --seq 16 --micro-batch 2 --global-batch 8 --batches 2 --json"
  expect 0 "$MPSHARD" eval --ckpt "$T/ref" $EV
  want=$(sed -E 's/.*"val_loss": ([^,]*),.*/\1/' "$T/out")
  mpirun -np 3 "$MPSHARD" eval --ckpt "$T/ref" --layout pp=3 $EV >"$T/out" 2>"$T/err" && ok || bad "$model eval pp=3: $(tail -2 "$T/err")"
  awk -v w="$want" -F'"val_loss": ' '{ split($2, a, ","); d = a[1] - w; if (d < 0) d = -d; exit !(NR == 1 && w > 4 && d <= 1e-5 * w) }' \
    "$T/out" && ok || bad "$model eval pp=3: $(cat "$T/out") vs $want"
done
# the tied Qwen2 head sums its gradient between the first and the last stage: their copies agree
expect 0 "$MPSHARD" verify "$T/r6/step-00000006" -q
# tp must divide the kv heads
expect 2 "$MPSHARD" train $TR --ckpt "$T/init" --layout tp=4 --steps 1 --out "$T/x"
expect_err "tp=4 must divide the model's 2 key/value heads"
[ ! -e "$T/x" ] && ok || bad "a refused run left $T/x"
# Mistral NeMo's head size: 4 heads of 16 (q and the attention output 64 wide) in a 32-wide model
# over 2 kv heads: the losses of dp=1 under tp (the heads split), pp and ZeRO-3, and they fall
NEMO="arch=llama,family=mistral,n_layer=3,n_embd=32,n_head=4,n_kv_head=2,head_dim=16,ffn=48,vocab=250,n_positions=32,tied=0"
rm -rf "$T/init-hd" "$T/hd" "$T/hd.jsonl"
expect 0 "$MPSHARD" init --config "$NEMO" --layout dp=1 -o "$T/init-hd" -q
train 1 --ckpt "$T/init-hd" --layout dp=1 --steps 6 --out "$T/hd" --log "$T/hd.jsonl" && ok || bad "head_dim dp=1: $(cat "$T/err")"
awk -F'"loss": ' 'NR == 1 { split($2, a, ","); first = a[1] } NR == 6 { split($2, a, ","); last = a[1] }
  END { exit !(NR == 6 && first > 5.4 && first < 5.7 && last < first - 0.2) }' "$T/hd.jsonl" && ok \
  || bad "head_dim: loss did not fall: $(losses "$T/hd.jsonl" | tr '\n' ' ')"
for spec in "2 tp=2" "2 pp=2" "2 dp=2,zero=3" "4 dp=2,tp=2,zero=1"; do
  set -- $spec; rm -rf "$T/hd2" "$T/hd2.jsonl"
  train "$1" --ckpt "$T/init-hd" --layout "$2" --steps 6 --out "$T/hd2" --log "$T/hd2.jsonl" && ok \
    || bad "head_dim $2: $(tail -3 "$T/err")"
  same_losses "$T/hd2.jsonl" "$T/hd.jsonl"
done
# Mistral 7B v0.1's sliding window: the trainer's full causal attention is the model's up to the
# window (16 of 32 positions here): --seq 16 trains, --seq 32 is refused by name
MISTRAL_SW="arch=llama,family=mistral,n_layer=2,n_embd=32,n_head=4,n_kv_head=2,ffn=48,vocab=250,n_positions=32,sliding_window=16"
rm -rf "$T/init-sw"
expect 0 "$MPSHARD" init --config "$MISTRAL_SW" --layout dp=1 -o "$T/init-sw" -q
rm -rf "$T/sw" "$T/sw.jsonl"
train 2 --ckpt "$T/init-sw" --layout dp=2 --steps 2 --out "$T/sw" --log "$T/sw.jsonl" && ok || bad "mistral window: $(cat "$T/err")"
[ "$(wc -l < "$T/sw.jsonl")" = 2 ] && ok || bad "mistral window: no 2 steps logged"
expect 6 "$MPSHARD" train --data "$T/tok.bin" --global-batch 4 --micro-batch 2 --seq 32 -q --ckpt "$T/init-sw" --layout dp=1 --steps 1 --out "$T/x"
expect_err "--seq 32 exceeds the model's sliding_window 16 \(the trainer's attention is full causal"
[ ! -e "$T/x" ] && ok || bad "a refused run left $T/x"
# a token id beyond the model's vocabulary: the file and the offset named
expect 0 "$MPSHARD" tokens --count 2000 --vocab 300 -o "$T/big.bin"
expect 3 "$MPSHARD" train --data "$T/big.bin" --global-batch 8 --micro-batch 2 --seq 16 -q --ckpt "$T/init" --layout dp=1 --steps 1 --out "$T/x"
expect_err "big.bin: token [0-9]+ is id [0-9]+, beyond the model's vocabulary of 250"
finish
