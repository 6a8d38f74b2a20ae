#!/usr/bin/env python3
"""Where a training step's wall time goes on the GPU, from a bench/cupti_trace.c trace.

usage: bench/timeline.py TRACE [--skip 5] [--top 25] [--gaps 12]

Steps end at the optimizer: a step boundary is the end of the last optimizer kernel (a name
matching --opt, default mpshard's k_adamw_many or PyTorch's fused Adam) before the next step's
first kernel. Over the steps after --skip (torch_llama.py and the benches time steps 6..N), it
prints the wall time per step, the GPU's busy time (the union of kernels, copies and memsets),
the idle time between them by size, the largest gaps with the kernels around them and the host's
CUDA calls during each, and the kernels' time by name at the clock the card actually ran."""
import argparse, bisect, collections, re, sys

ap = argparse.ArgumentParser()
ap.add_argument("trace")
ap.add_argument("--skip", type=int, default=5)
ap.add_argument("--steps", type=int, default=0, help="only the first STEPS optimizer steps (a script that trains several models)")
ap.add_argument("--top", type=int, default=25)
ap.add_argument("--gaps", type=int, default=12)
ap.add_argument("--opt", default=r"k_adamw_many|Adam|adam")
args = ap.parse_args()

dev, api = [], []  # (start, end, label)
for line in open(args.trace, errors="replace"):
    f = line.rstrip("\n").split(" ", 5)
    if f[0] == "K" and len(f) == 6:
        dev.append((int(f[1]), int(f[2]), f[5]))
    elif f[0] == "M" and len(f) >= 5:
        dev.append((int(f[1]), int(f[2]), "[memcpy kind %s, %s bytes]" % (f[4], f[3])))
    elif f[0] == "S" and len(f) >= 4:
        dev.append((int(f[1]), int(f[2]), "[memset %s bytes]" % f[3]))
    elif f[0] == "R" and len(f) >= 5:
        api.append((int(f[1]), int(f[2]), f[4]))
dev.sort()
api.sort()
opt = re.compile(args.opt)
is_opt = [bool(opt.search(d[2])) for d in dev]
bounds = [dev[i][1] for i in range(len(dev) - 1) if is_opt[i] and not is_opt[i + 1]]
if dev and is_opt[-1]:
    bounds.append(dev[-1][1])
if args.steps:
    bounds = bounds[:args.steps]
if len(bounds) < args.skip + 2:
    sys.exit(f"{args.trace}: {len(bounds)} optimizer steps found (--opt {args.opt!r}): too few")
t0, t1 = bounds[args.skip], bounds[-1]
steps = len(bounds) - 1 - args.skip
win = [d for d in dev if d[0] >= t0 and d[1] <= t1]

def short(name):
    return re.sub(r"\(.*", "", name)[:80]

busy, gaps, cur_end, prev = 0, [], t0, None
for s, e, name in win:
    if s > cur_end:
        gaps.append((s - cur_end, cur_end, s, prev, name))
    if e > cur_end:
        busy += e - max(s, cur_end)
        cur_end = e
    prev = name
if t1 > cur_end:
    gaps.append((t1 - cur_end, cur_end, t1, prev, None))
wall = t1 - t0
print(f"{steps} steps: {wall / steps / 1e6:.2f} ms per step; GPU busy {busy / steps / 1e6:.2f} ms "
      f"({100 * busy / wall:.1f}%), idle {(wall - busy) / steps / 1e6:.3f} ms per step in {len(gaps) / steps:.0f} gaps")
edges = [0, 2e3, 1e4, 1e5, 1e6, float("inf")]
labels = ["< 2 us", "2-10 us", "10-100 us", "0.1-1 ms", ">= 1 ms"]
for lo, hi, lab in zip(edges, edges[1:], labels):
    sel = [g[0] for g in gaps if lo <= g[0] < hi]
    print(f"  gaps {lab:>9}: {len(sel) / steps:8.1f} per step, {sum(sel) / steps / 1e3:9.1f} us per step")

api_starts = [a[0] for a in api]
def calls_during(a, b):
    """the host's CUDA calls that overlap [a, b]: name -> overlapped ns"""
    out = collections.Counter()
    i = max(0, bisect.bisect_left(api_starts, a) - 64)
    for s, e, name in api[i:]:
        if s > b:
            break
        if e >= a:
            out[name] += min(e, b) - max(s, a)
    return out

print(f"\nlargest gaps (of {len(gaps)}):")
for g, a, b, before, after in sorted(gaps, reverse=True)[:args.gaps]:
    calls = ", ".join(f"{n} {ns / 1e3:.0f} us" for n, ns in calls_during(a, b).most_common(3))
    print(f"  {g / 1e3:8.1f} us after {short(before or '(window start)')} before {short(after or '(window end)')}"
          f"{'; host: ' + calls if calls else ''}")

host = collections.Counter()
for s, e, name in api:
    if s >= t0 and e <= t1:
        host[name] += e - s
print("\nhost time in CUDA runtime calls per step (top 8):")
for name, ns in host.most_common(8):
    print(f"  {ns / steps / 1e3:9.1f} us  {name}")

tot, cnt = collections.Counter(), collections.Counter()
for s, e, name in win:
    tot[short(name)] += e - s
    cnt[short(name)] += 1
print(f"\nkernels by name, per step (sum {sum(tot.values()) / steps / 1e6:.2f} ms):")
for name, ns in tot.most_common(args.top):
    print(f"  {ns / steps / 1e6:8.3f} ms {cnt[name] / steps:6.1f}x  {name}")
