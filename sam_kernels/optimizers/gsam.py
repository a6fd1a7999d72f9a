"""GSAM, surrogate-gap guided SAM (ALGORITHMS.md, "GSAM"; Zhuang et al., ICLR 2022):

    g   = grad f(x_t)                        in .grad at first_step(), kept (one copy)
    x~  = x_t + rho g / (||g|| + eps)        first_step(), SAM's (x_t kept in x_old)
    g_p = grad f(x~)                         the caller's second forward / backward
    g_perp = g - (<g, g_p> / (||g_p||^2 + eps)) g_p
    x_t restored, base step with d = g_p - alpha g_perp      second_step()

The perturbation is SAM's with engine/directions.py's KeptGradient, whose prelude writes d into
.grad on the device (a dot product, a norm, one lincomb_ launch) before the fused update;
rho may follow the learning rate (ProportionalRho, GSAM's schedule).
"""
from __future__ import annotations

import math

import torch

from ..engine.directions import KeptGradient
from ..engine.perturbations import Copies, CopyPerturbation
from .sam import SAM


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class ProportionalRho:
    """GSAM's rho schedule, rho following the learning rate of each param group:

        rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)

    a callable for `rho=` of any optimizer here (called when a SAM step starts, with the group:
    its current lr, e.g. from a torch lr scheduler). lr_max: the peak lr; None takes the group's
    "initial_lr" (set by torch's lr schedulers). A tensor lr is read on the host."""

    per_group = True  # the engine calls it with each param group (engine.apply_rho_schedule)

    def __init__(self, rho_max: float, rho_min: float = 0.0, lr_max: float | None = None, lr_min: float = 0.0):
        self.rho_max, self.rho_min = _check_real("rho_max", rho_max), _check_real("rho_min", rho_min)
        if self.rho_max < 0 or self.rho_min < 0:
            raise ValueError(f"rho_max and rho_min must be >= 0, got {rho_max!r}, {rho_min!r}")
        self.lr_max = None if lr_max is None else _check_real("lr_max", lr_max)
        self.lr_min = _check_real("lr_min", lr_min)
        if self.lr_max is not None and self.lr_max <= self.lr_min:
            raise ValueError(f"lr_max must be above lr_min, got lr_max={lr_max!r}, lr_min={lr_min!r}")

    def __call__(self, step: int, group: dict | None = None) -> float:
        if group is None:
            return self.rho_max  # (the radius a constructor checks: the schedule at the peak lr)
        lr_max = self.lr_max if self.lr_max is not None else group.get("initial_lr")
        if lr_max is None:
            raise ValueError("ProportionalRho: lr_max is None and the param group has no 'initial_lr' (set by torch's "
                             "lr schedulers): give lr_max")
        if lr_max <= self.lr_min:
            raise ValueError(f"ProportionalRho: lr_max {lr_max!r} must be above lr_min {self.lr_min!r}")
        frac = (float(group["lr"]) - self.lr_min) / (lr_max - self.lr_min)
        return self.rho_min + (self.rho_max - self.rho_min) * frac

    def __repr__(self) -> str:
        return (f"ProportionalRho(rho_max={self.rho_max}, rho_min={self.rho_min}, lr_max={self.lr_max}, "
                f"lr_min={self.lr_min})")


class GSAM(SAM):
    """Surrogate-gap guided SAM around any torch.optim optimizer (two passes per step, as SAM).

    Args:
        alpha: the weight of the surrogate-gap term (paper default 0.4; 0 is SAM); read on every
            step (opt.alpha may be changed between steps).
        rho: a number, a callable step -> rho, or ProportionalRho(...) (GSAM's schedule).

    The others as for SAM (adaptive, backend, nonfinite, start_step, max_grad_norm, perturb
    per group, capturable, the base optimizer's options).

    second_step() leaves d in .grad (as clip_grad_norm_ leaves the clipped gradient): zero it,
    or pass zero_grad=True. With subset perturbation the correction is over the perturbed
    parameters; the others take g_p.
    """

    def __init__(self, params=None, base_optimizer=torch.optim.SGD, rho=0.05, alpha: float = 0.4, **kwargs):
        self.direction = KeptGradient(_check_real("alpha", alpha))
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def _perturbation(self) -> CopyPerturbation:
        return CopyPerturbation(Copies(self), self.direction)

    @property
    def alpha(self) -> float:
        return self.direction.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.direction.alpha = _check_real("alpha", value)

    def memory_report(self) -> dict:
        """As SAM's, plus `kept_gradient`: the copy of g of the perturbed parameters."""
        return {**super().memory_report(), "kept_gradient": self.direction.nbytes(self.engine.cached("first"))}


__all__ = ["GSAM", "ProportionalRho"]
