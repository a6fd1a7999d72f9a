"""SAM and ASAM (ALGORITHMS.md, "SAM"), drop-in for the widely used PyTorch SAM.

    g = grad f(x_t)                       (in .grad when first_step() is called)
    e = rho T^2 g / (||T g|| + eps)       T = |x| + offset for ASAM, 1 for SAM; one global norm
    x~ = x_t + e                          first_step(): x_t is kept, the perturbation is in place
    g~ = grad f(x~)                       the caller's second forward / backward (or the closure)
    x_t restored, base step with g~       second_step(): one fused pass for SGD and Adam / AdamW

The first pass is a plan (SamPlan) built once: the norm's tables, one perturb launch per param
group, the x_old buffers; the second pass is the shared one of _base.py.
"""
from __future__ import annotations

import torch

from .. import ops
from ..engine.pipeline import NormStage
from ..integrations import distributed
from ..ops.lists import GradsOf
from .base import SharpnessAwareOptimizer, check_nonneg, split_rho


class SamPlan:
    """The first pass of SAM / ASAM / GaussSAM over [(group, params with a gradient)]: the global
    norm of the directions into a device scalar (a non-finite one leaves the weights where they
    are and is the first gradient's check, `prior`), then x_old <- x, x <- x + e per group."""

    def __init__(self, opt: "SAM", work, device):
        self.params = [p for _, ps in work for p in ps]
        self.active = False  # perturbed and not yet restored or updated
        backend = opt._backend(device, "perturb_")
        self.olds = {id(p): opt._old(p) for p in self.params}
        olds = [self.olds[id(p)] for p in self.params]
        directions = opt._directions(self, work, device)
        classes: dict[tuple, list] = {}
        for group, ps in work:
            if ps:
                key = (group["adaptive"], group["adaptive_offset"] if group["adaptive"] else 0.0)
                classes.setdefault(key, []).extend(ps)
        self.norm = NormStage(opt._backend(device, "global_norm"), device,
                              [(directions(xs), xs if adaptive else None, int(adaptive), offset)
                               for (adaptive, offset), xs in classes.items()], group=opt._reduce_group())
        self.norm_out = self.norm.out()
        self.prior = self.norm_out
        self._rho = lambda group: opt._rho(group, device)  # a number, or a device scalar (capturable)
        self.perturbs = [(group, ops.bind("perturb_", backend, device,
                                          {"params": ps, "grads": directions(ps),
                                           "olds": [self.olds[id(p)] for p in ps]}))
                         for group, ps in work if ps]
        self._restore = ops.bind("restore_", backend, device, {"params": self.params, "olds": olds}) \
            if self.params else None
        self._backend, self._device = backend, device

    def perturb(self, norm_done: bool = False) -> None:
        if not norm_done:
            self.norm.norm(self.norm_out)
        for group, run in self.perturbs:
            run(norm=self.norm_out, rho=self._rho(group), adaptive=group["adaptive"], offset=group["adaptive_offset"])
        self.active = True

    def old_of(self, p):
        return self.olds.get(id(p), p)

    def rank1_of(self, p):
        return None

    def restore_left(self, params):
        if not params:
            return None
        run = ops.bind("restore_", self._backend, self._device,
                       {"params": params, "olds": [self.olds[id(p)] for p in params]})
        return lambda flags: run()

    def commit(self):
        return None

    def undo(self) -> None:
        if self.active and self._restore is not None:
            self._restore()
        self.active = False


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
        capturable: lr and rho live on the device too, so that a step can be captured in a CUDA
            graph (sam_kernels/capturable.py; sam_kernels.make_graphed_step captures whole steps).
    """

    def __init__(self, params=None, base_optimizer=torch.optim.SGD, rho=0.05, adaptive: bool = False,
                 backend: str = "auto", nonfinite: str = "skip", adaptive_offset: float = 0.0, start_step: int = 0,
                 max_grad_norm=None, capturable: bool = False, **base_kwargs):
        rho, rho_fn = split_rho(rho)
        check_nonneg("adaptive_offset", adaptive_offset)
        defaults = dict(rho=rho, adaptive=bool(adaptive), adaptive_offset=float(adaptive_offset))
        super().__init__(params, base_optimizer, defaults, backend, nonfinite, base_kwargs, start_step, rho_fn,
                         max_grad_norm, capturable)

    def _group_key(self, group: dict) -> tuple:
        return (group["adaptive"], group["adaptive_offset"])

    def _build_first(self, work, device) -> SamPlan:
        return SamPlan(self, work, device)

    def _perturb(self, plan: SamPlan) -> None:
        if self.nonfinite == "raise":
            plan.norm.norm(plan.norm_out)
            if not bool(torch.isfinite(plan.norm_out)):  # raise mode must know: a synchronization
                raise FloatingPointError(f"{type(self).__name__}.first_step: the gradient norm is "
                                         f"{plan.norm_out.item()} (NaN or inf in .grad)")
        plan.perturb(norm_done=self.nonfinite == "raise")

    def _directions(self, plan, work, device):
        """of(params): the directions params are perturbed along, their gradients (GradsOf: read
        when used, never kept by the plan)."""
        return GradsOf

    def memory_report(self) -> dict:
        """Bytes held by the optimizer: `perturbation` (SAM's x_old buffers, one copy of the
        perturbed parameters) and `base_state` (the base optimizer's tensors)."""
        perturbation = sum(distributed.nbytes(st["old_p"]) for st in self.state.values() if "old_p" in st)
        return {"perturbation": perturbation, "base_state": self._base_state_bytes()}

    def _old(self, p: torch.Tensor) -> torch.Tensor:
        """The x_old buffer of p, allocated once and reused (contiguous, p's dtype: a bit-exact copy)."""
        st = self.state[p]
        old = st.get("old_p")
        if old is None or old.shape != p.shape or old.dtype != p.dtype or old.get_device() != p.get_device():
            old = st["old_p"] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return old
