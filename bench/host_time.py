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
SHAPES = PARAM_SETS["host_152"]()


def params():
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in SHAPES]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return ps


def two_pass(cls, base, **kw):
    opt = cls(params(), base, backend="cpu", **kw)

    def step():
        opt.first_step()
        opt.second_step()
    return step


CASES = {
    "sam_sgd": two_pass(SAM, torch.optim.SGD, lr=1e-9, momentum=0.9),
    "sam_adamw": two_pass(SAM, torch.optim.AdamW, lr=1e-9),
    "nusam_sgd": two_pass(NuSAM, torch.optim.SGD, lr=1e-9, momentum=0.9),
}

if __name__ == "__main__":
    results = {}
    for name, step in CASES.items():
        for _ in range(30):
            step()
        best = float("inf")
        for _ in range(9):
            t = time.perf_counter()
            for _ in range(100):
                step()
            best = min(best, (time.perf_counter() - t) / 100)
        results[name] = best * 1e3
    print(" ".join(f"{k}={v:.3f}ms" for k, v in results.items()))
