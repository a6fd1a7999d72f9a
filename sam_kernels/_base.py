"""What every sharpness-aware optimizer of sam_kernels shares: building or adopting the base
optimizer (param groups shared with it), argument checks, step(closure), zero_grad, the
non-finite policy and its counter, and the state dict (the base optimizer's plus our own)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

from . import backends, ops
from .fused_update import fused_kind

NONFINITE = ("skip", "raise")
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_step(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def split_rho(rho):
    """(the radius at step 0, the schedule step -> rho or None): rho is a number or a callable."""
    if callable(rho):
        return check_nonneg("rho(0)", rho(0)), rho
    return check_nonneg("rho", rho), None


def _check_scaler(grad_scaler) -> None:
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")


def check_grad(p: torch.Tensor, where: str):
    g = p.grad
    if g.layout is torch.strided and g.dtype is p.dtype and p.dtype in _FLOATS and g.shape == p.shape:
        return  # the common case, checked cheaply (this runs for every parameter, twice a step)
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"{where}: sparse gradients are not supported (parameter of shape {tuple(p.shape)})")
    if g.is_complex() or p.is_complex():
        raise TypeError(f"{where}: complex parameters are not supported (dtype {p.dtype})")
    if g.dtype != p.dtype or g.shape != p.shape:
        raise TypeError(
            f"{where}: gradient of dtype {g.dtype} and shape {tuple(g.shape)} does not match its parameter "
            f"({p.dtype}, {tuple(p.shape)})"
        )
    raise TypeError(f"{where}: parameters of dtype {p.dtype} are not supported (expected one of {_FLOATS})")


def _flatten_params(params):
    out = []
    for item in params:
        if isinstance(item, dict):
            out.extend(item["params"] if not isinstance(item["params"], torch.Tensor) else [item["params"]])
        else:
            out.append(item)
    return out


class SharpnessAwareOptimizer(Optimizer):
    """Base class: subclasses implement _sam_first_step(), _sam_second_step() and _sam_restore().

    Shared schedule (ALGORITHMS.md, "Perturbation delay and rho schedules"): before `start_step`
    a step is a plain base step (one gradient); `rho` may be a callable step -> rho, applied to
    every param group when a SAM step starts. `sam_step_due` says which kind the next step is.
    """

    def __init__(self, params, base_optimizer, defaults: dict, backend: str, nonfinite: str, base_kwargs: dict,
                 start_step: int = 0, rho_fn: Callable[[int], float] | None = None):
        backends.check_name(backend)
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError("base_optimizer is an instance: its options are set already, "
                                f"got {sorted(base_kwargs)}")
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
            check_nonneg(f"param_groups[{i}]['rho']", group["rho"])
            devices = {p.device for p in group["params"]}
            if len(devices) > 1:
                raise ValueError(
                    f"param_groups[{i}] spans devices {sorted(map(str, devices))}: a fused group must be on one device"
                )
            for d in devices:
                backends.resolve(backend, d)  # an unavailable explicit backend fails here, not mid-step
        self._skipped = 0
        self.start_step = check_step("start_step", start_step)
        self._rho_fn = rho_fn
        self._t = 0  # steps taken (SAM, plain or skipped): what start_step and the rho schedule count
        self._plain_pending = False  # first_step() found no SAM step due: second_step() is a base step
        self._grad_scale = 1.0  # GradScaler's 1 / scale for the update in progress (1: no scaler)
        self._scaler = None

    # --- to implement ------------------------------------------------------------------------

    def _sam_first_step(self, zero_grad: bool) -> None:
        raise NotImplementedError

    def _sam_second_step(self, zero_grad: bool) -> None:
        raise NotImplementedError

    def _sam_restore(self) -> None:
        raise NotImplementedError

    def _perturbed_now(self) -> bool:
        raise NotImplementedError

    def _extra_state(self) -> dict:
        """What the subclass keeps across steps beyond the base optimizer (tensors allowed)."""
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    # --- the schedule ------------------------------------------------------------------------

    @property
    def sam_step_due(self) -> bool:
        """Whether the next step is a SAM step (two gradients) rather than a plain base step."""
        return self._t >= self.start_step

    @property
    def steps(self) -> int:
        """Steps taken so far (SAM steps, plain base steps and skipped steps)."""
        return self._t

    def _apply_rho_schedule(self) -> None:
        if self._rho_fn is not None:
            rho = check_nonneg(f"rho({self._t})", self._rho_fn(self._t))
            for group in self.param_groups:
                group["rho"] = rho

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """Perturb the weights along the gradient in .grad, if a SAM step is due (else nothing:
        second_step() will then take a plain base step). With a GradScaler the gradient is scaled:
        the perturbation only uses its direction, and an inf / NaN is caught by second_step()."""
        name = type(self).__name__
        _check_scaler(grad_scaler)
        if self._plain_pending or self._perturbed_now():
            raise RuntimeError(f"{name}.first_step() called twice: call second_step() or restore() in between")
        if not self.sam_step_due:
            self._plain_pending = True
            if zero_grad:
                self.zero_grad()
            return
        self._apply_rho_schedule()
        self._sam_first_step(zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """Restore x_t and take the base step with the gradient at the perturbed point (after a
        first_step() that found no SAM step due: a plain base step with the gradient in .grad).
        grad_scaler: the torch.amp.GradScaler that scaled both losses; the gradient is unscaled
        inside the fused update, and the scaler learns whether the step was skipped (inf / NaN in
        either pass), so that scaler.update() backs off as after scaler.step(optimizer)."""
        _check_scaler(grad_scaler)
        if self._plain_pending:
            self._plain_pending = False
            self.base_step(zero_grad, grad_scaler)
            return
        self._scaler = grad_scaler
        try:
            self._sam_second_step(zero_grad)
        finally:
            self._scaler = None

    @torch.no_grad()
    def base_step(self, zero_grad: bool = False, grad_scaler=None) -> bool:
        """A plain base-optimizer step with the gradient in .grad (one gradient, no perturbation),
        for the steps where no SAM step is due. The same non-finite and GradScaler handling as a
        SAM step."""
        name = type(self).__name__
        _check_scaler(grad_scaler)
        if self._perturbed_now():
            raise RuntimeError(f"{name}.base_step() between first_step() and second_step(): the weights are perturbed")
        self._plain_pending = False
        grads = [p.grad for _, ps in self._params_with_grad(f"{name} base_step") for p in ps]
        accepted = not grads or bool(torch.isfinite(ops.global_norm(grads, backend=self.backend)))
        self._t += 1
        grad_scale = self._inform_scaler(grad_scaler, accepted)
        if not accepted:
            self._skipped += 1
            if self.nonfinite == "raise":
                raise FloatingPointError(f"{name}.base_step: NaN or inf in a gradient; the step was skipped")
        else:
            if grad_scale != 1.0:
                torch._foreach_mul_(grads, grad_scale)
            self.base_optimizer.step()
        self._opt_called = True
        if zero_grad:
            self.zero_grad()
        return accepted

    @torch.no_grad()
    def restore(self) -> None:
        """Put x_t back after first_step() without updating (bit for bit for SAM)."""
        self._plain_pending = False
        self._sam_restore()

    # --- shared ------------------------------------------------------------------------------

    def _params_with_grad(self, where: str):
        """[(group, [params with a gradient])] after checking every gradient."""
        work = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                check_grad(p, where)
            work.append((group, ps))
        return work

    def _second_step(self, first_check: torch.Tensor | None, zero_grad: bool) -> bool:
        """The shared second half: check both gradients, then the fused or generic update.

        first_check: a device scalar that is finite iff the first gradient was. Returns whether
        the step was taken (False: skipped, the weights restored, the state untouched)."""
        name = type(self).__name__
        try:
            groups = self._params_with_grad(f"{name} second_step")
        except BaseException:
            self.restore()
            raise
        grads = [p.grad for _, ps in groups for p in ps]
        checks = [n for n in (first_check, ops.global_norm(grads, backend=self.backend) if grads else None)
                  if n is not None]
        # The one host synchronization of a step: is either gradient non-finite?
        accepted = not checks or bool(torch.isfinite(sum(n.to(checks[0].device) for n in checks)))
        self._t += 1
        self._grad_scale = self._inform_scaler(self._scaler, accepted)
        if not accepted:
            self.restore()
            self._skipped += 1
            if self.nonfinite == "raise":
                raise FloatingPointError(f"{name}.second_step: NaN or inf in a gradient; the step was skipped")
        else:
            kind = fused_kind(self.base_optimizer)
            if kind is None:
                self.restore()
                if self._grad_scale != 1.0:
                    torch._foreach_mul_(grads, self._grad_scale)
                self.base_optimizer.step()
            else:
                self._fused_step(kind, groups)
        self._opt_called = True  # what torch's lr schedulers check, as after a plain optimizer.step()
        if zero_grad:
            self.zero_grad()
        return accepted

    def _fused_step(self, kind: str, groups) -> None:
        """The fused restore + update; the gradients are multiplied by self._grad_scale."""
        raise NotImplementedError

    def _inform_scaler(self, scaler, accepted: bool) -> float:
        """Record the step's inf check in `scaler` as scaler.step(optimizer) would (so that
        scaler.update() backs the scale off after a skipped step); returns the factor that
        unscales the gradients (1 without a scaler)."""
        if scaler is None or not scaler.is_enabled():
            return 1.0
        state = scaler._per_optimizer_states[id(self)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("the GradScaler already recorded a step of this optimizer since its last update()")
        scale = scaler._scale
        device = scale.device if scale is not None else torch.device("cpu")
        state["found_inf_per_device"][device] = torch.full((), 0.0 if accepted else 1.0, device=device)
        state["stage"] = OptState.STEPPED
        return 1.0 / scaler.get_scale()  # a host read: the step's guard has synchronized already

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, grad_scaler=None):
        """One step. The first gradient must already be in .grad; `closure` computes the loss and
        its gradient at the perturbed point (forward + backward) and returns the loss. When no SAM
        step is due (sam_step_due), a plain base step with .grad: the closure is not called and
        None is returned."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that recomputes the loss and gradients "
                             "(or use first_step / second_step)")
        if not self.sam_step_due:
            self.base_step(grad_scaler=grad_scaler)
            return None
        self.first_step(zero_grad=True, grad_scaler=grad_scaler)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step(grad_scaler=grad_scaler)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held NaN or inf."""
        return self._skipped

    def state_dict(self) -> dict:
        """The base optimizer's state_dict (its param_groups hold rho and our options) plus ours."""
        if self._perturbed_now():
            raise RuntimeError(f"{type(self).__name__}.state_dict() between first_step() and second_step(): "
                               "the weights are perturbed")
        sd = self.base_optimizer.state_dict()
        sd["sam"] = {"skipped_steps": self._skipped, "step": self._t, **self._extra_state()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = dict(state_dict.pop("sam", {}))
        self.restore()
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict makes new group dicts
        self._skipped = int(extra.pop("skipped_steps", 0))
        self._t = int(extra.pop("step", 0))
        self._load_extra_state(extra)

    def _base_state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.base_optimizer.state.values() for t in st.values()
                   if torch.is_tensor(t))
