"""The step engine: what every optimizer of sam_kernels shares, once (the classes in
sam_kernels/optimizers/ are the user-facing API over it; make_graphed_step, FSDP2 and the
benchmarks talk to it through its methods, never its fields).

    configuration   the backend, the non-finite policy, capturable, max_grad_norm
    schedule        the steps taken, whether a SAM step is due (start_step, PSAM's period), rho(step)
    plans           the plan cache (engine/plans.py), keys derived from what a plan binds (key())
    device state    the flags (engine/flags.py), the device scalars of a capturable step
                    (engine/scalars.py), Adam's step counters (engine/counters.py)
    a step          begin() (the capture guard, the device scalars), finish() (the guard, the update,
                    the non-finite policy, the GradScaler in and out), record_step() (the host's
                    bookkeeping: the step counter, what torch's lr schedulers check)

Nothing in a step reads a tensor on the host, except nonfinite="raise" (which must know, to raise)
and base optimizers we do not fuse (whose own step() cannot read a device flag): both documented.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..integrations import distributed
from ..ops import backends, extension as _ext
from .bases import fused
from .counters import StepCounters
from .flags import SKIPPED, Flags, scaler_inputs, scaler_record, scaler_state
from .plans import PlanCache
from .scalars import DeviceScalars, capturing

NONFINITE = ("skip", "raise")


class Schedule:
    """Which steps are SAM steps (two gradients) and which plain base steps: from start_step on
    (ALGORITHMS.md, "Perturbation delay and rho schedules"); PSAM overrides due()."""

    def __init__(self, start_step: int = 0):
        self.start_step = start_step

    def due(self, t: int) -> bool:
        return t >= self.start_step


class StepEngine:
    """One per optimizer (see the module docstring). optimizer: the torch Optimizer whose param
    groups (shared with base) the engine steps; group_key(group): the options of a group that
    decide a plan's launches (the optimizer's perturbation says which)."""

    def __init__(self, optimizer, base: torch.optim.Optimizer, *, backend: str, nonfinite: str, capturable: bool,
                 max_grad_norm, schedule: Schedule, rho_fn: Callable[[int], float] | None,
                 group_key: Callable[[dict], tuple]):
        self.optimizer, self.base = optimizer, base
        self.backend, self.nonfinite, self.capturable = backend, nonfinite, bool(capturable)
        self.max_grad_norm = max_grad_norm
        self.schedule, self.rho_fn, self.group_key = schedule, rho_fn, group_key
        self.steps = 0  # steps taken (SAM, plain or skipped): what the schedule counts
        self._skipped_at_load = 0.0  # a loaded skipped_steps, before the flags exist
        self._rebuild_transient()

    def _rebuild_transient(self) -> None:
        """What is made again after a copy (tables of addresses, device tensors, caches by id())."""
        self.plans = PlanCache()
        self.counters = StepCounters()
        self.flags: Flags | None = None  # on the parameters' device, from the first step on
        self.scalars: DeviceScalars | None = None  # capturable: lr and rho on the device
        self.version = 0  # bumped when the param groups or the state change under the plans
        self._params_cache = (-1, [])
        self._sharded = None

    def __getstate__(self) -> dict:
        skip = ("plans", "counters", "flags", "scalars", "version", "_params_cache", "_sharded")
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        state["_skipped_at_load"] = float(self.skipped_steps)  # the device count, read once
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._rebuild_transient()

    # --- the schedule --------------------------------------------------------------------------

    @property
    def sam_step_due(self) -> bool:
        return self.schedule.due(self.steps)

    def apply_rho_schedule(self) -> None:
        """rho(steps) into every param group, when rho is a schedule (when a SAM step starts)."""
        if self.rho_fn is not None:
            from ..optimizers.checks import check_nonneg  # (the optimizers' argument checks)

            if getattr(self.rho_fn, "per_group", False):  # a schedule of each group's lr (GSAM's ProportionalRho)
                for i, group in enumerate(self.optimizer.param_groups):
                    group["rho"] = check_nonneg(f"rho({self.steps}, param_groups[{i}])", self.rho_fn(self.steps, group))
                return
            rho = check_nonneg(f"rho({self.steps})", self.rho_fn(self.steps))
            for group in self.optimizer.param_groups:
                group["rho"] = rho

    def record_step(self) -> None:
        """The host's bookkeeping of a step taken (or skipped on the device): the counter, and what
        torch's lr schedulers check (`_opt_called`, set by the wrapper they put on step()) on the
        optimizer and on the base, so that a scheduler attached to either one sees a step (the
        fused path never calls the base's own step())."""
        self.steps += 1
        self.optimizer._opt_called = True
        self.base._opt_called = True

    def host_state(self) -> tuple:
        """The host's bookkeeping (for a caller that records a step without taking it: a CUDA graph's
        capture), to give back to reset_host_state."""
        return (self.steps, getattr(self.optimizer, "_opt_called", False), getattr(self.base, "_opt_called", False))

    def reset_host_state(self, state: tuple) -> None:
        self.steps, self.optimizer._opt_called, self.base._opt_called = state

    def capture_fingerprint(self) -> tuple:
        """What a captured graph holds of the optimizer's setup: the plans' generation, the
        parameters and the device scalars it reads (make_graphed_step refuses a replay after any
        of them changed)."""
        return (self.version, tuple(id(p) for p in self.param_list()), id(self.scalars))

    # --- parameters, plans -------------------------------------------------------------------

    def invalidate(self) -> None:
        """The param groups or the state changed under the plans: build them again."""
        self.version += 1
        self.plans.clear()

    def param_list(self) -> list:
        version, params = self._params_cache
        groups = self.optimizer.param_groups
        if version != self.version or len(params) != sum(len(g["params"]) for g in groups):
            params = [p for g in groups for p in g["params"]]
            self._params_cache = (self.version, params)
            self._sharded = distributed.shard_group(params, "param_groups")  # None, or the mesh's group
        return params

    def reduce_group(self):
        """The process group over which the parameters are sharded (None: not sharded): what the
        global norms are all-reduced over (sam_kernels/integrations/distributed.py)."""
        self.param_list()
        return self._sharded

    def key(self, *extra, update: bool = False):
        """A plan's key, (structure, gradient addresses), from what the plan reads when it is built:
        the configuration (backend, capturable), the groups' options that decide launches
        (group_key), the parameters' addresses and layout and which of them have a gradient (and
        `extra`); for an update plan (update=True) also the base optimizer's fused family and the
        options that decide its lists, Adam's counters vector and the state entries it binds
        (which exist, and where: a state created or replaced by hand, or read through torch's
        defaultdict, makes another plan); then where the gradients are. Cheap: C loops over the
        parameters."""
        params = self.param_list()
        fp = _ext if self._sharded is None else distributed
        params_key, grads = fp.fingerprint(params)
        groups = tuple((len(g["params"]), self.group_key(g)) for g in self.optimizer.param_groups)
        config = (self.version, self.backend, self.capturable)
        if not update:
            return (config, groups, params_key, *extra), grads
        adapter = fused(self.base)
        if adapter is None:
            return (config, groups, params_key, None, self.counters.version, *extra), grads
        structure = tuple(adapter.structure(g) for g in self.optimizer.param_groups)
        state = self.state_key(adapter.state_keys)
        return (config, groups, params_key, adapter.family, structure, self.counters.version, state, *extra), grads

    def state_key(self, keys: tuple, state=None) -> bytes:
        """Which of the base optimizer's state entries `keys` exist for each parameter, and where
        (state: another optimizer's state instead, e.g. the optimizer's own: F-SAM's m): what a plan
        that binds them keys on (a state created or replaced makes another plan)."""
        params = self.param_list()
        fp = _ext if self._sharded is None else distributed
        return fp.state_fingerprint(self.base.state if state is None else state, params, keys)

    def plan(self, pass_name: str, key, build):
        """The plan of `pass_name` for key() (a function: taken again once a plan is built, which may have
        created what it binds); under CUDA graph capture it must be the one warm-up built (a build
        or a refresh would copy tables from the host into the graph)."""
        if capturing() and not self.plans.holds(pass_name, key()):
            raise RuntimeError(f"{type(self.optimizer).__name__}: the {pass_name!r} step plan changed during CUDA "
                               "graph capture (parameters, gradients, their addresses or the param groups differ "
                               "from the last eager step): run an eager step with the same setup before capturing")
        return self.plans.get(pass_name, key, build)

    def cached(self, pass_name: str):
        """The plan of `pass_name` now cached, or None (what memory reports read)."""
        return self.plans.plan(pass_name)

    def work(self, where: str, need_grad: bool = False):
        """[(group, [params with a gradient])] after checking every gradient, and their device;
        need_grad: a RuntimeError when no parameter has one (a first step perturbs along it)."""
        from ..optimizers.checks import check_grad

        work, devices = [], set()
        for i, group in enumerate(self.optimizer.param_groups):
            ps = [p for p in group["params"] if p.grad is not None]
            for j, p in enumerate(group["params"]):
                if p.grad is not None:
                    check_grad(p, f"{where}: param_groups[{i}]['params'][{j}]")
                    devices.add(p.device)
            work.append((group, ps))
        if len(devices) > 1:
            raise ValueError(f"{where}: the parameters with gradients span devices {sorted(map(str, devices))}")
        if need_grad and not devices:
            n = sum(len(g["params"]) for g in self.optimizer.param_groups)
            raise RuntimeError(f"{where}: no parameter has a gradient (.grad is None for all {n}): the perturbation "
                               "follows the gradient at the current weights; call loss.backward() first, or "
                               "step(closure) with a closure that computes it")
        device = next(iter(devices)) if devices else next(
            (p.device for g in self.optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        return work, device

    def backend_for(self, device, op: str) -> str:
        return backends.resolve(self.backend, device, op)

    # --- device state ----------------------------------------------------------------------

    def flags_on(self, device) -> Flags:
        if self.flags is None or self.flags.device != torch.device(device):
            skipped = self.flags.values[SKIPPED].to(device) if self.flags is not None else self._skipped_at_load
            self.flags = Flags(device)
            self.flags.values[SKIPPED] = skipped
        return self.flags

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held NaN or inf (reading this waits for the device)."""
        if self.flags is None:
            return int(self._skipped_at_load)
        return int(self.flags.values[SKIPPED].item())

    def set_skipped(self, skipped: float) -> None:
        if self.flags is not None:
            self.flags.values[SKIPPED] = skipped
        self._skipped_at_load = skipped

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """The norm of the (unscaled, unclipped) gradient of the last update, a device scalar."""
        return self.flags.grad_norm if self.flags is not None else None

    def device_scalars(self, device) -> DeviceScalars:
        """The device scalars of the param groups; made again when the groups or the device changed,
        which the plans holding views of the old ones did not see: they are dropped."""
        ds = self.scalars
        if ds is None or ds.device != torch.device(device) or not ds.covers(self.optimizer.param_groups):
            if ds is not None:
                self.invalidate()
            ds = self.scalars = DeviceScalars(self.optimizer.param_groups, self.flags_on(device).device)
            ds.load_()
        return ds

    def load_device_scalars(self, device) -> None:
        """The groups' current lr and rho into the device scalars (before a replay of a graph)."""
        self.device_scalars(device).load_()

    def lr(self, group: dict, device):
        """What a fused update takes for the group's lr: None (group["lr"], read per call) or, when
        capturable, its device scalar."""
        return self.device_scalars(device).lr(group) if self.capturable else None

    def rho(self, group: dict, device):
        """The group's rho: the number, or (capturable) its device scalar."""
        return self.device_scalars(device).rho(group) if self.capturable else group["rho"]

    # --- a step ------------------------------------------------------------------------------

    def begin(self, name: str) -> None:
        """Before a step's launches: under CUDA graph capture, only a capturable optimizer may run
        (its host numbers would be baked into the graph); otherwise the device scalars of a
        capturable one get the groups' current lr and rho."""
        if capturing():
            if not self.capturable:
                raise RuntimeError(f"{name} is being captured in a CUDA graph but the optimizer was built with "
                                   "capturable=False: its lr and rho would be fixed at their values of the capture")
            if self.nonfinite == "raise":
                raise RuntimeError(f"{name}: nonfinite='raise' reads the device on the host and cannot be captured")
        elif self.capturable and self.scalars is not None:
            self.scalars.load_()

    def finish(self, plan, first_norm, grad_scaler, first, name: str) -> None:
        """The guard, then the update of an update plan (engine/updates.py): the one place the
        non-finite policy is written. first: the step's first pass (its perturbation is taken out by
        the update, or undone on the generic path), or None."""
        flags = self.flags_on(plan.guard.partials.device)
        for run in plan.preludes:  # the update's gradient from the step's gradients (GSAM, LookSAM)
            run()
        scale, found_inf, state = scaler_inputs(self.optimizer, grad_scaler, flags.device)
        if found_inf is not None and plan.guard.group is not None:  # scaler.unscale_ checked this rank's shards
            found_inf = found_inf.clone()
            distributed.all_reduce_sum_(found_inf, plan.guard.group)
        plan.guard.guard(flags, first_norm=first_norm, scale=scale, found_inf=found_inf, max_norm=self.max_grad_norm,
                         steps=plan.steps, steps_mask=plan.steps_mask)
        scaler_record(state, flags)
        if self.nonfinite == "raise" and bool(flags.found_inf):  # raise mode must know: a synchronization
            raise FloatingPointError(f"{name}: NaN or inf in a gradient; the step was skipped")  # the caller undoes
        if plan.generic:  # a base optimizer we do not fuse: x_t back, then its own step() if the guard says so
            if first is not None:
                first.undo()
            for run in plan.commits:
                run(flags)
            if not bool(flags.found_inf):  # its step() cannot read a device flag: a synchronization
                if len(plan.grads):
                    torch._foreach_mul_(list(plan.grads), flags.grad_scale)
                self.base.step()
            return
        if first is not None:
            first.hand_over()  # the updates below take the perturbation out
        for run in plan.updates + plan.restores + plan.commits:
            run(flags)

    def scaler_scale(self, grad_scaler):
        """The scale of an enabled GradScaler on the parameters' device (None otherwise): what a
        first pass that keeps gradients across steps divides by (F-SAM's m). No host read."""
        if grad_scaler is None or not grad_scaler.is_enabled():
            return None
        params = self.param_list()
        device = distributed.local(params[0]).device if params else torch.device("cpu")
        return scaler_inputs(self.optimizer, grad_scaler, device)[0]

    def record_to_scaler(self, grad_scaler) -> None:
        """What scaler.step(optimizer) records: the last step's device flag (a graphed step's replay,
        whose own record the capture dropped)."""
        scaler_record(scaler_state(grad_scaler, self.optimizer), self.flags)

    # --- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict:
        """What a checkpoint holds of the engine (read from the device once)."""
        return {"skipped_steps": self.skipped_steps, "step": self.steps}

    def load_state(self, extra: dict) -> None:
        self.set_skipped(float(extra.pop("skipped_steps", 0)))
        self.steps = int(extra.pop("step", 0))
        self.invalidate()
