"""The "torch" backend: the primitives in plain PyTorch foreach ops, written to mirror
ALGORITHMS.md and torch.optim's foreach path line by line. It is the oracle of the tests and
the fallback for devices without a kernel. fp32 / fp64 tensors are updated in place; bf16 /
fp16 tensors are computed in fp32 working copies and written back once, like the kernels.
Unlike the kernels, it reads the norm's finiteness on the host (a synchronization on a GPU).
"""
from __future__ import annotations

import torch

EPS = 1e-12  # ALGORITHMS.md: eps guarding divisions by a norm
_HALF = (torch.float16, torch.bfloat16)


def _work(tensors):
    """Tensors to compute on: the tensors themselves, or fp32 copies of half-precision ones."""
    return [t.float() if t.dtype in _HALF else t for t in tensors]


def _commit(dst, work):
    """Write fp32 working copies back into half-precision tensors (no-op for in-place ones)."""
    for d, w in zip(dst, work):
        if d is not w:
            d.copy_(w)


def global_norm(tensors, weights, offset):
    """||T g|| over all tensors together, T = |w| + offset (ASAM) or 1."""
    ts = _work(tensors)
    if weights:
        ts = torch._foreach_mul(ts, torch._foreach_add(torch._foreach_abs(_work(weights)), offset))
    return torch.linalg.vector_norm(torch.stack([n.double() for n in torch._foreach_norm(ts)])).float()


def perturb_(params, grads, olds, norm, rho, adaptive, offset):
    """olds <- x;  x <- x + s * T^2 * g,  s = rho / (||T g|| + eps); x untouched if the norm is not finite."""
    torch._foreach_copy_(olds, params)
    _add_perturbation(params, grads, norm, rho, adaptive, offset)


def _add_perturbation(params, grads, norm, rho, adaptive=False, offset=0.0):
    if not bool(torch.isfinite(norm)):
        return
    x = _work(params)
    step = torch._foreach_mul(_work(grads), (rho / (norm + EPS)).to(torch.float32))
    if adaptive:
        w = torch._foreach_add(torch._foreach_abs(x), offset)
        torch._foreach_mul_(step, torch._foreach_mul(w, w))
    torch._foreach_add_(x, step)
    _commit(params, x)


def restore_(params, olds):
    """x <- x_old, bit for bit."""
    torch._foreach_copy_(params, olds)


def _start(params, olds):
    """The update's working copy of x_old: params themselves with olds copied in, or for bf16 /
    fp16 params fp32 copies of olds (so nuSAM's recomputed M - s u v^T enters the step unrounded,
    as in the kernels)."""
    out = []
    for p, o in zip(params, olds):
        if p.dtype in _HALF:
            out.append(o.to(torch.float32, copy=True))
        else:
            out.append(p.copy_(o))
    return out


def _grads(grads, maximize, grad_scale):
    """The gradient as the update sees it: unscaled by grad_scale (GradScaler), negated to maximize."""
    d = _work(grads)
    if grad_scale != 1.0:
        d = torch._foreach_mul(d, grad_scale)
    return torch._foreach_neg(d) if maximize else d


def restore_sgd_(params, olds, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs,
                 grad_scale=1.0):
    """x <- x_old, then torch.optim.SGD's step with gradient g (times grad_scale)."""
    x = _start(params, olds)
    d = _grads(grads, maximize, grad_scale)
    if weight_decay != 0:
        d = torch._foreach_add(d, x, alpha=weight_decay)
    if momentum != 0:
        buf = _work(bufs)
        if init_bufs:
            torch._foreach_copy_(buf, d)
        else:
            torch._foreach_mul_(buf, momentum)
            torch._foreach_add_(buf, d, alpha=1 - dampening)
        d = torch._foreach_add(d, buf, alpha=momentum) if nesterov else buf
        _commit(bufs, buf)
    torch._foreach_add_(x, d, alpha=-lr)
    _commit(params, x)


def restore_adam_(
    params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps,
    weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2, grad_scale=1.0,
):
    """x <- x_old, then torch.optim.Adam / AdamW's step with gradient g (times grad_scale)."""
    x = _start(params, olds)
    d = _grads(grads, maximize, grad_scale)
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(x, 1 - lr * weight_decay)
        else:
            d = torch._foreach_add(d, x, alpha=weight_decay)
    m, v = _work(exp_avgs), _work(exp_avg_sqs)
    torch._foreach_lerp_(m, d, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, d, d, value=1 - beta2)
    den_v = v
    if amsgrad:
        vmax = _work(max_exp_avg_sqs)
        torch._foreach_maximum_(vmax, v)
        _commit(max_exp_avg_sqs, vmax)
        den_v = vmax
    denom = torch._foreach_sqrt(den_v)
    torch._foreach_div_(denom, bias_correction2 ** 0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(x, m, denom, value=-(lr / bias_correction1))
    _commit(exp_avgs, m)
    _commit(exp_avg_sqs, v)
    _commit(params, x)


# --- SAMPa: the preview y_{t+1} with x~_t, and the update with d = (1 - lam) g~ + lam g_y' ---------

def _clones(tensors):
    return [t.clone() for t in tensors] if tensors else tensors


def sampa_preview_sgd_(params, grads, perturbed, previews, bufs, norm, rho, lr, momentum, dampening, nesterov,
                       weight_decay, maximize, init_bufs):
    """perturbed <- x + rho g / (||g|| + eps);  previews <- torch.optim.SGD's step from x with g,
    computed on copies of the momentum buffers (the optimizer state is not changed)."""
    torch._foreach_copy_(perturbed, params)
    _add_perturbation(perturbed, grads, norm, rho)
    torch._foreach_copy_(previews, params)
    scratch = [torch.empty_like(p) for p in params] if momentum != 0 and init_bufs else _clones(bufs)
    restore_sgd_(previews, previews, grads, scratch, lr, momentum, dampening, nesterov, weight_decay,
                 maximize, init_bufs)


def sampa_preview_adam_(params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, norm, rho, lr,
                        beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, bias_correction1,
                        bias_correction2):
    """perturbed <- x + rho g / (||g|| + eps);  previews <- torch.optim.Adam / AdamW's step from x with
    g, computed on copies of the moments (the optimizer state is not changed)."""
    torch._foreach_copy_(perturbed, params)
    _add_perturbation(perturbed, grads, norm, rho)
    torch._foreach_copy_(previews, params)
    restore_adam_(previews, previews, grads, _clones(exp_avgs), _clones(exp_avg_sqs), _clones(max_exp_avg_sqs), lr,
                  beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2)


def _mix(grads, grads2, lam):
    """d = (1 - lam) * g + lam * g2, in fp32 for half-precision gradients."""
    d = torch._foreach_mul(_work(grads), 1 - lam)
    torch._foreach_add_(d, _work(grads2), alpha=lam)
    return d


def sampa_update_sgd_(params, grads, grads2, bufs, lam, lr, momentum, dampening, nesterov, weight_decay, maximize,
                      init_bufs):
    """torch.optim.SGD's step from x with d = (1 - lam) g + lam g2."""
    restore_sgd_(params, params, _mix(grads, grads2, lam), bufs, lr, momentum, dampening, nesterov, weight_decay,
                 maximize, init_bufs)


def sampa_update_adam_(params, grads, grads2, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lam, lr, beta1, beta2, eps,
                       weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2):
    """torch.optim.Adam / AdamW's step from x with d = (1 - lam) g + lam g2."""
    restore_adam_(params, params, _mix(grads, grads2, lam), exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2,
                  eps, weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2)


# --- nuSAM: rank-1 perturbations of weight matrices (ALGORITHMS.md, "nuSAM") ----------------

def power_iteration_(mats, us, vs, sigmas, iters, tau):
    """Algorithm 2 of the nuSAM paper per matrix G (n x m), warm-started from u (in place):
    T times v = G^T u / (||G^T u|| + tau), u = G v / (||G v|| + tau); sigma = ||G v||."""
    for i, (g, u, v) in enumerate(zip(mats, us, vs)):
        g32 = g.float()
        uu = u.clone()
        for _ in range(iters):
            vv = g32.t() @ uu
            vv = vv / (torch.linalg.vector_norm(vv) + tau)
            gv = g32 @ vv
            sigma = torch.linalg.vector_norm(gv)
            uu = gv / (sigma + tau)
        u.copy_(uu)
        v.copy_(vv)
        sigmas[i] = sigma


def _rank1_term(m, u, v, s):
    """(s * u_r) * v_c in fp32, the order every backend uses."""
    return torch.outer(s * u, v)


def rank1_update_(mats, us, vs, scales):
    """M_i <- M_i + s_i u_i v_i^T; a zero s_i leaves M_i untouched (even if u, v are not finite)."""
    for i, (m, u, v) in enumerate(zip(mats, us, vs)):
        s = scales[i]
        if bool(s != 0):
            m.copy_(_work([m])[0] + _rank1_term(m, u, v, s))


def _rank1_olds(mats, us, vs, scales):
    """x = M - s u v^T for every matrix (the weights nuSAM restores, recomputed, not stored)."""
    return [torch.where(scales[i] != 0, x - _rank1_term(m, u, v, scales[i]), x)
            for i, (m, u, v, x) in enumerate(zip(mats, us, vs, _work(mats)))]


def rank1_restore_sgd_(params, us, vs, scales, grads, bufs, lr, momentum, dampening, nesterov, weight_decay,
                       maximize, init_bufs, grad_scale=1.0):
    """M <- M - s u v^T, then torch.optim.SGD's step with gradient g."""
    olds = _rank1_olds(params, us, vs, scales)
    restore_sgd_(params, olds, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs,
                 grad_scale)


def rank1_restore_adam_(params, us, vs, scales, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2,
                        eps, weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2,
                        grad_scale=1.0):
    """M <- M - s u v^T, then torch.optim.Adam / AdamW's step with gradient g."""
    olds = _rank1_olds(params, us, vs, scales)
    restore_adam_(params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps,
                  weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2, grad_scale)
