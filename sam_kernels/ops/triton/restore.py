"""restore_: x <- x_old, a bit-exact copy; with found_inf, only when it is 0 (SAMPa commits the
y-pass buffers this way, integer ones as float views). Floor: read x_old, write x (8 B per fp32
element).

load_old: what the fused updates (sgd.py, adam.py) restore x from: a copy (SAM), M - s u v^T
recomputed (nuSAM), or x + s d recomputed along the state list d (MSAM's momentum)."""
from __future__ import annotations

import triton
import triton.language as tl

from .. import constants
from ._tables import bind, block_of, host_or_device, optional, tensor_ptr, tl_dtype
from .rank1 import rank1_term

NORM_EPS = tl.constexpr(constants.NORM_EPS)


@triton.jit
def load_old(ptrs, n_tensors, t, offs, mask, ncols, index, scales, shift_norm, shift_rho, RANK1: tl.constexpr,
             SHIFT: tl.constexpr, RHO_T: tl.constexpr, U_LIST: tl.constexpr, D_LIST: tl.constexpr,
             DTYPE: tl.constexpr, CT: tl.constexpr):
    """x_t for the fused updates, in the compute type: list 1 of the table (SAM's copy); for nuSAM
    (RANK1) M - s u v^T recomputed from list 0 (M) and the vectors at U_LIST, U_LIST + 1; for MSAM
    (SHIFT) x + s d with x list 0, d list D_LIST, s = rho / (norm + eps) (rounded to DTYPE as
    shift_ rounds it; no move for a non-finite norm, as there was none)."""
    if RANK1:
        term, s = rank1_term(ptrs, n_tensors, t, offs, mask, ncols, index, scales, U_LIST)
        xm = tl.load(tensor_ptr(ptrs, n_tensors, t, 0, DTYPE) + offs, mask=mask).to(CT)
        x = tl.where(s != 0, xm - term.to(CT), xm)
    elif SHIFT:
        norm = tl.load(shift_norm)
        finite = tl.abs(norm) < float("inf")
        s = tl.where(finite, host_or_device(shift_rho, RHO_T) / (norm + NORM_EPS), 0.0).to(CT)
        xm = tl.load(tensor_ptr(ptrs, n_tensors, t, 0, DTYPE) + offs, mask=mask).to(CT)
        d = tl.load(tensor_ptr(ptrs, n_tensors, t, D_LIST, DTYPE) + offs, mask=mask, other=0.0).to(CT)
        x = tl.where(finite, (xm + s * d).to(DTYPE).to(CT), xm)
    else:
        x = tl.load(tensor_ptr(ptrs, n_tensors, t, 1, DTYPE) + offs, mask=mask).to(CT)
    return x


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
