"""restore_adam_: x <- olds, then one torch.optim.Adam / AdamW step, fused in one pass:
    d = maximize ? -g : g;  AdamW: x *= 1 - lr * wd,  Adam: d += wd * x
    m = lerp(m, d, 1 - beta1);  v = beta2 * v + (1 - beta2) * d^2;  vmax = max(vmax, v) (amsgrad)
    x -= (lr / bc1) * m / (sqrt(v or vmax) / sqrt(bc2) + eps)
Floor: read olds, g, m, v; write x, m, v (28 B per fp32 element, +8 B with amsgrad).

The same kernel is nuSAM's rank1_restore_adam_ (RANK1) and SAMPa's sampa_update_adam_ (MIX),
as for SGD in sgd.py."""
from __future__ import annotations

import math

import triton
import triton.language as tl

from ._tables import (Launch, block_of, compute_dtype, dtype_groups, load_grad, pick, tensor_ptr,
                      tl_dtype)
from .rank1 import load_old, rank1_lists


@triton.jit
def adam_math(x, d, m, v, vmax, beta1_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size,
              bc2_sqrt, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
              HAS_WD: tl.constexpr):
    """torch.optim.Adam / AdamW's step of x with gradient d: (new x, m, v, vmax)."""
    if MAXIMIZE:
        d = -d
    if HAS_WD:
        if DECOUPLED:
            x = x * decay_factor
        else:
            d = d + weight_decay * x
    # torch's lerp: start + w * (end - start) for w < 0.5, end - (end - start) * (1 - w) otherwise
    m = tl.where(beta1_weight < 0.5, m + beta1_weight * (d - m), d - (d - m) * (1.0 - beta1_weight))
    v = beta2 * v + one_minus_beta2 * d * d
    v_den = v
    if AMSGRAD:
        vmax = tl.maximum(vmax, v)
        v_den = vmax
    denom = tl.sqrt(v_den) / bc2_sqrt + eps
    return x - step_size * m / denom, m, v, vmax


def adam_scalars(lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2):
    """The kernels' runtime scalars, in adam_math's order after vmax."""
    return (float(1 - beta1), float(beta2), float(1 - beta2), float(eps), float(weight_decay),
            float(1 - lr * weight_decay), float(lr / bias_correction1), float(math.sqrt(bias_correction2)))


@triton.jit
def _restore_adam_kernel(
    ptrs, n_tensors, numels, blk_tensor, blk_start,
    beta1_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size, bc2_sqrt, ncols, scales, lam,
    grad_scale, SCALED: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
    RANK1: tl.constexpr, U_LIST: tl.constexpr, MIX: tl.constexpr, DTYPE: tl.constexpr, CT: tl.constexpr,
    VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    x_ptr = tensor_ptr(ptrs, n_tensors, t, 0, DTYPE)
    m_ptr = tensor_ptr(ptrs, n_tensors, t, 3, DTYPE)
    v_ptr = tensor_ptr(ptrs, n_tensors, t, 4, DTYPE)

    x = load_old(ptrs, n_tensors, t, offs, mask, ncols, scales, RANK1, U_LIST, DTYPE, CT)  # nuSAM: M - s u v^T
    d = load_grad(ptrs, n_tensors, t, offs, mask, lam, 2, MIX, U_LIST, DTYPE, CT)  # SAMPa: (1 - lam) g + lam g2
    if SCALED:  # GradScaler: unscaled here, not in a pass of its own
        d = d * grad_scale
    m = tl.load(m_ptr + offs, mask=mask).to(CT)
    v = tl.load(v_ptr + offs, mask=mask).to(CT)
    vmax = v
    if AMSGRAD:
        vmax = tl.load(tensor_ptr(ptrs, n_tensors, t, 5, DTYPE) + offs, mask=mask).to(CT)
    x, m, v, vmax = adam_math(x, d, m, v, vmax, beta1_weight, beta2, one_minus_beta2, eps, weight_decay,
                              decay_factor, step_size, bc2_sqrt, AMSGRAD, DECOUPLED, MAXIMIZE, HAS_WD)
    if AMSGRAD:
        tl.store(tensor_ptr(ptrs, n_tensors, t, 5, DTYPE) + offs, vmax.to(DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)
    tl.store(x_ptr + offs, x.to(DTYPE), mask=mask)


def _launch(params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, rank1, lr, beta1, beta2, eps,
            weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2, grads2=None, lam=0.0,
            grad_scale=1.0):
    for dtype, index in dtype_groups(params):
        lists = [pick(params, index), pick(olds, index), pick(grads, index), pick(exp_avgs, index),
                 pick(exp_avg_sqs, index)]
        if amsgrad:
            lists.append(pick(max_exp_avg_sqs, index))
        extra = len(lists)  # first list after the fixed ones: u, v (RANK1) or g2 (MIX)
        if grads2 is not None:
            lists.append(pick(grads2, index))
        lists, ncols, scales = rank1_lists(lists, params, index, rank1)
        launch = Launch(lists)
        launch.run(
            _restore_adam_kernel, *adam_scalars(lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2),
            ncols, scales, float(lam), float(grad_scale), SCALED=grad_scale != 1.0,
            AMSGRAD=bool(amsgrad), DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0,
            RANK1=rank1 is not None, U_LIST=extra, MIX=grads2 is not None, DTYPE=tl_dtype(dtype), CT=compute_dtype(dtype),
        )


def restore_adam_(
    params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps,
    weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2, grad_scale=1.0,
):
    _launch(params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, None, lr, beta1, beta2, eps,
            weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2, grad_scale=grad_scale)


def rank1_restore_adam_(params, us, vs, scales, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2,
                        eps, weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2,
                        grad_scale=1.0):
    _launch(params, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, (us, vs, scales), lr, beta1, beta2, eps,
            weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2, grad_scale=grad_scale)


def sampa_update_adam_(params, grads, grads2, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lam, lr, beta1, beta2, eps,
                       weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2):
    _launch(params, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, None, lr, beta1, beta2, eps,
            weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2, grads2=grads2, lam=lam)
