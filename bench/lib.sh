# Sourced by the training benches (train_bench.sh, train_bench_llama.sh): PyTorch's measure and
# flop count (../shared/bench/torch_gpt.py, torch_llama.py) applied to mpshard train's log, so
# that both sides of a ratio are the same quantity. Needs $M (the mpshard binary).
# shellcheck shell=bash

PEAK_TFLOPS=${PEAK_TFLOPS:-989} # H100 / H200 SXM, dense bf16: the torch scripts' denominator

# SPEC: a name `mpshard models` lists, or LABEL=CONFIG (CONFIG as `--config` takes it: tiny
# shapes for runs on the CPU)
spec_label() { echo "${1%%=*}"; }
spec_is_config() { [[ $1 == *=* ]]; }
# the init/train option naming the model (two words: callers leave it unquoted)
spec_model_opt() { if spec_is_config "$1"; then echo "--config ${1#*=}"; else echo "--model $1"; fi; }
# its shape as K=V,.. (a named model's from `mpshard models --config`)
spec_shape() {
  if spec_is_config "$1"; then echo "${1#*=}"
  else "$M" models --config | awk -v n="$1" '$1 == n { print $2 }'; fi
}
# shape_get SHAPE KEY [DEFAULT]
shape_get() {
  local v
  v=$(echo ",$1," | grep -oE ",$2=[^,]*," | head -1 | sed -E "s/^,$2=//; s/,\$//")
  echo "${v:-${3:-}}"
}

# The parameter count n as the torch scripts take it (sum of p.numel()), from the shape:
#  GPT-2 (torch_gpt.py): token embedding of the padded vocab (the head tied to it), positions,
#    per layer 12 C^2 + 13 C (qkv, proj, fc, fc2 with biases, two LayerNorms), the final LayerNorm;
#  Llama (torch_llama.py): the embedding and the untied head (V C each), per layer q and o C^2,
#    k and v C * kv * C/H, gate, up and down 3 C F, two RMSNorm weights; the final RMSNorm.
shape_params() {
  local s=$1 L C V
  L=$(shape_get "$s" n_layer); C=$(shape_get "$s" n_embd)
  V=$(shape_get "$s" padded_vocab)
  if [ -z "$V" ]; then # as mpshard pads a vocab given without padded_vocab: to a multiple of 128
    V=$(shape_get "$s" vocab); V=$(( (V + 127) / 128 * 128 ))
  fi
  if [ "$(shape_get "$s" arch gpt2)" = llama ]; then
    awk -v L="$L" -v C="$C" -v V="$V" -v H="$(shape_get "$s" n_head)" -v KV="$(shape_get "$s" n_kv_head "$(shape_get "$s" n_head)")" \
      -v F="$(shape_get "$s" ffn)" -v tied="$(shape_get "$s" tied 0)" -v qb="$(shape_get "$s" qkv_bias 0)" \
      'BEGIN { hs = C / H; printf "%.0f\n", (2 - tied) * V * C + C + L * (2 * C * C + 2 * C * KV * hs + 3 * C * F + 2 * C + qb * (C + 2 * KV * hs)) }'
  else
    awk -v L="$L" -v C="$C" -v V="$V" -v P="$(shape_get "$s" n_positions)" \
      'BEGIN { printf "%.0f\n", V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C }'
  fi
}

# params_m SHAPE: n, and in the torch scripts' form (millions, one decimal) to compare with theirs
params_m() { shape_params "$1" | awk '{ printf "%.0f (%.1fM)", $1, $1 / 1e6 }'; }

# mfu SHAPE T TOKENS_PER_S: the torch scripts' count, 6 n + 12 L C T flops per token (attention
# counted dense), over PEAK_TFLOPS
mfu() {
  if [ -z "$3" ] || [ "$3" = "?" ]; then echo "?"; return; fi
  awk -v n="$(shape_params "$1")" -v L="$(shape_get "$1" n_layer)" -v C="$(shape_get "$1" n_embd)" -v T="$2" \
    -v t="$3" -v peak="$PEAK_TFLOPS" 'BEGIN { printf "%.1f%%", 100 * t * (6 * n + 12 * L * C * T) / (peak * 1e12) }'
}

# log_tps LOG TOKENS_PER_STEP: the tokens of steps 6..N over the wall time from the end of step 5
# to the end of step N (the log's elapsed_s), as torch_*.py time 30 steps after 5 warm-up steps:
# never a median of per-step figures. "?" when the log has fewer than 6 steps.
log_tps() {
  awk -v tok="$2" '/"loss"/ { n++; e = $0; sub(/.*"elapsed_s": /, "", e); sub(/[,}].*/, "", e); t[n] = e + 0 }
    END { if (n < 6 || t[n] <= t[5]) print "?"; else printf "%.1f\n", tok * (n - 5) / (t[n] - t[5]) }' "$1"
}

# first_step_s LOG: seconds from the launch of mpshard train to the end of its first step
first_step_s() {
  local s
  s=$(grep -m1 '"loss"' "$1" 2>/dev/null | sed -E 's/.*"elapsed_s": ([0-9.]+).*/\1/')
  echo "${s:-?}"
}

# save_stalls LOG: "STEP STALL_S" for each step the run saved at (the log's save_stall_s)
save_stalls() { grep '"save_stall_s"' "$1" | sed -E 's/^\{"step": ([0-9]+),.*"save_stall_s": ([0-9.]+).*/\1 \2/'; }

# torch_tps FILE: the tokens/s figure of a torch_*.py line; torch_params FILE: its "params N.NM"
torch_tps() { grep -oE '[0-9,]+ tok/s' "$1" | head -1 | cut -d' ' -f1 | tr -d ,; }
torch_params() { grep -oE 'params [0-9.]+M' "$1" | head -1 | cut -d' ' -f2; }

# run_error ERRFILE: the error line of a failed mpshard run (the last line, /usr/bin/time's lines aside)
run_error() { grep -vE $'^\t|^Command exited' "$1" | tail -1; }

# ratio A B: A / B to three decimals, "?" without both
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.3fx", a / b; else print "?" }'; }
fmt0() { [ "$1" = "?" ] || [ -z "$1" ] && echo "?" || printf '%.0f' "$1"; }

# the page cache dropped (root only; DROP_CACHES=0: left alone), so that a load reads the disk
drop_caches() {
  [ "${DROP_CACHES:-1}" != 0 ] || { echo "page cache not dropped: DROP_CACHES=0"; return; }
  sync
  if echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then echo "caches dropped"; else echo "page cache not dropped: not root"; fi
}

gpu_name() { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi: BACKEND=${BACKEND:-cuda})"; }

# save_report LABEL LOG ERR: one line per save of a run (the log's save_stall_s, and from the
# run's stderr whether it was a background save, how much of its stall waited for the previous
# save's write, and how long the writer took)
save_report() {
  local step stall line wait write
  save_stalls "$2" | while read -r step stall; do
    line=$(grep -F "/step-$(printf '%08d' "$step") in " "$3" | head -1)
    case $line in
      *"of stall (snapshot copy"*)
        wait=$(echo "$line" | grep -oE '[0-9.]+ s of it waiting' | cut -d' ' -f1)
        write=$(echo "$line" | sed -nE 's/.*in the background in ([0-9.]+) s.*/\1/p')
        echo "save stall ($1, background save at step $step): $stall s (snapshot copy${wait:+; $wait s of it waiting for the previous save}; written in the background in ${write:-?} s)" ;;
      *) echo "save stall ($1, save at step $step, the run's last: written directly): $stall s" ;;
    esac
  done
}
