# Reference loss from Hugging Face transformers on the same weights and batch as `mpshard train`'s
# first step: python3 torch_loss.py EXPORT_DIR TOKENS.bin G T  (EXPORT_DIR from
# `mpshard export CKPT --format safetensors`). Prints the mean cross-entropy over the G x T tokens
# of sequences 0..G-1 (sequence j = tokens [jT, jT + T]), in fp32 (TF32 off). The model class is the
# one config.json names: GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, ...
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
d, tok, G, T = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.backends.cuda.matmul.allow_tf32 = False
head = np.fromfile(tok, dtype=np.int32, count=256)
assert head[0] == 20240520 and head[1] == 1, "not an llm.c token file"
t = np.fromfile(tok, dtype=np.uint16, offset=1024).astype(np.int64)
x = torch.tensor(np.stack([t[j * T: j * T + T] for j in range(G)]))
y = torch.tensor(np.stack([t[j * T + 1: j * T + T + 1] for j in range(G)]))
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).to(dev).eval()
with torch.no_grad():
    logits = m(x.to(dev)).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.to(dev).view(-1))
print(f"{loss.item():.7f}")
