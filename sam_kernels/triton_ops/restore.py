"""restore_: x <- olds, a bit-exact copy. Floor: read olds, write x (8 B per fp32 element)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._tables import Launch, dtype_groups, launch_kwargs, pick, tl_dtype


@triton.jit
def _restore_kernel(ptrs, n_tensors, numels, blk_tensor, blk_start, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    offs = tl.load(blk_start + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    x_ptr = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    o_ptr = tl.load(ptrs + n_tensors + t).to(tl.pointer_type(DTYPE))
    tl.store(x_ptr + offs, tl.load(o_ptr + offs, mask=mask), mask=mask)


def restore_(params, olds):
    for dtype, index in dtype_groups(params):
        launch = Launch([pick(params, index), pick(olds, index)])
        _restore_kernel[launch.grid](*launch.args(), DTYPE=tl_dtype(dtype), BLOCK=launch.block, **launch_kwargs())
