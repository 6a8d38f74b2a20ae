# Where the PyTorch baseline's step goes, to set beside bench/train_profile.sh's table of mpshard's:
# the GPU kernels of one step of ../shared/bench/torch_llama.py (or torch_gpt.py) under
# torch.profiler (CUPTI kernel times, clocks as they run), summed by name and by class (GEMM,
# attention, AdamW, Triton, other), largest first. The model and step are the baseline's own: its
# file is run up to its closing loop over sizes, so nothing is copied.
# usage (GPU host): python3 bench/torch_profile.py SHARED_BENCH_DIR NAME   e.g. ../shared/bench tinyllama-1.1b
import collections, os, sys, time
import torch

src_dir, name = sys.argv[1], sys.argv[2]
script = os.path.join(src_dir, "torch_llama.py" if not name.startswith("gpt2") else "torch_gpt.py")
code = open(script).read()
cut = code.rfind("\nfor name in")  # the closing loop that benches every size when the file is run
if cut < 0:
    sys.exit(f"{script}: no closing 'for name in' loop to leave out")
ns = {"__name__": "torch_baseline"}
exec(compile(code[:cut], script, "exec"), ns)

L, C, H, KV, Fd, V, T, B = ns["SIZES"][name]
torch.manual_seed(0)
m = ns["Llama"](L, C, H, KV, Fd, V, T).cuda()
opt = torch.optim.AdamW(m.parameters(), lr=3e-4, fused=True)
mc = torch.compile(m)
data = torch.randint(0, V, (B, T + 1), device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = mc(data[:, :-1], data[:, 1:])
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)


for _ in range(6):
    step()
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(5):
    step()
torch.cuda.synchronize()
wall = (time.perf_counter() - t0) / 5
STEPS = 3
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize()


def klass(k):
    lk = k.lower()
    if "flash" in lk or "fmha" in lk or "attention" in lk or "sdpa" in lk:
        return "attention"
    if "gemm" in lk or "nvjet" in lk or "xmma" in lk or "cutlass" in lk or "sm90_" in lk:
        return "GEMM"
    if "adam" in lk or "multi_tensor" in lk:
        return "AdamW"
    if lk.startswith("triton"):
        return "Triton (fused element-wise)"
    return "other"


tot = collections.defaultdict(float); cnt = collections.Counter()
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA:
        tot[e.name] += e.device_time / STEPS; cnt[e.name] += 1
s = sum(tot.values())
print(f"torch {name} B={B} T={T}: {wall*1e3:.1f} ms/step wall, {B*T/wall:,.0f} tok/s; "
      f"kernels of one step {s/1e3:.1f} ms busy ({sum(cnt.values())//STEPS} launches)")
by = collections.defaultdict(float)
for k, us in tot.items():
    by[klass(k)] += us
for k, us in sorted(by.items(), key=lambda x: -x[1]):
    print(f"  class {us/1e3:9.2f} ms {100*us/s:5.1f}%  {k}")
for k, us in sorted(tot.items(), key=lambda x: -x[1])[:40]:
    print(f"{us/1e3:9.2f} ms {100*us/s:5.1f}% {cnt[k]//STEPS:5d}x  {k[:100]}")
