"""MSAM, momentum SAM (ALGORITHMS.md, "MSAM"; Becker et al. 2024): ONE forward-backward per step.

    b_t   the base optimizer's momentum (SGD's momentum_buffer, Adam's exp_avg) before this step
    e_t = -rho b_t / (||b_t|| + eps)      first_step(): before the forward, x <- x_t + e_t (e_0 = 0)
    g~  = grad f(x_t + e_t; B_t)          the caller's one forward / backward (or the closure)
    x_t back, base step with g~           second_step(): x <- x - e_t inside the fused base step

No copy of the weights: the perturbation is removed by recomputing it, so x_t comes back within
one rounding (as nuSAM's rank-1 term; SAM's copy gives it back bit for bit). The weights between
steps are x_t (evaluation and checkpoints see the real weights). The strategy is
engine/momentum.py's; the rest is the step engine's through the two-pass API (two_pass.py).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..engine.momentum import MomentumPerturbation
from .checks import split_rho
from .two_pass import SharpnessAwareOptimizer


class MSAM(SharpnessAwareOptimizer):
    """Momentum SAM around SGD with momentum, Adam or AdamW: SAM's perturbation at the cost of one
    gradient per step.

    Usage (one forward-backward; first_step before it):

        opt.first_step()                 # x <- x_t - rho b / ||b||
        loss_fn(model(x), y).backward()  # the gradient at the perturbed point
        opt.second_step(zero_grad=True)  # x_t back and the base step with that gradient, in one pass

    or opt.step(closure) with a closure that computes the loss and its gradient (called once).

    Args:
        rho: perturbation radius (per group: a 'rho' key), or a callable step -> rho.
        perturb: per param group (default True): False leaves it unperturbed (subset perturbation).

    The others as for SAM (backend, nonfinite, start_step, max_grad_norm, capturable, the base
    optimizer's options). SGD needs momentum > 0 (its buffer is the direction).
    """

    def __init__(self, params=None, base_optimizer=torch.optim.SGD, rho=0.3, backend: str = "auto",
                 nonfinite: str = "skip", start_step: int = 0, max_grad_norm=None, capturable: bool = False,
                 **base_kwargs):
        rho, rho_fn = split_rho(rho)
        self.perturbation = MomentumPerturbation()
        defaults = dict(rho=rho, perturb=True)
        super().__init__(params, base_optimizer, defaults, backend, nonfinite, base_kwargs, start_step, rho_fn,
                         max_grad_norm, capturable)
        self.perturbation.direction_key(self.base_optimizer)  # a base without a fused momentum fails here

    def _check_group(self, group: dict, where: str) -> None:
        super()._check_group(group, where)
        if isinstance(self.base_optimizer, torch.optim.SGD) and group.get("momentum", 0) == 0:
            raise ValueError(f"MSAM: {where}['momentum'] is {group.get('momentum', 0)!r}: MSAM perturbs along "
                             "SGD's momentum buffer, so it needs momentum > 0")

    # first_step is SAM's (two_pass.py) with these two: before the forward, no gradient needed; the
    # parameters whose momentum buffer exists (none on the first step: e_0 = 0)

    def _first_key(self):
        engine, direction = self.engine, (self.perturbation.direction_key(self.base_optimizer),)
        return lambda: engine.key(engine.state_key(direction))  # where the buffers are, fused base or not

    def _first_work(self, where: str):
        return self.perturbation.work(self.engine)

    def step_kind(self) -> str:
        """"momentum" when a SAM step is due (first_step before the one forward-backward, then
        second_step), else "base" (before start_step: backward, base_step)."""
        return "momentum" if self.sam_step_due else "base"

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, grad_scaler=None):
        """One step with `closure` (computes the loss and its gradient; called once, at the
        perturbed point): first_step, closure(), second_step. Returns the closure's loss."""
        if closure is None:
            if self._pending is not None or self._plain_pending:  # after first_step and the backward
                self.second_step(grad_scaler=grad_scaler)
                return None
            if self._lr_zero(self.param_groups):
                self._init_state_for_checkpoint()
                return None
            raise ValueError("MSAM.step needs a closure that computes the loss and gradients "
                             "(or use first_step / second_step)")
        return self._perturbed_step(closure, grad_scaler)

    def memory_report(self) -> dict:
        """Bytes held by the optimizer: `perturbation` 0 (no copy: the move is recomputed) and
        `base_state` (the base optimizer's tensors, whose momentum is the direction)."""
        return {"perturbation": 0, "base_state": self._base_state_bytes()}
