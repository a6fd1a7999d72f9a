"""PSAM, parsimonious SAM (ALGORITHMS.md, "PSAM"; seed 003, Algorithm 1): before step
`dense_from`, a SAM step every `period` steps and plain base steps otherwise; from `dense_from`
on, a SAM step every step. A plain step calls no closure: over T steps the gradient count is
T + (T - E) + ceil(E / n), not 2T."""
from __future__ import annotations

import torch

from .base import check_step
from .sam import SAM


class PSAM(SAM):
    """SAM on a parsimonious schedule; everything else is SAM's (fused kernels, failure handling).

    Args:
        period: n, the spacing of SAM steps before dense_from (step t is a SAM step when t % n == 0).
        dense_from: E, the step from which every step is a SAM step (None: never).
        start_step: plain base steps before it, whatever the schedule says.
        The others as for SAM. With step(closure) the closure runs only on SAM steps; two-step users
        read `sam_step_due` and call `base_step()` on the other steps (or call first_step() /
        second_step() anyway: first_step() then perturbs nothing and second_step() is a base step).
    """

    def __init__(self, params=None, base_optimizer=torch.optim.SGD, rho=0.05, period: int = 20,
                 dense_from: int | None = None, **kwargs):
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an integer >= 1, got {period!r}")
        if dense_from is not None:
            check_step("dense_from", dense_from)
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.period, self.dense_from = period, dense_from

    @property
    def sam_step_due(self) -> bool:
        t = self._t
        if t < self.start_step:
            return False
        if self.dense_from is not None and t >= self.dense_from:
            return True
        return t % self.period == 0
