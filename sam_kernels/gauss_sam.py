"""GaussSAM, the random-direction baseline of the nuSAM paper (ALGORITHMS.md, "GaussSAM"):
e = rho z / ||z|| with z ~ N(0, I), ignoring the gradient. Everything else is SAM's (x_old
kept, fused restore + update, the same failure handling)."""
from __future__ import annotations

import torch

from .sam import SAM


class GaussSAM(SAM):
    """SAM perturbed along a normalized Gaussian direction instead of the gradient.

    generator: a torch.Generator on the parameters' device for z (None: torch's global RNG).
    """

    def __init__(self, params=None, base_optimizer=torch.optim.SGD, rho=0.05, backend: str = "auto",
                 nonfinite: str = "skip", generator: torch.Generator | None = None, start_step: int = 0,
                 **base_kwargs):
        super().__init__(params, base_optimizer, rho=rho, adaptive=False, backend=backend, nonfinite=nonfinite,
                         start_step=start_step, **base_kwargs)
        self.generator = generator

    def _directions(self, params) -> dict:
        return {p: torch.randn(p.shape, generator=self.generator, device=p.device, dtype=p.dtype) for p in params}
