"""restore_adam_: x <- x_old, then one torch.optim.Adam / AdamW step, fused in one pass:
    d = (maximize ? -g : g) * grad_scale;  AdamW: x *= 1 - lr * wd,  Adam: d += wd * x
    m = lerp(m, d, 1 - beta1);  v = beta2 * v + (1 - beta2) * d^2;  vmax = max(vmax, v) (amsgrad)
    x -= (lr / bc1) * m / (sqrt(v or vmax) / sqrt(bc2) + eps),   bc = 1 - beta^step
Floor: read x_old, g, m, v; write x, m, v (28 B per fp32 element, +8 B with amsgrad).
Each tensor's step count is read on the device (the counters live there: the host never reads
them); found_inf != 0 skips the step: x <- x_old, the moments untouched.

The same kernel is nuSAM's rank1_restore_adam_ (RANK1), MSAM's shift_restore_adam_ (SHIFT: x + s m)
and SAMPa's sampa_update_adam_ (MIX), as for SGD in sgd.py."""
from __future__ import annotations

import triton
import triton.language as tl

from ._tables import (Launch, block_of, compute_dtype, dtype_groups, host_or_device, load_grad, load_optional,
                      optional, pick, scalar_arg, scalar_ptr, tensor_ptr, tl_dtype)
from .rank1 import rank1_lists
from .restore import load_old


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


@triton.jit
def step_scalars(step_ptr, lr, one_minus_beta1, one_minus_beta2, STEP_OFFSET: tl.constexpr, CT: tl.constexpr):
    """(lr / bc1, sqrt(bc2)) for the tensor whose step counter is at step_ptr (plus STEP_OFFSET:
    SAMPa's preview is of the next step), bc = 1 - beta^step in fp64 by binary powers of
    beta = 1 - (1 - beta) (1 - beta is what fp32 holds exactly enough: beta itself would cost
    1e-5 of bc2 at step 1)."""
    z = tl.zeros([], tl.float64)
    b1 = 1.0 - (one_minus_beta1 + z)
    b2 = 1.0 - (one_minus_beta2 + z)
    e = (tl.load(step_ptr) + STEP_OFFSET).to(tl.int64)
    p1 = z + 1.0
    p2 = z + 1.0
    for _ in tl.static_range(32):  # fp32 counters are exact integers below 2^24
        odd = (e & 1) != 0
        p1 = tl.where(odd, p1 * b1, p1)
        p2 = tl.where(odd, p2 * b2, p2)
        b1 = b1 * b1
        b2 = b2 * b2
        e = e >> 1
    return ((lr + z) / (1.0 - p1)).to(CT), tl.sqrt(1.0 - p2).to(CT)


@triton.jit
def _restore_adam_kernel(
    ptrs, n_tensors, numels, blk_tensor, blk_start,
    lr, beta1_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor, ncols, index, scales, lam,
    grad_scale, found_inf, shift_norm, shift_rho, SCALED: tl.constexpr, HAS_FOUND: tl.constexpr,
    AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
    RANK1: tl.constexpr, U_LIST: tl.constexpr, MIX: tl.constexpr, SHIFT: tl.constexpr, RHO_T: tl.constexpr,
    LR_T: tl.constexpr, DTYPE: tl.constexpr, CT: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
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
        m_ptr = tensor_ptr(ptrs, n_tensors, t, 3, DTYPE)
        v_ptr = tensor_ptr(ptrs, n_tensors, t, 4, DTYPE)
        lr, decay_factor = device_lr(lr, weight_decay, decay_factor, LR_T)
        step_size, bc2_sqrt = step_scalars(scalar_ptr(ptrs, n_tensors, t, 5, tl.float32), lr, beta1_weight,
                                           one_minus_beta2, 0, CT)
        d = load_grad(ptrs, n_tensors, t, offs, mask, lam, 2, MIX, U_LIST, DTYPE, CT)  # SAMPa: (1 - lam) g + lam g2
        if SCALED:  # GradScaler's unscale and the clipping coefficient: here, not in a pass of their own
            d = d * load_optional(grad_scale, SCALED, 1.0).to(CT)
        m = tl.load(m_ptr + offs, mask=mask).to(CT)
        v = tl.load(v_ptr + offs, mask=mask).to(CT)
        vmax = v
        if AMSGRAD:
            vmax = tl.load(tensor_ptr(ptrs, n_tensors, t, 6, DTYPE) + offs, mask=mask).to(CT)
        x, m, v, vmax = adam_math(x, d, m, v, vmax, beta1_weight, beta2, one_minus_beta2, eps, weight_decay,
                                  decay_factor, step_size, bc2_sqrt, AMSGRAD, DECOUPLED, MAXIMIZE, HAS_WD)
        if AMSGRAD:
            tl.store(tensor_ptr(ptrs, n_tensors, t, 6, DTYPE) + offs, vmax.to(DTYPE), mask=mask)
        tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
        tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)
        tl.store(x_ptr + offs, x.to(DTYPE), mask=mask)


@triton.jit
def device_lr(lr, weight_decay, decay_factor, LR_T: tl.constexpr):
    """(lr, AdamW's 1 - lr * wd): as given, or (LR_T) lr read from the device and the factor from it."""
    lr_v = host_or_device(lr, LR_T)
    decay = decay_factor
    if LR_T:
        decay = 1.0 - lr_v * weight_decay
    return lr_v, decay


def adam_scalars(lr, beta1, beta2, eps, weight_decay):
    """The kernels' runtime scalars, in kernel order from lr to decay_factor (lr a device scalar:
    the kernel computes the factor; LR_T), and LR_T."""
    lr, lr_t = scalar_arg(lr)
    decay = 1.0 if lr_t else 1 - lr * weight_decay
    return (lr, float(1 - beta1), float(beta2), float(1 - beta2), float(eps), float(weight_decay),
            float(decay)), lr_t


def _prepare(params, x_old, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad, rank1=None,
             grads2=None, shift=False):
    launches = []
    for dtype, index in dtype_groups(params):
        lists = [pick(params, index), pick(x_old, index), pick(grads, index), pick(exp_avgs, index),
                 pick(exp_avg_sqs, index), pick(state_steps, index)]
        if amsgrad:
            lists.append(pick(max_exp_avg_sqs, index))
        extra = len(lists)  # first list after the fixed ones: u, v (RANK1) or g2 (MIX)
        if grads2 is not None:
            lists.append(pick(grads2, index))
        lists, ncols, cols_index, _ = rank1_lists(lists, params, index, (*rank1, None) if rank1 else None)
        launches.append((dtype, Launch(lists), extra, ncols, cols_index))

    def run(lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None,
            lam=0.0, scales=None, norm=None, rho=0.0):
        scalars, lr_t = adam_scalars(lr, beta1, beta2, eps, weight_decay)
        rho, rho_t = scalar_arg(rho)
        for dtype, launch, extra, ncols, cols_index in launches:
            gscale, scaled = optional(grad_scale, launch.numels)
            flag, has_found = optional(found_inf, launch.numels)
            launch.run(
                _restore_adam_kernel, *scalars, ncols, cols_index,
                scales if scales is not None else launch.numels, float(lam), gscale, flag,
                norm if shift else launch.numels, rho, SCALED=scaled, HAS_FOUND=has_found, AMSGRAD=bool(amsgrad),
                DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0,
                RANK1=rank1 is not None, U_LIST=extra, MIX=grads2 is not None, SHIFT=shift, RHO_T=rho_t, LR_T=lr_t,
                DTYPE=tl_dtype(dtype), CT=compute_dtype(dtype),
            )
    return run


def prepare_restore_adam_(params, x_old, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad):
    return _prepare(params, x_old, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad)


def prepare_rank1_restore_adam_(params, us, vs, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad):
    run = _prepare(params, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad,
                   rank1=(us, vs))
    return lambda scales, **kw: run(scales=scales, **kw)


def prepare_shift_restore_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad):
    run = _prepare(params, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad, shift=True)
    return lambda norm, rho, **kw: run(norm=norm, rho=rho, **kw)


def prepare_sampa_update_adam_(params, grads, grads2, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad):
    run = _prepare(params, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad, grads2=grads2)
    return lambda lam, **kw: run(lam=lam, **kw)


def restore_adam_(params, x_old, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                  weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    prepare_restore_adam_(params, x_old, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad)(
        lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf)


def rank1_restore_adam_(params, us, vs, scales, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                        beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    prepare_rank1_restore_adam_(params, us, vs, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad)(
        scales, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
        amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)


def shift_restore_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, norm, rho, lr, beta1,
                        beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    prepare_shift_restore_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad)(
        norm, rho, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
        amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)


def sampa_update_adam_(params, grads, grads2, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lam, lr, beta1,
                       beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    prepare_sampa_update_adam_(params, grads, grads2, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad)(
        lam, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
        amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
