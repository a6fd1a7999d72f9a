"""perturb_: x_old <- x;  x <- x + s * T^2 * g  with  s = rho / (||T g|| + eps)  read from the
device-resident norm (no host synchronization). T = |x| + offset for ASAM, 1 for SAM.
A non-finite norm leaves x untouched. Floor: read x, g; write x_old, x (16 B per fp32 element).
shift_ (MSAM): x <- x +- s * d, no copy (12 B)."""
from __future__ import annotations

import triton
import triton.language as tl

from ..constants import NORM_EPS as EPS
from ._tables import bind, block_of, compute_dtype, host_or_device, scalar_arg, tensor_ptr, tl_dtype


@triton.jit
def _perturb_kernel(
    ptrs, n_tensors, numels, blk_tensor, blk_start, norm_ptr, rho, offset,
    ADAPTIVE: tl.constexpr, RHO_T: tl.constexpr, DTYPE: tl.constexpr, CT: tl.constexpr, EPS: tl.constexpr,
    VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    x_ptr = tensor_ptr(ptrs, n_tensors, t, 0, DTYPE)
    g_ptr = tensor_ptr(ptrs, n_tensors, t, 1, DTYPE)
    o_ptr = tensor_ptr(ptrs, n_tensors, t, 2, DTYPE)

    norm = tl.load(norm_ptr)
    finite = tl.abs(norm) < float("inf")  # False for inf and NaN
    scale = tl.where(finite, host_or_device(rho, RHO_T) / (norm + EPS), 0.0).to(CT)

    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(o_ptr + offs, x, mask=mask)
    xf = x.to(CT)
    step = scale * tl.load(g_ptr + offs, mask=mask, other=0.0).to(CT)
    if ADAPTIVE:
        w = tl.abs(xf) + offset
        step = step * (w * w)
    # x round-trips exactly through CT, so the not-finite branch rewrites x bit for bit
    tl.store(x_ptr + offs, tl.where(finite, xf + step, xf).to(DTYPE), mask=mask)


def prepare_perturb_(params, grads, x_old):
    bound = bind(params, grads, x_old)

    def run(norm, rho, adaptive, offset):
        rho, rho_t = scalar_arg(rho)
        for dtype, launch, _ in bound:
            launch.run(_perturb_kernel, norm, rho, float(offset), ADAPTIVE=bool(adaptive), RHO_T=rho_t,
                       DTYPE=tl_dtype(dtype), CT=compute_dtype(dtype), EPS=EPS)
    return run


def perturb_(params, grads, x_old, norm, rho, adaptive, offset):
    prepare_perturb_(params, grads, x_old)(norm, rho, adaptive, offset)


@triton.jit
def _shift_kernel(
    ptrs, n_tensors, numels, blk_tensor, blk_start, norm_ptr, rho,
    SUBTRACT: tl.constexpr, RHO_T: tl.constexpr, DTYPE: tl.constexpr, CT: tl.constexpr, EPS: tl.constexpr,
    VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    """shift_: x <- x + s * d (SUBTRACT: x - s * d), s = rho / (norm + eps); x untouched for a
    non-finite norm. MSAM's move along its momentum and back, with no copy: 12 B per fp32 element."""
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    x_ptr = tensor_ptr(ptrs, n_tensors, t, 0, DTYPE)
    d_ptr = tensor_ptr(ptrs, n_tensors, t, 1, DTYPE)

    norm = tl.load(norm_ptr)
    finite = tl.abs(norm) < float("inf")
    scale = tl.where(finite, host_or_device(rho, RHO_T) / (norm + EPS), 0.0).to(CT)
    if SUBTRACT:
        scale = -scale  # exact
    xf = tl.load(x_ptr + offs, mask=mask).to(CT)
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(CT)
    tl.store(x_ptr + offs, tl.where(finite, xf + scale * d, xf).to(DTYPE), mask=mask)


def prepare_shift_(params, directions):
    bound = bind(params, directions)

    def run(norm, rho, subtract):
        rho, rho_t = scalar_arg(rho)
        for dtype, launch, _ in bound:
            launch.run(_shift_kernel, norm, rho, SUBTRACT=bool(subtract), RHO_T=rho_t, DTYPE=tl_dtype(dtype),
                       CT=compute_dtype(dtype), EPS=EPS)
    return run


def shift_(params, directions, norm, rho, subtract):
    prepare_shift_(params, directions)(norm, rho, subtract)


@triton.jit
def _lincomb_kernel(
    ptrs, n_tensors, numels, blk_tensor, blk_start, a_ptr, b_ptr,
    DTYPE: tl.constexpr, CT: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    """lincomb_: out <- a x + b y, a and b read from device scalars (out may be x or y: each
    element is loaded before it is stored). 12 B per fp32 element."""
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    o_ptr = tensor_ptr(ptrs, n_tensors, t, 0, DTYPE)
    x_ptr = tensor_ptr(ptrs, n_tensors, t, 1, DTYPE)
    y_ptr = tensor_ptr(ptrs, n_tensors, t, 2, DTYPE)
    a = tl.load(a_ptr).to(CT)
    b = tl.load(b_ptr).to(CT)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(CT)
    tl.store(o_ptr + offs, (a * x + b * y).to(DTYPE), mask=mask)


def prepare_lincomb_(out, x, y):
    bound = bind(out, x, y)

    def run(a, b):
        for dtype, launch, _ in bound:
            launch.run(_lincomb_kernel, a, b, DTYPE=tl_dtype(dtype), CT=compute_dtype(dtype))
    return run


def lincomb_(out, x, y, a, b):
    prepare_lincomb_(out, x, y)(a, b)
