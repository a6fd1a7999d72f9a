"""restore_sgd_: x <- x_old, then one torch.optim.SGD step, fused in one pass:
    d = (maximize ? -g : g) * grad_scale + wd * x;  buf = init ? d : momentum * buf + (1 - dampening) * d
    x = x - lr * (nesterov ? d + momentum * buf : buf)
Floor with momentum: read x_old, g, buf; write x, buf (20 B per fp32 element).
found_inf != 0 (read on the device) skips the step: x <- x_old, the buffers untouched.

The same kernel is nuSAM's rank1_restore_sgd_ (x_old = M - s u v^T recomputed: RANK1), MSAM's
shift_restore_sgd_ (x_old = x + s buf recomputed: SHIFT; 20 B) and SAMPa's sampa_update_sgd_
(x_old = params, d from (1 - lam) g + lam g2: MIX; 24 B; a skipped step writes nothing)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._tables import (Launch, block_of, compute_dtype, dtype_groups, host_or_device, load_grad, load_optional,
                      optional, pick, scalar_arg, tensor_ptr, tl_dtype)
from .rank1 import rank1_lists
from .restore import load_old


@triton.jit
def sgd_math(x, d, buf, lr, momentum, one_minus_dampening, weight_decay, MOMENTUM: tl.constexpr,
             NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, INIT_BUFS: tl.constexpr, HAS_WD: tl.constexpr):
    """torch.optim.SGD's step of x with gradient d: (new x, new momentum buffer)."""
    if MAXIMIZE:
        d = -d
    if HAS_WD:
        d = d + weight_decay * x
    if MOMENTUM:
        if INIT_BUFS:
            buf = d
        else:
            buf = momentum * buf + one_minus_dampening * d
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    return x - lr * d, buf


@triton.jit
def _restore_sgd_kernel(
    ptrs, n_tensors, numels, blk_tensor, blk_start,
    lr, momentum, one_minus_dampening, weight_decay, ncols, index, scales, lam, grad_scale, found_inf, shift_norm,
    shift_rho, SCALED: tl.constexpr, HAS_FOUND: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, INIT_BUFS: tl.constexpr, HAS_WD: tl.constexpr, RANK1: tl.constexpr, U_LIST: tl.constexpr,
    MIX: tl.constexpr, SHIFT: tl.constexpr, RHO_T: tl.constexpr, LR_T: tl.constexpr, DTYPE: tl.constexpr,
    CT: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    x_ptr = tensor_ptr(ptrs, n_tensors, t, 0, DTYPE)
    # SAM: x_old; nuSAM: M - s u v^T; MSAM: x + s d with d list 3 (the momentum buffer / exp_avg)
    x = load_old(ptrs, n_tensors, t, offs, mask, ncols, index, scales, shift_norm, shift_rho, RANK1, SHIFT, RHO_T,
                 U_LIST, 3, DTYPE, CT)
    if load_optional(found_inf, HAS_FOUND, 0.0) != 0:  # skipped: SAM's restore (nuSAM's removal, MSAM's way back)
        if not MIX:
            tl.store(x_ptr + offs, x.to(DTYPE), mask=mask)
    else:
        d = load_grad(ptrs, n_tensors, t, offs, mask, lam, 2, MIX, U_LIST, DTYPE, CT)  # SAMPa: (1 - lam) g + lam g2
        if SCALED:  # GradScaler's unscale and the clipping coefficient: here, not in a pass of their own
            d = d * load_optional(grad_scale, SCALED, 1.0).to(CT)
        buf = d
        if MOMENTUM and not INIT_BUFS:
            buf = tl.load(tensor_ptr(ptrs, n_tensors, t, 3, DTYPE) + offs, mask=mask).to(CT)
        x, buf = sgd_math(x, d, buf, host_or_device(lr, LR_T), momentum, one_minus_dampening, weight_decay, MOMENTUM,
                          NESTEROV, MAXIMIZE, INIT_BUFS, HAS_WD)
        if MOMENTUM:
            tl.store(tensor_ptr(ptrs, n_tensors, t, 3, DTYPE) + offs, buf.to(DTYPE), mask=mask)
        tl.store(x_ptr + offs, x.to(DTYPE), mask=mask)


def _prepare(params, x_old, grads, bufs, momentum, rank1=None, grads2=None, shift=False):
    """The launches of one fused SGD update over these lists (rank1 = (us, vs): nuSAM; grads2: SAMPa;
    shift: MSAM, x_t = x + s bufs, so the buffers are in the table whatever the momentum)."""
    has_momentum = momentum != 0
    launches = []
    for dtype, index in dtype_groups(params):
        lists = [pick(params, index), pick(x_old, index), pick(grads, index)]
        if has_momentum or shift:
            lists.append(pick(bufs, index))
        extra = len(lists)  # first list after the fixed ones: u, v (RANK1) or g2 (MIX)
        if grads2 is not None:
            lists.append(pick(grads2, index))
        lists, ncols, cols_index, _ = rank1_lists(lists, params, index, (*rank1, None) if rank1 else None)
        launches.append((dtype, Launch(lists), extra, ncols, cols_index))

    def run(lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs, grad_scale=None, found_inf=None,
            lam=0.0, scales=None, norm=None, rho=0.0):
        lr, lr_t = scalar_arg(lr)
        rho, rho_t = scalar_arg(rho)
        for dtype, launch, extra, ncols, cols_index in launches:
            gscale, scaled = optional(grad_scale, launch.numels)
            flag, has_found = optional(found_inf, launch.numels)
            launch.run(
                _restore_sgd_kernel, lr, float(momentum), float(1 - dampening), float(weight_decay), ncols,
                cols_index, scales if scales is not None else launch.numels, float(lam), gscale, flag,
                norm if shift else launch.numels, rho, SCALED=scaled, HAS_FOUND=has_found, MOMENTUM=momentum != 0,
                NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), INIT_BUFS=bool(init_bufs), HAS_WD=weight_decay != 0,
                RANK1=rank1 is not None, U_LIST=extra, MIX=grads2 is not None, SHIFT=shift, RHO_T=rho_t, LR_T=lr_t,
                DTYPE=tl_dtype(dtype), CT=compute_dtype(dtype),
            )
    return run


def prepare_restore_sgd_(params, x_old, grads, bufs, momentum):
    return _prepare(params, x_old, grads, bufs, momentum)


def prepare_rank1_restore_sgd_(params, us, vs, grads, bufs, momentum):
    run = _prepare(params, params, grads, bufs, momentum, rank1=(us, vs))
    return lambda scales, **kw: run(scales=scales, **kw)


def prepare_shift_restore_sgd_(params, grads, bufs, momentum):
    run = _prepare(params, params, grads, bufs, momentum, shift=True)
    return lambda norm, rho, **kw: run(norm=norm, rho=rho, **kw)


def prepare_sampa_update_sgd_(params, grads, grads2, bufs, momentum):
    run = _prepare(params, params, grads, bufs, momentum, grads2=grads2)
    return lambda lam, **kw: run(lam=lam, **kw)


def restore_sgd_(params, x_old, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs,
                 grad_scale=None, found_inf=None):
    prepare_restore_sgd_(params, x_old, grads, bufs, momentum)(
        lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs, grad_scale, found_inf)


def rank1_restore_sgd_(params, us, vs, scales, grads, bufs, lr, momentum, dampening, nesterov, weight_decay,
                       maximize, init_bufs, grad_scale=None, found_inf=None):
    prepare_rank1_restore_sgd_(params, us, vs, grads, bufs, momentum)(
        scales, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
        maximize=maximize, init_bufs=init_bufs, grad_scale=grad_scale, found_inf=found_inf)


def shift_restore_sgd_(params, grads, bufs, norm, rho, lr, momentum, dampening, nesterov, weight_decay, maximize,
                       init_bufs, grad_scale=None, found_inf=None):
    prepare_shift_restore_sgd_(params, grads, bufs, momentum)(
        norm, rho, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
        maximize=maximize, init_bufs=init_bufs, grad_scale=grad_scale, found_inf=found_inf)


def sampa_update_sgd_(params, grads, grads2, bufs, lam, lr, momentum, dampening, nesterov, weight_decay, maximize,
                      init_bufs, grad_scale=None, found_inf=None):
    prepare_sampa_update_sgd_(params, grads, grads2, bufs, momentum)(
        lam, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
        maximize=maximize, init_bufs=init_bufs, grad_scale=grad_scale, found_inf=found_inf)
