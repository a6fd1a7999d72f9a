"""SAM's second half for the base optimizers we fuse: x <- x_old and the base step, in one pass.

`fused_kind(base)` says whether a base optimizer instance can be fused ("sgd", "adam") or must
take the generic path (restore, then its own step()). The update functions own the base
optimizer's state exactly as torch.optim creates it (same keys, dtypes and step counters), so
base_optimizer.state_dict() is the same as after torch's own step and either path can follow.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.optim.optimizer import _get_scalar_dtype

from . import ops


def _plain_float(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def fused_kind(base: torch.optim.Optimizer) -> str | None:
    """'sgd' or 'adam' when every param group of `base` has options our kernels implement."""
    kind = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}.get(type(base))
    if kind is None:
        return None
    for g in base.param_groups:
        if g.get("differentiable") or not _plain_float(g["lr"], g["weight_decay"]):
            return None
        if kind == "sgd" and not _plain_float(g["momentum"], g["dampening"]):
            return None
        if kind == "adam" and (g.get("capturable") or g.get("fused") or not _plain_float(*g["betas"])):
            return None
    return kind


def _take(lst, index):
    return [lst[i] for i in index]


def sgd_step(base, group, params, olds, grads, backend, rank1=None):
    """params <- olds (or, for nuSAM, params - s u v^T with rank1 = (us, vs, scales)), then
    torch.optim.SGD's step for `group` with `grads`."""
    momentum = group["momentum"]
    kw = dict(lr=group["lr"], momentum=momentum, dampening=group["dampening"], nesterov=group["nesterov"],
              weight_decay=group["weight_decay"], maximize=group["maximize"], backend=backend)

    def run(index, bufs, init):
        ps, gs = _take(params, index), _take(grads, index)
        if rank1 is None:
            ops.restore_sgd_(ps, _take(olds, index), gs, bufs, init_bufs=init, **kw)
        else:
            us, vs, scales = rank1
            sel = scales if len(index) == len(params) else scales[index]
            ops.rank1_restore_sgd_(ps, _take(us, index), _take(vs, index), sel, gs, bufs, init_bufs=init, **kw)

    if momentum == 0:
        run(range(len(params)), None, False)
        return
    state = base.state
    fresh = [state[p].get("momentum_buffer") is None for p in params]
    for p, new in zip(params, fresh):
        if new:  # torch.optim.SGD's first step sets buf = d (no dampening): the kernel's init_bufs
            state[p]["momentum_buffer"] = torch.empty_like(p, memory_format=torch.contiguous_format)
    for init in (True, False):
        index = [i for i, new in enumerate(fresh) if new is init]
        if index:
            run(index, [state[params[i]]["momentum_buffer"] for i in index], init)


def adam_step(base, group, params, olds, grads, backend, rank1=None):
    """params <- olds (or params - s u v^T, see sgd_step), then torch.optim.Adam / AdamW's step."""
    state = base.state
    amsgrad = group["amsgrad"]
    for p in params:
        st = state[p]
        if len(st) == 0:  # as torch.optim.Adam._init_group does
            st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    steps = [state[p]["step"] for p in params]
    torch._foreach_add_(steps, 1.0)
    by_step = defaultdict(list)  # bias corrections depend on the step: one launch per distinct step
    for i, s in enumerate(steps):
        by_step[s.item()].append(i)  # CPU scalars: no device synchronization
    beta1, beta2 = group["betas"]
    decoupled = isinstance(base, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
    for step, index in by_step.items():
        ps = _take(params, index)
        kw = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                  decoupled=decoupled, amsgrad=amsgrad, maximize=group["maximize"],
                  bias_correction1=1 - beta1 ** step, bias_correction2=1 - beta2 ** step, backend=backend)
        state_lists = ([state[p]["exp_avg"] for p in ps], [state[p]["exp_avg_sq"] for p in ps],
                       [state[p]["max_exp_avg_sq"] for p in ps] if amsgrad else None)
        if rank1 is None:
            ops.restore_adam_(ps, _take(olds, index), _take(grads, index), *state_lists, **kw)
        else:
            us, vs, scales = rank1
            sel = scales if len(index) == len(params) else scales[index]
            ops.rank1_restore_adam_(ps, _take(us, index), _take(vs, index), sel, _take(grads, index), *state_lists,
                                    **kw)


UPDATES = {"sgd": sgd_step, "adam": adam_step}
