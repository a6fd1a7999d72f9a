"""PSAM, parsimonious SAM (ALGORITHMS.md, "PSAM"; seed 003, Algorithm 1): before step
`dense_from`, a SAM step every `period` steps and plain base steps otherwise; from `dense_from`
on, a SAM step every step. A plain step calls no closure: over T steps the gradient count is
T + (T - E) + ceil(E / n), not 2T. PSAM is SAM with this schedule (engine/engine.py, Schedule)."""
from __future__ import annotations

import torch

from ..engine.engine import Schedule
from .checks import check_step
from .sam import SAM


class ParsimoniousSchedule(Schedule):
    """A SAM step at t when t % period == 0, or t >= dense_from; none before start_step."""

    def __init__(self, start_step: int, period: int, dense_from: int | None):
        super().__init__(start_step)
        self.period, self.dense_from = period, dense_from

    def due(self, t: int) -> bool:
        if t < self.start_step:
            return False
        if self.dense_from is not None and t >= self.dense_from:
            return True
        return t % self.period == 0


class PSAM(SAM):
    """SAM on a parsimonious schedule; everything else is SAM's (fused kernels, failure handling).

    Args:
        period: n, the spacing of SAM steps before dense_from (step t is a SAM step when t % n == 0).
        dense_from: E, the step from which every step is a SAM step (None: never).
        start_step: plain base steps before it, whatever the schedule says.

    The others as for SAM. With step(closure) the closure runs only on SAM steps (in the form
    where the first gradient is given); two-step users read `sam_step_due` and call
    `base_step()` on the other steps (or call first_step() / second_step() anyway:
    first_step() then perturbs nothing and second_step() is a base step).
    """

    def __init__(self, params=None, base_optimizer=torch.optim.SGD, rho=0.05, period: int = 20,
                 dense_from: int | None = None, start_step: int = 0, **kwargs):
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an integer >= 1, got {period!r}")
        if dense_from is not None:
            check_step("dense_from", dense_from)
        self._schedule_args = (period, dense_from)  # what _make_schedule builds the engine's schedule from
        super().__init__(params, base_optimizer, rho=rho, start_step=start_step, **kwargs)
        del self._schedule_args

    def _make_schedule(self, start_step: int) -> ParsimoniousSchedule:
        return ParsimoniousSchedule(start_step, *self._schedule_args)

    period = property(lambda self: self.engine.schedule.period)
    dense_from = property(lambda self: self.engine.schedule.dense_from)
