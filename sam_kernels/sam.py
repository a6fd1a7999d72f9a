"""SAM and ASAM (ALGORITHMS.md, "SAM"), drop-in for the widely used PyTorch SAM.

    g = grad f(x_t)                       (in .grad when first_step() is called)
    e = rho T^2 g / (||T g|| + eps)       T = |x| + offset for ASAM, 1 for SAM; one global norm
    x~ = x_t + e                          first_step(): x_t is kept, the perturbation is in place
    g~ = grad f(x~)                       the caller's second forward / backward (or the closure)
    x_t restored, base step with g~       second_step(): one fused pass for SGD and Adam / AdamW

Work is batched over the whole parameter list on one of the backends of sam_kernels.ops.
"""
from __future__ import annotations

import torch

from . import ops
from ._base import SharpnessAwareOptimizer, check_nonneg, split_rho
from .fused_update import UPDATES


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
        nonfinite: "skip" (default): a NaN / inf in either gradient skips the step, the weights are
            restored bit for bit and skipped_steps grows; "raise": FloatingPointError instead.
        start_step: plain base steps before this step (perturbation delay), SAM steps from it on.
    """

    def __init__(self, params=None, base_optimizer=torch.optim.SGD, rho=0.05, adaptive: bool = False,
                 backend: str = "auto", nonfinite: str = "skip", adaptive_offset: float = 0.0, start_step: int = 0,
                 **base_kwargs):
        rho, rho_fn = split_rho(rho)
        check_nonneg("adaptive_offset", adaptive_offset)
        defaults = dict(rho=rho, adaptive=bool(adaptive), adaptive_offset=float(adaptive_offset))
        super().__init__(params, base_optimizer, defaults, backend, nonfinite, base_kwargs, start_step, rho_fn)
        self._perturbed: list[torch.Tensor] | None = None
        self._first_norm: torch.Tensor | None = None

    # --- the two steps ---------------------------------------------------------------------

    @torch.no_grad()
    def _sam_first_step(self, zero_grad: bool) -> None:
        """Perturb x in place along the gradient in .grad (no host synchronization)."""
        if self._perturbed is not None:
            raise RuntimeError("SAM.first_step() called twice: call second_step() or restore() in between")
        work = self._params_with_grad("SAM first_step")
        params = [p for _, ps in work for p in ps]
        if not params:  # nothing to perturb: second_step() is then a plain base step
            self._first_norm, self._perturbed = None, []
            if zero_grad:
                self.zero_grad()
            return
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"SAM: the parameters with gradients span devices {sorted(map(str, devices))}")
        direction = self._directions(params)
        norm = self._norm(work, direction)
        if self.nonfinite == "raise" and not bool(torch.isfinite(norm)):
            raise FloatingPointError(f"SAM.first_step: the gradient norm is {norm.item()} (NaN or inf in .grad)")
        for group, ps in work:
            if ps:
                ops.perturb_(ps, [direction[p] for p in ps], [self._old(p) for p in ps], norm, group["rho"],
                             adaptive=group["adaptive"], offset=group["adaptive_offset"], backend=self.backend)
        self._first_norm = norm
        self._perturbed = params
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def _sam_second_step(self, zero_grad: bool) -> None:
        """Restore x_t and take the base step with the gradient at the perturbed point."""
        if self._perturbed is None:
            raise RuntimeError("SAM.second_step() called without first_step()")
        self._second_step(self._first_norm, zero_grad)
        self._perturbed = None

    def _fused_step(self, kind: str, groups) -> None:
        perturbed = {id(p) for p in self._perturbed}
        for group, ps in groups:
            if ps:
                olds = [self.state[p]["old_p"] if id(p) in perturbed else p for p in ps]
                UPDATES[kind](self.base_optimizer, group, ps, olds, [p.grad for p in ps], self.backend,
                              grad_scale=self._grad_scale)
        with_grad = {id(p) for _, ps in groups for p in ps}
        self._restore([p for p in self._perturbed if id(p) not in with_grad])
        self._perturbed = None

    @torch.no_grad()
    def _sam_restore(self) -> None:
        """Put x_t back after first_step() without updating (bit for bit)."""
        if self._perturbed is not None:
            self._restore(self._perturbed)
            self._perturbed = None

    def memory_report(self) -> dict:
        """Bytes held by the optimizer: `perturbation` (SAM's x_old buffers, one copy of the
        perturbed parameters) and `base_state` (the base optimizer's tensors)."""
        perturbation = sum(st["old_p"].numel() * st["old_p"].element_size() for st in self.state.values()
                           if "old_p" in st)
        return {"perturbation": perturbation, "base_state": self._base_state_bytes()}

    def _perturbed_now(self) -> bool:
        return self._perturbed is not None

    def _old(self, p: torch.Tensor) -> torch.Tensor:
        """The x_old buffer of p, allocated once and reused (contiguous, p's dtype: a bit-exact copy)."""
        st = self.state[p]
        old = st.get("old_p")
        if old is None or old.shape != p.shape or old.dtype != p.dtype or old.get_device() != p.get_device():
            old = st["old_p"] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return old

    def _restore(self, params) -> None:
        if params:
            ops.restore_(params, [self.state[p]["old_p"] for p in params], backend=self.backend)

    def _directions(self, params) -> dict:
        """The direction each parameter is perturbed along: its gradient."""
        return {p: p.grad for p in params}

    def _norm(self, work, direction) -> torch.Tensor:
        """One global norm over every parameter with a gradient (ASAM: of T g)."""
        classes: dict[tuple, list] = {}
        for group, ps in work:
            key = (group["adaptive"], group["adaptive_offset"] if group["adaptive"] else 0.0)
            classes.setdefault(key, []).extend(ps)
        norms = [
            ops.global_norm([direction[p] for p in ps], ps if adaptive else None, offset, backend=self.backend)
            for (adaptive, offset), ps in classes.items() if ps
        ]
        return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))

