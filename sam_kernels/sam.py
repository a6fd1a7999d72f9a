"""SAM and ASAM (ALGORITHMS.md, "SAM"), drop-in for the widely used PyTorch SAM.

    g = grad f(x_t)                       (in .grad when first_step() is called)
    e = rho T^2 g / (||T g|| + eps)       T = |x| + offset for ASAM, 1 for SAM; one global norm
    x~ = x_t + e                          first_step(): x_t is kept, the perturbation is in place
    g~ = grad f(x~)                       the caller's second forward / backward (or the closure)
    x_t restored, base step with g~       second_step(): one fused pass for SGD and Adam / AdamW

Work is batched over the whole parameter list on one of the backends of sam_kernels.ops.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim import Optimizer

from . import backends, ops
from .fused_update import UPDATES, fused_kind

NONFINITE = ("skip", "raise")


def _check_nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_grad(p: torch.Tensor, where: str):
    g = p.grad
    if g.layout is torch.strided and g.dtype is p.dtype and p.dtype in _FLOATS and g.shape == p.shape:
        return  # the common case, checked cheaply (this runs for every parameter, twice a step)
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"SAM {where}: sparse gradients are not supported (parameter of shape {tuple(p.shape)})")
    if g.is_complex() or p.is_complex():
        raise TypeError(f"SAM {where}: complex parameters are not supported (dtype {p.dtype})")
    if g.dtype != p.dtype or g.shape != p.shape:
        raise TypeError(
            f"SAM {where}: gradient of dtype {g.dtype} and shape {tuple(g.shape)} does not match its parameter "
            f"({p.dtype}, {tuple(p.shape)})"
        )
    raise TypeError(f"SAM {where}: parameters of dtype {p.dtype} are not supported (expected one of {_FLOATS})")


class SAM(Optimizer):
    """Sharpness-aware minimization around any torch.optim optimizer.

    Args:
        params: parameters or param groups (may be None when base_optimizer is an instance).
        base_optimizer: a torch.optim.Optimizer subclass (built with base_kwargs on SAM's param
            groups) or an instance (SAM then shares its param groups).
        rho: perturbation radius (per group: a 'rho' key in a param group).
        adaptive: ASAM, e = rho T^2 g / ||T g|| with T = |x| + adaptive_offset.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (see sam_kernels.backends).
        nonfinite: "skip" (default): a NaN / inf in either gradient skips the step, the weights are
            restored bit for bit and skipped_steps grows; "raise": FloatingPointError instead.
    """

    def __init__(self, params=None, base_optimizer=torch.optim.SGD, rho: float = 0.05, adaptive: bool = False,
                 backend: str = "auto", nonfinite: str = "skip", adaptive_offset: float = 0.0, **base_kwargs):
        _check_nonneg("rho", rho)
        _check_nonneg("adaptive_offset", adaptive_offset)
        backends.check_name(backend)
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        defaults = dict(rho=float(rho), adaptive=bool(adaptive), adaptive_offset=float(adaptive_offset))
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(f"base_optimizer is an instance: its options are set already, got {sorted(base_kwargs)}")
            base = base_optimizer
            if params is not None:
                given = {id(p) for p in _flatten_params(params)}
                owned = {id(p) for g in base.param_groups for p in g["params"]}
                if given != owned:
                    raise ValueError("params must be the parameters of the base_optimizer instance (or None)")
            super().__init__(base.param_groups, defaults)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if params is None:
                raise ValueError("params is None: give the parameters, or a base_optimizer instance")
            super().__init__(params, defaults)
            base = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer subclass or instance, got {base_optimizer!r}"
            )
        self.base_optimizer = base
        self.param_groups = base.param_groups  # shared: lr schedulers on either object drive both
        self.defaults.update(base.defaults)
        self.backend = backend
        self.nonfinite = nonfinite
        for i, group in enumerate(self.param_groups):
            _check_nonneg(f"param_groups[{i}]['rho']", group["rho"])
            devices = {p.device for p in group["params"]}
            if len(devices) > 1:
                raise ValueError(
                    f"param_groups[{i}] spans devices {sorted(map(str, devices))}: a fused group must be on one device"
                )
            for d in devices:
                backends.resolve(backend, d)  # an unavailable explicit backend fails here, not mid-step
        self._skipped = 0
        self._perturbed: list[torch.Tensor] | None = None
        self._first_norm: torch.Tensor | None = None

    # --- the two steps ---------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb x in place along the gradient in .grad (no host synchronization)."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.first_step() called twice: call second_step() or restore() in between")
        work = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                _check_grad(p, "first_step")
            work.append((group, ps))
        params = [p for _, ps in work for p in ps]
        if not params:  # nothing to perturb: second_step() is then a plain base step
            self._first_norm, self._perturbed = None, []
            if zero_grad:
                self.zero_grad()
            return
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"SAM: the parameters with gradients span devices {sorted(map(str, devices))}")
        norm = self._grad_norm(work)
        if self.nonfinite == "raise" and not bool(torch.isfinite(norm)):
            raise FloatingPointError(f"SAM.first_step: the gradient norm is {norm.item()} (NaN or inf in .grad)")
        for group, ps in work:
            if ps:
                ops.perturb_(ps, [p.grad for p in ps], [self._old(p) for p in ps], norm, group["rho"],
                             adaptive=group["adaptive"], offset=group["adaptive_offset"], backend=self.backend)
        self._first_norm = norm
        self._perturbed = params
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore x_t and take the base step with the gradient at the perturbed point."""
        if self._perturbed is None:
            raise RuntimeError("SAM.second_step() called without first_step()")
        try:
            groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
            for _, ps in groups:
                for p in ps:
                    _check_grad(p, "second_step")
        except BaseException:
            self.restore()
            raise
        grads = [p.grad for _, ps in groups for p in ps]
        norms = [n for n in (self._first_norm, ops.global_norm(grads, backend=self.backend) if grads else None)
                 if n is not None]
        # The one host synchronization of a SAM step: is either gradient non-finite?
        if norms and not bool(torch.isfinite(sum(n.to(norms[0].device) for n in norms))):
            self.restore()
            self._skipped += 1
            if self.nonfinite == "raise":
                raise FloatingPointError("SAM.second_step: NaN or inf in a gradient; the step was skipped")
        else:
            kind = fused_kind(self.base_optimizer)
            if kind is None:
                self.restore()
                self.base_optimizer.step()
            else:
                self._fused_step(kind, groups)
        self._opt_called = True  # what torch's lr schedulers check, as after a plain optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _fused_step(self, kind: str, groups) -> None:
        perturbed = {id(p) for p in self._perturbed}
        for group, ps in groups:
            if ps:
                olds = [self.state[p]["old_p"] if id(p) in perturbed else p for p in ps]
                UPDATES[kind](self.base_optimizer, group, ps, olds, [p.grad for p in ps], self.backend)
        with_grad = {id(p) for _, ps in groups for p in ps}
        self._restore([p for p in self._perturbed if id(p) not in with_grad])
        self._perturbed = None

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One SAM step. The first gradient must already be in .grad; `closure` computes the loss
        and its gradient at the perturbed point (forward + backward) and returns the loss."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and gradients (or use first_step / "
                             "second_step)")
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss

    @torch.no_grad()
    def restore(self) -> None:
        """Put x_t back after first_step() without updating (bit for bit)."""
        if self._perturbed is not None:
            self._restore(self._perturbed)
            self._perturbed = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # --- state -----------------------------------------------------------------------------

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held NaN or inf."""
        return self._skipped

    def memory_report(self) -> dict:
        """Bytes held by the optimizer: `perturbation` (SAM's x_old buffers, one copy of the
        perturbed parameters) and `base_state` (the base optimizer's tensors)."""
        def nbytes(states):
            return sum(t.numel() * t.element_size() for st in states for t in st.values() if torch.is_tensor(t))

        perturbation = sum(st["old_p"].numel() * st["old_p"].element_size() for st in self.state.values()
                           if "old_p" in st)
        return {"perturbation": perturbation, "base_state": nbytes(self.base_optimizer.state.values())}

    def state_dict(self) -> dict:
        """The base optimizer's state_dict (param_groups hold rho / adaptive) plus SAM's counters."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.state_dict() between first_step() and second_step(): the weights are perturbed")
        sd = self.base_optimizer.state_dict()
        sd["sam"] = {"skipped_steps": self._skipped}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        sam = state_dict.pop("sam", {})
        self.restore()
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict makes new group dicts
        self._skipped = int(sam.get("skipped_steps", 0))

    # --- helpers ---------------------------------------------------------------------------

    def _old(self, p: torch.Tensor) -> torch.Tensor:
        """The x_old buffer of p, allocated once and reused (contiguous, p's dtype: a bit-exact copy)."""
        st = self.state[p]
        old = st.get("old_p")
        if old is None or old.shape != p.shape or old.dtype != p.dtype or old.device != p.device:
            old = st["old_p"] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return old

    def _restore(self, params) -> None:
        if params:
            ops.restore_(params, [self.state[p]["old_p"] for p in params], backend=self.backend)

    def _grad_norm(self, work) -> torch.Tensor:
        """One global norm over every parameter with a gradient (ASAM: of T g)."""
        classes: dict[tuple, list] = {}
        for group, ps in work:
            key = (group["adaptive"], group["adaptive_offset"] if group["adaptive"] else 0.0)
            classes.setdefault(key, []).extend(ps)
        norms = [
            ops.global_norm([p.grad for p in ps], ps if adaptive else None, offset, backend=self.backend)
            for (adaptive, offset), ps in classes.items() if ps
        ]
        return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def _flatten_params(params):
    out = []
    for item in params:
        if isinstance(item, dict):
            out.extend(item["params"] if not isinstance(item["params"], torch.Tensor) else [item["params"]])
        else:
            out.append(item)
    return out
