"""What the benchmarks time: each primitive, and the whole SAM optimizer step, on a parameter set.

Bytes counted per fp32 element (the floor: each input read once, each output written once):
    grad_norm 4 (read g) | perturb 16 (read x, g; write x_old, x) | restore 8
    restore_sgd 20 (read x_old, g, buf; write x, buf) | restore_adamw 28 (read x_old, g, m, v; write x, m, v)
    sam_step with SGD+momentum 40 = norm 4 + perturb 16 + restore_sgd 20
    sam_step with AdamW 48 = norm 4 + perturb 16 + restore_adamw 28
    power_iteration 8 (T = 1: read every matrix gradient twice; counted over the matrices only)
    nusam_step with SGD+momentum 36 = power iteration 8 + rank-1 perturb 8 (read, write M) + update 20
    nusam_step with AdamW 44 = 8 + 8 + 28 (non-matrix parameters get no perturbation: slightly less)
    sampa_step with SGD+momentum 52 = preview 20 (read x, g_y, buf; write x~, y) + norms of g~ and g_y' 8
        + update 24 (read x, g~, g_y', buf; write x, buf)
    sampa_step with AdamW 64 = preview 24 (read x, g_y, m, v; write x~, y) + 8 + update 32
    msam_step with SGD+momentum 36 = ||b|| 4 + the move 12 (read x, b; write x) + the update with the
        way back 20 (read x, g, b; write x, b: shift_restore_sgd_)
    msam_step with AdamW 44 = 4 + 12 + 28 (b = exp_avg)
Our SAM step also reads the second gradient once more (4 B) to refuse a non-finite one: that
guard is in the measured time but not in the floor, so GB/s here is against the floor.
"""
from __future__ import annotations

import torch

from .. import MSAM, SAM, NuSAM, SAMPa, ops

BYTES_PER_ELEMENT = {
    "grad_norm": 4, "perturb": 16, "restore": 8, "restore_sgd": 20, "restore_adamw": 28,
    "sam_step": 40, "sam_step_adamw": 48, "sgd_step": 20,
    "power_iteration": 8, "nusam_step": 36, "nusam_step_adamw": 44,
    "sampa_step": 52, "sampa_step_adamw": 64, "msam_step": 36, "msam_step_adamw": 44,
}


def make_params(shapes, device, dtype=torch.float32, seed=0):
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: 86M CPU draws take seconds
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g, device=device) * 0.02).to(dtype))
        p.grad = (torch.randn(s, generator=g, device=device) * 1e-3).to(dtype)
        params.append(p)
    return params


def primitive_case(op: str, params, backend: str):
    """A zero-argument callable running primitive `op` once over `params`."""
    xs = [p.data for p in params]
    gs = [p.grad for p in params]
    x_old = [torch.empty_like(x) for x in xs]
    norm = torch.ones((), device=xs[0].device)
    if op == "grad_norm":
        return lambda: ops.global_norm(gs, backend=backend)
    if op == "perturb":
        return lambda: ops.perturb_(xs, gs, x_old, norm, 1e-9, backend=backend)
    if op == "restore":
        for o, x in zip(x_old, xs):
            o.copy_(x)
        return lambda: ops.restore_(xs, x_old, backend=backend)
    if op == "restore_sgd":
        for o, x in zip(x_old, xs):
            o.copy_(x)
        bufs = [torch.zeros_like(x) for x in xs]
        return lambda: ops.restore_sgd_(xs, x_old, gs, bufs, lr=1e-9, momentum=0.9, backend=backend)
    if op == "restore_adamw":
        for o, x in zip(x_old, xs):
            o.copy_(x)
        m = [torch.zeros_like(x) for x in xs]
        v = [torch.zeros_like(x) for x in xs]
        steps = [torch.full((), 10.0, device=x.device) for x in xs]
        return lambda: ops.restore_adam_(xs, x_old, gs, m, v, state_steps=steps, lr=1e-9, beta1=0.9, beta2=0.999,
                                         eps=1e-8, weight_decay=0.01, decoupled=True, backend=backend)
    raise ValueError(op)


def sam_step_case(params, backend: str, base: str = "sgd", cls=SAM):
    """One whole optimizer step (first_step + second_step) of `cls` with the gradients in .grad."""
    if base == "sgd":
        opt = cls(params, torch.optim.SGD, rho=0.05, lr=1e-9, momentum=0.9, backend=backend)
    else:
        opt = cls(params, torch.optim.AdamW, rho=0.05, lr=1e-9, weight_decay=0.01, backend=backend)

    def step():
        opt.first_step()
        opt.second_step()
    return step


def loop_sam_case(params, base: str = "sgd"):
    """SAM as the popular per-parameter implementations write it (one tensor at a time)."""
    base_opt = (torch.optim.SGD(params, lr=1e-9, momentum=0.9, foreach=False) if base == "sgd"
                else torch.optim.AdamW(params, lr=1e-9, weight_decay=0.01, foreach=False))
    rho, x_old = 0.05, {}

    @torch.no_grad()
    def step():
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
        scale = rho / (norm + 1e-12)
        for p in params:
            x_old[p] = p.clone()
            p.add_(p.grad * scale)
        for p in params:
            p.data = x_old[p]
        base_opt.step()
    return step


def foreach_sam_case(params, base: str = "sgd"):
    """The strongest SAM a user writes in 20 lines of torch: the norm, the copy and the perturbation
    with torch._foreach_* ops (the norm stays on the device: no synchronization, and no guard
    against NaN / inf), restore by _foreach_copy_, then torch's fused SGD / AdamW step."""
    base_opt = (torch.optim.SGD(params, lr=1e-9, momentum=0.9, fused=True) if base == "sgd"
                else torch.optim.AdamW(params, lr=1e-9, weight_decay=0.01, fused=True))
    xs = [p.data for p in params]
    x_old = [torch.empty_like(x) for x in xs]

    @torch.no_grad()
    def step():
        gs = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)))
        torch._foreach_copy_(x_old, xs)
        torch._foreach_add_(xs, torch._foreach_mul(gs, 0.05 / (norm + 1e-12)))
        torch._foreach_copy_(xs, x_old)
        base_opt.step()
    return step


def compiled_sam_case(params, base: str = "sgd"):
    """SAM written with torch's foreach ops, its perturb and its restore each compiled with
    torch.compile (inductor fuses them), around torch's own foreach SGD / AdamW step: what a user
    gets from the compiler without our kernels."""
    base_opt = (torch.optim.SGD(params, lr=1e-9, momentum=0.9, foreach=True) if base == "sgd"
                else torch.optim.AdamW(params, lr=1e-9, weight_decay=0.01, foreach=True))
    xs = [p.data for p in params]
    x_old = [torch.empty_like(x) for x in xs]

    @torch.compile
    def perturb(xs, gs, x_old):
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)))
        torch._foreach_copy_(x_old, xs)
        torch._foreach_add_(xs, torch._foreach_mul(gs, 0.05 / (norm + 1e-12)))

    @torch.compile
    def restore(xs, x_old):
        torch._foreach_copy_(xs, x_old)

    @torch.no_grad()
    def step():
        perturb(xs, [p.grad for p in params], x_old)
        restore(xs, x_old)
        base_opt.step()
    return step


def peer_sam_case(params, base: str = "sgd"):
    """pytorch-optimizer's SAM (PyPI), when installed."""
    import pytorch_optimizer

    opt = (pytorch_optimizer.SAM(params, torch.optim.SGD, rho=0.05, lr=1e-9, momentum=0.9) if base == "sgd"
           else pytorch_optimizer.SAM(params, torch.optim.AdamW, rho=0.05, lr=1e-9, weight_decay=0.01))

    def step():
        opt.first_step()
        opt.second_step()
    return step


def torch_sgd_case(params, variant: str):
    """torch's own SGD+momentum step (no SAM), for context: foreach or fused."""
    kw = {"foreach": True} if variant == "foreach" else {"fused": True}
    opt = torch.optim.SGD(params, lr=1e-9, momentum=0.9, **kw)
    return opt.step


def power_iteration_case(params, backend: str):
    """One batched power iteration (T = 1) over the matrix gradients."""
    mats = [p.grad for p in params if p.dim() == 2]
    us = [torch.nn.functional.normalize(torch.randn(m.shape[0], device=m.device), dim=0) for m in mats]
    vs = [torch.empty(m.shape[1], device=m.device) for m in mats]
    sig = torch.empty(len(mats), device=mats[0].device)
    return lambda: ops.power_iteration_(mats, us, vs, sig, iters=1, backend=backend)


def nusam_step_case(params, backend: str, base: str = "sgd"):
    """One whole nuSAM optimizer step (T = 1) with the gradients in .grad."""
    return sam_step_case(params, backend, base, cls=NuSAM)


def msam_step_case(params, backend: str, base: str = "sgd"):
    """One whole MSAM optimizer step (the move along the momentum, then the update with the way
    back) with the gradients in .grad; a first step makes the buffers (e_0 = 0 moves nothing)."""
    step = sam_step_case(params, backend, base, cls=MSAM)
    step()
    return step


class _Holder(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.params = torch.nn.ParameterList(params)


def sampa_step_case(params, backend: str, base: str = "sgd"):
    """SAMPa's optimizer work in one step, without the two gradient passes: the fused preview
    (x~ and y), the guard norms of g~ and g_y', and the fused update with the mixed gradient."""
    holder = _Holder(params)
    kw = dict(lr=1e-9, momentum=0.9) if base == "sgd" else dict(lr=1e-9, weight_decay=0.01)
    opt = SAMPa(holder, lambda m, b: None, torch.optim.SGD if base == "sgd" else torch.optim.AdamW, rho=0.05,
                backend=backend, **kw)
    grads = [p.grad for p in params]
    opt.optimizer_work(grads)  # the base state exists, as in every step after the first
    return lambda: opt.optimizer_work(grads)
