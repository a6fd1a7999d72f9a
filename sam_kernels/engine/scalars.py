"""capturable=True (torch's meaning): every per-step quantity of a step lives on the device, so
first_step / second_step / base_step can be captured in a CUDA graph and replayed.

What a step reads that can change between steps is on the device already on every path (the
found-inf flag, skipped_steps and the gradient multiplier: engine/flags.py; Adam's step counters:
engine/counters.py; the GradScaler's scale and found-inf). What is a host number in an eager
step is made a device scalar here: each param group's lr and rho (DeviceScalars), which the
kernels read when they run (csrc/table.cpp `launch_op`, ops/triton/_tables.host_or_device).
An eager capturable step writes the groups' current values into them first (one non-blocking
copy); a captured step does not (its copy would replay the values of the capture): the graphed
step (sam_kernels/integrations/graphs.py) writes them before each replay, so an lr scheduler or a
rho schedule takes effect on the next replay, as in eager mode.

Everything else a step reads is fixed at capture (momentum, betas, eps, weight decay, lam, the
parameters, gradients and state): the engine raises when a plan would have to be rebuilt under
capture (StepEngine.plan), and graphs.py when an option changed after it.
"""
from __future__ import annotations

import math

import torch

COLUMNS = ("lr", "rho")


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class DeviceScalars:
    """lr and rho of every param group as fp32 device scalars: views of one [groups, 2] tensor
    whose address the step plans (and a graph) keep."""

    def __init__(self, groups: list, device: torch.device):
        self.values = torch.zeros(len(groups), len(COLUMNS), dtype=torch.float32, device=device)
        self._rows = {id(g): i for i, g in enumerate(groups)}
        self._groups = list(groups)
        self.device = self.values.device

    def covers(self, groups: list) -> bool:
        return len(groups) == len(self._groups) and all(a is b for a, b in zip(groups, self._groups))

    def lr(self, group: dict) -> torch.Tensor:
        return self.values[self._rows[id(group)], 0]

    def rho(self, group: dict) -> torch.Tensor:
        return self.values[self._rows[id(group)], 1]

    def rho_column(self) -> torch.Tensor:
        return self.values[:, 1]

    def row(self, group: dict) -> int:
        return self._rows[id(group)]

    def host_values(self) -> list[list[float]]:
        values = []
        for i, g in enumerate(self._groups):
            row = [g.get(k, 0.0) for k in COLUMNS]
            for k, v in zip(COLUMNS, row):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"param_groups[{i}]['{k}'] must be a finite number on a capturable "
                                     f"optimizer, got {v!r}")
            values.append([float(v) for v in row])
        return values

    def load_(self) -> None:
        """Write the groups' current lr and rho into the device scalars, without waiting for the
        device (from pinned memory on CUDA; the copy is ordered after the steps already queued)."""
        src = torch.tensor(self.host_values(), dtype=torch.float32)
        if self.device.type == "cpu":
            self.values.copy_(src)
        else:
            self.values.copy_(src.pin_memory(), non_blocking=True)
