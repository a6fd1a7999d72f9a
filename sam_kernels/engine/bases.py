"""The base optimizer, as the last pass of a step sees it: one adapter per family of base.

    FusedSGD    torch.optim.SGD with options our kernels implement: its step fused into the pass
                that restores x_t (SAM's x_old, nuSAM's M - s u v^T, or x itself) and reads the
                second gradient, one launch per (param group, dtype)
    FusedAdam   torch.optim.Adam / AdamW, the same (amsgrad too)
    Generic     any other optimizer (or SGD with dampening, a tensor lr, capturable / fused Adam):
                x_t back, then its own step() if the guard says so (a host read of the flag)

The fused adapters own the base optimizer's state as torch.optim lays it out (same keys and
dtypes), so base_optimizer.state_dict() reads like torch's own and either path can follow the
other, with two differences that keep the host out of the step: new momentum buffers start at
zero (with dampening 0, m * 0 + d is torch's first buf = d), and Adam's step counters live on the
device, as views of one vector per optimizer (engine/counters.py) that the guard advances when a
step is taken. Each adapter also previews a step (SAMPa's y: the base step from x_t, the state
read and never written).

What an update restores x from is its source (Restore: a copy, or x itself; Rank1: nuSAM's
recomputed term; Shift: MSAM's recomputed move along the momentum; Mix: SAMPa's mixed gradient
from x itself): the adapter picks the primitive.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch.optim.optimizer import _get_scalar_dtype

from .. import ops
from ..integrations.distributed import local
from .counters import StepCounters


@dataclass
class Restore:
    """x <- x_old (SAM's copies; the parameters themselves for a plain step), then the step."""
    x_old: list


@dataclass
class Rank1:
    """x <- M - s u v^T (nuSAM): us, vs of the matrices; keys: the state's owners when the update's
    tensors are matrix views of them (conv kernels). The scales are given per call."""
    us: list
    vs: list
    keys: list | None = None


@dataclass
class Shift:
    """x <- x + s b (MSAM's way back along the momentum b it moved along: the base state's buffer,
    read once with the step), s = rho / (norm + eps); norm: the move's device norm, rho(): the
    move's rho (a number or a device scalar), read per call; done(): called once the update is
    launched (these parameters are back)."""
    norm: torch.Tensor
    rho: Callable
    done: Callable


@dataclass
class Mix:
    """The step from x with d = (1 - lam) grads + lam grads2 (SAMPa); lam is given per call."""
    grads2: list


def _plain_float(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


class FusedSGD:
    """torch.optim.SGD fused into our passes."""
    family = "sgd"
    state_keys = ("momentum_buffer",)  # what an update binds (engine.key: their addresses)
    primitives = {Restore: "restore_sgd_", Rank1: "rank1_restore_sgd_", Shift: "shift_restore_sgd_",
                  Mix: "sampa_update_sgd_"}
    preview_primitive = "sampa_preview_sgd_"

    def __init__(self, base: torch.optim.Optimizer):
        self.base = base

    @staticmethod
    def accepts(group: dict) -> bool:
        return _plain_float(group["momentum"], group["dampening"]) and group["dampening"] == 0

    def structure(self, group: dict) -> tuple:
        """What in a param group decides which lists an update launch holds (part of a plan's key)."""
        return (group["momentum"] != 0,)

    def static(self, group: dict) -> dict:
        return {"momentum": group["momentum"]}

    def create_state(self, group: dict, keys) -> None:
        """The state torch.optim creates on a first step, where it is missing (buffers at zero)."""
        if group["momentum"] != 0:
            for p in keys:
                st = self.base.state[p]
                if st.get("momentum_buffer") is None:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    def state_lists(self, group: dict, keys, views=None) -> dict:
        if group["momentum"] == 0:
            return {"bufs": None}
        return {"bufs": _views([self.base.state[p]["momentum_buffer"] for p in keys], views)}

    def scalars(self, group: dict, lr) -> dict:
        """The scalars of a group's update, read on every call (lr schedulers change them)."""
        return dict(lr=group["lr"] if lr is None else lr, momentum=group["momentum"], dampening=group["dampening"],
                    nesterov=group["nesterov"], weight_decay=group["weight_decay"], maximize=group["maximize"],
                    init_bufs=False)


class FusedAdam:
    """torch.optim.Adam / AdamW fused into our passes."""
    family = "adam"
    state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
    primitives = {Restore: "restore_adam_", Rank1: "rank1_restore_adam_", Shift: "shift_restore_adam_",
                  Mix: "sampa_update_adam_"}
    preview_primitive = "sampa_preview_adam_"

    def __init__(self, base: torch.optim.Optimizer):
        self.base = base
        self.decoupled = isinstance(base, torch.optim.AdamW)

    @staticmethod
    def accepts(group: dict) -> bool:
        return not (group.get("capturable") or group.get("fused")) and _plain_float(*group["betas"])

    def structure(self, group: dict) -> tuple:
        return (bool(group["amsgrad"]),)

    def static(self, group: dict) -> dict:
        return {"amsgrad": bool(group["amsgrad"])}

    def create_state(self, group: dict, keys) -> None:
        for p in keys:
            st = self.base.state[p]
            if "exp_avg" not in st or (group["amsgrad"] and "max_exp_avg_sq" not in st):
                new = {"step": torch.zeros((), dtype=_get_scalar_dtype(), device=p.device),
                       "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                       "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                if group["amsgrad"]:
                    new["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                for k, v in new.items():
                    st.setdefault(k, v)

    def state_lists(self, group: dict, keys, views=None) -> dict:
        state = self.base.state
        return {"exp_avgs": _views([state[p]["exp_avg"] for p in keys], views),
                "exp_avg_sqs": _views([state[p]["exp_avg_sq"] for p in keys], views),
                "max_exp_avg_sqs": _views([state[p]["max_exp_avg_sq"] for p in keys], views)
                if group["amsgrad"] else None,
                "state_steps": [state[p]["step"] for p in keys]}

    def scalars(self, group: dict, lr) -> dict:
        beta1, beta2 = group["betas"]
        return dict(lr=group["lr"] if lr is None else lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decoupled=self.decoupled or group.get("decoupled_weight_decay", False),
                    amsgrad=group["amsgrad"], maximize=group["maximize"])


def _views(tensors, views):
    """The state tensors as the kernel sees them: as they are, or (views: per tensor a shape)
    viewed like nuSAM's matrices of conv kernels (sharded: this rank's shard)."""
    return tensors if views is None else [local(t).view(s) for t, s in zip(tensors, views)]


_FUSED = {torch.optim.SGD: FusedSGD, torch.optim.Adam: FusedAdam, torch.optim.AdamW: FusedAdam}


def fused(base: torch.optim.Optimizer):
    """The fused adapter of `base` when every param group has options our kernels implement, else
    None (the generic path: x_t back, then base.step())."""
    cls = _FUSED.get(type(base))
    if cls is None:
        return None
    for g in base.param_groups:
        if g.get("differentiable") or not _plain_float(g["lr"], g["weight_decay"]) or not cls.accepts(g):
            return None
    return cls(base)


def fused_family(base: torch.optim.Optimizer) -> str | None:
    """'sgd' or 'adam' when `base` is fused (fused()), else None."""
    adapter = fused(base)
    return adapter.family if adapter is not None else None


def prepare_state(adapter, work, counters: StepCounters, device) -> None:
    """Create the state every parameter of [(group, params)] needs, and (Adam) bind all their step
    counters to the vector at once: a launch prepared before another parameter joined the vector
    would hold views of the old one."""
    for group, ps in work:
        adapter.create_state(group, ps)
    if adapter.family == "adam":
        counters.bind(adapter.base.state, [p for _, ps in work for p in ps], device)


def prepare_update(adapter, group: dict, backend: str, device, params, grads, counters: StepCounters, source,
                   lr=None):
    """The fused update of `params` (one param group) with `grads`, from `source` (Restore, Rank1,
    Shift, Mix). counters: the optimizer's StepCounters (Adam). lr: a device scalar the kernel reads
    instead of group["lr"] (capturable steps: engine/scalars.py). Returns run(grad_scale,
    found_inf, **per_call) with the source's per-call values (Rank1's scales, Mix's lam, Shift's
    norm and rho)."""
    keys = source.keys if isinstance(source, Rank1) and source.keys is not None else params
    views = None if keys is params else [p.shape for p in params]
    adapter.create_state(group, keys)
    if adapter.family == "adam":
        counters.bind(adapter.base.state, keys, device)
    lists = adapter.state_lists(group, keys, views)
    if isinstance(source, Restore):
        lists = {"params": params, "x_old": source.x_old, "grads": grads, **lists}
    elif isinstance(source, Shift):
        lists = {"params": params, "grads": grads, **lists}
    elif isinstance(source, Rank1):
        lists = {"params": params, "us": source.us, "vs": source.vs, "grads": grads, **lists}
    else:
        lists = {"params": params, "grads": grads, "grads2": source.grads2, **lists}
    launch = ops.bind(adapter.primitives[type(source)], backend, device, lists, adapter.static(group))

    def run(grad_scale=None, found_inf=None, **per_call):
        launch(grad_scale=grad_scale, found_inf=found_inf, **adapter.scalars(group, lr), **per_call)
    return run


def prepare_preview(adapter, group: dict, backend: str, device, params, grads, perturbed, previews, lr=None):
    """SAMPa: perturbed <- x + rho g / (norm + eps), previews <- the base step from x with g, the state
    read and never written. State that does not exist yet is created as the update of the same
    step creates it (zeros: a zero momentum buffer steps as torch's fresh one, m * 0 + d = d, and
    Adam's zero moments at step 0 are torch's first step), since a prepared launch holds
    addresses, so what it reads must outlive it. lr: as for prepare_update. Returns run(norm,
    rho) (rho a number or a device scalar)."""
    adapter.create_state(group, params)
    lists = adapter.state_lists(group, params)
    static = adapter.static(group)
    if adapter.family == "sgd":
        static["init_bufs"] = False
    launch = ops.bind(adapter.preview_primitive, backend, device, {
        "params": params, "grads": grads, "perturbed": perturbed, "previews": previews, **lists}, static)

    def run(norm, rho):
        launch(norm=norm, rho=rho, **adapter.scalars(group, lr))
    return run


# What a twin of a torch optimizer must not share with it: the lr scheduler's wrapper of step()
# (instance attributes), its state and param groups (the twin's own), the hooks a user registered.
_NOT_SHARED = ("step", "_opt_called", "state", "param_groups")


def preview_with_own_step(base, groups, previews, grads, norm) -> None:
    """SAMPa's preview for a base optimizer we do not fuse (any torch.optim optimizer, SGD with
    dampening): previews[i] (of param group groups[i], holding x_t) <- the base optimizer's own
    step from x_t with grads, by a twin of it over the preview tensors with a copy of its state,
    so that its state does not move (ALGORITHMS.md, SAMPa: y_{t+1} is the base step from x_t). A
    gradient whose norm is not finite previews a zero gradient, as the fused previews do (the step
    that used it is skipped; the next one starts from a finite preview). The copy of the state
    lives for the call."""
    twin = object.__new__(type(base))
    twin.__dict__.update({k: v for k, v in base.__dict__.items()
                          if k not in _NOT_SHARED and not k.startswith("_optimizer_")})
    for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        setattr(twin, name, OrderedDict())
    twin.param_groups = [{**g, "params": ys} for g, ys in zip(groups, previews)]
    twin.state = defaultdict(dict)
    finite = torch.isfinite(norm)
    held = []
    for group, ys, gs in zip(groups, previews, grads):
        for p, y, g in zip(group["params"], ys, gs):
            if p in base.state:
                twin.state[y] = {k: v.clone() if torch.is_tensor(v) else v for k, v in base.state[p].items()}
            held.append((y, y.grad))
            y.grad = torch.where(finite, g, 0).to(y.dtype)
    try:
        with torch.no_grad():
            type(base).step(twin)
    finally:
        for y, g in held:
            y.grad = g
