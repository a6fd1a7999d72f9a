"""sampa_preview_sgd_ / sampa_preview_adam_: SAMPa's two points of a step from one read of x and g_y:
    perturbed = x + s * g,  s = rho / (||g|| + eps) read from the device
    previews  = the base optimizer's step from x with g (SGD or Adam / AdamW, sgd.py / adam.py math),
                with the optimizer state read and not written
A non-finite norm means g must not be used (the step that produced it was skipped): then the
perturbed point is x and the preview steps with a zero gradient.
Floor (fp32): read x, g (+ buf for SGD momentum, + m, v for Adam); write perturbed, previews:
20 B per element for SGD with momentum, 24 B for Adam."""
from __future__ import annotations

import triton
import triton.language as tl

from ._tables import bind, block_of, compute_dtype, host_or_device, scalar_arg, scalar_ptr, tensor_ptr, tl_dtype
from .adam import adam_math, adam_scalars, device_lr, step_scalars
from .perturb import EPS
from .sgd import sgd_math


@triton.jit
def _perturbed_point(ptrs, n_tensors, t, offs, mask, norm_ptr, rho, RHO_T: tl.constexpr, DTYPE: tl.constexpr,
                     CT: tl.constexpr, EPS: tl.constexpr):
    """Loads x and g (lists 0, 1; g = 0 where the norm is not finite), stores x + s g into list 2,
    returns x and g in the compute type."""
    norm = tl.load(norm_ptr)
    finite = tl.abs(norm) < float("inf")  # False for inf and NaN
    scale = tl.where(finite, host_or_device(rho, RHO_T) / (norm + EPS), 0.0).to(CT)
    x = tl.load(tensor_ptr(ptrs, n_tensors, t, 0, DTYPE) + offs, mask=mask).to(CT)
    g = tl.where(finite, tl.load(tensor_ptr(ptrs, n_tensors, t, 1, DTYPE) + offs, mask=mask).to(CT), 0.0)
    tl.store(tensor_ptr(ptrs, n_tensors, t, 2, DTYPE) + offs, (x + scale * g).to(DTYPE), mask=mask)
    return x, g


@triton.jit
def _preview_sgd_kernel(
    ptrs, n_tensors, numels, blk_tensor, blk_start, norm_ptr, rho,
    lr, momentum, one_minus_dampening, weight_decay,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, INIT_BUFS: tl.constexpr,
    HAS_WD: tl.constexpr, RHO_T: tl.constexpr, LR_T: tl.constexpr, DTYPE: tl.constexpr, CT: tl.constexpr,
    EPS: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    x, g = _perturbed_point(ptrs, n_tensors, t, offs, mask, norm_ptr, rho, RHO_T, DTYPE, CT, EPS)
    buf = g
    if MOMENTUM and not INIT_BUFS:
        buf = tl.load(tensor_ptr(ptrs, n_tensors, t, 4, DTYPE) + offs, mask=mask).to(CT)
    y, buf = sgd_math(x, g, buf, host_or_device(lr, LR_T), momentum, one_minus_dampening, weight_decay, MOMENTUM,
                      NESTEROV, MAXIMIZE, INIT_BUFS, HAS_WD)
    tl.store(tensor_ptr(ptrs, n_tensors, t, 3, DTYPE) + offs, y.to(DTYPE), mask=mask)


@triton.jit
def _preview_adam_kernel(
    ptrs, n_tensors, numels, blk_tensor, blk_start, norm_ptr, rho,
    lr, beta1_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
    AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
    RHO_T: tl.constexpr, LR_T: tl.constexpr, DTYPE: tl.constexpr, CT: tl.constexpr, EPS: tl.constexpr,
    VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    x, g = _perturbed_point(ptrs, n_tensors, t, offs, mask, norm_ptr, rho, RHO_T, DTYPE, CT, EPS)
    lr, decay_factor = device_lr(lr, weight_decay, decay_factor, LR_T)
    m = tl.load(tensor_ptr(ptrs, n_tensors, t, 4, DTYPE) + offs, mask=mask).to(CT)
    v = tl.load(tensor_ptr(ptrs, n_tensors, t, 5, DTYPE) + offs, mask=mask).to(CT)
    vmax = v
    if AMSGRAD:
        vmax = tl.load(tensor_ptr(ptrs, n_tensors, t, 7, DTYPE) + offs, mask=mask).to(CT)
    # the step it previews is the next one: count + 1
    step_size, bc2_sqrt = step_scalars(scalar_ptr(ptrs, n_tensors, t, 6, tl.float32), lr, beta1_weight,
                                       one_minus_beta2, 1, CT)
    y, m, v, vmax = adam_math(x, g, m, v, vmax, beta1_weight, beta2, one_minus_beta2, eps, weight_decay,
                              decay_factor, step_size, bc2_sqrt, AMSGRAD, DECOUPLED, MAXIMIZE, HAS_WD)
    tl.store(tensor_ptr(ptrs, n_tensors, t, 3, DTYPE) + offs, y.to(DTYPE), mask=mask)


def prepare_sampa_preview_sgd_(params, grads, perturbed, previews, bufs, momentum, init_bufs):
    bound = bind(params, grads, perturbed, previews, bufs if momentum != 0 and not init_bufs else None)

    def run(norm, rho, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs):
        (rho, rho_t), (lr, lr_t) = scalar_arg(rho), scalar_arg(lr)
        for dtype, launch, _ in bound:
            launch.run(
                _preview_sgd_kernel, norm, rho, lr, float(momentum), float(1 - dampening),
                float(weight_decay), MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
                INIT_BUFS=bool(init_bufs), HAS_WD=weight_decay != 0, RHO_T=rho_t, LR_T=lr_t, DTYPE=tl_dtype(dtype),
                CT=compute_dtype(dtype), EPS=EPS,
            )
    return run


def prepare_sampa_preview_adam_(params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                state_steps, amsgrad):
    bound = bind(params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, state_steps,
                 max_exp_avg_sqs if amsgrad else None)

    def run(norm, rho, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize):
        (rho, rho_t), (scalars, lr_t) = scalar_arg(rho), adam_scalars(lr, beta1, beta2, eps, weight_decay)
        for dtype, launch, _ in bound:
            launch.run(
                _preview_adam_kernel, norm, rho, *scalars,
                AMSGRAD=bool(amsgrad), DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0,
                RHO_T=rho_t, LR_T=lr_t, DTYPE=tl_dtype(dtype), CT=compute_dtype(dtype), EPS=EPS,
            )
    return run


def sampa_preview_sgd_(params, grads, perturbed, previews, bufs, norm, rho, lr, momentum, dampening, nesterov,
                       weight_decay, maximize, init_bufs):
    prepare_sampa_preview_sgd_(params, grads, perturbed, previews, bufs, momentum, init_bufs)(
        norm, rho, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs)


def sampa_preview_adam_(params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, norm,
                        rho, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize):
    prepare_sampa_preview_adam_(params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                state_steps, amsgrad)(
        norm, rho, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize)
