"""Multi-tensor launch tables shared by the Triton kernels.

One launch covers every tensor of a (device, dtype) group, whatever their number and sizes,
like the work table of Triton's grouped-GEMM tutorial: program p handles BLOCK elements of
tensor blk_tensor[p] starting at blk_start[p]; the tensors' addresses are int64 entries of a
pointer table, cast in the kernel with tl.pointer_type. The block table depends only on the
sizes and is cached; the pointer table is cached by the addresses it holds and otherwise
sent with one asynchronous copy from pinned memory.

Vector width: the compiler issues 16-byte loads and stores only where it can prove that the
addresses are 16-byte aligned and that the mask is constant over each vector (checked in the
PTX of sm_90 builds: ld.global.v4.b32, not ld.global.b32). So the base addresses carry an
alignment hint (ops.py stages any tensor whose address is not a multiple of 16 bytes), block
starts are multiples of BLOCK, and the element counts carry a hint that they are multiples of
VEC = 16 bytes / element size, which makes `offs < numel` constant over each vector. Tensors
whose count is not such a multiple (rare: an odd-sized bias) go to a second launch with VEC = 1.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np
import torch
import triton
import triton.language as tl

from ..lists import Live, any_live, dtype_groups, on_refresh, pick  # noqa: F401  (re-exported to the kernels)
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
def block_of(numels, blk_tensor, blk_start, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor index, element offsets and in-bounds mask (constant over runs of VEC
    elements: the tensors of a launch with VEC > 1 have counts that are multiples of VEC)."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    offs = tl.multiple_of(tl.load(blk_start + pid), BLOCK) + tl.arange(0, BLOCK)
    n = tl.load(numels + t)
    if VEC > 1:
        n = tl.multiple_of(n, VEC)
    return t, offs, offs < n


@triton.jit
def tensor_ptr(ptrs, n_tensors, t, LIST: tl.constexpr, DTYPE: tl.constexpr):
    """The base pointer of tensor t of list LIST in the pointer table (16-byte aligned)."""
    return tl.multiple_of(tl.load(ptrs + LIST * n_tensors + t).to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def scalar_ptr(ptrs, n_tensors, t, LIST: tl.constexpr, DTYPE: tl.constexpr):
    """The pointer of tensor t of list LIST when that list holds scalars or small vectors (Adam's
    step counters, nuSAM's u and v): no alignment is assumed."""
    return tl.load(ptrs + LIST * n_tensors + t).to(tl.pointer_type(DTYPE))


@triton.jit
def load_optional(ptr, HAS: tl.constexpr, ABSENT: tl.constexpr):
    """An optional fp32 device scalar, ABSENT when not given (found_inf 0: the step is taken;
    grad_scale 1: the gradient as it is)."""
    v = ABSENT
    if HAS:
        v = tl.load(ptr)
    return v


@triton.jit
def host_or_device(v, ON_DEVICE: tl.constexpr):
    """A runtime scalar given as a number, or (ON_DEVICE) as an fp32 device scalar read when the
    kernel runs: a capturable step's lr or rho, which change between replays of a CUDA graph."""
    out = v
    if ON_DEVICE:
        out = tl.load(v)
    return out


_FP32_TINY = float(np.finfo(np.float32).tiny)


def fp32(v: float) -> float:
    """A float argument as a kernel gets it: rounded to fp32, and a subnormal one flushed to zero
    (as the GPU's fp32 arithmetic does). Triton types a float argument outside fp32's normal range
    as fp64, and then computes (the interpreter: stores) in fp64: a subnormal lr made a bf16
    update 0 through the interpreter (python_tests/test_ops.py, the SGD property test)."""
    with np.errstate(over="ignore"):  # beyond fp32's range: inf, as the kernel's argument would be
        f = float(np.float32(v))
    return 0.0 if abs(f) < _FP32_TINY else f


def scalar_arg(v):
    """(what a kernel takes for a runtime scalar, whether it is a device scalar): host_or_device;
    a number as fp32() makes it."""
    return (v, True) if isinstance(v, torch.Tensor) else (fp32(v), False)


def tl_dtype(dtype: torch.dtype):
    try:
        return TL_DTYPE[dtype]
    except KeyError:
        raise TypeError(f"sam_kernels: dtype {dtype} is not supported by the triton backend") from None


def compute_dtype(dtype: torch.dtype):
    """Arithmetic type inside the kernels: fp64 for fp64 tensors, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def device_tensor(values, dtype, device: torch.device) -> torch.Tensor:
    """`values` on the device without waiting for it: one asynchronous copy from pinned memory (the
    caching host allocator keeps the pinned block until the copy is done)."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=128)
def _block_table(numels: tuple[int, ...], block: int, vec: int, device: torch.device):
    """The launches over tensors of these sizes, each (first block, tensor indices, starts, number
    of blocks, VEC): the tensors whose count is a multiple of vec, then (VEC = 1) the others; and
    the numels on the device."""
    parts = {vec: [], 1: []}
    for i, n in enumerate(numels):
        parts[vec if n % vec == 0 else 1].extend((i, s) for s in range(0, n, block))
    as_dev = lambda v, dt: device_tensor(v, dt, device)  # noqa: E731 (built once per size set)
    blocks = parts[vec] + (parts[1] if vec != 1 else [])
    blk_tensor = as_dev([i for i, _ in blocks], torch.int32)
    blk_start = as_dev([s for _, s in blocks], torch.int64)
    bounds = ((0, len(parts[vec]), vec), (len(parts[vec]), len(blocks), 1))
    launches = tuple((lo, blk_tensor[lo:hi], blk_start[lo:hi], hi - lo, v) for lo, hi, v in bounds if hi > lo)
    return launches, as_dev(list(numels), torch.int64), len(blocks)


_data_ptr = torch.Tensor.data_ptr


@functools.lru_cache(maxsize=256)
def _pointer_table(ptrs: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The addresses on the device. Cached: in a training loop the parameters, their state and
    (through the caching allocator) the gradients keep their addresses, so after the first steps
    a launch sends no table at all; the entries are the key itself, so a hit is never stale."""
    return device_tensor(ptrs, torch.int64, device)


class Launch:
    """Tables for one multi-tensor launch over `lists` (each a list of same-sized tensors)."""

    def __init__(self, lists, block: int = BLOCK):
        first = lists[0]
        self.device = first[0].device
        self.n_tensors = len(first)
        vec = max(1, 16 // first[0].element_size())  # elements per 16-byte vector
        self.parts, self.numels, self.n_blocks = _block_table(tuple(t.numel() for t in first), block, vec,
                                                              self.device)
        self.ptrs = self._pointers(lists)
        self.block = block
        if any_live(lists):  # a step plan's gradients: new addresses, the same table shape
            on_refresh(lambda: setattr(self, "ptrs", self._pointers(lists)))

    def _pointers(self, lists) -> torch.Tensor:
        ptrs = (lst.addresses().tolist() if isinstance(lst, Live) else map(_data_ptr, lst) for lst in lists)
        return _pointer_table(tuple(itertools.chain.from_iterable(ptrs)), self.device)

    def run(self, kernel, *args, **meta):
        """Launch `kernel` over the table (once; twice if some counts are not multiples of the
        vector width). An argument given as a function of the launch's first block index gets its
        value per launch (per-block outputs)."""
        for first, blk_tensor, blk_start, n, vec in self.parts:
            kernel[(n,)](self.ptrs, self.n_tensors, self.numels, blk_tensor, blk_start,
                         *(a(first) if callable(a) else fp32(a) if type(a) is float else a for a in args),
                         VEC=vec, BLOCK=self.block, **meta, **launch_kwargs())


def bind(*lists):
    """[(dtype, Launch, index)] over the dtype groups of the first list: the tables of a kernel
    for these lists, built once (absent optional lists are None and left out of the table)."""
    present = [lst for lst in lists if lst is not None]
    return [(dtype, Launch([pick(lst, index) for lst in present]), index)
            for dtype, index in dtype_groups(present[0])]


@functools.lru_cache(maxsize=256)
def int_column(values: tuple, device: torch.device) -> torch.Tensor:
    """A per-tensor int64 column on the device (nuSAM's column counts and indices), built once."""
    return device_tensor(values, torch.int64, device)


def optional(t, fallback):
    """(a tensor to pass, whether it is real): kernels take a pointer either way."""
    return (t, True) if t is not None else (fallback, False)


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
