"""The "torch" backend: the primitives in plain PyTorch foreach ops, written to mirror
ALGORITHMS.md and torch.optim line by line. It is the oracle of the tests and the fallback
for devices without a kernel. bf16 / fp16 tensors are computed in fp32, like the kernels.
"""
from __future__ import annotations

import torch

EPS = 1e-12  # ALGORITHMS.md: eps guarding divisions by a norm


def _opmath(tensors):
    """fp32 copies of half-precision tensors (fp32 / fp64 tensors are used as they are)."""
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def _opmath_copy(tensors):
    """Fresh opmath copies, safe to update in place."""
    return [t.to(torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype, copy=True) for t in tensors]


def _write(dst, src):
    if dst:
        torch._foreach_copy_(dst, src)


def global_norm(tensors, weights, offset):
    """||T g|| over all tensors together, T = |w| + offset (ASAM) or 1."""
    # Accumulated in float64: torch's fp32 CPU norm drifts by ~3e-5 over 1M elements, more
    # than the kernels' own fp32 partial sums; the oracle must be the more exact of the two.
    device = tensors[0].device
    ts = [t.double() for t in tensors]
    if weights:
        ts = torch._foreach_mul(ts, torch._foreach_add(torch._foreach_abs([w.double() for w in weights]), offset))
    if not ts:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ts))).float()


def perturb_(params, grads, olds, norm, rho, adaptive, offset):
    """olds <- x;  x <- x + s * T^2 * g,  s = rho / (||T g|| + eps); x untouched if the norm is not finite."""
    if not params:
        return
    torch._foreach_copy_(olds, params)
    finite = torch.isfinite(norm)
    scale = torch.where(finite, rho / (norm + EPS), torch.zeros_like(norm)).to(torch.float32)
    x = _opmath(params)
    step = torch._foreach_mul(_opmath(grads), scale)
    if adaptive:
        w = torch._foreach_add(torch._foreach_abs(x), offset)
        step = torch._foreach_mul(step, torch._foreach_mul(w, w))
    new = torch._foreach_add(x, step)
    _write(params, [torch.where(finite, n, xi) for n, xi in zip(new, x)])


def restore_(params, olds):
    """x <- x_old, bit for bit."""
    if params:
        torch._foreach_copy_(params, olds)


def restore_sgd_(params, olds, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs):
    """x <- x_old, then torch.optim.SGD's step (single-tensor semantics) with gradient g."""
    if not params:
        return
    x = _opmath_copy(olds)
    d = torch._foreach_neg(_opmath(grads)) if maximize else _opmath_copy(grads)
    if weight_decay != 0:
        torch._foreach_add_(d, x, alpha=weight_decay)
    if momentum != 0:
        if init_bufs:
            buf = _opmath_copy(d)
        else:
            buf = _opmath_copy(bufs)
            torch._foreach_mul_(buf, momentum)
            torch._foreach_add_(buf, d, alpha=1 - dampening)
        d = torch._foreach_add(d, buf, alpha=momentum) if nesterov else buf
        _write(bufs, buf)
    torch._foreach_add_(x, d, alpha=-lr)
    _write(params, x)


def restore_adam_(
    params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps,
    weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2,
):
    """x <- x_old, then torch.optim.Adam / AdamW's step (single-tensor semantics) with gradient g."""
    if not params:
        return
    x = _opmath_copy(olds)
    d = torch._foreach_neg(_opmath(grads)) if maximize else _opmath_copy(grads)
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(x, 1 - lr * weight_decay)
        else:
            torch._foreach_add_(d, x, alpha=weight_decay)
    m = _opmath_copy(exp_avgs)
    v = _opmath_copy(exp_avg_sqs)
    torch._foreach_lerp_(m, d, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, d, d, value=1 - beta2)
    if amsgrad:
        vmax = torch._foreach_maximum(_opmath(max_exp_avg_sqs), v)
        _write(max_exp_avg_sqs, vmax)
        den_v = vmax
    else:
        den_v = v
    denom = torch._foreach_div(torch._foreach_sqrt(den_v), bias_correction2 ** 0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(x, m, denom, value=-(lr / bias_correction1))
    _write(exp_avgs, m)
    _write(exp_avg_sqs, v)
    _write(params, x)
