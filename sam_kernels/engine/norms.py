"""The global norms of a step's passes: a first pass's norm (SAM's ||g||, ASAM's ||T g||) and the
guard of a second pass (the norm of the gradient that drives the update, which also says whether
it is finite and by what the update multiplies it), each from launch tables built once: the
partial sums of squares of every tensor into one buffer, then one finalize launch. Sharded
parameters (FSDP2) add one all-reduce of one scalar (sam_kernels/integrations/distributed.py)."""
from __future__ import annotations

import torch

from .. import ops
from ..integrations.distributed import all_reduce_sum_, localize
from ..ops import reference
from .flags import Flags


class NormStage:
    """A global norm of one pass, from tables built once: `classes` are (tensors, second, mode,
    scalar) whose sums of squares go into one partials buffer (mode 0: of tensors; 1: of (|second|
    + scalar) tensors, ASAM; 2: of (1 - scalar) tensors + scalar second, SAMPa; 3: the dot product
    of tensors and second instead, GSAM and LookSAM; a scalar may be a function, read on every
    call: SAMPa's lam), then one finalize launch writes the norm (norm()) or the step's guard
    (guard()); total() writes the plain sum (a dot product's). Classes whose tensors the
    kernels cannot take as they are (non-contiguous, misaligned for Triton) are staged through
    contiguous copies on every call, and their tables built for them (the same sums as from
    tensors that need no staging, bit for bit). group: the process group whose ranks hold shards of
    the tensors (sam_kernels/integrations/distributed.py): the partial sums are summed and all-reduced, one
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

    def total(self, out: torch.Tensor) -> None:
        """out <- the sum of the partials over every rank, without the square root (mode 3: the
        dot product)."""
        if self.group is None:
            self._local()
            torch.sum(self.partials, 0, out=out)
        else:
            all_reduce_sum_(self.local_sum(), self.group)
            out.copy_(self._total[0])

    def norm(self, out: torch.Tensor) -> None:
        self._finalize(self._sums(), out)

    def guard(self, flags: Flags, first_norm=None, scale=None, found_inf=None, max_norm=None, steps=None,
              steps_mask=None) -> None:
        self._guard(self._sums(), flags.values, first_norm, scale, found_inf,
                    float("inf") if max_norm is None else max_norm, steps, steps_mask)


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
