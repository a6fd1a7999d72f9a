"""Norms, deterministic, and the guard of a step:
    sumsq           each program writes the sum of squares of its block to a partials buffer (fp32,
                    or fp64 for the norms of fp64 tensors, in fp64 arithmetic): of g (MODE 0), of
                    (|w| + offset) g (1, ASAM) or of (1 - lam) g + lam g2 (2, SAMPa); or the
                    dot product of g and w (3)
    norm_finalize   one program adds the partials in a fixed order and writes sqrt(total) to a
                    device scalar (the perturbation reads it there: no host synchronization)
    guard_finalize  the same norm, then the guard of check_grads_ (found_inf, the gradient's
                    multiplier, its norm, the skipped count; Adam's step counters advanced when
                    the step is taken) into the optimizer's device flags
Floor: read every element once (plus the weights for ASAM, the second gradient for the mix)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import constants as _constants
from ._tables import bind, block_of, compute_dtype, load_optional, tensor_ptr, tl_dtype

CLIP_EPS = tl.constexpr(_constants.CLIP_EPS)
# the flags (csrc/guard_math.h)
FOUND_INF, GRAD_SCALE, GRAD_NORM, SKIPPED = (tl.constexpr(i) for i in range(4))


@triton.jit(do_not_specialize=["part0"])
def _sumsq_kernel(
    ptrs, n_tensors, numels, blk_tensor, blk_start, partials, part0, scalar,
    MODE: tl.constexpr, DTYPE: tl.constexpr, CT: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    v = tl.load(tensor_ptr(ptrs, n_tensors, t, 0, DTYPE) + offs, mask=mask, other=0.0).to(CT)
    if MODE == 1:
        w = tl.load(tensor_ptr(ptrs, n_tensors, t, 1, DTYPE) + offs, mask=mask, other=0.0).to(CT)
        v = v * (tl.abs(w) + scalar)
    if MODE == 2:
        g2 = tl.load(tensor_ptr(ptrs, n_tensors, t, 1, DTYPE) + offs, mask=mask, other=0.0).to(CT)
        v = (1.0 - scalar) * v + scalar * g2
    if MODE == 3:  # the dot product of tensors and second (GSAM, LookSAM)
        u = tl.load(tensor_ptr(ptrs, n_tensors, t, 1, DTYPE) + offs, mask=mask, other=0.0).to(CT)
        tl.store(partials + part0 + tl.program_id(0), tl.sum(v * u, axis=0))
    else:
        tl.store(partials + part0 + tl.program_id(0), tl.sum(v * v, axis=0))


@triton.jit
def _total(partials, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=partials.dtype.element_ty)  # fp64 partials: an fp64 norm
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _finalize_kernel(partials, n, out, BLOCK: tl.constexpr):
    tl.store(out, tl.sqrt(_total(partials, n, BLOCK)))


@triton.jit
def _guard_kernel(
    partials, n, flags, first_norm, n_first_norm, scale, found_inf, max_norm, steps, steps_mask, n_steps,
    HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    raw = tl.sqrt(_total(partials, n, BLOCK))  # the norm as the gradient is in memory (scaled)
    bad = tl.where(tl.abs(raw) < float("inf"), 0, 1)
    for start in range(0, n_first_norm, BLOCK):  # the first pass's norm(s): any non-finite one
        offs = start + tl.arange(0, BLOCK)
        p = tl.load(first_norm + offs, mask=offs < n_first_norm, other=0.0)
        bad += tl.sum(tl.where(tl.abs(p) < float("inf"), 0, 1), axis=0)
    found = tl.where((bad > 0) | (load_optional(found_inf, HAS_FOUND, 0.0) != 0), 1.0, 0.0)
    inv = 1.0 / load_optional(scale, HAS_SCALE, 1.0)
    norm = raw * inv
    clip = max_norm / (norm + CLIP_EPS)  # max_norm = inf: no clipping
    tl.store(flags + FOUND_INF, found)
    tl.store(flags + GRAD_SCALE, inv * tl.minimum(clip, 1.0))
    tl.store(flags + GRAD_NORM, norm)
    tl.store(flags + SKIPPED, tl.load(flags + SKIPPED) + found)
    for start in range(0, n_steps, BLOCK):  # Adam's counters move only when the step is taken
        offs = start + tl.arange(0, BLOCK)
        m = offs < n_steps
        inc = 1.0 - found
        if HAS_MASK:
            inc = inc * tl.load(steps_mask + offs, mask=m, other=0.0)
        tl.store(steps + offs, tl.load(steps + offs, mask=m, other=0.0) + inc, mask=m)


def prepare_sumsq(tensors, second=None):
    """run(partials, mode, scalar) writing one partial per program of every dtype group of
    `tensors` into partials[at:] (at = run.offset, set by the caller when several share a buffer);
    run.n_partials is how many."""
    bound = bind(tensors, second)

    def run(partials, mode, scalar, at=0):
        for dtype, launch, _ in bound:
            launch.run(_sumsq_kernel, partials, lambda first, at=at: at + first, float(scalar), MODE=int(mode),
                       DTYPE=tl_dtype(dtype), CT=compute_dtype(dtype))
            at += launch.n_blocks

    run.n_partials = sum(launch.n_blocks for _, launch, _ in bound)
    return run


def norm_finalize(partials, out):
    """out <- sqrt(sum(partials)) (every element of partials is a sum of squares)."""
    _finalize_kernel[(1,)](partials, partials.numel(), out, BLOCK=1024)


def guard_finalize(partials, flags, first_norm=None, scale=None, found_inf=None, max_norm=float("inf"), steps=None,
                   steps_mask=None):
    """The guard of check_grads_ from the sums of squares in partials."""
    _guard_kernel[(1,)](
        partials, partials.numel(), flags,
        first_norm if first_norm is not None else flags, first_norm.numel() if first_norm is not None else 0,
        scale if scale is not None else flags, found_inf if found_inf is not None else flags, float(max_norm),
        steps if steps is not None else flags, steps_mask if steps_mask is not None else flags,
        steps.numel() if steps is not None else 0, HAS_SCALE=scale is not None, HAS_FOUND=found_inf is not None,
        HAS_MASK=steps_mask is not None, BLOCK=128,
    )


def norm_dtype(tensors) -> torch.dtype:
    """The dtype of a norm's partial sums and result: fp64 when a tensor is (clip_grad_norm_ takes
    the norm in the gradients' precision), fp32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def partials_for(n, device, dtype=torch.float32):
    """A partials buffer of n sums (one zero when there is nothing to sum)."""
    return torch.empty(n, dtype=dtype, device=device) if n else torch.zeros(1, dtype=dtype, device=device)


def _partials(tensors, second, mode, scalar):
    run = prepare_sumsq(tensors, second)
    partials = partials_for(run.n_partials, tensors[0].device, norm_dtype(tensors))
    run(partials, mode, scalar)
    return partials


def global_norm(tensors, weights, offset):
    out = torch.empty((), dtype=norm_dtype(tensors), device=tensors[0].device)  # written by the cleanup
    norm_finalize(_partials(tensors, weights or None, 1 if weights else 0, offset), out)
    return out


def check_grads_(grads, grads2, lam, flags, first_norm, scale, found_inf, max_norm, steps, steps_mask):
    guard_finalize(_partials(grads, grads2 or None, 2 if grads2 else 0, lam), flags, first_norm, scale, found_inf,
                   max_norm, steps, steps_mask)
