"""restore_sgd_: x <- olds, then one torch.optim.SGD step, fused in one pass:
    d = (maximize ? -g : g) + wd * x;  buf = init ? d : momentum * buf + (1 - dampening) * d
    x = x - lr * (nesterov ? d + momentum * buf : buf)
Floor with momentum: read olds, g, buf; write x, buf (20 B per fp32 element)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._tables import Launch, block_of, tensor_ptr, compute_dtype, dtype_groups, launch_kwargs, pick, tl_dtype
from .rank1 import load_old, rank1_lists


@triton.jit
def _restore_sgd_kernel(
    ptrs, n_tensors, numels, blk_tensor, blk_start,
    lr, momentum, one_minus_dampening, weight_decay, ncols, scales,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, INIT_BUFS: tl.constexpr,
    HAS_WD: tl.constexpr, RANK1: tl.constexpr, U_LIST: tl.constexpr, DTYPE: tl.constexpr, CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, offs, mask = block_of(numels, blk_tensor, blk_start, BLOCK)
    x_ptr = tensor_ptr(ptrs, n_tensors, t, 0, DTYPE)
    g_ptr = tensor_ptr(ptrs, n_tensors, t, 2, DTYPE)

    x = load_old(ptrs, n_tensors, t, offs, mask, ncols, scales, RANK1, U_LIST, DTYPE, CT)  # nuSAM: M - s u v^T
    d = tl.load(g_ptr + offs, mask=mask).to(CT)
    if MAXIMIZE:
        d = -d
    if HAS_WD:
        d = d + weight_decay * x
    if MOMENTUM:
        b_ptr = tensor_ptr(ptrs, n_tensors, t, 3, DTYPE)
        if INIT_BUFS:
            buf = d
        else:
            buf = momentum * tl.load(b_ptr + offs, mask=mask).to(CT) + one_minus_dampening * d
        tl.store(b_ptr + offs, buf.to(DTYPE), mask=mask)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    tl.store(x_ptr + offs, (x - lr * d).to(DTYPE), mask=mask)


def _launch(params, olds, grads, bufs, rank1, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs):
    has_momentum = momentum != 0
    for dtype, index in dtype_groups(params):
        lists = [pick(params, index), pick(olds, index), pick(grads, index)]
        if has_momentum:
            lists.append(pick(bufs, index))
        lists, ncols, scales = rank1_lists(lists, params, index, rank1)
        launch = Launch(lists)
        _restore_sgd_kernel[launch.grid](
            *launch.args(), float(lr), float(momentum), float(1 - dampening), float(weight_decay), ncols, scales,
            MOMENTUM=has_momentum, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), INIT_BUFS=bool(init_bufs),
            HAS_WD=weight_decay != 0, RANK1=rank1 is not None, U_LIST=4 if has_momentum else 3,
            DTYPE=tl_dtype(dtype), CT=compute_dtype(dtype), BLOCK=launch.block, **launch_kwargs(),
        )


def restore_sgd_(params, olds, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs):
    _launch(params, olds, grads, bufs, None, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs)


def rank1_restore_sgd_(params, us, vs, scales, grads, bufs, lr, momentum, dampening, nesterov, weight_decay,
                       maximize, init_bufs):
    _launch(params, params, grads, bufs, (us, vs, scales), lr, momentum, dampening, nesterov, weight_decay,
            maximize, init_bufs)
