"""The last pass of a step, for every optimizer: one builder (build_update) for SAM's second step,
nuSAM's, a plain base step and SAMPa's update.

    preludes  what forms the update's gradient in .grad from the step's gradients before the guard
              reads it (GSAM's d = g_p - alpha g_perp, LookSAM's reused direction), or nothing
    guard     the norm of the gradient that drives the update (engine/norms.py): whether any
              gradient of the step is not finite, by what the update multiplies it (the
              GradScaler's unscale, the clipping coefficient), and Adam's counters moved when
              the step is taken
    updates   per param group and source, the fused base step (engine/bases.py), reading the
              guard's flags: a skipped step restores x_t and writes no state
    restores  perturbed parameters that got no second gradient: x_t back, unconditionally
    commits   what the first pass keeps only if the step is taken (nuSAM's new warm start)

A base optimizer we do not fuse takes the generic path instead: x_t back (the first pass's
undo), the commits, then its own step() if the guard's flag says so (a host read).
"""
from __future__ import annotations

from typing import Callable

import torch

from .bases import Mix, Restore, Shift, fused, prepare_state, prepare_update
from .norms import NormStage


class UpdatePlan:
    """The last pass of a step, built once per key (see the module docstring)."""

    def __init__(self):
        self.guard: NormStage | None = None
        self.preludes: list[Callable] = []  # each run() before the guard
        self.updates: list[Callable] = []  # each run(flags) launches one fused update
        self.restores: list[Callable] = []  # run(flags) after them
        self.commits: list[Callable] = []  # run(flags) last
        self.generic = False
        self.grads: list[torch.Tensor] = []  # the generic path's gradients (multiplied by grad_scale)
        self.steps = self.steps_mask = None  # Adam's counters (engine/counters.py) and which of them move


def mix_weight(group: dict, plain: bool = False) -> float:
    """SAMPa's weight of g_y' in the update's gradient, (1 - lam) g~ + lam g_y': 0 for a plain step.
    At 0 and 1 the update is the plain fused step with the one gradient used (bit for bit, the
    other not read): what a plan decides (endpoint(), part of its key), not a per-call scalar."""
    return 0.0 if plain else group["lam"]


def endpoint(group: dict, plain: bool = False):
    """The weight if it is an endpoint (0 or 1: the update reads one gradient), else None."""
    w = mix_weight(group, plain)
    return w if w in (0.0, 1.0) else None


def build_update(engine, work, device, sources, guard_classes, restores=(), commits=(), generic_grads=(),
                 preludes=()) -> UpdatePlan:
    """The last pass over [(group, params with a gradient)].

    sources(group, params) -> [(source, params, grads, scales)]: per group, what each part of it
        restores from (bases.Restore / Rank1 / Shift / Mix) with its gradients, and for Rank1 a
        function of the flags giving the scales (None otherwise);
    guard_classes: the guard's norm classes (engine/norms.py);
    restores, commits: run(flags) functions (None entries are dropped);
    preludes: run() functions writing the update's gradient into .grad before the guard (None dropped);
    generic_grads: what the generic path multiplies by grad_scale before the base's own step()."""
    plan = UpdatePlan()
    plan.guard = NormStage(engine.backend_for(device, "global_norm"), device, guard_classes,
                           group=engine.reduce_group())
    adapter = fused(engine.base)
    plan.generic = adapter is None
    plan.restores = [r for r in restores if r is not None]
    plan.commits = [c for c in commits if c is not None]
    plan.preludes = [r for r in preludes if r is not None]
    if adapter is None:
        plan.grads = generic_grads
        return plan
    prepare_state(adapter, work, engine.counters, device)
    moving = []  # parameters whose Adam counters this step advances
    for group, ps in work:
        if not ps:
            continue
        lr = engine.lr(group, device)
        for source, params, grads, scales in sources(group, ps):
            backend = engine.backend_for(device, adapter.primitives[type(source)])
            run = prepare_update(adapter, group, backend, device, params, grads, engine.counters, source, lr=lr)
            if scales is not None:
                plan.updates.append(lambda flags, run=run, scales=scales: run(flags.grad_scale, flags.found_inf,
                                                                            scales=scales(flags)))
            elif isinstance(source, Mix):
                plan.updates.append(lambda flags, run=run, group=group: run(flags.grad_scale, flags.found_inf,
                                                                          lam=group["lam"]))
            elif isinstance(source, Shift):
                plan.updates.append(_shift_update(run, source))
            else:
                plan.updates.append(lambda flags, run=run: run(flags.grad_scale, flags.found_inf))
        moving += ps
    if adapter.family == "adam" and moving:
        plan.steps, plan.steps_mask = engine.counters.vec, engine.counters.mask(moving)
    return plan


def _shift_update(run, source: Shift):
    """MSAM's update: the way back at the move's norm and rho, then its parameters count as back."""
    def update(flags):
        run(flags.grad_scale, flags.found_inf, norm=source.norm, rho=source.rho())
        source.done()
    return update


def plain_sources(grads_of):
    """A step from x itself with each parameter's gradient (base_step; SAMPa's endpoints)."""
    return lambda group, ps: [(Restore(x_old=ps), ps, grads_of(ps), None)]
