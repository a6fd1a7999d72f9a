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


def _sgd_kw(group, backend) -> dict:
    return dict(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"],
                weight_decay=group["weight_decay"], maximize=group["maximize"], backend=backend)


def _by_momentum_buffer(base, group, params, run, create: bool, keys=None) -> None:
    """run(index, bufs, init) over the params with a momentum buffer (init False) and without one
    (init True: torch.optim.SGD's first step sets buf = d). create: allocate the missing buffers
    (an update) or not (a preview: bufs None for them, the kernel does not read them).
    keys: the parameters that own the state when `params` are views of them (nuSAM's matrix
    views of conv kernels): the buffers have the parameters' shapes and are passed as views."""
    if group["momentum"] == 0:
        run(range(len(params)), None, False)
        return
    state, keys = base.state, keys if keys is not None else params
    fresh = [state[k].get("momentum_buffer") is None if k in state else True for k in keys]
    if create:
        for k, new in zip(keys, fresh):
            if new:
                state[k]["momentum_buffer"] = torch.empty_like(k, memory_format=torch.contiguous_format)
    for init in (True, False):
        index = [i for i, new in enumerate(fresh) if new is init]
        if index:
            bufs = None
            if create or not init:
                bufs = [state[keys[i]]["momentum_buffer"] for i in index]
                if keys is not params:  # views with the shapes of params
                    bufs = [b.view(params[i].shape) for b, i in zip(bufs, index)]
            run(index, bufs, init)


def sgd_step(base, group, params, olds, grads, backend, rank1=None, mix=None, grad_scale=1.0, keys=None):
    """params <- olds (or, for nuSAM, params - s u v^T with rank1 = (us, vs, scales)), then
    torch.optim.SGD's step for `group` with `grads` (SAMPa: mix = (grads2, lam), the step from
    params itself with (1 - lam) grads + lam grads2). grad_scale: GradScaler's 1 / scale."""
    kw = _sgd_kw(group, backend)

    def run(index, bufs, init):
        ps, gs = _take(params, index), _take(grads, index)
        if mix is not None:
            ops.sampa_update_sgd_(ps, gs, _take(mix[0], index), bufs, lam=mix[1], init_bufs=init, **kw)
        elif rank1 is None:
            ops.restore_sgd_(ps, _take(olds, index), gs, bufs, init_bufs=init, grad_scale=grad_scale, **kw)
        else:
            us, vs, scales = rank1
            sel = scales if len(index) == len(params) else scales[index]
            ops.rank1_restore_sgd_(ps, _take(us, index), _take(vs, index), sel, gs, bufs, init_bufs=init,
                                   grad_scale=grad_scale, **kw)

    _by_momentum_buffer(base, group, params, run, create=True, keys=keys)


def sgd_preview(base, group, params, grads, perturbed, previews, norm, rho, backend):
    """SAMPa: perturbed <- x + rho g / (norm + eps), previews <- torch.optim.SGD's step from x with
    g, one pass; the momentum buffers are read, never created or written."""
    kw = _sgd_kw(group, backend)

    def run(index, bufs, init):
        ops.sampa_preview_sgd_(_take(params, index), _take(grads, index), _take(perturbed, index),
                               _take(previews, index), bufs, norm=norm, rho=rho, init_bufs=init, **kw)

    _by_momentum_buffer(base, group, params, run, create=False)


def _adam_batches(base, group, params, create: bool, keys=None):
    """(index, step after this update, [exp_avgs, exp_avg_sqs, max_exp_avg_sqs or None]) for the
    params grouped by step count (the bias corrections depend on it). create: initialize missing
    state as torch.optim.Adam does and count the step (an update); otherwise (a preview) zeros
    stand in for missing moments and no state is created or changed. keys: as for SGD."""
    viewed = keys is not None  # state tensors have the keys' shapes: view them with the params'
    state, keys = base.state, keys if keys is not None else params
    amsgrad = group["amsgrad"]
    names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    if create:
        for p in keys:
            st = state[p]
            if len(st) == 0:  # as torch.optim.Adam._init_group does
                st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                for name in names:
                    st[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        steps = [state[p]["step"] for p in keys]
        torch._foreach_add_(steps, 1.0)
        counts = [s.item() for s in steps]  # CPU scalars: no device synchronization
    else:
        counts = [state[p]["step"].item() + 1 if p in state and len(state[p]) else 1.0 for p in keys]
    by_step = defaultdict(list)
    for i, c in enumerate(counts):
        by_step[c].append(i)
    for step, index in by_step.items():
        lists = []
        for name in names:
            sts = [state[keys[i]] if keys[i] in state else {} for i in index]
            lst = [st[name] if name in st else torch.zeros_like(params[i]) for st, i in zip(sts, index)]
            lists.append([t.view(params[i].shape) for t, i in zip(lst, index)] if viewed else lst)
        yield index, step, lists + ([] if amsgrad else [None])


def _adam_kw(base, group, step, backend) -> dict:
    beta1, beta2 = group["betas"]
    decoupled = isinstance(base, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
    return dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                decoupled=decoupled, amsgrad=group["amsgrad"], maximize=group["maximize"],
                bias_correction1=1 - beta1 ** step, bias_correction2=1 - beta2 ** step, backend=backend)


def adam_step(base, group, params, olds, grads, backend, rank1=None, mix=None, grad_scale=1.0, keys=None):
    """params <- olds (or params - s u v^T, see sgd_step), then torch.optim.Adam / AdamW's step
    (SAMPa: mix = (grads2, lam), see sgd_step)."""
    for index, step, state_lists in _adam_batches(base, group, params, create=True, keys=keys):
        kw = _adam_kw(base, group, step, backend)
        ps, gs = _take(params, index), _take(grads, index)
        if mix is not None:
            ops.sampa_update_adam_(ps, gs, _take(mix[0], index), *state_lists, lam=mix[1], **kw)
        elif rank1 is None:
            ops.restore_adam_(ps, _take(olds, index), gs, *state_lists, grad_scale=grad_scale, **kw)
        else:
            us, vs, scales = rank1
            sel = scales if len(index) == len(params) else scales[index]
            ops.rank1_restore_adam_(ps, _take(us, index), _take(vs, index), sel, gs, *state_lists,
                                    grad_scale=grad_scale, **kw)


def adam_preview(base, group, params, grads, perturbed, previews, norm, rho, backend):
    """SAMPa: perturbed <- x + rho g / (norm + eps), previews <- Adam / AdamW's step from x with g
    (the bias corrections of that step), one pass; the state is read, never created or written."""
    for index, step, state_lists in _adam_batches(base, group, params, create=False):
        ops.sampa_preview_adam_(_take(params, index), _take(grads, index), _take(perturbed, index),
                                _take(previews, index), *state_lists, norm=norm, rho=rho,
                                **_adam_kw(base, group, step, backend))


UPDATES = {"sgd": sgd_step, "adam": adam_step}
PREVIEWS = {"sgd": sgd_preview, "adam": adam_preview}
