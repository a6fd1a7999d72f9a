"""Host time per optimizer step on the host_152 set (ViT-B's 152 tensors at 256 elements each), cpu
backend, one intra-op thread: the minimum over 9 repeats of the mean of 100 steps (the gradients
stay in .grad: no backward). This machine's timings vary by up to 1.6x from run to run: compare
two versions by alternating runs of this script (bench/NOTES.md, "Issue 23").

    python bench/host_time.py
"""
import time

import torch

from sam_kernels import SAM, NuSAM
from sam_kernels.bench.shapes import PARAM_SETS

torch.set_num_threads(1)
shapes = PARAM_SETS["host_152"]()


def params():
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in ps: p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return ps


def sam_case(cls, base, **kw):
    ps = params(); opt = cls(ps, base, backend="cpu", **kw)
    def step():
        opt.first_step(); opt.second_step()
    return step


cases = {
  "sam_sgd": sam_case(SAM, torch.optim.SGD, lr=1e-9, momentum=0.9),
  "sam_adamw": sam_case(SAM, torch.optim.AdamW, lr=1e-9),
  "nusam_sgd": sam_case(NuSAM, torch.optim.SGD, lr=1e-9, momentum=0.9),
}
res = {}
for name, f in cases.items():
    for _ in range(30): f()
    best = float("inf")
    for r in range(9):
        t = time.perf_counter()
        for _ in range(100): f()
        best = min(best, (time.perf_counter() - t) / 100)
    res[name] = best * 1e3
print(" ".join(f"{k}={v:.3f}ms" for k, v in res.items()))
