#!/bin/bash
# bench/lib.sh, the training benches' measure, on fixed inputs: tokens over the wall time of steps
# 6..N from a log's elapsed_s (as ../shared/bench/torch_*.py measure), the parameter count of the
# torch scripts' flop count against the one `mpshard inspect` prints, the MFU, and the per-save
# lines. Nothing here is timed.
source "$(dirname "$0")/common.bash"
SRC=${MPS_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}
M=$MPSHARD
. "$SRC/bench/lib.sh" || { bad "no bench/lib.sh"; finish; exit 1; }
same() { if [ "$1" = "$2" ]; then ok; else bad "$3: got '$1', wanted '$2'"; fi; }

# 8 steps of 1000 tokens; the end of step 5 at 10.5 s, of step 8 at 12.0 s: 3000 tokens in 1.5 s.
# An evaluation line (val_loss) and a save's stall in between are not steps.
{
  for i in 1 2 3 4 5; do echo "{\"step\": $i, \"loss\": 7.5, \"lr\": 0.0003, \"grad_norm\": 1, \"tokens_per_s\": 999999.0, \"elapsed_s\": $((i + 5)).500}"; done
  echo '{"step": 5, "val_loss": 7.1, "val_tokens": 640, "elapsed_s": 10.700}'
  echo '{"step": 6, "loss": 7.4, "lr": 0.0003, "grad_norm": 1, "tokens_per_s": 5.0, "elapsed_s": 11.000, "save_stall_s": 0.250}'
  echo '{"step": 7, "loss": 7.3, "lr": 0.0003, "grad_norm": 1, "tokens_per_s": 5.0, "elapsed_s": 11.500}'
  echo '{"step": 8, "loss": 7.2, "lr": 0.0003, "grad_norm": 1, "tokens_per_s": 5.0, "elapsed_s": 12.000, "save_stall_s": 3.125}'
} >"$T/run.jsonl"
same "$(log_tps "$T/run.jsonl" 1000)" 2000.0 "tokens over the wall time of steps 6..8"
# elapsed times compared as numbers, not strings: step 5 at 9.5 s, step 7 at 10.5 s (a run whose
# clock passes 10 s between the two read "?" when "10.5" sorted before "9.5")
{
  for i in 1 2 3 4 5; do echo "{\"step\": $i, \"loss\": 7.5, \"elapsed_s\": $((i + 4)).500}"; done
  echo '{"step": 6, "loss": 7.4, "elapsed_s": 10.000}'
  echo '{"step": 7, "loss": 7.3, "elapsed_s": 10.500, "save_stall_s": 14.027}'
} >"$T/ten.jsonl"
same "$(log_tps "$T/ten.jsonl" 1000)" 2000.0 "a clock passing 10 s"
head -5 "$T/run.jsonl" >"$T/short.jsonl"
same "$(log_tps "$T/short.jsonl" 1000)" "?" "a log of 5 steps"
same "$(first_step_s "$T/run.jsonl")" 6.500 "time to the first step"
same "$(first_step_s "$T/none.jsonl")" "?" "time to the first step without a log"
same "$(save_stalls "$T/run.jsonl" | tr '\n' ' ')" "6 0.250 8 3.125 " "the saves' stalls"
cat >"$T/run.err" <<'EOF'
train: saved r/step-00000006 in 0.250 s of stall (snapshot copy, 0.200 s of it waiting for the previous save); written in the background in 4.20 s, committed in 0.002 s
train: saved r/step-00000008 in 3.12 s (training stalls for the save)
EOF
same "$(save_report m "$T/run.jsonl" "$T/run.err")" "save stall (m, background save at step 6): 0.250 s (snapshot copy; 0.200 s of it waiting for the previous save; written in the background in 4.20 s)
save stall (m, save at step 8, the run's last: written directly): 3.125 s" "the per-save report"

# n as torch_gpt.py and torch_llama.py count it (sum of p.numel()) = the count mpshard inspect prints
same "$(shape_params "$(spec_shape gpt2)")" 124475904 "gpt2's n"
same "$(shape_params "$(spec_shape tinyllama-1.1b)")" 1100048384 "tinyllama-1.1b's n"
for spec in "g=n_layer=3,n_embd=96,n_head=6,vocab=1000,n_positions=64" \
  "l=arch=llama,n_layer=2,n_embd=64,n_head=4,n_kv_head=2,ffn=160,vocab=1000,n_positions=64,tied=0" \
  "q=arch=llama,family=qwen2,n_layer=2,n_embd=64,n_head=4,n_kv_head=2,ffn=160,vocab=1000,n_positions=64,tied=1,qkv_bias=1"; do
  want=$("$M" inspect $(spec_model_opt "$spec") --layout dp=1 | sed -nE '1s/.*: ([0-9]+) parameters$/\1/p')
  same "$(shape_params "$(spec_shape "$spec")")" "${want:-none}" "n of $spec"
done
# 6 n + 12 L C T flops per token: gpt2 at T=1024, 545,239 tok/s of 989 TFLOP/s; llama-125m as
# torch_llama.py printed it (544,538 tok/s: "~47.4% of 989 TFLOP/s")
same "$(mfu "$(spec_shape gpt2)" 1024 545239)" 47.4% "gpt2's MFU"
same "$(mfu "$(spec_shape llama-125m)" 1024 544538)" 47.4% "llama-125m's MFU"
same "$(PEAK_TFLOPS=1 mfu "$(spec_shape gpt2)" 1024 1000)" 86.0% "the MFU against PEAK_TFLOPS"
same "$(mfu "$(spec_shape gpt2)" 1024 "?")" "?" "the MFU of no figure"
finish
