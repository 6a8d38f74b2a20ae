# PyTorch's training curve for the same run as `mpshard train`: the same initial weights (an
# export: `mpshard export CKPT --format safetensors`), the same batches (step k takes sequences
# [k*G, (k+1)*G), sequence j = tokens [jT, jT + T], micro-batches of B summed into one mean over
# G x T tokens), AdamW with torch semantics (beta 0.9/0.95, eps 1e-8, decay on matrices and
# embeddings only), mpshard's warmup + cosine schedule and global-norm clipping. Prints one JSON
# line per step like mpshard's --log: step, loss (before the update), lr, grad_norm (before
# clipping). fp32 with TF32 off by default; --bf16 runs the forward under bf16 autocast, as
# torch_gpt.py does. Dropout is off (mpshard has none).
# usage: python3 torch_curve.py EXPORT_DIR TOKENS.bin --global-batch G --micro-batch B --seq T --steps N
#        [--lr X] [--lr-min X] [--warmup K] [--decay-steps S] [--weight-decay X] [--grad-clip X] [--bf16]
import argparse
import json
import math

import numpy as np
import torch
from transformers import GPT2LMHeadModel

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("tokens")
ap.add_argument("--global-batch", type=int, required=True)
ap.add_argument("--micro-batch", type=int, required=True)
ap.add_argument("--seq", type=int, required=True)
ap.add_argument("--steps", type=int, required=True)
ap.add_argument("--lr", type=float, default=3e-4)
ap.add_argument("--lr-min", type=float, default=None)
ap.add_argument("--warmup", type=int, default=0)
ap.add_argument("--decay-steps", type=int, default=None)
ap.add_argument("--weight-decay", type=float, default=0.1)
ap.add_argument("--grad-clip", type=float, default=1.0)
ap.add_argument("--bf16", action="store_true")
a = ap.parse_args()
G, B, T = a.global_batch, a.micro_batch, a.seq
assert G % B == 0, "--global-batch must be a multiple of --micro-batch"
# mpshard keeps these in float32
lr_peak = float(np.float32(a.lr))
lr_min = lr_peak if a.lr_min is None else float(np.float32(a.lr_min))
decay_steps = a.steps if a.decay_steps is None else a.decay_steps


def lr_at(step):  # train/engine.c mps_engine_lr
    if step < a.warmup:
        return float(np.float32(lr_peak) * np.float32(step + 1) / np.float32(a.warmup))
    if decay_steps <= a.warmup or lr_min == lr_peak:
        return lr_peak
    progress = min((step - a.warmup) / (decay_steps - a.warmup), 1.0)
    return float(np.float32(lr_min + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr_peak - lr_min)))


head = np.fromfile(a.tokens, dtype=np.int32, count=256)
assert head[0] == 20240520 and head[1] == 1, "not an llm.c token file"
tok = np.fromfile(a.tokens, dtype=np.uint16, offset=1024).astype(np.int64)
nseq = (len(tok) - 1) // T


def batch(first, count):
    rows = [((first + i) % nseq) * T for i in range(count)]
    x = np.stack([tok[r:r + T] for r in rows])
    y = np.stack([tok[r + 1:r + T + 1] for r in rows])
    return torch.tensor(x), torch.tensor(y)


torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = "cuda" if torch.cuda.is_available() else "cpu"
model = GPT2LMHeadModel.from_pretrained(a.model, torch_dtype=torch.float32, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0).to(dev).train()
params = [p for _, p in model.named_parameters()]  # wte once (the head is tied to it)
groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": a.weight_decay},
          {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
opt = torch.optim.AdamW(groups, lr=lr_peak, betas=(0.9, 0.95), eps=1e-8, foreach=False)
position = 0
for step in range(a.steps):
    lr = lr_at(step)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for mb in range(G // B):
        x, y = batch(position + mb * B, B)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.bf16 and dev == "cuda"):
            logits = model(x.to(dev)).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.to(dev).reshape(-1),
                                                 reduction="sum") / (G * T)
        loss.backward()
        total += loss.item()
    norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip if a.grad_clip > 0 else float("inf"))
    opt.step()
    position += G
    print(json.dumps({"step": step + 1, "loss": round(total, 8), "lr": lr, "grad_norm": round(float(norm), 8)}),
          flush=True)
