"""The two-pass API of the SAM family (SAM, ASAM, GaussSAM, PSAM, NuSAM): the caller computes both
gradients, the optimizer runs the passes between them on the step engine:

    first_step    plan "first"   the perturbation strategy's first pass (engine/perturbations.py,
                                 engine/rank1.py): it moves x to x~ and says what the update
                                 restores each parameter from
    second_step   plan "second"  the guard, then the fused base update restoring x_t
                                 (engine/updates.py)
    base_step     plan "base"    the guard, then the fused base update from x itself
    step(closure)                both, the closure computing the gradients (two forms, docs/guides/training-loops.md)
"""
from __future__ import annotations

from typing import Callable

import torch

from ..engine.flags import check_scaler
from ..engine.updates import build_update, plain_sources
from ..ops.lists import GradsOf
from .base import EngineOptimizer


class SharpnessAwareOptimizer(EngineOptimizer):
    """Subclasses give a perturbation strategy (self.perturbation: build(engine, work, device) ->
    a first pass with perturb / sources / restore_left / prelude / commit / hand_over / undo / first_norm /
    params; prelude and commit take (engine, the parameters with a second gradient, device)).

    Subset perturbation (SAM-ON, ALGORITHMS.md "Subset perturbation"): a param group with
    perturb=False is not perturbed (no x_old, no perturb / restore traffic, not in the norm) and
    takes the base step with its gradient at the perturbed point; sam_kernels.sam_on_groups(model)
    builds SAM-ON's groups (the normalization layers' affine parameters perturbed)."""

    perturbation = None  # set by the subclass before EngineOptimizer.__init__ checks the groups

    def __init__(self, *args, **kwargs):
        self._pending = None  # the first pass between first_step() and second_step()
        self._plain_pending = False  # first_step() found no SAM step due: second_step() is a base step
        super().__init__(*args, group_key=self.perturbation.group_key, **kwargs)

    def _check_group(self, group: dict, where: str) -> None:
        super()._check_group(group, where)
        if not isinstance(group.get("perturb", True), bool):
            raise TypeError(f"{where}['perturb'] must be True or False (perturb this group's parameters in the "
                            f"first pass, or only update them), got {group['perturb']!r}")

    # --- the steps ---------------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """Perturb the weights along the gradient in .grad, if a SAM step is due (else nothing:
        second_step() will then take a plain base step). With a GradScaler the gradient is scaled:
        the perturbation only uses its direction, and an inf / NaN skips the step in second_step()."""
        name, engine = type(self).__name__, self.engine
        check_scaler(grad_scaler)
        if self._plain_pending or self._pending is not None:
            raise RuntimeError(f"{name}.first_step() called twice: call second_step() or restore() in between")
        check_scaler(grad_scaler, self, f"{name}.first_step(): scaler.unscale_(optimizer) was called before the "
                                        "first step; call it after the second backward, before second_step()")
        if not engine.sam_step_due:
            self._plain_pending = True
            if zero_grad:
                self.zero_grad()
            return
        engine.apply_rho_schedule()
        engine.begin(f"{name}.first_step")
        first = engine.plan("first", self._first_key(), lambda: self.perturbation.build(
            engine, *self._first_work(f"{name}.first_step()")))
        first.perturb(engine.nonfinite == "raise", engine.scaler_scale(grad_scaler))
        self._pending = first
        if zero_grad:
            self.zero_grad()

    def _first_key(self):
        """The first plan's key (a function): what the perturbation binds."""
        return self.engine.key

    def _first_work(self, where: str):
        """[(group, params the first pass reads)] and their device: those with a gradient."""
        return self.engine.work(where, need_grad=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """Restore x_t and take the base step with the gradient at the perturbed point (after a
        first_step() that found no SAM step due: a plain base step with the gradient in .grad).
        grad_scaler: the torch.amp.GradScaler that scaled both losses; the gradient is unscaled
        inside the fused update (or was, by scaler.unscale_(optimizer) before this call), and the
        scaler gets the step's device flag, so that scaler.update() backs off after an inf / NaN
        in either pass, as after scaler.step(optimizer)."""
        name, engine = type(self).__name__, self.engine
        check_scaler(grad_scaler)
        if self._plain_pending:
            self._plain_pending = False
            self.base_step(zero_grad, grad_scaler)
            return
        first = self._pending
        if first is None:
            raise RuntimeError(f"{name}.second_step() called without first_step()")
        self._pending = None
        try:
            engine.begin(f"{name}.second_step")
            plan = engine.plan("second", lambda: engine.key(first, update=True),
                               lambda: self._build_second(first, *engine.work(f"{name}.second_step()")))
            engine.record_step()
            engine.finish(plan, first.first_norm, grad_scaler, first, f"{name}.second_step")
        except BaseException:
            first.undo()  # x_t back unless the update consumed the perturbation already
            raise
        if zero_grad:
            self.zero_grad()

    def _build_second(self, first, work, device):
        """The update restoring each parameter from what `first` kept, with the guard over the
        second gradients; x_t back for perturbed parameters without one; the first pass's commit."""
        params = [p for _, ps in work for p in ps]
        grads = GradsOf(params)
        with_grad = {id(p) for p in params}
        return build_update(self.engine, work, device, first.sources,
                            [(grads, None, 0, 0.0)] if len(grads) else [],
                            restores=[first.restore_left([p for p in first.params if id(p) not in with_grad])],
                            commits=[first.commit(self.engine, params, device)], generic_grads=grads,
                            preludes=[first.prelude(self.engine, params, device)])

    @torch.no_grad()
    def base_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """A plain base-optimizer step with the gradient in .grad (one gradient, no perturbation),
        for the steps where no SAM step is due. The same non-finite and GradScaler handling as a
        SAM step."""
        name, engine = type(self).__name__, self.engine
        check_scaler(grad_scaler)
        if self._pending is not None:
            raise RuntimeError(f"{name}.base_step() between first_step() and second_step(): the weights are perturbed")
        self._plain_pending = False
        engine.begin(f"{name}.base_step")
        plan = engine.plan(*self._base_plan(f"{name}.base_step()"))
        engine.record_step()
        engine.finish(plan, None, grad_scaler, None, f"{name}.base_step")
        if zero_grad:
            self.zero_grad()

    def _base_plan(self, where: str):
        """(pass name, key, build) of the step without a perturbation (LookSAM's: its reuse step)."""
        engine = self.engine
        return "base", lambda: engine.key(update=True), lambda: self._build_base(*engine.work(where))

    def _build_base(self, work, device):
        grads = GradsOf([p for _, ps in work for p in ps])
        return build_update(self.engine, work, device, plain_sources(GradsOf),
                            [(grads, None, 0, 0.0)] if len(grads) else [], generic_grads=grads)

    @torch.no_grad()
    def restore(self) -> None:
        """Put x_t back after first_step() without updating (bit for bit for SAM)."""
        self._plain_pending = False
        if self._pending is not None:
            first, self._pending = self._pending, None
            first.undo()

    _before_load = restore

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, grad_scaler=None):
        """One step with `closure`, which computes the loss at the current weights and its gradient
        (forward + backward; zeroing .grad first or not) and returns the loss. Two forms:

        - the first gradient is in .grad already (davda54/sam's form: loss.backward(), then
          step(closure)): perturb, closure() at the perturbed point, restore, update; returns that
          loss (the closure's only call);
        - no parameter has a gradient (torch's closure convention, as LBFGS, Lightning's automatic
          optimization and Composer call step(closure)): closure() at x_t for the first gradient,
          then the step above; returns the loss at x_t (the first call), as torch's optimizers do.

        Either way the step leaves .grad empty (None), so the next call sees no gradient until one
        is computed. When no SAM step is due (sam_step_due): a plain base step with the first
        gradient (the first form does not call the closure and returns None).

        Without a closure (what trainers call: HF's Trainer through sam_kernels.integrations.hf,
        Accelerate's wrapper): after first_step() (the second gradient computed by the caller), the
        step's second_step(); when no SAM step is due, a base step with the gradient in .grad."""
        if closure is None:
            if self._pending is not None or self._plain_pending:
                self.second_step(grad_scaler=grad_scaler)
                return None
            if not self.sam_step_due and any(p.grad is not None for p in self.engine.param_list()):
                self.base_step(grad_scaler=grad_scaler)
                return None
            if self._lr_zero(self.param_groups):
                self._init_state_for_checkpoint()
                return None
            raise ValueError(f"{type(self).__name__}.step needs a closure that recomputes the loss and gradients "
                             "(or use first_step / second_step; step() without one completes a first_step())")
        given = any(p.grad is not None for p in self.engine.param_list())
        first_loss = None
        if not given:
            with torch.enable_grad():
                first_loss = closure()
        if not self.sam_step_due:
            self.base_step(zero_grad=True, grad_scaler=grad_scaler)
            return first_loss
        loss = self._perturbed_step(closure, grad_scaler)
        return loss if given else first_loss

    def _perturbed_step(self, closure, grad_scaler):
        """first_step, closure() at the perturbed point (x_t back if it raises), second_step: its loss."""
        self.first_step(zero_grad=True, grad_scaler=grad_scaler)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step(zero_grad=True, grad_scaler=grad_scaler)
        return loss

    # --- copies ------------------------------------------------------------------------------

    def _transient(self) -> tuple:
        return ("_pending",)

    def _copy_refused(self) -> str | None:
        if self._pending is not None:
            return (f"{type(self).__name__} cannot be copied between first_step() and second_step(): "
                    "the weights are perturbed")
        return None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._pending = None
