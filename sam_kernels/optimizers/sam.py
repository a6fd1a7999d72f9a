"""SAM and ASAM (ALGORITHMS.md, "SAM"), drop-in for the widely used PyTorch SAM.

    g = grad f(x_t)                       (in .grad when first_step() is called)
    e = rho T^2 g / (||T g|| + eps)       T = |x| + offset for ASAM, 1 for SAM; one global norm
    x~ = x_t + e                          first_step(): x_t is kept, the perturbation is in place
    g~ = grad f(x~)                       the caller's second forward / backward (or the closure)
    x_t restored, base step with g~       second_step(): one fused pass for SGD and Adam / AdamW

The perturbation is engine/perturbations.py's CopyPerturbation along the gradient; the rest is the
step engine's (sam_kernels/engine/) through the two-pass API (two_pass.py).
"""
from __future__ import annotations

import torch

from ..engine.perturbations import CopyPerturbation, Copies
from ..integrations import distributed
from .checks import check_nonneg, split_rho
from .two_pass import SharpnessAwareOptimizer


class SAM(SharpnessAwareOptimizer):
    """Sharpness-aware minimization around any torch.optim optimizer.

    Args:
        params: parameters or param groups (may be None when base_optimizer is an instance).
        base_optimizer: a torch.optim.Optimizer subclass (built with base_kwargs on SAM's param
            groups) or an instance (SAM then shares its param groups).
        rho: perturbation radius (per group: a 'rho' key in a param group), or a callable
            step -> rho applied to every group when a SAM step starts.
        adaptive: ASAM, e = rho T^2 g / ||T g|| with T = |x| + adaptive_offset.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (see sam_kernels.backends).
        nonfinite: "skip" (default): a NaN / inf in either gradient skips the step, decided on the
            device: the weights are restored bit for bit, the state does not move, skipped_steps
            grows; "raise": FloatingPointError instead (this reads the decision on the host).
        start_step: plain base steps before this step (perturbation delay), SAM steps from it on.
        max_grad_norm: clip the gradient of the base update to this global norm (None: no clipping).
        perturb: per param group (default True): False leaves the group's parameters unperturbed
            (SAM-ON's subset: sam_kernels.sam_on_groups); the norm is over the perturbed ones.
        capturable: lr and rho live on the device too, so that a step can be captured in a CUDA
            graph (sam_kernels/engine/scalars.py; sam_kernels.make_graphed_step captures whole steps).
    """

    def __init__(self, params=None, base_optimizer=torch.optim.SGD, rho=0.05, adaptive: bool = False,
                 backend: str = "auto", nonfinite: str = "skip", adaptive_offset: float = 0.0, start_step: int = 0,
                 max_grad_norm=None, capturable: bool = False, **base_kwargs):
        rho, rho_fn = split_rho(rho)
        check_nonneg("adaptive_offset", adaptive_offset)
        self.perturbation = self._perturbation()
        defaults = dict(rho=rho, adaptive=bool(adaptive), adaptive_offset=float(adaptive_offset), perturb=True)
        super().__init__(params, base_optimizer, defaults, backend, nonfinite, base_kwargs, start_step, rho_fn,
                         max_grad_norm, capturable)

    def _perturbation(self) -> CopyPerturbation:
        """Along the gradient, restored from a copy in this optimizer's state (state[p]["old_p"])."""
        return CopyPerturbation(Copies(self))

    def memory_report(self) -> dict:
        """Bytes held by the optimizer: `perturbation` (SAM's x_old buffers, one copy of the
        perturbed parameters) and `base_state` (the base optimizer's tensors)."""
        return {"perturbation": self.perturbation.copies.nbytes(distributed.nbytes),
                "base_state": self._base_state_bytes()}
