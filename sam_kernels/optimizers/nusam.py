"""nuSAM and nuSAM-Norm (ALGORITHMS.md, "nuSAM"; seed 002, Algorithms 1-2 and appendix C.1).

Only weight matrices M_i are perturbed, by a rank-1 term along the top singular pair of their
gradient (warm-started power iteration), and the update removes it by recomputing it: the
perturbation costs a few vectors per matrix instead of a copy of the weights. The strategy and
its first pass are engine/rank1.py's; the rest is the step engine's through the two-pass API.
"""
from __future__ import annotations

import torch

from ..engine.rank1 import CONV, Rank1Perturbation
from ..integrations.distributed import Shard, is_dtensor
from .checks import check_nonneg, split_rho
from .two_pass import SharpnessAwareOptimizer


class NuSAM(SharpnessAwareOptimizer):
    """Memory-efficient SAM with nuclear-norm (rank-1) perturbations of the weight matrices.

    Args:
        params, base_optimizer, backend, nonfinite, max_grad_norm, **base_kwargs: as for sam_kernels.SAM.
        rho: radius of the rank-1 perturbation of each matrix (nuclear norm), per group.
        power_iters: power iterations T per step (1 in the paper).
        normalized: nuSAM-Norm: scale layer i by sigma_i / sqrt(sum_j sigma_j^2).
        conv: "skip" (conv kernels are not perturbed, as in the paper) or "reshape" (treated as
            (out, in * kh * kw) matrices).
        seed: the left vectors u_i start as normalized N(0, I) draws from torch.Generator(seed),
            in parameter order, on the CPU (so the start is the same on every device).
        tau: the guard of the power iteration's divisions (1e-12).
        start_step: plain base steps before it (perturbation delay). Those steps move one gradient
            and do not run the power iteration: the first SAM step starts from the seeded vectors
            (raise power_iters if one iteration from a random start is too rough for you).

    rho may be a callable step -> rho, as for SAM.
    """

    def __init__(self, params=None, base_optimizer=torch.optim.AdamW, rho: float = 0.1, power_iters: int = 1,
                 normalized: bool = False, conv: str = "skip", backend: str = "auto", nonfinite: str = "skip",
                 seed: int = 0, tau: float = 1e-12, start_step: int = 0, max_grad_norm=None, capturable: bool = False,
                 **base_kwargs):
        rho, rho_fn = split_rho(rho)
        check_nonneg("tau", tau)
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
            raise ValueError(f"power_iters must be an integer >= 1, got {power_iters!r}")
        if conv not in CONV:
            raise ValueError(f"conv must be one of {CONV}, got {conv!r}")
        # before the groups are checked: _check_group reads which parameters are matrices
        self.perturbation = Rank1Perturbation(conv, power_iters, float(tau), seed)
        defaults = dict(rho=rho, normalized=bool(normalized), perturb=True)
        super().__init__(params, base_optimizer, defaults, backend, nonfinite, base_kwargs, start_step, rho_fn,
                         max_grad_norm, capturable)
        gen = torch.Generator().manual_seed(seed)
        for group in self.param_groups:
            self.perturbation.init_warm_starts(group["params"], gen)

    power_iters = property(lambda self: self.perturbation.power_iters,
                           lambda self, v: setattr(self.perturbation, "power_iters", v))
    tau = property(lambda self: self.perturbation.tau, lambda self, v: setattr(self.perturbation, "tau", v))
    conv = property(lambda self: self.perturbation.conv)
    seed = property(lambda self: self.perturbation.seed)
    vectors = property(lambda self: self.perturbation.vectors)

    def _check_group(self, group: dict, where: str) -> None:
        super()._check_group(group, where)
        for j, p in enumerate(group["params"]):
            matrix = self.perturbation.is_matrix(p)
            if is_dtensor(p) and matrix and tuple(p.placements) != (Shard(0),):
                raise NotImplementedError(
                    f"NuSAM: {where}['params'][{j}] is sharded as {p.placements}: the power iteration on sharded "
                    "matrices takes their rows sharded (Shard(0), what FSDP2's fully_shard makes)")
            if matrix and not p.is_contiguous():
                raise ValueError(f"NuSAM perturbs matrices in place: {where}['params'][{j}] of shape "
                                 f"{tuple(p.shape)} must be contiguous")

    def _group_added(self, group: dict) -> None:
        """A group added later draws its u from torch.Generator(seed + its index)."""
        self.perturbation.init_warm_starts(group["params"], torch.Generator().manual_seed(
            self.perturbation.seed + len(self.param_groups) - 1))

    # --- state -----------------------------------------------------------------------------

    def memory_report(self) -> dict:
        """Bytes held: `perturbation` (u, v and u's candidate: sum(2n + m) fp32 values) and
        `base_state` (the base optimizer's tensors)."""
        return {"perturbation": self.perturbation.nbytes(), "base_state": self._base_state_bytes()}

    def _params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    def _extra_state(self) -> dict:
        """The warm-start vectors u_i, in parameter order: a resumed run continues bit for bit."""
        return self.perturbation.state(self._params())

    def _check_extra_state(self, extra: dict) -> None:
        self.perturbation.check_state(self._params(), extra)

    def _load_extra_state(self, extra: dict) -> None:
        self.perturbation.load_state(self._params(), extra)
