"""The step pipeline every optimizer of sam_kernels runs: what does not change between steps is
decided once, in a plan, and a step only launches kernels; nothing in a step reads a tensor on
the host.

A SAM-family step is two passes over the gradients (sam_kernels/_base.py drives them):
  first pass   first_step()    the perturbation (a norm, or nuSAM's power iteration, and the
                               in-place move to x~); its norm is also the check of the first gradient
  second pass  second_step()   the guard (check_grads_: found_inf, the gradient's multiplier
                               (GradScaler's unscale times the clipping coefficient), Adam's step
                               counters) and the fused base update that restores x_t first
and base_step() is the second pass alone. A plan holds, for one pass: the resolved backend, the
prepared launches per (param group, dtype) with their tables, the state lists, and the device
buffers its kernels write; it stays valid while its key holds (the parameters' and gradients'
addresses and layout: sam_kernels._ext.fingerprint, and the param groups' structure) and is
rebuilt when it does not.

The decisions that depend on values live in the optimizer's device flags (Flags): the kernels
read them, the host never does (except with nonfinite="raise", and on the generic path of base
optimizers we do not fuse, whose own step() cannot read a flag).
"""
from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState

from .. import ops
from ..integrations.distributed import all_reduce_sum_, localize
from ..ops import reference
from ..ops.lists import collecting

FOUND_INF, GRAD_SCALE, GRAD_NORM, SKIPPED = range(4)  # csrc/guard_math.h


class Flags:
    """An optimizer's device flags, fp32[4]: found_inf (1: the step in progress is skipped),
    grad_scale (what the update multiplies the gradient by), grad_norm (of the unscaled gradient
    that drove the last update, before clipping), skipped (steps skipped so far)."""

    def __init__(self, device: torch.device, skipped: float = 0.0):
        self.t = torch.zeros(4, dtype=torch.float32, device=device)
        if skipped:
            self.t[SKIPPED] = skipped
        self.found_inf = self.t[FOUND_INF]  # 0-dim views: what the kernels and the GradScaler get
        self.grad_scale = self.t[GRAD_SCALE]
        self.device = self.t.device


def scaler_inputs(opt, scaler, device):
    """(scale, found_inf, state) for the guard from a torch.amp.GradScaler: its scale (the gradients
    are scaled; the update unscales them) or, after the user's scaler.unscale_(opt), no scale and
    the scaler's own inf check. None for all three without an enabled scaler. No host reads."""
    if scaler is None or not scaler.is_enabled():
        return None, None, None
    state = scaler._per_optimizer_states[id(opt)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("the GradScaler already recorded a step of this optimizer since its last update()")
    if state["stage"] is OptState.UNSCALED:  # scaler.unscale_(opt) ran: the gradients are unscaled already
        found = [f.to(device, non_blocking=True) for f in state["found_inf_per_device"].values()]
        return None, found[0] if len(found) == 1 else torch.stack(found).sum(), state
    if scaler._scale is None:
        scaler._lazy_init_scale_growth_tracker(device)
    scale = scaler._scale
    return (scale if scale.device == device else scale.to(device, non_blocking=True)), None, state


def scaler_record(state, flags: Flags) -> None:
    """Tell the GradScaler what scaler.step(optimizer) would have: whether the step found an inf /
    NaN (the device flag itself: update() backs the scale off without a host read)."""
    if state is not None:
        state["found_inf_per_device"] = {flags.device: flags.found_inf}
        state["stage"] = OptState.STEPPED


class NormStage:
    """A global norm of one pass, from tables built once: `classes` are (tensors, second, mode,
    scalar) whose sums of squares go into one partials buffer (mode 0: of tensors; 1: of (|second|
    + scalar) tensors, ASAM; 2: of (1 - scalar) tensors + scalar second, SAMPa; a scalar may be a
    function, read on every call: SAMPa's lam), then one finalize
    launch writes the norm (norm()) or the step's guard (guard()). Classes whose tensors the
    kernels cannot take as they are (non-contiguous, misaligned for Triton) are staged through
    contiguous copies on every call, and their tables built for them (the same sums as from
    tensors that need no staging, bit for bit). group: the process group whose ranks hold shards of
    the tensors (sam_kernels/distributed.py): the partial sums are summed and all-reduced, one
    fp32 scalar, before the finalize."""

    def __init__(self, backend: str, device: torch.device, classes, group=None):
        self.runs, at = [], 0
        self.group = group
        # fp64 tensors: partial sums and norm in fp64 (clip_grad_norm_ takes the norm in the
        # gradients' precision); fp32 otherwise. The guard's flags stay fp32.
        self.dtype = torch.float64 if any(t.dtype == torch.float64 for tensors, *_ in classes
                                          for t in localize(list(tensors))) else torch.float32
        for tensors, second, mode, scalar in classes:
            tensors = localize(tensors) if isinstance(tensors, list) else tensors
            second = localize(second) if isinstance(second, list) else second
            lists = {"tensors": tensors, "second": second}
            if backend == "torch":
                run = reference.prepare_sumsq(tensors, second)
            elif ops.stageable(lists, aligned=backend == "triton"):
                run = ops.prepare("sumsq", backend, device, tensors=tensors, second=second)
            else:
                run = _staged_sumsq(backend, device, tensors, second)
            self.runs.append((run, mode, scalar, at))
            at += run.n_partials
        self.partials = (torch.empty(at, dtype=self.dtype, device=device) if at
                         else torch.zeros(1, dtype=self.dtype, device=device))
        self._finalize, self._guard = ops.finalizers(backend)
        self._total = torch.zeros(1, dtype=self.dtype, device=device)

    def _sums(self) -> torch.Tensor:
        """The partial sums of squares (sharded: their sum over every rank, one scalar)."""
        if self.group is None:
            self._local()
            return self.partials
        all_reduce_sum_(self.local_sum(), self.group)
        return self._total

    def _local(self) -> None:
        for run, mode, scalar, at in self.runs:
            run(self.partials, mode, scalar() if callable(scalar) else scalar, at)

    def out(self) -> torch.Tensor:
        """A device scalar for norm() to write (the norm's dtype: fp64 for fp64 tensors)."""
        return torch.empty((), dtype=self.dtype, device=self.partials.device)

    def local_sum(self) -> torch.Tensor:
        """This rank's sum of squares, one element (for a caller that all-reduces it together
        with other values, then calls finish)."""
        self._local()
        return torch.sum(self.partials, 0, keepdim=True, out=self._total)

    def finish(self, total: torch.Tensor, out: torch.Tensor) -> None:
        """out <- sqrt(total), total: the sum of squares over every rank."""
        self._finalize(total, out)

    def norm(self, out: torch.Tensor) -> None:
        self._finalize(self._sums(), out)

    def guard(self, flags: Flags, prior=None, scale=None, found_inf=None, max_norm=None, steps=None,
              steps_mask=None) -> None:
        self._guard(self._sums(), flags.t, prior, scale, found_inf, float("inf") if max_norm is None else max_norm,
                    steps, steps_mask)


def _staged_sumsq(backend, device, tensors, second):
    """prepare_sumsq over contiguous, 16-byte aligned copies of the tensors that are not, made and
    bound on every call (the tensors are read-only here)."""
    def fine(t):
        return t.is_contiguous() and (backend != "triton" or t.data_ptr() % 16 == 0)

    def staged(lst):
        return None if lst is None else [t if fine(t) else t.clone(memory_format=torch.contiguous_format)
                                         for t in lst]

    def run(partials, mode, scalar, at=0):
        copies, second_copies = staged(tensors), staged(second)  # alive until the launch is enqueued
        ops.prepare("sumsq", backend, device, tensors=copies, second=second_copies)(partials, mode, scalar, at)

    run.n_partials = ops.prepare("sumsq", backend, device, tensors=staged(tensors), second=staged(second)).n_partials
    return run


class Plans:
    """One plan per pass kind, kept while its key holds. A key is (structure, addresses): a plan is
    built for a structure; when only the addresses of the live lists it binds changed (autograd
    gave the gradients new memory), the refreshers its prepared launches registered while it was
    built write them into its tables instead."""

    def __init__(self):
        self._plans: dict[str, list] = {}
        self.builds = self.refreshes = 0  # counted for the tests and the benchmarks

    def get(self, kind: str, key, build):
        """The plan of `kind` for key() (a function: taken again after a build, which may create
        what the plan binds, so that the next step finds the plan it built)."""
        structure, addresses = key()
        cached = self._plans.get(kind)
        if cached is not None and cached[0] == structure:
            if cached[1] != addresses:
                for refresh in cached[3]:
                    refresh()
                cached[1] = addresses
                self.refreshes += 1
            return cached[2]
        with collecting() as refreshers:
            plan = build()
        structure, addresses = key()
        self._plans[kind] = [structure, addresses, plan, refreshers]
        self.builds += 1
        return plan

    def holds(self, kind: str, key: tuple) -> bool:
        """Whether get(kind, lambda: key, ...) would neither build nor refresh."""
        cached = self._plans.get(kind)
        return cached is not None and cached[0] == key[0] and cached[1] == key[1]

    def plan(self, kind: str):
        """The plan of `kind` now cached, or None."""
        cached = self._plans.get(kind)
        return cached[2] if cached is not None else None

    def clear(self) -> None:
        self._plans.clear()
