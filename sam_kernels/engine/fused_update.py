"""The base optimizer's step, fused into the last pass of a step: x <- its restored value (SAM's
x_old, nuSAM's M - s u v^T, or x itself), then torch.optim.SGD's or Adam / AdamW's update, in one
pass per (param group, dtype), reading the guard's device flags (found_inf skips it, grad_scale
multiplies the gradient).

`fused_kind(base)` says whether a base optimizer can be fused ("sgd", "adam") or must take the
generic path (restore, then its own step()). The updates own the base optimizer's state as
torch.optim lays it out (same keys and dtypes), so base_optimizer.state_dict() reads like
torch's own and either path can follow the other, with two differences that keep the host out
of the step: new momentum buffers start at zero (with dampening 0, m * 0 + d is torch's first
buf = d; dampening != 0 takes the generic path), and Adam's step counters live on the device,
as views of one vector per optimizer (StepCounters) that the guard advances when a step is taken.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict

import torch
from torch.optim.optimizer import _get_scalar_dtype

from .. import ops
from ..integrations.distributed import local


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
        if kind == "sgd" and (not _plain_float(g["momentum"], g["dampening"]) or g["dampening"] != 0):
            return None
        if kind == "adam" and (g.get("capturable") or g.get("fused") or not _plain_float(*g["betas"])):
            return None
    return kind


# The state entries an update of each kind binds (their addresses are part of its plan's key).
STATE_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")}


def structure(kind: str, group: dict) -> tuple:
    """What in a param group decides which lists an update launch holds (part of a plan's key)."""
    return (group["momentum"] != 0,) if kind == "sgd" else (bool(group["amsgrad"]),)


class StepCounters:
    """Adam's per-parameter step counters as views of one fp32 vector on the device.

    state[p]["step"] stays what torch.optim.Adam keeps (a 0-dim fp32 tensor), so state_dict and
    torch's own Adam read it as usual; being views of one vector, the guard (check_grads_)
    advances them all in its one-program epilogue, only when the step is taken, and the kernels
    read each tensor's count on the device: no counter is ever read on the host."""

    def __init__(self):
        self.vec: torch.Tensor | None = None
        self.slots: dict[int, int] = {}  # id(param) -> index in vec
        self._order: list = []  # the parameters of the slots
        self.version = 0  # bumped when the vector is rebuilt: plans holding the old views rebuild too

    def _is_view(self, p, st) -> bool:
        i = self.slots.get(id(p))
        step = st.get("step")
        return (i is not None and self.vec is not None and isinstance(step, torch.Tensor)
                and step.device == self.vec.device and step.data_ptr() == self.vec.data_ptr() + 4 * i)

    def bind(self, state, params, device) -> None:
        """Make state[p]["step"] of every p in params (whose state exists) a view of the vector,
        rebuilding it, from the current counts of every parameter it covers, when one is not: a
        new parameter, a loaded state dict, a counter torch's own Adam created."""
        if all(self._is_view(p, state[p]) for p in params):
            return
        order = list({id(p): p for p in [*self._order, *params] if p in state and "step" in state[p]}.values())
        values = []
        for p in order:
            step = state[p]["step"]
            step = step if isinstance(step, torch.Tensor) else torch.tensor(float(step))
            values.append(step.detach().reshape(()).to(device=device, dtype=torch.float32, non_blocking=True))
        self.vec = torch.stack(values) if values else torch.zeros(0, device=device)
        self.slots = {id(p): i for i, p in enumerate(order)}
        self._order = order
        self.version += 1
        for i, p in enumerate(order):
            state[p]["step"] = self.vec[i]

    def mask(self, params) -> torch.Tensor:
        """1 at the slots of params, 0 elsewhere (which counters a step advances)."""
        m = [0.0] * self.vec.numel()
        for p in params:
            m[self.slots[id(p)]] = 1.0
        t = torch.tensor(m, dtype=torch.float32)
        return t if self.vec.device.type == "cpu" else t.pin_memory().to(self.vec.device, non_blocking=True)


def _new_state(kind: str, group: dict, p: torch.Tensor) -> dict:
    """The state torch.optim creates for p on its first step (momentum buffers at zero)."""
    if kind == "sgd":
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.contiguous_format)}
    st = {"step": torch.zeros((), dtype=_get_scalar_dtype(), device=p.device),
          "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
          "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    if group["amsgrad"]:
        st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return st


def state_lists(base, kind: str, group: dict, keys, views=None, create: bool = True) -> dict:
    """The state lists of an update over `keys` (the parameters that own the state), creating what
    is missing (create; a preview creates nothing and must not be asked before the state exists).
    views: per key the shape the kernel sees it with (nuSAM's matrix views of conv kernels)."""
    state = base.state
    if create:
        for p in keys:
            st = state[p]
            if kind == "sgd" and group["momentum"] != 0 and st.get("momentum_buffer") is None:
                st.update(_new_state("sgd", group, p))
            elif kind == "adam" and ("exp_avg" not in st or (group["amsgrad"] and "max_exp_avg_sq" not in st)):
                for k, v in _new_state("adam", group, p).items():
                    st.setdefault(k, v)

    def view(name):
        ts = [state[p][name] for p in keys]
        return ts if views is None else [local(t).view(s) for t, s in zip(ts, views)]  # sharded: this rank's

    if kind == "sgd":
        return {"bufs": view("momentum_buffer") if group["momentum"] != 0 else None}
    return {"exp_avgs": view("exp_avg"), "exp_avg_sqs": view("exp_avg_sq"),
            "max_exp_avg_sqs": view("max_exp_avg_sq") if group["amsgrad"] else None,
            "state_steps": [state[p]["step"] for p in keys]}


def prepare_state(base, kind: str, work, counters: StepCounters, device) -> None:
    """Create the state every parameter of [(group, params)] needs, and (Adam) bind all their step
    counters to the vector at once: a launch prepared before another parameter joined the vector
    would hold views of the old one."""
    for group, ps in work:
        state_lists(base, kind, group, ps)
    if kind == "adam":
        counters.bind(base.state, [p for _, ps in work for p in ps], device)


def hyper(base, kind: str, group: dict, lr=None) -> dict:
    """The scalars of a group's update, read on every call (lr schedulers change them). lr: a device
    scalar the kernel reads instead of group["lr"] (capturable steps: sam_kernels/capturable.py)."""
    lr = group["lr"] if lr is None else lr
    if kind == "sgd":
        return dict(lr=lr, momentum=group["momentum"], dampening=group["dampening"],
                    nesterov=group["nesterov"], weight_decay=group["weight_decay"], maximize=group["maximize"],
                    init_bufs=False)
    beta1, beta2 = group["betas"]
    decoupled = isinstance(base, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
    return dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                decoupled=decoupled, amsgrad=group["amsgrad"], maximize=group["maximize"])


# Which primitive runs an update, by base kind and by where x_old comes from.
_OPS = {("sgd", "old"): "restore_sgd_", ("sgd", "rank1"): "rank1_restore_sgd_", ("sgd", "mix"): "sampa_update_sgd_",
        ("adam", "old"): "restore_adam_", ("adam", "rank1"): "rank1_restore_adam_",
        ("adam", "mix"): "sampa_update_adam_"}


def prepare_update(base, kind: str, group: dict, backend: str, device, params, grads, counters: StepCounters, *,
                   olds=None, rank1=None, grads2=None, keys=None, lr=None):
    """The fused update of `params` (one param group) with `grads`, restoring from olds (SAM), from
    the rank-1 term rank1 = (us, vs) (nuSAM; the scales are given per call), or from x itself
    with the mix of grads and grads2 (SAMPa). keys: the state's owners when params are views of
    them. counters: the optimizer's StepCounters (Adam). lr: a device scalar the kernel reads instead of
    group["lr"] (capturable steps: sam_kernels/capturable.py). Returns run(grad_scale, found_inf,
    scales=None, lam=None)."""
    keys = keys if keys is not None else params
    views = None if keys is params else [p.shape for p in params]
    state_lists(base, kind, group, keys)  # create what is missing
    if kind == "adam":
        counters.bind(base.state, keys, device)
    lists = state_lists(base, kind, group, keys, views, create=False)
    source = "rank1" if rank1 is not None else "mix" if grads2 is not None else "old"
    op = _OPS[kind, source]
    if source == "old":
        lists = {"params": params, "olds": olds, "grads": grads, **lists}
    elif source == "rank1":
        lists = {"params": params, "us": rank1[0], "vs": rank1[1], "grads": grads, **lists}
    else:
        lists = {"params": params, "grads": grads, "grads2": grads2, **lists}
    static = {"momentum": group["momentum"]} if kind == "sgd" else {"amsgrad": bool(group["amsgrad"])}
    launch = ops.bind(op, backend, device, lists, static)

    def run(grad_scale=None, found_inf=None, scales=None, lam=None):
        kw = hyper(base, kind, group, lr)
        if scales is not None:
            kw["scales"] = scales
        if lam is not None:
            kw["lam"] = lam
        launch(grad_scale=grad_scale, found_inf=found_inf, **kw)
    return run


def prepare_preview(base, kind: str, group: dict, backend: str, device, params, grads, perturbed, previews, lr=None):
    """SAMPa: perturbed <- x + rho g / (norm + eps), previews <- the base step from x with g, the state
    read and never written. State that does not exist yet is created as the update of the same
    step creates it (zeros: a zero momentum buffer steps as torch's fresh one, m * 0 + d = d, and
    Adam's zero moments at step 0 are torch's first step), since a prepared launch holds
    addresses, so what it reads must outlive it. lr: as for prepare_update. Returns run(norm,
    rho) (rho a number or a device scalar)."""
    lists = state_lists(base, kind, group, params)
    if kind == "sgd":
        static, op = {"momentum": group["momentum"], "init_bufs": False}, "sampa_preview_sgd_"
    else:
        static, op = {"amsgrad": bool(group["amsgrad"])}, "sampa_preview_adam_"
    launch = ops.bind(op, backend, device, {"params": params, "grads": grads, "perturbed": perturbed,
                                            "previews": previews, **lists}, static)

    def run(norm, rho):
        launch(norm=norm, rho=rho, **hyper(base, kind, group, lr))
    return run


# What a twin of a torch optimizer must not share with it: the lr scheduler's wrapper of step()
# (instance attributes), and the hooks a user registered on the instance.
_NOT_SHARED = ("step", "_opt_called", "state", "param_groups")


def preview_with_own_step(base, groups, previews, grads, norm) -> None:
    """SAMPa's preview for a base optimizer we do not fuse (any torch.optim optimizer, SGD with
    dampening): previews[i] (of param group groups[i], holding x_t) <- the base optimizer's own step from
    x_t with grads, by a twin of it over the preview tensors with a copy of its state, so that its
    state does not move (ALGORITHMS.md, SAMPa: y_{t+1} is the base step from x_t). A gradient
    whose norm is not finite previews a zero gradient, as the fused previews do (the step that
    used it is skipped; the next one starts from a finite preview). The copy of the state lives
    for the call."""
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
