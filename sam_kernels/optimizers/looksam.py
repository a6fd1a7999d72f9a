"""LookSAM (ALGORITHMS.md, "LookSAM"; Liu et al., CVPR 2022): a SAM step every k steps, and in
between one forward-backward with the sharpness direction of the last SAM step reused:

    SAM step (t - start_step) % k == 0:
        g = grad f(x_t), g_s = grad f(x_t + rho g / ||g||)          two gradients
        g_v = g_s - (<g, g_s> / ||g||^2) g                          kept (the part of g_s orthogonal to g)
        base step from x_t with g_s
    other steps:
        g = grad f(x_t)                                             one gradient
        base step with g + alpha (||g|| / ||g_v||) g_v

Over T steps: T + ceil(T / k) gradient evaluations (step(closure) calls the closure that often;
two-pass users read sam_step_due and call base_step() on the other steps). Memory: g_v, and a
copy of g during a SAM step; no copy of the weights (x_t is restored by recomputing the move,
within one rounding, as MSAM's). The SAM step is engine/directions.py's LookaheadPass, the
other steps its reuse_prelude, both on the step engine through the two-pass API (two_pass.py).
"""
from __future__ import annotations

import torch

from ..engine.directions import LOOKSAM_KEY, LookaheadPass, reuse_prelude
from ..engine.engine import Schedule
from ..engine.updates import build_update, plain_sources
from ..integrations import distributed
from ..ops.lists import GradsOf
from .checks import split_rho
from .gsam import _check_real
from .two_pass import SharpnessAwareOptimizer


class EveryKSchedule(Schedule):
    """A SAM step at t when t >= start_step and (t - start_step) % k == 0."""

    def __init__(self, start_step: int, k: int):
        super().__init__(start_step)
        self.k = k

    def due(self, t: int) -> bool:
        return t >= self.start_step and (t - self.start_step) % self.k == 0


class LookaheadPerturbation:
    """The strategy: build(engine, work, device) -> LookaheadPass (the optimizer keeps g_v)."""

    def __init__(self, owner):
        self.owner = owner

    @staticmethod
    def group_key(group: dict) -> tuple:
        return (group["perturb"],)

    def build(self, engine, work, device) -> LookaheadPass:
        return LookaheadPass(engine, work, device, self.owner)


class LookSAM(SharpnessAwareOptimizer):
    """LookSAM around any torch.optim optimizer.

    Args:
        k: a SAM step every k steps (paper default 5); 1 is SAM.
        alpha: the weight of the reused direction (paper default 0.7); read on every step.
        rho: perturbation radius (per group: a 'rho' key), or a callable step -> rho.
        perturb: per param group (default True): False leaves the group unperturbed and without
            a reused direction (subset perturbation).

    The others as for SAM (backend, nonfinite, start_step: plain base steps before it,
    max_grad_norm, capturable, the base optimizer's options).

    base_step() on the steps between SAM steps leaves g + alpha (||g|| / ||g_v||) g_v in .grad
    (as clip_grad_norm_ leaves the clipped gradient): zero it, or pass zero_grad=True.
    """

    _own_state_keys = (LOOKSAM_KEY,)

    def __init__(self, params=None, base_optimizer=torch.optim.SGD, rho=0.05, k: int = 5, alpha: float = 0.7,
                 backend: str = "auto", nonfinite: str = "skip", start_step: int = 0, max_grad_norm=None,
                 capturable: bool = False, **base_kwargs):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self._k = k
        self._alpha = _check_real("alpha", alpha)
        rho, rho_fn = split_rho(rho)
        self.perturbation = LookaheadPerturbation(self)
        super().__init__(params, base_optimizer, dict(rho=rho, perturb=True), backend, nonfinite, base_kwargs,
                         start_step, rho_fn, max_grad_norm, capturable)

    def _make_schedule(self, start_step: int) -> EveryKSchedule:
        return EveryKSchedule(start_step, self._k)

    k = property(lambda self: self.engine.schedule.k)

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = _check_real("alpha", value)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """x_t back (recomputed), then the base step with the gradient at the perturbed point, and
        g_v kept; a GradScaler as in SAM.second_step."""
        if self._pending is not None:
            self._pending.undo()  # before the update reads x
        super().second_step(zero_grad, grad_scaler)

    def step_kind(self) -> str:
        if self.sam_step_due:
            return "sam"
        return "base" if self.engine.steps < self.engine.schedule.start_step else "reuse"

    def _base_plan(self, where: str):
        """Before start_step: a plain base step; after it, between SAM steps: the reuse step."""
        engine = self.engine
        if engine.steps < engine.schedule.start_step:
            return super()._base_plan(where)
        state = self.state
        return ("reuse", lambda: engine.key(engine.state_key((LOOKSAM_KEY,), state), update=True),
                lambda: self._build_reuse(*engine.work(where)))

    def _build_reuse(self, work, device):
        params = [p for group, ps in work if group["perturb"] for p in ps]
        grads = GradsOf([p for _, ps in work for p in ps])
        prelude = reuse_prelude(self.engine, self, params, device, lambda: self._alpha)
        return build_update(self.engine, work, device, plain_sources(GradsOf),
                            [(grads, None, 0, 0.0)] if len(grads) else [], generic_grads=grads, preludes=[prelude])

    def memory_report(self) -> dict:
        """Bytes held by the optimizer: `reused_direction` (g_v), `kept_gradient` (the copy of g of
        a SAM step), `perturbation` 0 (no copy of the weights) and `base_state`."""
        g_v = sum(distributed.nbytes(st[LOOKSAM_KEY]) for st in self.state.values() if LOOKSAM_KEY in st)
        return {"perturbation": 0, "reused_direction": g_v,
                "kept_gradient": LookaheadPass.nbytes(self.engine.cached("first")),
                "base_state": self._base_state_bytes()}
