"""restore_: x <- olds, a bit-exact copy. Floor: read olds, write x (8 B per fp32 element)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._tables import Launch, block_of, tensor_ptr, dtype_groups, pick, tl_dtype


@triton.jit
def _restore_kernel(ptrs, n_tensors, numels, blk_tensor, blk_start,
                    DTYPE: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    x_ptr = tensor_ptr(ptrs, n_tensors, t, 0, DTYPE)
    o_ptr = tensor_ptr(ptrs, n_tensors, t, 1, DTYPE)
    tl.store(x_ptr + offs, tl.load(o_ptr + offs, mask=mask), mask=mask)


def restore_(params, olds):
    for dtype, index in dtype_groups(params):
        launch = Launch([pick(params, index), pick(olds, index)])
        launch.run(_restore_kernel, DTYPE=tl_dtype(dtype))
