"""restore_: x <- x_old, a bit-exact copy; with found_inf, only when it is 0 (SAMPa commits the
y-pass buffers this way, integer ones as float views). Floor: read x_old, write x (8 B per fp32
element)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._tables import bind, block_of, optional, tensor_ptr, tl_dtype


@triton.jit
def _restore_kernel(ptrs, n_tensors, numels, blk_tensor, blk_start, found_inf,
                    HAS_FOUND: tl.constexpr, DTYPE: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    x_ptr = tensor_ptr(ptrs, n_tensors, t, 0, DTYPE)
    o_ptr = tensor_ptr(ptrs, n_tensors, t, 1, DTYPE)
    v = tl.load(o_ptr + offs, mask=mask)
    if HAS_FOUND:
        if tl.load(found_inf) == 0:
            tl.store(x_ptr + offs, v, mask=mask)
    else:
        tl.store(x_ptr + offs, v, mask=mask)


def prepare_restore_(params, x_old):
    bound = bind(params, x_old)

    def run(found_inf=None):
        for dtype, launch, _ in bound:
            flag, has = optional(found_inf, launch.numels)
            launch.run(_restore_kernel, flag, HAS_FOUND=has, DTYPE=tl_dtype(dtype))
    return run


def restore_(params, x_old, found_inf=None):
    prepare_restore_(params, x_old)(found_inf)
