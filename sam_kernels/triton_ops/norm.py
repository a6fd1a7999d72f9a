"""Global l2 norm: deterministic, two launches for one dtype group (one per extra group).
Launch 1 writes each program's fp32 sum of squares to a partials buffer; launch 2, a single
program, adds the partials in a fixed order and writes sqrt(total) to a device scalar, which
the perturb kernel then reads without a host synchronization.
Floor: read every element once (plus the weights for ASAM)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tables import Launch, block_of, tensor_ptr, dtype_groups, pick, tl_dtype


@triton.jit
def _sumsq_kernel(
    ptrs, n_tensors, numels, blk_tensor, blk_start, partials, offset,
    WEIGHTED: tl.constexpr, DTYPE: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    g_ptr = tensor_ptr(ptrs, n_tensors, t, 0, DTYPE)
    v = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if WEIGHTED:
        w_ptr = tensor_ptr(ptrs, n_tensors, t, 1, DTYPE)
        v = v * (tl.abs(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)) + offset)
    tl.store(partials + tl.program_id(0), tl.sum(v * v, axis=0))


@triton.jit
def _finalize_kernel(partials, n, out, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(out, tl.sqrt(tl.sum(acc, axis=0)))


def global_norm(tensors, weights, offset):
    device = tensors[0].device
    launches = []
    for dtype, index in dtype_groups(tensors):
        lists = [pick(tensors, index)] + ([pick(weights, index)] if weights else [])
        launches.append((dtype, Launch(lists)))
    total = sum(l.n_blocks for _, l in launches)
    if total == 0:
        return torch.zeros((), dtype=torch.float32, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)  # written by the cleanup: no fill launch
    partials = torch.empty(total, dtype=torch.float32, device=device)
    at = 0
    for dtype, launch in launches:
        launch.run(_sumsq_kernel, lambda first, at=at: partials[at + first:], float(offset),
                   WEIGHTED=bool(weights), DTYPE=tl_dtype(dtype))
        at += launch.n_blocks
    _finalize_kernel[(1,)](partials, total, out, BLOCK=1024)
    return out
