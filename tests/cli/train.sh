#!/bin/bash
# The trainer: the same loss per step under every layout (same global batch), 3 steps in one
# layout + a resume in another == 6 steps straight, resumes from shard (Hugging Face file), reshard
# and the trainer's own checkpoints, and the clear errors.
. "$(dirname "$0")/common.bash"
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_rmaps_base_oversubscribe=1
# (leak checking off under mpirun: OpenMPI's components leak by design)
export ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0"
command -v mpirun >/dev/null || { bad "mpirun not installed"; finish; exit 1; }
# 6 heads (tp=2, tp=3 divide them), 2 layers (pp=2), vocab 250 padded to 256 (uneven over tp=3)
TINY="n_layer=2,n_embd=48,n_head=6,vocab=250,n_positions=32"
TR="--data $T/tok.bin --global-batch 8 --micro-batch 2 --seq 16 --lr 1e-3 --lr-min 1e-4 --warmup 2 --decay-steps 6 -q"
expect 0 "$MPSHARD" tokens --count 20000 --vocab 250 -o "$T/tok.bin"
expect 0 "$MPSHARD" init --config "$TINY" --layout dp=1 -o "$T/init" -q
train() { local np=$1; shift; mpirun -np "$np" "$MPSHARD" train $TR "$@" >"$T/out" 2>"$T/err"; }
losses() { sed -E 's/.*"loss": ([^,]*),.*/\1/' "$1"; }
# same_losses A B: every step's loss within 1e-5 relative
same_losses() {
  if paste <(losses "$1") <(losses "$2") | awk '{ d = $1 - $2; if (d < 0) d = -d; if (d > 1e-5 * $2 || NF != 2) bad = 1 }
      END { exit bad || NR != 6 }'; then ok; else bad "losses differ: $1 vs $2: $(paste <(losses "$1") <(losses "$2") | tr '\t\n' ' ;')"; fi
}
train 1 --ckpt "$T/init" --layout dp=1 --steps 6 --out "$T/ref" --log "$T/ref.jsonl" && ok || bad "dp=1: $(cat "$T/err")"
[ "$(wc -l <"$T/ref.jsonl")" = 6 ] && ok || bad "log lines: $(cat "$T/ref.jsonl")"
# the loss falls on this learnable text, and every field is there
awk -F'"loss": ' 'NR == 1 { split($2, a, ","); first = a[1] } NR == 6 { split($2, a, ","); last = a[1] }
  END { exit !(first > 5.4 && last < first - 0.3) }' "$T/ref.jsonl" && ok || bad "loss did not fall: $(losses "$T/ref.jsonl" | tr '\n' ' ')"
# (a step that saved also gives the time training stalled for the save)
grep -qE '"step": 6, "loss": [0-9.]*, "lr": [0-9.e-]*, "grad_norm": [0-9.]*, "tokens_per_s": [0-9.]*, "elapsed_s": [0-9.]*, "save_stall_s": [0-9.]*}' "$T/ref.jsonl" && ok \
  || bad "log format: $(tail -1 "$T/ref.jsonl")"
grep -qE '"step": 5, "loss": [0-9.]*, "lr": [0-9.e-]*, "grad_norm": [0-9.]*, "tokens_per_s": [0-9.]*, "elapsed_s": [0-9.]*}' "$T/ref.jsonl" && ok \
  || bad "log format: $(sed -n 5p "$T/ref.jsonl")"
[ "$(cat "$T/ref/latest")" = step-00000006 ] && ok || bad "latest: $(cat "$T/ref/latest")"
expect 0 "$MPSHARD" verify "$T/ref/step-00000006" -q
i=0
for spec in "2 dp=2" "2 tp=2" "2 pp=2" "2 dp=2,zero=3" "8 dp=2,pp=2,tp=2,zero=1" "3 tp=3" \
            "4 dp=2,pp=2,zero=2 --schedule gpipe" "4 pp=2,tp=2,zero=3" "4 dp=2,tp=2,zero=3 --comm-staged" \
            "4 pp=2,tp=2,zero=3 --recompute" "1 dp=1 --recompute"; do
  set -- $spec; np=$1; lay=$2; shift 2
  i=$((i + 1)); rm -rf "$T/r$i"
  train "$np" --ckpt "$T/init" --layout "$lay" --steps 6 --out "$T/r$i" --log "$T/r$i.jsonl" "$@" && ok \
    || bad "$lay: $(tail -3 "$T/err")"
  same_losses "$T/r$i.jsonl" "$T/ref.jsonl"
done
# activation recompute replays the same kernels on the same values: the very same losses
[ "$(losses "$T/r11.jsonl")" = "$(losses "$T/ref.jsonl")" ] && ok \
  || bad "--recompute changed the losses: $(losses "$T/r11.jsonl" | tr '\n' ' ') vs $(losses "$T/ref.jsonl" | tr '\n' ' ')"
[ "$(losses "$T/r10.jsonl")" = "$(losses "$T/r8.jsonl")" ] && ok || bad "--recompute (pp=2 tp=2 zero=3) changed the losses"
# the DP gradient reduction under the backward (ZeRO-0 sums and ZeRO-1 reduce-scatters in the
# step's last backward pass, ZeRO-2/3 reduce-scatters layer by layer in every one) and ZeRO-3's
# weight prefetch, with each started collective run only where the engine waits for it and its
# input checked for changes meanwhile (--comm-deferred): the very same losses as with every
# collective done when called (--comm-staged), and a clean run (a write to a buffer in flight
# fails the run; a read before the wait shows in the losses); likewise the pipeline's ring of
# send buffers over a step's 4 micro-batches (a buffer written again before its send was waited
# for fails the run)
for spec in "2 dp=2" "2 dp=2,zero=1" "2 dp=2,zero=2" "2 dp=2,zero=3" "4 dp=2,pp=2" \
            "4 dp=2,pp=2,zero=2 --schedule gpipe" "4 dp=2,tp=2,zero=3 --recompute" "2 pp=2" "2 pp=2 --schedule gpipe"; do
  set -- $spec; np=$1; lay=$2; shift 2
  rm -rf "$T/df" "$T/st" "$T/df.jsonl" "$T/st.jsonl"
  train "$np" --ckpt "$T/init" --layout "$lay" --steps 6 --out "$T/df" --log "$T/df.jsonl" --comm-deferred "$@" && ok \
    || bad "--comm-deferred $lay: $(tail -3 "$T/err")"
  train "$np" --ckpt "$T/init" --layout "$lay" --steps 6 --out "$T/st" --log "$T/st.jsonl" --comm-staged "$@" && ok \
    || bad "--comm-staged $lay: $(tail -3 "$T/err")"
  [ -s "$T/df.jsonl" ] && [ "$(losses "$T/df.jsonl")" = "$(losses "$T/st.jsonl")" ] && ok \
    || bad "$lay: --comm-deferred losses $(losses "$T/df.jsonl" | tr '\n' ' ') vs $(losses "$T/st.jsonl" | tr '\n' ' ')"
done
# pipelines of 3 and 4 stages (4 layers: uneven at pp=3; the tied head between stages that are not
# neighbours), the last one with DP x PP at ZeRO-3 through the deferred collectives
expect 0 "$MPSHARD" init --config "n_layer=4,n_embd=48,n_head=6,vocab=250,n_positions=32" --layout dp=1 -o "$T/init4" -q
rm -rf "$T/p1" "$T/p1.jsonl"
train 1 --ckpt "$T/init4" --layout dp=1 --steps 6 --out "$T/p1" --log "$T/p1.jsonl" && ok || bad "4 layers: $(tail -3 "$T/err")"
for spec in "3 pp=3" "4 pp=4 --schedule gpipe" "4 pp=4,zero=1" "8 dp=2,pp=4,zero=3 --comm-deferred"; do
  set -- $spec; np=$1; lay=$2; shift 2
  rm -rf "$T/pn" "$T/pn.jsonl"
  train "$np" --ckpt "$T/init4" --layout "$lay" --steps 6 --out "$T/pn" --log "$T/pn.jsonl" "$@" && ok \
    || bad "$lay: $(tail -3 "$T/err")"
  same_losses "$T/pn.jsonl" "$T/p1.jsonl"
done
# validation (--val-data): the mean loss of the current weights over the file's first batches,
# forward passes only, at the start, the end and every --val-every steps. Over the training
# file's first batch, step 0's is step 1's training loss; the training losses are those of the
# run without it (the evaluation changes nothing); every layout gives the same figures.
TRV="--val-data $T/tok.bin --val-every 3 --val-batches 1"
val_losses() { grep '"val_loss"' "$1" | sed -E 's/.*"step": ([0-9]+), "val_loss": ([^,]*),.*/\1 \2/'; }
rm -rf "$T/v1" "$T/v1.jsonl"
train 1 --ckpt "$T/init4" --layout dp=1 --steps 6 --out "$T/v1" --log "$T/v1.jsonl" $TRV && ok || bad "val: $(tail -3 "$T/err")"
[ "$(val_losses "$T/v1.jsonl" | cut -d' ' -f1 | tr '\n' ' ')" = "0 3 6 " ] && ok || bad "val steps: $(val_losses "$T/v1.jsonl")"
[ "$(val_losses "$T/v1.jsonl" | head -1 | cut -d' ' -f2)" = "$(losses "$T/p1.jsonl" | head -1)" ] && ok \
  || bad "val at step 0 $(val_losses "$T/v1.jsonl" | head -1) vs step 1's loss $(losses "$T/p1.jsonl" | head -1)"
grep -v '"val_loss"' "$T/v1.jsonl" >"$T/v1t.jsonl"
[ "$(losses "$T/v1t.jsonl")" = "$(losses "$T/p1.jsonl")" ] && ok || bad "--val-data changed the training losses"
awk '$2 < 4.5 || $2 > 6' <(val_losses "$T/v1.jsonl") | grep -q . && bad "val losses: $(val_losses "$T/v1.jsonl")" || ok
for spec in "2 dp=2,zero=3" "4 pp=4" "4 dp=2,tp=2,zero=2 --comm-deferred" "3 pp=3 --recompute --schedule gpipe" \
            "8 dp=2,pp=2,tp=2,zero=1"; do
  set -- $spec; np=$1; lay=$2; shift 2
  rm -rf "$T/vn" "$T/vn.jsonl"
  train "$np" --ckpt "$T/init4" --layout "$lay" --steps 6 --out "$T/vn" --log "$T/vn.jsonl" $TRV "$@" && ok \
    || bad "val $lay: $(tail -3 "$T/err")"
  paste <(val_losses "$T/v1.jsonl") <(val_losses "$T/vn.jsonl") | awk '{ d = $2 - $4; if (d < 0) d = -d;
      if ($1 != $3 || d > 1e-5 * $2) bad = 1 } END { exit bad || NR != 3 }' && ok \
    || bad "val $lay: $(val_losses "$T/vn.jsonl" | tr '\n' ' ') vs $(val_losses "$T/v1.jsonl" | tr '\n' ' ')"
done
# mpshard eval: the same figure for the run's last checkpoint, on one process and under pp=4
EV="--data $T/tok.bin --seq 16 --micro-batch 2 --global-batch 8 --batches 1 --json"
want=$(val_losses "$T/v1.jsonl" | tail -1 | cut -d' ' -f2)
expect 0 "$MPSHARD" eval --ckpt "$T/v1" $EV
grep -q "^{\"step\": 6, \"val_loss\": $want, \"val_tokens\": 128}$" "$T/out" && ok || bad "eval: $(cat "$T/out") vs $want"
mpirun -np 4 "$MPSHARD" eval --ckpt "$T/v1" --layout pp=4 $EV >"$T/out" 2>"$T/err" && ok || bad "eval pp=4: $(tail -2 "$T/err")"
awk -v w="$want" -F'"val_loss": ' '{ split($2, a, ","); d = a[1] - w; if (d < 0) d = -d; exit !(NR == 1 && d <= 1e-5 * w) }' \
  "$T/out" && ok || bad "eval pp=4: $(cat "$T/out") vs $want"
expect 2 "$MPSHARD" eval --ckpt "$T/v1"
expect_err "--ckpt and --data are required"
# the checkpoint a layout saves holds what every other layout's checkpoint holds, to rounding
expect 0 "$MPSHARD" verify "$T/r5/step-00000006" -q
# 3 steps in one layout, then resume in another for the remaining 3 == 6 steps straight
train 4 --ckpt "$T/init" --layout dp=2,pp=2,zero=1 --steps 3 --out "$T/half" --log "$T/ab.jsonl" && ok || bad "half: $(cat "$T/err")"
train 3 --ckpt "$T/half" --layout tp=3,zero=0 --steps 6 --out "$T/half2" --log "$T/ab.jsonl" && ok || bad "resume: $(cat "$T/err")"
same_losses "$T/ab.jsonl" "$T/ref.jsonl"
# from a checkpoint resharded offline (step 3 -> tp=2 zero=3): the same continuation
expect 0 "$MPSHARD" reshard "$T/half/step-00000003" --layout dp=2,tp=2,zero=3 -o "$T/resh" -q
head -3 "$T/ab.jsonl" >"$T/rs.jsonl"
train 2 --ckpt "$T/resh" --layout pp=2 --steps 6 --out "$T/rs" --log "$T/rs.jsonl" && ok || bad "from reshard: $(cat "$T/err")"
same_losses "$T/rs.jsonl" "$T/ref.jsonl"
# --keep-last K: after each save only the K newest checkpoints stay (background and direct saves);
# a removal cut short (step-*.removing) goes too; what is not a committed checkpoint (a staging
# directory, a folder of the user's, even one named step-*) is left alone; a resume from the run
# directory takes the newest and continues the curve
for mode in "" --save-sync; do
  rm -rf "$T/kp" "$T/kp.jsonl"
  mkdir -p "$T/kp/notes" "$T/kp/step-00000099.partial" "$T/kp/step-00000098" "$T/kp/step-00000001.removing/x"
  train 2 --ckpt "$T/init" --layout dp=2,zero=1 --steps 5 --save-every 1 --keep-last 2 --out "$T/kp" --log "$T/kp.jsonl" \
    $mode && ok || bad "--keep-last $mode: $(tail -3 "$T/err")"
  [ "$(ls "$T/kp" | tr '\n' ' ')" = "latest notes step-00000004 step-00000005 step-00000098 step-00000099.partial " ] && ok \
    || bad "--keep-last 2 $mode left: $(ls "$T/kp" | tr '\n' ' ')"
  train 1 --ckpt "$T/kp" --layout dp=1 --steps 6 --save-every 1 --keep-last 1 --out "$T/kp" --log "$T/kp.jsonl" $mode \
    && ok || bad "--keep-last resume $mode: $(tail -3 "$T/err")"
  same_losses "$T/kp.jsonl" "$T/ref.jsonl"
  [ "$(ls "$T/kp" | tr '\n' ' ')" = "latest notes step-00000006 step-00000098 step-00000099.partial " ] && ok \
    || bad "--keep-last 1 $mode left: $(ls "$T/kp" | tr '\n' ' ')"
  expect 0 "$MPSHARD" verify "$T/kp/step-00000006" -q
done
# a run directory stands for its latest checkpoint wherever a checkpoint is read
expect 0 "$MPSHARD" verify "$T/kp" -q
expect 0 "$MPSHARD" inspect "$T/kp"
grep -q "^checkpoint $T/kp/step-00000006: format version" "$T/out" && ok || bad "inspect RUNDIR: $(sed -n 3p "$T/out")"
expect 0 "$MPSHARD" compare "$T/kp" "$T/kp/step-00000006"
expect 0 "$MPSHARD" export "$T/kp" --format safetensors -o "$T/kpx" -q
mkdir -p "$T/badrun" && echo "../kp" >"$T/badrun/latest"
expect 3 "$MPSHARD" verify "$T/badrun"
expect_err "badrun/latest: expected the name of a checkpoint directory beside it"
# Background saves (the default: a host snapshot written by a thread while training goes on) hold
# what --save-sync writes, byte for byte (the files differ by their checkpoint id and HDF5 times:
# compare every kind, and the llm.c export of parameters and Adam state byte for byte); training
# is the same curve with them, and a run resumed from one continues it.
for spec in "1 dp=1" "2 dp=2,zero=3" "4 dp=2,tp=2,zero=1" "4 pp=2,tp=2,zero=2 --comm-staged"; do
  set -- $spec; np=$1; lay=$2; shift 2
  rm -rf "$T/bg" "$T/sy" "$T/bg.jsonl" "$T/bgx" "$T/syx"
  train "$np" --ckpt "$T/init" --layout "$lay" --steps 6 --save-every 2 --out "$T/bg" --log "$T/bg.jsonl" "$@" && ok \
    || bad "background saves, $lay: $(tail -3 "$T/err")"
  train "$np" --ckpt "$T/init" --layout "$lay" --steps 6 --save-every 2 --out "$T/sy" --save-sync "$@" && ok \
    || bad "--save-sync, $lay: $(tail -3 "$T/err")"
  same_losses "$T/bg.jsonl" "$T/ref.jsonl"
  [ "$(grep -c '"save_stall_s"' "$T/bg.jsonl")" = 3 ] && ok || bad "save_stall_s on the steps that saved: $(cat "$T/bg.jsonl")"
  for st in 2 4 6; do
    expect 0 "$MPSHARD" compare "$T/bg/step-0000000$st" "$T/sy/step-0000000$st"
  done
  expect 0 "$MPSHARD" verify "$T/bg/step-00000002" -q
  expect 0 "$MPSHARD" export "$T/bg/step-00000004" --format llmc --processes 1 -o "$T/bgx" -q
  expect 0 "$MPSHARD" export "$T/sy/step-00000004" --format llmc --processes 1 -o "$T/syx" -q
  diff -r "$T/bgx" "$T/syx" >/dev/null && [ -s "$T/bgx/state_00000004_00000.bin" ] && ok \
    || bad "$lay: background and --save-sync exports differ: $(cd "$T" && cmp bgx/model_00000004.bin syx/model_00000004.bin)"
done
# resume from a background save (step 2, dp=2 x tp=2 ZeRO-1) on another layout: 6 steps straight
head -2 "$T/ref.jsonl" >"$T/bgr.jsonl"
train 2 --ckpt "$T/bg/step-00000002" --layout pp=2 --steps 6 --out "$T/bgr" --log "$T/bgr.jsonl" && ok \
  || bad "resume from a background save: $(tail -3 "$T/err")"
same_losses "$T/bgr.jsonl" "$T/ref.jsonl"
# the stderr report: the stall (snapshot copy) and, at the commit, the background write
rm -rf "$T/bg"
"$MPSHARD" train ${TR% -q} --ckpt "$T/init" --layout dp=1 --steps 6 --save-every 3 --out "$T/bg" >"$T/out" 2>"$T/err" && ok \
  || bad "background save, not quiet: $(cat "$T/err")"
grep -qE "^train: saved .*/step-00000003 in [0-9.]+ s of stall \(snapshot copy[^)]*\); written in the background in [0-9.]+ s, committed in [0-9.]+ s$" \
  "$T/err" && ok || bad "background save report: $(cat "$T/err")"
grep -qE "^train: saved .*/step-00000006 in [0-9.]+ s \(training stalls for the save" "$T/err" && ok \
  || bad "last save report: $(cat "$T/err")"
# running to a step the checkpoint already reached does nothing
train 1 --ckpt "$T/rs" --layout dp=1 --steps 6 --out "$T/rs" && ok || bad "no-op resume: $(cat "$T/err")"
# from a Hugging Face file through mpshard shard: two layouts see the same model and losses
expect 0 "$MPSHARD" synth --config "$TINY" --format safetensors -o "$T/hf" --seed 4
expect 0 "$MPSHARD" shard "$T/hf/model.safetensors" --layout dp=2,tp=2 -o "$T/hfs" -q
train 1 --ckpt "$T/hfs" --layout dp=1 --steps 6 --out "$T/hf1" --log "$T/hf1.jsonl" && ok || bad "from shard: $(cat "$T/err")"
train 4 --ckpt "$T/hfs" --layout pp=2,tp=2,zero=2 --steps 6 --out "$T/hf2" --log "$T/hf2.jsonl" && ok || bad "from shard: $(cat "$T/err")"
same_losses "$T/hf2.jsonl" "$T/hf1.jsonl"
# errors: a layout that does not match WORLD, another model, too little data, a token beyond the vocabulary
expect 2 "$MPSHARD" train $TR --ckpt "$T/init" --layout dp=2 --steps 1 --out "$T/x"
expect_err "dp\*pp\*tp = 2 processes but 1 are running"
mpirun -np 2 "$MPSHARD" train $TR --ckpt "$T/init" --layout dp=3 --steps 1 --out "$T/x" >"$T/out" 2>"$T/err"; rc=$?
[ "$rc" = 2 ] && grep -q "needs dp\*pp\*tp = 3 processes but mpirun started 2" "$T/err" && ok || bad "mpirun world: $rc $(cat "$T/err")"
expect 2 "$MPSHARD" train $TR --ckpt "$T/init" --layout dp=1 --steps 1 --out "$T/x" --model gpt2
expect_err "holds another model"
expect 0 "$MPSHARD" tokens --count 100 --vocab 250 -o "$T/small.bin"
expect 2 "$MPSHARD" train $TR --ckpt "$T/init" --layout dp=1 --steps 1 --out "$T/x" --data "$T/small.bin"
expect_err "small.bin: 6 sequences of --seq 16 are too few for one batch of --global-batch 8"
expect 0 "$MPSHARD" tokens --count 5000 --vocab 300 -o "$T/big.bin"
expect 3 "$MPSHARD" train $TR --ckpt "$T/init" --layout dp=1 --steps 1 --out "$T/x" --data "$T/big.bin"
expect_err "big.bin: token [0-9]+ is id [0-9]+, beyond the model's vocabulary of 250"
# --data takes a glob pattern for a set of shard files (tests/unit/test_data.c checks the stream
# of several); one that matches nothing is a usage error naming it
rm -rf "$T/gl" "$T/gl.jsonl"
train 1 --ckpt "$T/init" --layout dp=1 --steps 6 --out "$T/gl" --log "$T/gl.jsonl" --data "$T/tok*.bin" && ok \
  || bad "--data glob: $(tail -3 "$T/err")"
same_losses "$T/gl.jsonl" "$T/ref.jsonl"
expect 2 "$MPSHARD" train $TR --ckpt "$T/init" --layout dp=1 --steps 1 --out "$T/x" --data "$T/nothing_*.bin"
expect_err "nothing_\*.bin: no token file matches"
expect 2 "$MPSHARD" train $TR --ckpt "$T/init" --layout dp=1 --steps 1 --out "$T/x" --val-every 2
expect_err "--val-every and --val-batches need --val-data"
expect 2 "$MPSHARD" train $TR --ckpt "$T/init" --layout dp=1 --steps 1 --out "$T/x" --val-data "$T/small.bin"
expect_err "--val-data .*small.bin: 6 sequences of --seq 16 are too few for --val-batches 10 of --global-batch 8"
# a missing input file is invalid input (exit 3), as a missing checkpoint is
expect 3 "$MPSHARD" train $TR --ckpt "$T/init" --layout dp=1 --steps 1 --out "$T/x" --val-data "$T/none.bin"
expect_err "none.bin"
# a NaN in the weights (wte[0][0] of an exported model, which every logit row reads): the first
# step stops the run before its update, and nothing is saved
expect 0 "$MPSHARD" export "$T/init" --format safetensors -o "$T/nanhf" -q
hl=$(od -An -tu8 -N8 "$T/nanhf/model.safetensors" | tr -d ' ')
printf '\xff\xff\xff\x7f' | dd of="$T/nanhf/model.safetensors" bs=1 seek=$((8 + hl)) conv=notrunc 2>/dev/null
expect 0 "$MPSHARD" shard "$T/nanhf/model.safetensors" --layout dp=1 -o "$T/nanck" -q
expect 1 "$MPSHARD" train $TR --ckpt "$T/nanck" --layout dp=1 --steps 2 --out "$T/x"
expect_err "step 1: the loss \(nan\) or the gradient norm \(nan\) is not finite; the update is not applied"
[ ! -e "$T/x" ] && ok || bad "a failed run left $T/x"
finish
