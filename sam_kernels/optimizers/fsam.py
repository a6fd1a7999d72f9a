"""F-SAM, friendly SAM (ALGORITHMS.md, "F-SAM"; Li et al., CVPR 2024): the perturbation along the
first gradient without its full-gradient part, estimated by an EMA of the first gradients:

    g = grad f(x_t)                                 in .grad at first_step()
    d = g - sigma m_{t-1}  (d = g on the first step)
    x~ = x_t + rho T^2 d / (||T d|| + eps)          first_step(), SAM's (ASAM's T when adaptive)
    x_t restored, base step with grad f(x~)         second_step(), SAM's
    m_t = lambda m_{t-1} + (1 - lambda) g  (m_1 = g), kept only if the step is taken

The direction is engine/directions.py's FriendlyDirection; m is the optimizer's own state
(state[p]["fsam_m"], saved in state_dict() beside the base optimizer's state).
"""
from __future__ import annotations

import torch

from ..engine.directions import FriendlyDirection
from ..engine.perturbations import Copies, CopyPerturbation
from ..integrations import distributed
from .gsam import _check_real
from .sam import SAM


class FSAM(SAM):
    """Friendly SAM around any torch.optim optimizer (two passes per step, as SAM).

    Args:
        sigma: the weight of the full-gradient estimate removed from g (paper default 1).
        lam: lambda, the decay of the EMA m of the first gradients (paper default 0.9).

    The others as for SAM (rho, adaptive, backend, nonfinite, start_step, max_grad_norm,
    perturb per group, capturable, the base optimizer's options).
    """

    _own_state_keys = (FriendlyDirection.KEY,)

    def __init__(self, params=None, base_optimizer=torch.optim.SGD, rho=0.05, sigma: float = 1.0, lam: float = 0.9,
                 **kwargs):
        lam = _check_real("lam", lam)
        if not 0.0 <= lam < 1.0:
            raise ValueError(f"lam must be in [0, 1), got {lam!r}")
        self.direction = FriendlyDirection(self, _check_real("sigma", sigma), lam)
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def _perturbation(self) -> CopyPerturbation:
        return CopyPerturbation(Copies(self), self.direction)

    sigma = property(lambda self: self.direction.sigma)
    lam = property(lambda self: self.direction.lam)

    def _first_key(self):
        engine, state = self.engine, self.state
        return lambda: engine.key(engine.state_key((FriendlyDirection.KEY,), state))  # where the m buffers are

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """SAM's; m is kept unscaled, so a GradScaler given here must have been given to
        first_step() too (else x_t is put back and a ValueError says so)."""
        first = self._pending
        if first is not None and grad_scaler is not None and grad_scaler.is_enabled() and first.scale is None:
            self.restore()
            raise ValueError("FSAM.second_step(grad_scaler=...): pass the GradScaler to first_step() too (F-SAM keeps "
                             "its average of the first gradients unscaled); the step was not taken")
        super().second_step(zero_grad, grad_scaler)

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), **self.direction.state()}

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self.direction.load_state(extra)

    def memory_report(self) -> dict:
        """As SAM's, plus `ema` (m, kept across steps) and `direction` (the d buffers of a step)."""
        ema = sum(distributed.nbytes(st[FriendlyDirection.KEY]) for st in self.state.values()
                  if FriendlyDirection.KEY in st)
        return {**super().memory_report(), "ema": ema, "direction": self.direction.nbytes(self.engine.cached("first"))}
