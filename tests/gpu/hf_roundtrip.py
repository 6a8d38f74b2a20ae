#!/usr/bin/env python3
"""Models made by transformers, saved with save_pretrained, go through mpshard shard -> reshard ->
export and load back in transformers with identical weights and identical logits.

Models of each family (Llama with GQA and an untied head, with Llama 3's and linear RoPE scaling;
Qwen2 with q/k/v biases and a tied head; Mistral, with and without a sliding window, and with a
head size other than hidden / heads), in bf16 and f32, one saved with a small max_shard_size so
that it has an index. Needs torch and transformers (the GPU host has both); runs on the GPU when
there is one.
usage: tests/gpu/hf_roundtrip.py MPSHARD WORKDIR
"""
import os
import shutil
import subprocess
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

MPSHARD, WORK = sys.argv[1], sys.argv[2]
dev = "cuda" if torch.cuda.is_available() else "cpu"
common = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=5, num_attention_heads=8,
              max_position_embeddings=256, rms_norm_eps=1e-5)
cases = [
    # name, config, dtype, max_shard_size, layouts (shard, then each reshard)
    ("llama-gqa-untied", LlamaConfig(**common, num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=False,
                                     rope_theta=500000.0), torch.bfloat16, "300KB",
     ["dp=2,pp=2,tp=4,zero=1", "tp=2,pp=3,stages=1:3:1,zero=2", "dp=3,zero=3"]),
    ("llama3-rope-f32", LlamaConfig(**common, num_key_value_heads=2, vocab_size=999, tie_word_embeddings=False,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     torch.float32, None, ["tp=2,pp=2", "dp=2,tp=2,zero=3"]),
    ("llama-rope-linear", LlamaConfig(**common, num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=False,
                                      rope_scaling={"rope_type": "linear", "factor": 4.0}),
     torch.bfloat16, None, ["tp=4", "pp=2,dp=2,zero=1"]),
    ("qwen2-bias-tied", Qwen2Config(**common, num_key_value_heads=2, vocab_size=1003, tie_word_embeddings=True,
                                    use_sliding_window=False), torch.bfloat16, None,
     ["tp=2,pp=5", "dp=2,zero=1"]),
    ("mistral", MistralConfig(**common, num_key_value_heads=4, vocab_size=1000, sliding_window=None),
     torch.float32, "200KB", ["tp=4", "pp=2,dp=2,zero=2"]),
    # Mistral 7B v0.1's form: a window (16) below the context, which the 64-token logits below cross
    ("mistral-window", MistralConfig(**common, num_key_value_heads=2, vocab_size=1000, sliding_window=16),
     torch.bfloat16, None, ["tp=2,pp=2", "dp=2,zero=1"]),
    # Mistral NeMo's form: 8 heads of 32 (q 256 wide) in a 128-wide model
    ("mistral-head-dim", MistralConfig(**common, num_key_value_heads=4, vocab_size=1000, head_dim=32,
                                       sliding_window=None), torch.float32, None, ["tp=2,pp=2", "dp=2,tp=4,zero=1"]),
]


def run(*args):
    r = subprocess.run([MPSHARD, *args, "-q"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"FAIL: mpshard {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")


print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {dev}")
passed = failed = 0
for name, cfg, dtype, shard_size, layouts in cases:
    d = os.path.join(WORK, name)
    shutil.rmtree(d, ignore_errors=True)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # the norms and biases away from their init values, so that they are tested too
        for n, p in model.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(torch.randn_like(p) * 0.1)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(f"{d}/hf", **kw)
    files = sorted(os.listdir(f"{d}/hf"))
    run("shard", f"{d}/hf", "--layout", layouts[0], "-o", f"{d}/ck0")
    for i, layout in enumerate(layouts[1:], 1):
        run("reshard", f"{d}/ck{i-1}", "--layout", layout, "-o", f"{d}/ck{i}")
    run("verify", f"{d}/ck{len(layouts)-1}")
    export_args = ["--max-shard-size", shard_size] if shard_size else []
    run("export", f"{d}/ck{len(layouts)-1}", "--format", "safetensors", "-o", f"{d}/out", *export_args)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    back = AutoModelForCausalLM.from_pretrained(f"{d}/out", **{dtype_kw: dtype})
    # the reference is the saved model loaded the same way: model.to(bf16) also rounds buffers that
    # from_pretrained keeps in fp32 (RoPE's inv_freq), which changes bf16 logits
    model = AutoModelForCausalLM.from_pretrained(f"{d}/hf", **{dtype_kw: dtype})
    a, b = model.state_dict(), back.state_dict()
    same_weights = a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(5))
    model, back = model.to(dev).eval(), back.to(dev).eval()
    with torch.no_grad():
        la, lb = model(ids.to(dev)).logits, back(ids.to(dev)).logits
    same_logits = torch.equal(la, lb)
    ok = same_weights and same_logits and type(back) is type(model)
    print(f"{'ok  ' if ok else 'FAIL'} {name:18s} {str(dtype):15s} files {len(files)} -> "
          f"{len(os.listdir(f'{d}/out'))}, layouts {' -> '.join(layouts)}: weights "
          f"{'identical' if same_weights else 'DIFFER'}, logits {'identical' if same_logits else 'DIFFER'} "
          f"(max |diff| {(la.float() - lb.float()).abs().max().item():.3g}), class {type(back).__name__}")
    passed, failed = passed + ok, failed + (not ok)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
