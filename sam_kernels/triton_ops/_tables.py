"""Multi-tensor launch tables shared by the Triton kernels.

One launch covers every tensor of a (device, dtype) group, whatever their number and sizes,
like the work table of Triton's grouped-GEMM tutorial: program p handles BLOCK elements of
tensor blk_tensor[p] starting at blk_start[p]; the tensors' addresses are int64 entries of a
pointer table, cast in the kernel with tl.pointer_type. The block table depends only on the
sizes and is cached; the pointer table is rebuilt per call (gradients move between steps)
and sent with one asynchronous copy from pinned memory.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backends import triton_interpret

TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}

# 4096 elements a program: 16 KB per fp32 stream, enough bytes in flight per SM on Hopper
# with 8 warps; the interpreter runs programs one by one, so it gets the same size.
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def block_of(numels, blk_tensor, blk_start, BLOCK: tl.constexpr):
    """This program's tensor index, element offsets and in-bounds mask."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    offs = tl.load(blk_start + pid) + tl.arange(0, BLOCK)
    return t, offs, offs < tl.load(numels + t)


@triton.jit
def tensor_ptr(ptrs, n_tensors, t, LIST: tl.constexpr, DTYPE: tl.constexpr):
    """The base pointer of tensor t of list LIST in the pointer table."""
    return tl.load(ptrs + LIST * n_tensors + t).to(tl.pointer_type(DTYPE))


def tl_dtype(dtype: torch.dtype):
    try:
        return TL_DTYPE[dtype]
    except KeyError:
        raise TypeError(f"sam_kernels: dtype {dtype} is not supported by the triton backend") from None


def compute_dtype(dtype: torch.dtype):
    """Arithmetic type inside the kernels: fp64 for fp64 tensors, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=128)
def _block_table(numels: tuple[int, ...], block: int, device: torch.device):
    tensor_idx, starts = [], []
    for i, n in enumerate(numels):
        for s in range(0, n, block):
            tensor_idx.append(i)
            starts.append(s)
    as_dev = lambda v, dt: torch.tensor(v, dtype=dt).to(device)  # noqa: E731 (built once per size set)
    return as_dev(tensor_idx, torch.int32), as_dev(starts, torch.int64), as_dev(list(numels), torch.int64), len(starts)


class Launch:
    """Tables for one multi-tensor launch over `lists` (each a list of same-sized tensors)."""

    def __init__(self, lists, block: int = BLOCK):
        first = lists[0]
        self.device = first[0].device
        self.n_tensors = len(first)
        self.blk_tensor, self.blk_start, self.numels, self.n_blocks = _block_table(
            tuple(t.numel() for t in first), block, self.device
        )
        ptrs = [t.data_ptr() for lst in lists for t in lst]
        if self.device.type == "cpu":
            self.ptrs = torch.tensor(ptrs, dtype=torch.int64)
        else:
            self.ptrs = torch.tensor(ptrs, dtype=torch.int64, pin_memory=True).to(self.device, non_blocking=True)
        self.block = block

    @property
    def grid(self):
        return (self.n_blocks,)

    def args(self):
        return self.ptrs, self.n_tensors, self.numels, self.blk_tensor, self.blk_start


def dtype_groups(params):
    """Indices of params grouped by dtype, skipping empty tensors (one launch per group)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        if p.numel():
            groups.setdefault(p.dtype, []).append(i)
    return groups.items()


def pick(lst, index):
    return [lst[i] for i in index]


def launch_kwargs():
    return {} if triton_interpret() else {"num_warps": NUM_WARPS}


@triton.jit
def load_grad(ptrs, n_tensors, t, offs, mask, lam, G_LIST: tl.constexpr, MIX: tl.constexpr, G2_LIST: tl.constexpr,
              DTYPE: tl.constexpr, CT: tl.constexpr):
    """The gradient of a fused update: list G_LIST, or for SAMPa (MIX) (1 - lam) g + lam g2 with g2
    from list G2_LIST, in the compute type."""
    d = tl.load(tensor_ptr(ptrs, n_tensors, t, G_LIST, DTYPE) + offs, mask=mask).to(CT)
    if MIX:
        g2 = tl.load(tensor_ptr(ptrs, n_tensors, t, G2_LIST, DTYPE) + offs, mask=mask).to(CT)
        d = (1.0 - lam) * d + lam * g2
    return d
