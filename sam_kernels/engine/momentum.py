"""MSAM's perturbation (ALGORITHMS.md, "MSAM"): along minus the base optimizer's momentum, known
before the forward pass, and removed by recomputing it (no copy of the weights):

    first pass     n = ||b||;  x <- x - rho b / (n + eps)     b: SGD's momentum_buffer, Adam's exp_avg
    second pass    x <- x + rho b / (n + eps)  (the same n and rho: x_t within one rounding), then the
                   fused base step from x with the gradient at the perturbed point, in one pass
                   (bases.Shift: the update reads b once for both; engine/updates.py)

    MomentumPerturbation   the strategy MSAM composes
    ShiftPass              a first pass moving x along directions and back by shift_ (no copy):
                           the norm's tables, one shift_ launch per param group and way
                           (LookSAM's, engine/directions.py: the way back before the update)
    MomentumPass           MSAM's: minus the momentum buffers, the way back inside the update

Bytes per fp32 parameter of an MSAM + SGD-momentum step: ||b|| 4, the move 12, the guard's norm
of g 4, the update with the way back 20 (read x, g, b; write x, b): 40 (bench/NOTES.md).

A parameter without a buffer yet (the first step; a new param group) is not perturbed: e_0 = 0.
"""
from __future__ import annotations

import torch

from .. import ops
from ..integrations.distributed import local
from ..ops.lists import GradsOf
from .bases import Restore, Shift
from .norms import NormStage

# b, by the base optimizer's class (fused or not: with options we do not fuse, the update takes
# the generic path and the direction is still the buffer)
DIRECTION_KEYS = {torch.optim.SGD: "momentum_buffer", torch.optim.Adam: "exp_avg", torch.optim.AdamW: "exp_avg"}


class ShiftPass:
    """A first pass over [(group, params)] moving x <- x + sign rho d / (||d|| + eps) along
    `directions` ({id(p): d}) and back by recomputing the move (x_t within one rounding: no copy
    of the weights). Its norm is the first pass's check (first_norm)."""

    def __init__(self, engine, work, device, directions: dict, subtract: bool):
        self.params = [p for _, ps in work for p in ps]
        self.pending: set = set()  # ids of the parameters moved and not yet back
        self.subtract = subtract
        self.directions = directions
        self.moved = {id(group): {id(p) for p in ps} for group, ps in work if ps}  # per group, what moves
        self._work, self._device = [(group, ps) for group, ps in work if ps], device
        self._backend = backend = engine.backend_for(device, "shift_")
        self.norm = NormStage(engine.backend_for(device, "global_norm"), device,
                              [([directions[id(p)] for p in self.params], None, 0, 0.0)] if self.params else [],
                              group=engine.reduce_group())
        self.first_norm = self.norm.out()
        self._rho = lambda group: engine.rho(group, device)
        self.shifts = [(group, ops.bind("shift_", backend, device,
                                        {"params": ps, "directions": [directions[id(p)] for p in ps]}))
                       for group, ps in work if ps]
        self.used = {}  # id(group) -> the rho of its move (the way back takes the same)
        # a capturable step's rho, kept on the device for the way back (second_step reloads the
        # groups' device scalars, and a rho changed in between must not change the way back)
        self._kept_rho = torch.zeros(len(self.shifts), device=device) if engine.capturable and self.shifts else None

    @property
    def active(self) -> bool:
        """Whether a parameter is still away from x_t."""
        return bool(self.pending)

    def perturb(self, raise_nonfinite: bool, scale=None) -> None:
        self.norm.norm(self.first_norm)
        self.used = {}
        for i, (group, _) in enumerate(self.shifts):
            rho = self._rho(group)
            if isinstance(rho, torch.Tensor):  # a device copy: no host read
                rho = self._kept_rho[i].copy_(rho)
            self.used[id(group)] = rho
        for group, run in self.shifts:
            run(norm=self.first_norm, rho=self.used[id(group)], subtract=self.subtract)
        self.pending = {id(p) for p in self.params}

    def hand_over(self) -> None:
        """The updates take the move out part by part (back_done marks each): nothing to do here."""

    def back_done(self, params) -> None:
        """`params` are back at x_t (a fused update or restore_left launched for them)."""
        self.pending.difference_update(id(p) for p in params)

    def undo(self) -> None:
        """x_t back (recomputed: within one rounding) for what is still moved, once."""
        if not self.pending:
            return
        everything = len(self.pending) == len(self.params)
        for group, run in self.shifts:
            if everything:
                run(norm=self.first_norm, rho=self.used[id(group)], subtract=not self.subtract)
                continue
            left = [p for p in group["params"] if id(p) in self.pending]  # (an update failed part way)
            if left:
                ops.shift_([local(p) for p in left], [self.directions[id(p)] for p in left], self.first_norm,
                           self.used[id(group)], subtract=not self.subtract, backend=self._backend)
        self.pending = set()

    def sources(self, group, ps):
        """The update steps from x itself (x_t, after undo())."""
        return [(Restore(x_old=ps), ps, GradsOf(ps), None)]

    def restore_left(self, params):
        return None  # undo() moved every parameter back before the update

    def prelude(self, engine, params, device):
        return None

    def commit(self, engine=None, params=(), device=None):
        return None


class MomentumPass(ShiftPass):
    """The first pass of MSAM over [(group, params with a buffer)]: along minus the buffers. The
    way back is the fused update's (bases.Shift: the buffer it reads anyway), or shift_ for a moved
    parameter without a second gradient and on the generic path (undo())."""

    def __init__(self, engine, work, device, key: str):
        work = [(group, ps) for group, ps in work if group["perturb"] and ps]
        state = engine.base.state
        super().__init__(engine, work, device, {id(p): local(state[p][key]) for _, ps in work for p in ps},
                         subtract=True)

    def sources(self, group, ps):
        """The moved parameters of `group` come back inside the update (x + s b, the same s as the
        move: x_t within one rounding); the others step from x itself."""
        moved = self.moved.get(id(group), ())
        back, rest = [p for p in ps if id(p) in moved], [p for p in ps if id(p) not in moved]
        out = []
        if back:
            out.append((Shift(norm=self.first_norm, rho=lambda key=id(group): self.used[key],
                              done=lambda back=back: self.back_done(back)), back, GradsOf(back), None))
        if rest:
            out.append((Restore(x_old=rest), rest, GradsOf(rest), None))
        return out

    def restore_left(self, params):
        """x_t back for moved parameters without a second gradient (shift_; run(flags))."""
        left = {id(p) for p in params}
        runs = []
        for group, ps in self._work:
            mine = [p for p in ps if id(p) in left]
            if mine:
                lists = {"params": mine, "directions": [self.directions[id(p)] for p in mine]}
                runs.append((id(group), mine, ops.bind("shift_", self._backend, self._device, lists)))
        if not runs:
            return None

        def run(flags):
            for key, mine, launch in runs:
                launch(norm=self.first_norm, rho=self.used[key], subtract=not self.subtract)
                self.back_done(mine)
        return run


class MomentumPerturbation:
    """The strategy: build(engine, work, device) -> MomentumPass; work() the parameters it moves."""

    @staticmethod
    def group_key(group: dict) -> tuple:
        """What decides which parameters a first pass moves: perturb, and (SGD) a momentum set to 0
        after construction, whose buffer is then no longer followed."""
        return (group["perturb"], group.get("momentum", 1) != 0)

    @staticmethod
    def direction_key(base) -> str:
        key = DIRECTION_KEYS.get(type(base))
        if key is None:
            raise TypeError(f"MSAM perturbs along the base optimizer's momentum: torch.optim.SGD with momentum, "
                            f"Adam or AdamW (got {type(base).__name__})")
        return key

    def work(self, engine):
        """[(group, params whose buffer exists)] and their device (before the forward: no gradient)."""
        key, state = self.direction_key(engine.base), engine.base.state
        # (SGD with momentum set to 0 after construction: its buffer no longer moves, nor is it followed)
        work = [(g, [p for p in g["params"] if state.get(p, {}).get(key) is not None] if g.get("momentum", 1) != 0
                 else []) for g in engine.optimizer.param_groups]
        params = engine.param_list()
        device = local(params[0]).device if params else None
        return work, device

    def build(self, engine, work, device) -> MomentumPass:
        return MomentumPass(engine, work, device, self.direction_key(engine.base))
