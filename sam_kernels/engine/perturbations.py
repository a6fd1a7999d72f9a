"""Perturbations restored from a copy (SAM, ASAM, GaussSAM): the first pass of a step saves x_t into
x_old and moves x in place to x~ = x_t + rho T^2 d / (||T d|| + eps), where the direction d is the
gradient (SAM; ASAM's T = |x| + offset per param group) or a Gaussian draw (GaussSAM); the update
restores x_t from the copy, bit for bit, fused with the base step (engine/updates.py).

    CopyPerturbation(copies, direction)   the strategy an optimizer class composes
    CopyPass                              its plan: the norm's tables, one perturb launch per
                                          param group, the x_old buffers

A direction says what d is and what checks the first gradient: the gradient is its own check (a
non-finite norm leaves the weights where they are and skips the step); a Gaussian direction
checks the gradient's norm on its own and draws z into buffers allocated once per plan.
rank1.py is the other kind of perturbation (nuSAM's, restored by recomputing it).
"""
from __future__ import annotations

import torch

from .. import ops
from ..integrations.distributed import local
from ..ops.lists import GradsOf
from .bases import Restore
from .norms import NormStage


def scratch(params, device) -> tuple[list, dict]:
    """Buffers like `params` (this rank's shards of sharded ones) that a plan owns and a step
    overwrites before reading: one flat buffer per dtype (returned, to count their bytes) and
    {id(p): a view shaped like p's local tensor}, each 16-byte aligned (the kernels' vector width)."""
    flats, views = [], {}
    for dtype in dict.fromkeys(p.dtype for p in params):
        ps = [p for p in params if p.dtype == dtype]
        shards = [local(p) for p in ps]
        vec = max(1, 16 // ps[0].element_size())
        sizes = [-(-s.numel() // vec) * vec for s in shards]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        flats.append(flat)
        for p, s, z in zip(ps, shards, flat.split(sizes)):
            views[id(p)] = z[:s.numel()].view(s.shape)
    return flats, views


class Copies:
    """The x_old buffers of the perturbed parameters, in the optimizer's own state (state[p]["old_p"],
    as davda54's SAM keeps them), allocated once and reused: contiguous, p's dtype (a bit-exact copy)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer  # its .state (torch's Optimizer.state) holds the copies

    def of(self, p: torch.Tensor) -> torch.Tensor:
        st = self.optimizer.state[p]
        old = st.get("old_p")
        if old is None or old.shape != p.shape or old.dtype != p.dtype or old.get_device() != p.get_device():
            old = st["old_p"] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return old

    def drop(self, p: torch.Tensor) -> None:
        """p is no longer perturbed (its group's perturb became False): its copy goes."""
        self.optimizer.state.get(p, {}).pop("old_p", None)

    def nbytes(self, nbytes) -> int:
        return sum(nbytes(st["old_p"]) for st in self.optimizer.state.values() if "old_p" in st)


class GradientDirection:
    """d = the gradient in .grad (read when used: a plan never keeps a step's gradients alive).
    The base of the directions (engine/directions.py has the variants'): prepare() binds what a
    first pass reads, before() runs ahead of its norm, prelude() and commit() add to the second."""

    def prepare(self, engine, first: "CopyPass", work, device):
        return GradsOf

    def before(self, first: "CopyPass", raise_nonfinite: bool, scale=None) -> None:
        """What a step does before its perturbation: nothing (the norm of d is the check)."""

    def prelude(self, engine, first: "CopyPass", params, device):
        return None

    def commit(self, engine, first: "CopyPass", params, device):
        return None


class CopyPass:
    """The first pass of SAM / ASAM / GaussSAM over [(group, params with a gradient)]: the global
    norm of the directions into a device scalar (a non-finite one leaves the weights where they
    are and, for the gradient, is the first gradient's check, `first_norm`), then x_old <- x,
    x <- x + e per group."""

    def __init__(self, engine, work, device, copies: Copies, direction):
        for group, ps in work:
            if not group["perturb"]:
                for p in ps:
                    copies.drop(p)
        work = [(group, ps) for group, ps in work if group["perturb"]]  # subset perturbation: the chosen groups
        self.params = [p for _, ps in work for p in ps]
        self.active = False  # perturbed and not yet restored or updated
        self.direction = direction
        backend = engine.backend_for(device, "perturb_")
        self.x_old = {id(p): copies.of(p) for p in self.params}
        directions = direction.prepare(engine, self, work, device)
        classes: dict[tuple, list] = {}
        for group, ps in work:
            if ps:
                key = (group["adaptive"], group["adaptive_offset"] if group["adaptive"] else 0.0)
                classes.setdefault(key, []).extend(ps)
        self.norm = NormStage(engine.backend_for(device, "global_norm"), device,
                              [(directions(xs), xs if adaptive else None, int(adaptive), offset)
                               for (adaptive, offset), xs in classes.items()], group=engine.reduce_group())
        self.norm_out = self.norm.out()
        self.first_norm = getattr(self, "first_norm", self.norm_out)  # a direction may have set its own check
        self._rho = lambda group: engine.rho(group, device)  # a number, or a device scalar (capturable)
        self.perturbs = [(group, ops.bind("perturb_", backend, device,
                                          {"params": ps, "grads": directions(ps),
                                           "x_old": [self.x_old[id(p)] for p in ps]}))
                         for group, ps in work if ps]
        self._restore = ops.bind("restore_", backend, device,
                                 {"params": self.params, "x_old": [self.x_old[id(p)] for p in self.params]}) \
            if self.params else None
        self._backend, self._device = backend, device

    def perturb(self, raise_nonfinite: bool, scale=None) -> None:
        """x_old <- x, x <- x + e. scale: the GradScaler's scale of the gradient in .grad (a device
        scalar; None without one), for a direction that keeps state across steps (F-SAM's m)."""
        self.direction.before(self, raise_nonfinite, scale)
        self.norm.norm(self.norm_out)
        if raise_nonfinite and self.first_norm is self.norm_out and not bool(torch.isfinite(self.norm_out)):
            raise FloatingPointError(f"first_step: the gradient norm is {self.norm_out.item()} (NaN or inf in "
                                     ".grad)")  # raise mode must know: a synchronization
        for group, run in self.perturbs:
            run(norm=self.norm_out, rho=self._rho(group), adaptive=group["adaptive"], offset=group["adaptive_offset"])
        self.active = True

    def sources(self, group, ps):
        """Each parameter restores from its copy (a parameter not perturbed: from itself)."""
        return [(Restore(x_old=[self.x_old.get(id(p), p) for p in ps]), ps, GradsOf(ps), None)]

    def restore_left(self, params):
        """x_t back for perturbed parameters without a second gradient (run(flags))."""
        if not params:
            return None
        run = ops.bind("restore_", self._backend, self._device,
                       {"params": params, "x_old": [self.x_old[id(p)] for p in params]})
        return lambda flags: run()

    def prelude(self, engine, params, device):
        """What forms the update's gradient in .grad before the guard (GSAM's d), or None: the
        direction's (params: those with a second gradient)."""
        return self.direction.prelude(engine, self, params, device)

    def commit(self, engine=None, params=(), device=None):
        """What the direction keeps only if the step is taken (F-SAM's m), run(flags), or None."""
        return self.direction.commit(engine, self, params, device)

    def hand_over(self) -> None:
        """The fused updates take the perturbation out (they restore x_t): nothing left to undo."""
        self.active = False

    def undo(self) -> None:
        if self.active and self._restore is not None:
            self._restore()
        self.active = False


class CopyPerturbation:
    """The strategy: build(engine, work, device) -> CopyPass; group_key: ASAM's options decide the
    norm's classes and the perturb launches' flags."""

    def __init__(self, copies: Copies, direction=None):
        self.copies = copies
        self.direction = direction if direction is not None else GradientDirection()

    @staticmethod
    def group_key(group: dict) -> tuple:
        return (group["adaptive"], group["adaptive_offset"], group["perturb"])

    def build(self, engine, work, device) -> CopyPass:
        return CopyPass(engine, work, device, self.copies, self.direction)


class GaussianDirection(GradientDirection):
    """d = z ~ N(0, I), drawn each step into one buffer per dtype (a copy of the perturbed
    parameters, allocated once per plan; each parameter's part 16-byte aligned), in parameter
    order, from `generator` or an own generator on the parameters' device seeded with `seed`
    (sharded parameters: each rank draws its shards' z from seed + its rank in their mesh). The
    first gradient is checked on its own (its norm is the guard's first_norm)."""

    def __init__(self, generator, seed: int):
        self.generator = generator
        self.seed = seed
        self._own: torch.Generator | None = None

    def generator_on(self, device, group=None) -> torch.Generator:
        """The generator z is drawn from (made on first use; group: the mesh of sharded parameters)."""
        if self.generator is not None:
            return self.generator
        if self._own is None or self._own.device != torch.device(device):
            rank = torch.distributed.get_rank(group) if group is not None else 0
            self._own = torch.Generator(device).manual_seed(self.seed + rank)
        return self._own

    def current(self) -> torch.Generator | None:
        """The generator z is drawn from, once it exists."""
        return self.generator if self.generator is not None else self._own

    def forget(self) -> None:
        """The own generator is made again (from seed) on next use."""
        self._own = None

    def prepare(self, engine, first: CopyPass, work, device):
        params = [p for _, ps in work for p in ps]
        first.z, views = scratch(params, device)
        group = engine.reduce_group()
        first.check = NormStage(engine.backend_for(device, "global_norm"), device,
                                [(GradsOf(params), None, 0, 0.0)] if params else [], group=group)
        first.first_norm = first.check.out()
        first.generator = self.generator_on(device, group)
        return lambda ps: [views[id(p)] for p in ps]

    def before(self, first: CopyPass, raise_nonfinite: bool, scale=None) -> None:
        first.check.norm(first.first_norm)
        if raise_nonfinite and not bool(torch.isfinite(first.first_norm)):  # raise mode: a synchronization
            raise FloatingPointError(f"GaussSAM.first_step: the gradient norm is {first.first_norm.item()}")
        for z in first.z:
            z.normal_(generator=first.generator)

    @staticmethod
    def nbytes(first) -> int:
        """The z buffers of a plan."""
        return sum(z.numel() * z.element_size() for z in first.z) if first is not None else 0
