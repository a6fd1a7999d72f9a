"""make_graphed_step: a whole sharpness-aware training step (zero_grad, both forward-backward
passes with the BatchNorm policy of sam_kernels/integrations/batchnorm.py, the optimizer) captured once as a
CUDA graph and replayed, so that the host no longer sets the pace of small and mid-size models.

    step = sam_kernels.make_graphed_step(model, loss_fn, opt, example_batch)   # opt capturable
    for batch in loader:
        loss = step(batch)        # a device tensor: no synchronization

How a call runs (GraphedStep.__call__):
  - the batch is checked against the example (structure, shapes, dtypes, devices) before anything
    changes; then, per kind of step (optimizer.step_kind(): a SAM step, MSAM's one-gradient SAM
    step, LookSAM's reuse step or, for PSAM and before start_step, a plain base step, chosen on
    the host from the optimizer's step counter):
  - the first `warmup` calls of a kind are eager steps on a side stream (they build the step
    plans, the optimizer state and the gradients, which keep their addresses from then on:
    zero_grad(set_to_none=False));
  - the next call captures the step into a graph (capture records and does not run it) and
    replays it; every later call copies the batch into the graph's static inputs, writes the
    param groups' lr and rho into the optimizer's device scalars (sam_kernels/engine/scalars.py: an
    lr scheduler or a rho schedule takes effect on the next replay) and replays;
  - the host-side bookkeeping of a step (the step counter, the scheduler's `_opt_called`, the
    GradScaler's record of the step's found-inf flag and its update()) is done after each replay.
Each call is a real training step on its batch: eager, warm-up and graphed steps give the same
weights and state (to fp32 rounding; bit for bit where the kernels are the same).

SAMPa's whole step (the fused preview, both forward-backward passes, the fused update) is one
graph too; the previous batch, which SAMPa's x~-pass reads, is kept in a second set of static
inputs that the graph itself refreshes.

Without CUDA (CPU parameters, or no torch.cuda) the same step runs eagerly with the same
interface; `step.graphed` says which and `step.why_eager` why.
"""
from __future__ import annotations

import collections
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..engine.flags import forget_scaler_record
from ..optimizers.base import EngineOptimizer
from ..optimizers.two_pass import SharpnessAwareOptimizer
from .batchnorm import disable_running_stats, enable_running_stats

# What a step reads on the host at capture and bakes into the graph: changing it afterwards
# needs a new graphed step (lr and rho are read on the device: engine/scalars.py).
_FIXED_OPTIONS = ("momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "amsgrad", "maximize",
                  "adaptive", "adaptive_offset", "normalized", "lam")


def make_graphed_step(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                      optimizer: EngineOptimizer, example_batch,
                      grad_scaler: torch.amp.GradScaler | None = None, warmup: int = 3,
                      enabled: bool = True) -> "GraphedStep":
    """A training step `step(batch) -> loss` for `optimizer` (every class of sam_kernels/optimizers/),
    captured as a CUDA graph when the parameters are on a CUDA device (see the module docstring).

    loss_fn(model, batch) -> the scalar loss (AMP autocast may be used inside; with a graph, pass
    cache_enabled=False to torch.autocast, as torch's graph notes say). The returned loss is the
    first pass's (at the current weights; SAMPa: its y-pass loss, as SAMPa.step returns; MSAM: its
    one pass's, at the perturbed point).
    example_batch: a tensor or a (nested) tuple / list / dict of tensors with the shapes, dtypes
    and devices of every batch. grad_scaler: a torch.amp.GradScaler (fp16): the loss is scaled and
    the gradients unscaled inside the step, and scaler.update() runs after each step, without a
    synchronization. warmup: eager steps of each kind before its capture. enabled=False: always
    eager (the same interface).
    """
    return GraphedStep(model, loss_fn, optimizer, example_batch, grad_scaler, warmup, enabled)


def _describe(path) -> str:
    return "batch" + pytree.keystr(path)


class GraphedStep:
    """The step of make_graphed_step. Attributes: graphed (whether steps are replayed graphs),
    why_eager (the reason when not), graphs (the captured graphs by step kind, optimizer.step_kind():
    "sam", "base", "reuse", "momentum")."""

    def __init__(self, model, loss_fn, optimizer, example_batch, grad_scaler, warmup, enabled):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        if not isinstance(optimizer, EngineOptimizer):
            raise TypeError(f"optimizer must be a sam_kernels optimizer, got {type(optimizer).__name__}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1, got {warmup!r}")
        leaves, self._spec = pytree.tree_flatten_with_path(example_batch)
        if not leaves or not all(isinstance(t, torch.Tensor) for _, t in leaves):
            raise TypeError("example_batch must be a tensor or a (nested) tuple / list / dict of tensors")
        self._example = [(_describe(path), tuple(t.shape), t.dtype, t.device) for path, t in leaves]
        self.model, self.loss_fn, self.optimizer, self.scaler = model, loss_fn, optimizer, grad_scaler
        self.warmup = warmup
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._warm: collections.Counter[str] = collections.Counter()  # eager warm-up steps taken, per step kind
        self._static: dict[str, tuple] = {}  # kind -> (static input leaves, static loss)
        self._capture_state = None  # what the graphs were captured with (checked before each replay)
        self._sampa = not isinstance(optimizer, SharpnessAwareOptimizer)
        self._passes_per_step = 0
        self.why_eager = self._why_eager(enabled)
        self.graphed = self.why_eager is None
        if self.why_eager is not None and enabled and torch.cuda.is_available() and self._device().type == "cuda":
            warnings.warn(f"make_graphed_step runs eagerly: {self.why_eager}", stacklevel=3)

    # --- what runs -------------------------------------------------------------------------

    def _device(self) -> torch.device:
        p = next((p for g in self.optimizer.param_groups for p in g["params"]), None)
        return p.device if p is not None else torch.device("cpu")

    def _why_eager(self, enabled: bool) -> str | None:
        opt = self.optimizer
        if not enabled:
            return "enabled=False"
        if not torch.cuda.is_available() or self._device().type != "cuda":
            return "the parameters are not on a CUDA device"
        if getattr(opt, "parallel", None) == "distributed":
            return "SAMPa's parallel='distributed' exchanges its gradients through the process group"
        if not opt.capturable:
            return f"{type(opt).__name__} was built with capturable=False (pass capturable=True to graph its steps)"
        if opt.nonfinite == "raise":
            return "nonfinite='raise' reads the device on the host"
        return None

    def _backward(self, batch) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def _body(self, batch, kind: str) -> torch.Tensor:
        """One step; what a graph of `kind` captures. The gradients are zeroed in place: they keep
        their addresses, which the step plans (and a graph) hold."""
        opt = self.optimizer
        if not isinstance(opt, SharpnessAwareOptimizer):  # SAMPa: its passes are its own
            return opt.step(batch, grad_scaler=self.scaler)
        opt.zero_grad(set_to_none=False)
        if kind in ("base", "reuse"):  # one gradient (LookSAM's reuse step is its base_step)
            loss = self._backward(batch)
            opt.base_step(grad_scaler=self.scaler)
            return loss
        if kind == "momentum":  # MSAM: the move along the momentum, then its one forward-backward
            opt.first_step(grad_scaler=self.scaler)
            try:
                loss = self._backward(batch)
            except BaseException:
                opt.restore()
                raise
            opt.second_step(grad_scaler=self.scaler)
            return loss
        enable_running_stats(self.model)
        loss = self._backward(batch)
        opt.first_step(grad_scaler=self.scaler)
        try:
            opt.zero_grad(set_to_none=False)
            disable_running_stats(self.model)  # the second pass leaves BatchNorm's statistics alone
            self._backward(batch)
        except BaseException:
            opt.restore()
            raise
        finally:
            enable_running_stats(self.model)
        opt.second_step(grad_scaler=self.scaler)
        return loss

    def _kind(self) -> str:
        return self.optimizer.step_kind()

    # --- a call ------------------------------------------------------------------------------

    def _leaves(self, batch) -> list:
        """The batch's tensors, checked against the example (nothing has changed yet)."""
        leaves, spec = pytree.tree_flatten_with_path(batch)
        if spec != self._spec:
            raise ValueError(f"batch has structure {spec}, the example batch had {self._spec}")
        out = []
        for (path, t), (name, shape, dtype, device) in zip(leaves, self._example):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_describe(path)} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, dtype {t.dtype} on {t.device}; the example "
                                 f"batch had shape {shape}, dtype {dtype} on {device} (a graph replays fixed shapes)")
            out.append(t)
        return out

    def __call__(self, batch) -> torch.Tensor:
        leaves = self._leaves(batch)
        if not self.graphed:
            return self._eager(batch)
        kind = self._kind()
        if kind not in self.graphs:
            if self._warm[kind] < self.warmup:
                if not (kind == "momentum" and self.optimizer.steps == 0):
                    # MSAM's step 0 has no momentum to move along (e_0 = 0) and no gradients yet:
                    # its plans are not those of later steps, so it does not count as a warm-up
                    self._warm[kind] += 1
                return self._side_stream(lambda: self._eager(batch))
            self._capture(kind)
        self._check_unchanged()
        static_in, static_loss = self._static[kind]
        for dst, src in zip(static_in, leaves):
            dst.copy_(src, non_blocking=True)
        engine = self.optimizer.engine
        engine.apply_rho_schedule()
        engine.load_device_scalars(self._device())
        self.graphs[kind].replay()
        engine.record_step()
        if self._sampa:
            opt = self.optimizer
            opt.loss_calls += self._passes_per_step
        self._update_scaler()
        return static_loss.clone()  # the static output is overwritten by the next replay

    def _eager(self, batch) -> torch.Tensor:
        loss = self._body(batch, self._kind())
        if self.scaler is not None:
            self.scaler.update()
        return loss

    def _update_scaler(self) -> None:
        """What scaler.step(optimizer) records, then update(): backs off after an inf / NaN (the step's
        device flag), without a host read."""
        if self.scaler is not None and self.scaler.is_enabled():
            self.optimizer.engine.record_to_scaler(self.scaler)
            self.scaler.update()

    @staticmethod
    def _side_stream(fn):
        """fn() on a side stream forked from and joined to the current one (warm-up, as torch's
        graph notes ask: the allocator's pools of capture and eager work stay apart)."""
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = fn()
        current.wait_stream(side)
        return out

    # --- capture -----------------------------------------------------------------------------

    def _keep_previous_batch(self) -> list | None:
        """SAMPa: static inputs holding the batch of the last step (its x~-pass reads it next),
        filled now from that batch; None before SAMPa's first SAM step (no previous batch yet)."""
        previous = self.optimizer.kept_batch
        if previous is None:
            return None
        kept = [t.detach().clone() for t in self._leaves(previous)]
        self.optimizer.keep_batch(pytree.tree_unflatten(kept, self._spec))
        return kept

    def _snapshot(self) -> tuple:
        opt = self.optimizer
        groups = tuple(tuple((k, g[k]) for k in _FIXED_OPTIONS if k in g) for g in opt.param_groups)
        return opt.engine.capture_fingerprint(), groups

    def _check_unchanged(self) -> None:
        setup, groups = self._capture_state
        now = self._snapshot()
        if now[0] != setup:
            raise RuntimeError("the optimizer's parameters or param groups changed after the step was captured "
                               "(add_param_group, load_state_dict): build a new graphed step")
        for i, (old, new) in enumerate(zip(groups, now[1])):
            if old != new:
                changed = [k for (k, a), (_, b) in zip(old, new) if a != b]
                raise RuntimeError(f"param_groups[{i}] {changed} changed after the step was captured (only lr and "
                                   "rho are read on the device): build a new graphed step")

    def _capture(self, kind: str) -> None:
        opt = self.optimizer
        device = self._device()
        static_in = [torch.empty(shape, dtype=dtype, device=dev) for _, shape, dtype, dev in self._example]
        batch = pytree.tree_unflatten(static_in, self._spec)
        graph = torch.cuda.CUDAGraph()
        if hasattr(graph, "register_generator_state") and hasattr(opt, "generator_on"):
            graph.register_generator_state(opt.generator_on(device))  # GaussSAM's own stream advances per replay
        host, calls = opt.engine.host_state(), getattr(opt, "loss_calls", 0)
        kept = self._keep_previous_batch() if self._sampa else None
        opt.engine.load_device_scalars(device)
        torch.cuda.synchronize(device)
        try:
            with torch.cuda.graph(graph):
                loss = self._body(batch, kind)
                if kept is not None:  # the next step's x~-pass reads this step's batch
                    for dst, src in zip(kept, static_in):
                        dst.copy_(src)
        except Exception as e:
            if isinstance(opt, SharpnessAwareOptimizer):
                opt.restore()
            raise RuntimeError(f"capturing the {kind} step failed; nothing was changed. A step that synchronizes "
                               "(.item(), printing a tensor, a data-dependent shape in loss_fn or the model) cannot "
                               f"be captured: {type(e).__name__}: {e}") from e
        finally:
            opt.engine.reset_host_state(host)  # capture recorded the step without taking it
            if self._sampa:
                self._passes_per_step = opt.loss_calls - calls
                opt.loss_calls = calls
                if kept is not None:
                    opt.keep_batch(pytree.tree_unflatten(kept, self._spec))
        forget_scaler_record(self.scaler, opt)  # the capture's record of the step
        self.graphs[kind] = graph
        self._static[kind] = (static_in, loss)
        if self._capture_state is None:
            self._capture_state = self._snapshot()
