"""The "torch" backend: the primitives in plain PyTorch ops, written to mirror ALGORITHMS.md and
torch.optim's foreach path line by line. It is the oracle of the tests and the fallback for
devices without a kernel. fp32 / fp64 tensors are updated in place; bf16 / fp16 tensors are
computed in fp32 working copies and written back once, like the kernels. Like the kernels it
never reads a tensor on the host: the decisions that depend on values (a non-finite norm, a
skipped step) are torch.where on the device.
"""
from __future__ import annotations

import torch

from .constants import CLIP_EPS, NORM_EPS as EPS
from .lists import Live
from .primitives import REGISTRY

_HALF = (torch.float16, torch.bfloat16)


def _work(tensors):
    """Tensors to compute on: the tensors themselves, or fp32 copies of half-precision ones."""
    return [t.float() if t.dtype in _HALF else t for t in tensors]


def _commit(dst, work):
    """Write fp32 working copies back into half-precision tensors (no-op for in-place ones)."""
    for d, w in zip(dst, work):
        if d is not w:
            d.copy_(w)


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t).all()


def _norm(tensors) -> torch.Tensor:
    """The global norm, in fp64 for fp64 tensors (as clip_grad_norm_ takes it), in fp32 otherwise."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.linalg.vector_norm(torch.stack([n.double() for n in torch._foreach_norm(tensors)])).to(dtype)


def global_norm(tensors, weights, offset):
    """||T g|| over all tensors together, T = |w| + offset (ASAM) or 1."""
    ts = _work(tensors)
    if weights:
        ts = torch._foreach_mul(ts, torch._foreach_add(torch._foreach_abs(_work(weights)), offset))
    return _norm(ts)


def _mix(grads, grads2, lam):
    """d = (1 - lam) * g + lam * g2, in fp32 for half-precision gradients."""
    d = torch._foreach_mul(_work(grads), 1 - lam)
    torch._foreach_add_(d, _work(grads2), alpha=lam)
    return d


def check_grads_(grads, grads2, lam, flags, first_norm, scale, found_inf, max_norm, steps, steps_mask):
    """The guard of a step (csrc/guard_math.h): flags <- [found_inf, grad_scale, grad_norm, skipped + found_inf];
    steps += (1 - found_inf) * steps_mask."""
    _guard(_norm(_mix(grads, grads2, lam) if grads2 else _work(grads)), flags, first_norm, scale, found_inf, max_norm,
           steps, steps_mask)


def _guard(n, flags, first_norm, scale, found_inf, max_norm, steps, steps_mask):
    """check_grads_ from the gradient's norm n (fp32 device scalar)."""
    bad = ~torch.isfinite(n)
    if first_norm is not None:
        bad = bad | ~_finite(first_norm)
    if found_inf is not None:
        bad = bad | (found_inf != 0)
    inv = 1.0 / scale if scale is not None else torch.ones((), device=n.device)
    norm = n * inv
    clip = torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)
    found = bad.float()
    flags.copy_(torch.stack([found, inv * clip, norm, flags[3] + found]))
    if steps is not None:
        steps.add_((1 - found) * (steps_mask if steps_mask is not None else 1.0))


def perturb_(params, grads, x_old, norm, rho, adaptive, offset):
    """x_old <- x;  x <- x + s * T^2 * g,  s = rho / (||T g|| + eps); x untouched if the norm is not finite."""
    torch._foreach_copy_(x_old, params)
    _add_perturbation(params, grads, norm, rho, adaptive, offset)


def _add_perturbation(params, grads, norm, rho, adaptive=False, offset=0.0):
    finite = torch.isfinite(norm)
    x = _work(params)
    # fp32 arithmetic for an fp32 norm, fp64 for the fp64 norm of fp64 tensors (as the kernels)
    step = torch._foreach_mul(_work(grads), torch.where(finite, rho / (norm + EPS), 0.0).to(norm.dtype))
    if adaptive:
        w = torch._foreach_add(torch._foreach_abs(x), offset)
        torch._foreach_mul_(step, torch._foreach_mul(w, w))
    new = torch._foreach_add(x, step)
    _commit(params, [torch.where(finite, n, xi) for n, xi in zip(new, x)])


def shift_(params, directions, norm, rho, subtract):
    """x <- x -+ s * d, s = rho / (norm + eps); x untouched if the norm is not finite (negating rho is
    exact: the same roundings as the kernels' x - s * d)."""
    _add_perturbation(params, directions, norm, -rho if subtract else rho)


def lincomb_(out, x, y, a, b):
    """out <- a x + b y, in fp32 for the half types (fp64 for fp64), rounded once."""
    for o, xi, yi in zip(out, x, y):
        ct = torch.float64 if o.dtype == torch.float64 else torch.float32
        o.copy_(a.to(ct) * xi.to(ct) + b.to(ct) * yi.to(ct))


def restore_(params, x_old, found_inf=None):
    """x <- x_old, bit for bit (with found_inf: only when it is 0)."""
    if found_inf is None:
        torch._foreach_copy_(params, x_old)
        return
    keep = found_inf != 0
    for p, o in zip(params, x_old):
        torch.where(keep, p, o, out=p)


# --- the fused updates: the base step, applied or (found_inf) skipped on the device -----------

def _guarded(found_inf, fallbacks, update):
    """Run update(); where found_inf != 0, put each (tensor, value) of fallbacks back instead.
    fallbacks: pairs known before the update (the state as it was, the weights restored); a value
    that is not its own tensor is an input the update only reads (x_old), so it needs no copy."""
    if found_inf is None:
        update()
        return
    saved = [(t, v.clone() if v is t else v) for t, v in fallbacks]
    update()
    skip = found_inf != 0
    for t, v in saved:
        torch.where(skip, v.to(t.dtype), t, out=t)  # in place: no second copy


def _start(params, x_old):
    """The update's working copy of x_old: params themselves with x_old copied in, or for bf16 /
    fp16 params fp32 copies of x_old (so nuSAM's recomputed M - s u v^T enters the step unrounded,
    as in the kernels)."""
    out = []
    for p, o in zip(params, x_old):
        if p.dtype in _HALF:
            out.append(o.to(torch.float32, copy=True))
        else:
            out.append(p.copy_(o))
    return out


def _grads(grads, maximize, grad_scale):
    """The gradient as the update sees it: times grad_scale (GradScaler, clipping), negated to maximize."""
    d = _work(grads)
    if grad_scale is not None:
        d = torch._foreach_mul(d, grad_scale)
    return torch._foreach_neg(d) if maximize else d


def _sgd(params, x_old, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs, grad_scale):
    x = _start(params, x_old)
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
    if isinstance(lr, torch.Tensor):  # a capturable step's lr, a device scalar
        torch._foreach_add_(x, torch._foreach_mul(d, -lr.to(torch.float32)))
    else:
        torch._foreach_add_(x, d, alpha=-lr)
    _commit(params, x)


def restore_sgd_(params, x_old, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs,
                 grad_scale=None, found_inf=None):
    """x <- x_old, then torch.optim.SGD's step with gradient g (times grad_scale); skipped (x <- x_old
    only) where found_inf != 0."""
    state = list(bufs) if momentum != 0 else []
    _guarded(found_inf, list(zip(params, x_old)) + [(b, b) for b in state],
             lambda: _sgd(params, x_old, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize,
                          init_bufs, grad_scale))


def _bias_corrections(state_steps, beta1, beta2):
    """Per tensor (lr-free): (1 - beta1^step, sqrt(1 - beta2^step)) as fp64 device scalars."""
    steps = torch.stack([s.reshape(()) for s in state_steps]).double()
    return 1 - beta1 ** steps, torch.sqrt(1 - beta2 ** steps)


def _adam(params, x_old, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
          weight_decay, decoupled, amsgrad, maximize, grad_scale, step_offset=0):
    x = _start(params, x_old)
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
    bc1, bc2_sqrt = _bias_corrections([s + step_offset for s in state_steps], beta1, beta2)
    for i, (xi, mi, vi) in enumerate(zip(x, m, den_v)):
        denom = vi.sqrt().div_(bc2_sqrt[i].to(vi.dtype)).add_(eps)
        xi.add_(mi / denom * (-lr / bc1[i]).to(xi.dtype))
    _commit(exp_avgs, m)
    _commit(exp_avg_sqs, v)
    _commit(params, x)


def restore_adam_(params, x_old, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                  weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    """x <- x_old, then torch.optim.Adam / AdamW's step with gradient g (times grad_scale), the bias
    corrections from each tensor's step count; skipped (x <- x_old only) where found_inf != 0."""
    state = list(exp_avgs) + list(exp_avg_sqs) + (list(max_exp_avg_sqs) if amsgrad else [])
    _guarded(found_inf, list(zip(params, x_old)) + [(t, t) for t in state],
             lambda: _adam(params, x_old, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                           eps, weight_decay, decoupled, amsgrad, maximize, grad_scale))


# --- MSAM: the move along the momentum taken out inside the update ----------------------------

def _shifted(params, directions, norm, rho):
    """x + s d per tensor in x's dtype, as shift_ leaves it (MSAM's x_t, recomputed, not stored)."""
    x = [p.clone() for p in params]
    shift_(x, directions, norm, rho, subtract=False)
    return x


def shift_restore_sgd_(params, grads, bufs, norm, rho, lr, momentum, dampening, nesterov, weight_decay, maximize,
                       init_bufs, grad_scale=None, found_inf=None):
    """x <- x + s b (b the momentum buffers before the step), then torch.optim.SGD's step (the move
    back only where found_inf != 0)."""
    restore_sgd_(params, _shifted(params, bufs, norm, rho), grads, bufs, lr, momentum, dampening, nesterov,
                 weight_decay, maximize, init_bufs, grad_scale, found_inf)


def shift_restore_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, norm, rho, lr, beta1,
                        beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    """x <- x + s m (m the first moments before the step), then torch.optim.Adam / AdamW's step (the
    move back only where found_inf != 0)."""
    restore_adam_(params, _shifted(params, exp_avgs, norm, rho), grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                  state_steps, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale,
                  found_inf)


# --- SAMPa: the preview y_{t+1} with x~_t, and the update with d = (1 - lam) g~ + lam g_y' ---------

def _clones(tensors):
    return [t.clone() for t in tensors] if tensors else tensors


def _usable(grads, norm):
    """g_y as the preview uses it: zeros where its norm is not finite (the step that made it was skipped)."""
    finite = torch.isfinite(norm)
    return [torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device)) for g in grads]


def sampa_preview_sgd_(params, grads, perturbed, previews, bufs, norm, rho, lr, momentum, dampening, nesterov,
                       weight_decay, maximize, init_bufs):
    """perturbed <- x + rho g / (||g|| + eps);  previews <- torch.optim.SGD's step from x with g,
    computed on copies of the momentum buffers (the optimizer state is not changed)."""
    grads = _usable(grads, norm)
    torch._foreach_copy_(perturbed, params)
    _add_perturbation(perturbed, grads, norm, rho)
    torch._foreach_copy_(previews, params)
    scratch = [torch.empty_like(p) for p in params] if momentum != 0 and init_bufs else _clones(bufs)
    _sgd(previews, previews, grads, scratch, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs,
         None)


def sampa_preview_adam_(params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, norm,
                        rho, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize):
    """perturbed <- x + rho g / (||g|| + eps);  previews <- torch.optim.Adam / AdamW's step from x with
    g (the step after state_steps), computed on copies of the moments (the state is not changed)."""
    grads = _usable(grads, norm)
    torch._foreach_copy_(perturbed, params)
    _add_perturbation(perturbed, grads, norm, rho)
    torch._foreach_copy_(previews, params)
    _adam(previews, previews, grads, _clones(exp_avgs), _clones(exp_avg_sqs), _clones(max_exp_avg_sqs), state_steps,
          lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, None, step_offset=1)


def sampa_update_sgd_(params, grads, grads2, bufs, lam, lr, momentum, dampening, nesterov, weight_decay, maximize,
                      init_bufs, grad_scale=None, found_inf=None):
    """torch.optim.SGD's step from x with d = (1 - lam) g + lam g2 (nothing where found_inf != 0)."""
    restore_sgd_(params, params, _mix(grads, grads2, lam), bufs, lr, momentum, dampening, nesterov, weight_decay,
                 maximize, init_bufs, grad_scale, found_inf)


def sampa_update_adam_(params, grads, grads2, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lam, lr, beta1,
                       beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    """torch.optim.Adam / AdamW's step from x with d = (1 - lam) g + lam g2 (nothing where found_inf != 0)."""
    restore_adam_(params, params, _mix(grads, grads2, lam), exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                  beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf)


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


def rank1_scales_(sigmas, rho, normalized, scales, first_norm):
    """nuSAM's scales: every sigma finite ? (normalized ? rho sigma / (sqrt(sum of the normalized
    sigma^2) + 1e-12) : rho) : 0; first_norm = sum of the sigmas (not finite iff one is not)."""
    normed = normalized != 0
    c = torch.linalg.vector_norm(torch.where(normed, sigmas, 0.0))
    scale = torch.where(normed, rho * sigmas / (c + EPS), rho)
    scales.copy_(torch.where(torch.isfinite(sigmas).all(), scale, torch.zeros_like(scale)))
    first_norm.copy_(sigmas.sum().reshape(first_norm.shape))


def _rank1_term(m, u, v, s):
    """(s * u_r) * v_c in fp32, the order every backend uses."""
    return torch.outer(s * u, v)


def rank1_update_(mats, us, vs, scales):
    """M_i <- M_i + s_i u_i v_i^T; a zero s_i leaves M_i untouched (even if u, v are not finite)."""
    for i, (m, u, v) in enumerate(zip(mats, us, vs)):
        s = scales[i]
        m.copy_(torch.where(s != 0, _work([m])[0] + _rank1_term(m, u, v, s), m))


def _rank1_x_old(mats, us, vs, scales):
    """x = M - s u v^T for every matrix (the weights nuSAM restores, recomputed, not stored)."""
    return [torch.where(scales[i] != 0, x - _rank1_term(m, u, v, scales[i]), x)
            for i, (m, u, v, x) in enumerate(zip(mats, us, vs, _work(mats)))]


def rank1_restore_sgd_(params, us, vs, scales, grads, bufs, lr, momentum, dampening, nesterov, weight_decay,
                       maximize, init_bufs, grad_scale=None, found_inf=None):
    """M <- M - s u v^T, then torch.optim.SGD's step with gradient g (the removal only where found_inf != 0)."""
    x_old = _rank1_x_old(params, us, vs, scales)
    restore_sgd_(params, x_old, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs,
                 grad_scale, found_inf)


def rank1_restore_adam_(params, us, vs, scales, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                        beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    """M <- M - s u v^T, then torch.optim.Adam / AdamW's step with gradient g (the removal only where
    found_inf != 0)."""
    x_old = _rank1_x_old(params, us, vs, scales)
    restore_adam_(params, x_old, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                  weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf)


# --- prepared forms for the step plans (ops.prepare): the lists bound, the scalars per call ----

def prepare_sumsq(tensors, second=None):
    """One sum of squares per call, into partials[at] (of tensors, of (|w| + offset) tensors, or of
    the mix (1 - lam) tensors + lam second)."""
    def run(partials, mode, scalar, at=0):
        if mode == 3:  # a dot product (not a square)
            ct = partials.dtype
            partials[at] = sum((t.to(ct) * u.to(ct)).sum() for t, u in zip(tensors, second)) if len(tensors) \
                else 0.0
            return
        if mode == 2:
            ts = _mix(tensors, second, scalar)
        elif mode == 1:
            ts = torch._foreach_mul(_work(tensors), torch._foreach_add(torch._foreach_abs(_work(second)), scalar))
        else:
            ts = _work(tensors)
        partials[at] = _norm(ts).double().square()  # in the partials' dtype

    run.n_partials = 1
    return run


def norm_finalize(partials, out):
    out.copy_(partials.double().sum().sqrt())


def guard_finalize(partials, flags, first_norm=None, scale=None, found_inf=None, max_norm=float("inf"), steps=None,
                   steps_mask=None):
    _guard(partials.double().sum().sqrt().float(), flags, first_norm, scale, found_inf, max_norm, steps, steps_mask)


def prepare(name: str, **arguments):
    """Primitive `name` bound to the lists among `arguments` (static values are ignored: this
    backend reads every list when it runs); the forms of their own below for the norms' sums of
    squares, the power iterations from warm starts and rank1_scales_."""
    special = globals().get("prepare_" + name)
    if special is not None:
        return special(**arguments)
    fn = torch.no_grad()(globals()[name])  # in-place on leaf parameters, as the list ops (ops/__init__.py) run it
    lists = {p.name: arguments.get(p.name) for p in REGISTRY[name].lists}
    return lambda **kw: fn(**{k: list(v) if isinstance(v, Live) else v for k, v in lists.items()}, **kw)  # read now


def prepare_power_iteration(mats, us, vs, warm=None):
    """run(sigmas, iters, tau) from the warm start `warm` (default: us) into us, vs."""
    def run(sigmas, iters, tau):
        if warm is not None:
            torch._foreach_copy_(us, list(warm))
        torch.no_grad()(power_iteration_)(list(mats), us, vs, sigmas, iters, tau)
    return run


def prepare_rank1_scales_():
    return torch.no_grad()(rank1_scales_)
