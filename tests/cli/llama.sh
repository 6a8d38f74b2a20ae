#!/bin/bash
# Llama-family checkpoints (Llama with GQA and an untied head, Qwen2 with q/k/v biases and a tied
# head, Mistral) as transformers' save_pretrained writes them: one model.safetensors or several
# files and an index, f32, bf16 and f16. shard -> reshard chains (tp = n_kv_head, tp below it,
# pipelines with uneven stages, dp=3 at ZeRO 1-3) -> export must give back every tensor bit for bit,
# the dtype, the file layout and config.json byte for byte. Then the refusals.
. "$(dirname "$0")/common.bash"
# 8 query heads over 4 kv heads (head size 8), MLP 80, vocab 300 (padded to 384), 5 layers
LLAMA="n_layer=5,n_embd=64,n_head=8,vocab=300,n_positions=32,arch=llama,n_kv_head=4,ffn=80,tied=0,rope_theta=500000"
QWEN2="n_layer=4,n_embd=48,n_head=6,vocab=250,n_positions=32,arch=llama,family=qwen2,n_kv_head=2,ffn=72,tied=1,qkv_bias=1,norm_eps=1e-6"
MISTRAL="n_layer=3,n_embd=32,n_head=4,vocab=200,n_positions=16,arch=llama,family=mistral,n_kv_head=2,ffn=40,tied=0"
# layout chains: each checkpoint is resharded from the previous one
CHAIN_LLAMA="tp=4,pp=2,stages=3:2 tp=2,dp=3,zero=1 pp=3,stages=1:3:1,tp=4,zero=2 dp=3,tp=2,zero=3 dp=2,pp=5,zero=1 dp=1"
CHAIN_QWEN2="tp=2,pp=2,stages=3:1 dp=3,zero=3 tp=2,dp=3,zero=2 pp=4,dp=2,zero=1 dp=1"
CHAIN_MISTRAL="tp=2,pp=3 dp=3,tp=2,zero=1 dp=1"

# header_dtypes FILE: the dtypes named in a safetensors header
header_dtypes() { head -c "$(( $(od -An -t u8 -N 8 "$1" | tr -d ' ') + 8 ))" "$1" | grep -ao '"dtype":"[A-Z0-9]*"' | sort -u | tr '\n' ' '; }

roundtrip() { # NAME CONFIG CHAIN DTYPE [--max-shard-size S]
  local name=$1 cfg=$2 chain=$3 dtype=$4; shift 4
  local src="$T/src-$name-$dtype$*"; src=${src// /}
  expect 0 "$MPSHARD" synth --config "$cfg" --format safetensors --dtype "$dtype" --seed 11 "$@" -o "$src"
  local first=1 prev="$src" i=0
  for layout in $chain; do
    local ck="$T/ck-$name-$i"
    if [ $first = 1 ]; then
      expect 0 "$MPSHARD" shard "$src" --layout "$layout" -o "$ck" -q; first=0
    else
      expect 0 "$MPSHARD" reshard "$prev" --layout "$layout" -o "$ck" -q
      rm -rf "$prev"
    fi
    expect 0 "$MPSHARD" verify "$ck" -q
    prev=$ck; i=$((i+1))
  done
  rm -rf "$T/ex"
  expect 0 "$MPSHARD" export "$prev" --format safetensors -o "$T/ex" -q "$@"
  expect 0 "$MPSHARD" compare "$src" "$T/ex"
  grep -q "identical: " "$T/out" && ok || bad "$name $dtype: compare did not say identical: $(cat "$T/out")"
  cmp -s "$src/config.json" "$T/ex/config.json" && ok || bad "$name $dtype: config.json differs"
  # the same file layout (one file, or the same files and index) and the source dtype
  (cd "$src" && ls) > "$T/ls1"; (cd "$T/ex" && ls) > "$T/ls2"
  cmp -s "$T/ls1" "$T/ls2" && ok || bad "$name $dtype $*: files differ: $(tr '\n' ' ' < "$T/ls2")"
  if [ -f "$src/model.safetensors.index.json" ]; then
    cmp -s "$src/model.safetensors.index.json" "$T/ex/model.safetensors.index.json" && ok || bad "$name: index differs"
  fi
  local want=F32; [ "$dtype" = bf16 ] && want=BF16; [ "$dtype" = f16 ] && want=F16
  for f in "$T"/ex/*.safetensors; do
    [ "$(header_dtypes "$f")" = "\"dtype\":\"$want\" " ] && ok || bad "$name: $f has dtypes $(header_dtypes "$f")"
  done
  rm -rf "$prev" "$src"
}

roundtrip llama "$LLAMA" "$CHAIN_LLAMA" bf16 --max-shard-size 30KB
roundtrip llama "$LLAMA" "$CHAIN_LLAMA" f32
roundtrip qwen2 "$QWEN2" "$CHAIN_QWEN2" f32 --max-shard-size 20KB
roundtrip qwen2 "$QWEN2" "$CHAIN_QWEN2" bf16
roundtrip mistral "$MISTRAL" "$CHAIN_MISTRAL" f16 --max-shard-size 8KB
# linear RoPE scaling (LongChat's form): kept in the manifest, config.json written back as it was
roundtrip llama-rope-linear "$LLAMA,rope_linear=4" "$CHAIN_MISTRAL" f32
# Mistral 7B v0.1's sliding window (here 8 of 16 positions): kept through every layout, written
# back to config.json, and the checkpoint is format version 3 (older readers refuse it)
roundtrip mistral-window "$MISTRAL,sliding_window=8" "$CHAIN_MISTRAL" bf16
expect 0 "$MPSHARD" synth --config "$MISTRAL,sliding_window=8" --format safetensors -o "$T/sw"
grep -qE '"sliding_window": 8,?$' "$T/sw/config.json" && ok || bad "synth config.json lacks the window"
expect 0 "$MPSHARD" shard "$T/sw" --layout tp=2 -o "$T/ck-sw" -q
expect 0 "$MPSHARD" reshard "$T/ck-sw" --layout pp=3 -o "$T/ck-sw2" -q
grep -q '"format_version": 3' "$T/ck-sw2/manifest.json" && grep -q '"sliding_window": 8' "$T/ck-sw2/manifest.json" \
  && ok || bad "windowed manifest: $(grep -E 'format_version|sliding_window' "$T/ck-sw2/manifest.json" | tr -d '\n')"
# a window of the whole context or more never binds: the model has none (format version 2)
sed -i 's/"sliding_window": 8/"sliding_window": 16/' "$T/sw/config.json"
rm -rf "$T/ck-sw"; expect 0 "$MPSHARD" shard "$T/sw" --layout tp=2 -o "$T/ck-sw" -q
# (the manifest's model section; source.hf_config keeps the original's member)
grep -q '"format_version": 2' "$T/ck-sw/manifest.json" && ! sed -n '/"model": {/,/}/p' "$T/ck-sw/manifest.json" | grep -q sliding_window \
  && ok || bad "a window of n_positions was kept"
expect 0 "$MPSHARD" export "$T/ck-sw" --format safetensors -o "$T/sw-ex" -q
cmp -s "$T/sw/config.json" "$T/sw-ex/config.json" && ok || bad "config.json with sliding_window 16 not kept"
rm -rf "$T/sw" "$T/ck-sw" "$T/ck-sw2" "$T/sw-ex"
# Mistral NeMo's head size: 4 heads of 16 (q 64 wide) in a 32-wide model, through tp=2 (its kv
# heads split) and back; format version 3
roundtrip mistral-head-dim "$MISTRAL,head_dim=16" "$CHAIN_MISTRAL" bf16
expect 0 "$MPSHARD" synth --config "$MISTRAL,head_dim=16" --format safetensors -o "$T/hd"
grep -q '"head_dim": 16,' "$T/hd/config.json" && ok || bad "synth config.json lacks head_dim 16"
expect 0 "$MPSHARD" shard "$T/hd" --layout tp=2,pp=3 -o "$T/ck-hd" -q
grep -q '"format_version": 3' "$T/ck-hd/manifest.json" && grep -q '"head_dim": 16' "$T/ck-hd/manifest.json" \
  && ok || bad "head_dim manifest: $(grep -E 'format_version|head_dim' "$T/ck-hd/manifest.json" | tr -d '\n')"
expect 0 "$MPSHARD" ls "$T/ck-hd" --tensor h.0.qw
grep -q "rank-00001.h5  /param/h.0.qw   \[2:4, 0:16, 0:32\]" "$T/out" && ok || bad "h.0.qw boxes: $(cat "$T/out")"
rm -rf "$T/hd" "$T/ck-hd"
# the planner's default sequence is the longest the trainer takes: v0.1's window, not its context
expect 0 "$MPSHARD" inspect --model mistral-7b-v0.1 --layout tp=8 --json
grep -q '"seq": 4096,' "$T/out" && ok || bad "inspect mistral-7b-v0.1: $(grep -o '"seq": [0-9]*' "$T/out")"
expect 0 "$MPSHARD" inspect --model mistral-7b --layout tp=8 --json
grep -q '"seq": 32768,' "$T/out" && ok || bad "inspect mistral-7b: $(grep -o '"seq": [0-9]*' "$T/out")"
roundtrip mistral "$MISTRAL" "$CHAIN_MISTRAL" bf16

# the index itself as input, and a single .safetensors file with config.json beside it
expect 0 "$MPSHARD" synth --config "$LLAMA" --format safetensors --dtype bf16 --max-shard-size 30KB -o "$T/idx"
expect 0 "$MPSHARD" shard "$T/idx/model.safetensors.index.json" --layout tp=2 -o "$T/ck-idx" -q
expect 0 "$MPSHARD" export "$T/ck-idx" --format safetensors --max-shard-size 1GB -o "$T/one" -q
[ -f "$T/one/model.safetensors" ] && [ ! -e "$T/one/model.safetensors.index.json" ] && ok || bad "one-file export"
expect 0 "$MPSHARD" compare "$T/idx" "$T/one/model.safetensors"
# the manifest names the architecture and is format version 2; GPT-2 checkpoints stay version 1
grep -q '"arch": "llama"' "$T/ck-idx/manifest.json" && grep -q '"format_version": 2' "$T/ck-idx/manifest.json" \
  && grep -q '"n_kv_head": 4' "$T/ck-idx/manifest.json" && ok || bad "manifest model section"
expect 0 "$MPSHARD" synth --config "$SMALL" --format safetensors -o "$T/g2"
expect 0 "$MPSHARD" shard "$T/g2" --layout tp=2 -o "$T/ck-g2" -q
grep -q '"format_version": 1' "$T/ck-g2/manifest.json" && ok || bad "GPT-2 manifest is not version 1"

# ---- refusals, each in one line naming what is wrong
# tp above n_kv_head, or not dividing it
expect 2 "$MPSHARD" shard "$T/idx" --layout tp=8 -o "$T/x" -q
expect_err "tp=8 must divide the model's 4 key/value heads \(n_kv_head; 8 query heads\): tp above n_kv_head"
expect 2 "$MPSHARD" reshard "$T/ck-idx" --layout tp=8 -o "$T/x" -q
expect_err "tp=8 must divide the model's 4 key/value heads"
[ ! -e "$T/x" ] && ok || bad "a refused shard left $T/x"
# llm.c holds GPT-2 only
expect 6 "$MPSHARD" export "$T/ck-idx" --format llmc -o "$T/x" -q
expect_err "llm.c model files hold GPT-2 models only, this is a llama model"
# config.json options the model does not implement
base="$T/base"; expect 0 "$MPSHARD" synth --config "$MISTRAL" --format safetensors -o "$base"
refuse() { # EXIT PATTERN SED-EXPRESSION: config.json edited by sed must be refused
  local want=$1 pattern=$2 edit=$3
  rm -rf "$T/bad"; cp -r "$base" "$T/bad"
  sed -i "$edit" "$T/bad/config.json"
  expect "$want" "$MPSHARD" shard "$T/bad" --layout dp=1 -o "$T/x" -q
  expect_err "$pattern"
}
refuse 6 'sliding_window="8" is not supported \(null or a positive number' 's/"sliding_window": null/"sliding_window": "8"/'
refuse 6 'rope_scaling=.*longrope.* is not supported \(only default, linear, dynamic and llama3 RoPE\)' 's/"rope_scaling": null/"rope_scaling": {"rope_type": "longrope", "factor": 2.0}/'
refuse 6 'rope_scaling=.*yarn.* is not supported' 's/"rope_scaling": null/"rope_scaling": {"type": "yarn", "factor": 4.0}/'
refuse 6 'hidden_act="gelu" is not supported' 's/"hidden_act": "silu"/"hidden_act": "gelu"/'
refuse 6 'attention_bias=true is not supported \(o_proj has no bias' 's/"use_cache": true/"use_cache": true, "attention_bias": true/'
refuse 6 'mlp_bias=true is not supported' 's/"use_cache": true/"use_cache": true, "mlp_bias": true/'
# a head_dim the tensors do not have: the tensor and both shapes named
refuse 3 "q_proj.weight': shape \(32, 32\) but config.json implies \(64, 32\)" 's/"head_dim": 8/"head_dim": 16/'
refuse 6 'head_dim=16 is not supported \(Qwen2' 's/"model_type": "mistral"/"model_type": "qwen2"/; s/"head_dim": 8/"head_dim": 16/'
refuse 6 'num_local_experts=8 is not supported \(mixture-of-experts' 's/"use_cache": true/"use_cache": true, "num_local_experts": 8/'
refuse 6 'quantization_config=.* is not supported' 's/"use_cache": true/"use_cache": true, "quantization_config": {"quant_method": "gptq"}/'
refuse 6 'model_type="gemma" is not supported' 's/"model_type": "mistral"/"model_type": "gemma"/'
refuse 3 'missing intermediate_size' '/"intermediate_size"/d'
# Qwen2's window counts only with use_sliding_window
qwen="$T/qwen"; expect 0 "$MPSHARD" synth --config "$QWEN2" --format safetensors -o "$qwen"
sed -i 's/"use_sliding_window": false/"use_sliding_window": true/; s/"sliding_window": null/"sliding_window": 8/' "$qwen/config.json"
expect 6 "$MPSHARD" shard "$qwen" --layout dp=1 -o "$T/x" -q
expect_err 'sliding_window=8 is not supported'
sed -i 's/"use_sliding_window": true/"use_sliding_window": false/' "$qwen/config.json"
expect 0 "$MPSHARD" shard "$qwen" --layout dp=1 -o "$T/x" -q
rm -rf "$T/x"
# a tensor the config does not have (a bias in a Llama without biases), and one missing
rm -rf "$T/bad"; cp -r "$base" "$T/bad"
sed -i 's/"model_type": "mistral"/"model_type": "qwen2"/' "$T/bad/config.json"
expect 3 "$MPSHARD" shard "$T/bad" --layout dp=1 -o "$T/x" -q
expect_err "tensor 'model.layers.0.self_attn.q_proj.bias' is missing"
# an index that names a file outside the model's directory, or a file that does not hold the tensor
rm -rf "$T/bad"; cp -r "$T/idx" "$T/bad"
sed -i '0,/"model-00001-of/s//"..\/model-00001-of/' "$T/bad/model.safetensors.index.json"
expect 3 "$MPSHARD" shard "$T/bad" --layout dp=1 -o "$T/x" -q
expect_err "is not a file name in the model's directory"
rm -rf "$T/bad"; cp -r "$T/idx" "$T/bad"
sed -i 's/"model.norm.weight": "model-[0-9]*-of/"model.norm.weight": "model-00001-of/' "$T/bad/model.safetensors.index.json"
expect 3 "$MPSHARD" shard "$T/bad" --layout dp=1 -o "$T/x" -q
expect_err "tensor 'model.norm.weight' is stored in .*, but the index names another file"
finish
