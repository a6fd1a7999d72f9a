"""What every optimizer class of sam_kernels is as a torch Optimizer: it builds or adopts the base
optimizer (sharing its param groups, so an lr scheduler on either drives both), checks its
arguments and param groups before anything changes, composes a step engine (sam_kernels/engine/:
the plans, the device flags, the guard, the updates) and a perturbation strategy, and keeps
state_dict() / load_state_dict(), add_param_group, copies and init_state() like torch's own.

    EngineOptimizer            this module: the shared API, no step of its own
    SharpnessAwareOptimizer    two_pass.py: first_step / second_step / base_step / step(closure)
                               (SAM, ASAM, GaussSAM, PSAM, NuSAM)
    SAMPa                      sampa.py: step(batch), its two passes computed by the optimizer
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import required

from ..engine.bases import fused, fused_family, prepare_state
from ..engine.engine import NONFINITE, Schedule, StepEngine
from ..integrations import distributed
from ..ops import backends
from .checks import (_flatten_params, check_finite_options, check_like_constructor, check_max_norm, check_nonneg,
                     check_peer_options, check_step)

# What torch's lr schedulers put on an optimizer instance: a `step` wrapper holding a weak
# reference to that instance (a copy keeping it would step the original) and the flag it sets.
# torch.optim.Optimizer.__getstate__ drops them too.
_PATCHED = ("step", "_opt_called")
# Per-parameter scratch that peers' SAM keeps in the state they save (davda54/sam and
# pytorch_optimizer: x_old as "old_p"; composer and older davda54: the perturbation "e_w"):
# meaningless between steps, dropped when such a checkpoint is loaded.
_PEER_SCRATCH = ("old_p", "e_w")
# The base state tensors our fused updates bind, which must be shaped like their parameter.
_STATE_TENSORS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def no_group_key(group: dict) -> tuple:
    """A class whose plans read no option of a group beyond what the engine keys on."""
    return ()


class EngineOptimizer(Optimizer):
    """The API every class shares (see the module docstring). Subclasses pass their own options
    (defaults) and a group_key (the options of a group that decide a plan's launches), and
    implement _check_group / _group_added / _extra_state / _make_schedule for what they add.
    _own_state_keys: the per-parameter tensors a class keeps across steps in its own state
    (F-SAM's m, LookSAM's g_v; shaped like the parameter): saved beside the base optimizer's in
    state_dict()["state"], so that DCP shards and loads them like momentum buffers."""

    _own_state_keys: tuple = ()

    def __init__(self, params, base_optimizer, defaults: dict, backend: str, nonfinite: str, base_kwargs: dict,
                 start_step: int = 0, rho_fn: Callable[[int], float] | None = None, max_grad_norm=None,
                 capturable: bool = False, group_key: Callable[[dict], tuple] | None = None):
        if isinstance(params, Optimizer):
            raise TypeError(f"params is a {type(params).__name__} instance: pass the base optimizer as "
                            f"base_optimizer= and params=None, e.g. {type(self).__name__}(base_optimizer=opt, rho=...)")
        backends.check_name(backend)
        if isinstance(base_optimizer, type):
            base_kwargs = check_peer_options(type(self).__name__, base_optimizer, base_kwargs)
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        max_grad_norm = check_max_norm(max_grad_norm)
        start_step = check_step("start_step", start_step)
        self._own_defaults = dict(defaults)
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError("base_optimizer is an instance: its options are set already, "
                                f"got {sorted(base_kwargs)}")
            base = base_optimizer
            if params is not None:
                given = {id(p) for p in _flatten_params(params)}
                owned = {id(p) for g in base.param_groups for p in g["params"]}
                if given != owned:
                    raise ValueError("params must be the parameters of the base_optimizer instance (or None)")
            super().__init__(base.param_groups, defaults)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if params is None:
                raise ValueError("params is None: give the parameters, or a base_optimizer instance")
            super().__init__(params, defaults)
            base = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer subclass or instance, got {base_optimizer!r}"
            )
        self.base_optimizer = base
        self.param_groups = base.param_groups  # shared: lr schedulers on either object drive both
        self.defaults.update(base.defaults)
        self.engine = StepEngine(self, base, backend=backend, nonfinite=nonfinite, capturable=capturable,
                                 max_grad_norm=max_grad_norm, schedule=self._make_schedule(start_step),
                                 rho_fn=rho_fn, group_key=group_key or no_group_key)
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f"param_groups[{i}]")
        base.register_load_state_dict_post_hook(self._on_base_load)

    def _on_base_load(self, _base) -> None:
        self.engine.invalidate()

    def _make_schedule(self, start_step: int) -> Schedule:
        """Which steps are SAM steps: from start_step on (PSAM: its period)."""
        return Schedule(start_step)

    # --- configuration, as attributes users read and set -------------------------------------

    backend = property(lambda self: self.engine.backend, lambda self, v: setattr(self.engine, "backend", v))
    nonfinite = property(lambda self: self.engine.nonfinite, lambda self, v: setattr(self.engine, "nonfinite", v))
    capturable = property(lambda self: self.engine.capturable)
    max_grad_norm = property(lambda self: self.engine.max_grad_norm,
                             lambda self, v: setattr(self.engine, "max_grad_norm", check_max_norm(v)))
    start_step = property(lambda self: self.engine.schedule.start_step)

    @property
    def sam_step_due(self) -> bool:
        """Whether the next step is a SAM step (two gradients) rather than a plain base step."""
        return self.engine.sam_step_due

    def step_kind(self) -> str:
        """What the next step runs (one plan each, a CUDA graph each), and so the loop that drives it:
        "sam" (a SAM step: backward, first_step, backward, second_step), "base" (a plain base step:
        backward, base_step); LookSAM's steps between its SAM steps are "reuse" (backward,
        base_step) and MSAM's SAM steps "momentum" (first_step, backward, second_step: its
        perturbation is known before the forward)."""
        return "sam" if self.sam_step_due else "base"

    @property
    def steps(self) -> int:
        """Steps taken so far (SAM steps, plain base steps and skipped steps)."""
        return self.engine.steps

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held NaN or inf (counted on the device: reading this
        waits for the device, stepping never does)."""
        return self.engine.skipped_steps

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """The norm of the (unscaled, unclipped) gradient of the last update, a device scalar."""
        return self.engine.grad_norm

    # --- param groups --------------------------------------------------------------------------

    def _check_group(self, group: dict, where: str) -> None:
        """A param group's options and parameters, before it joins (nothing is modified if this
        raises). Subclasses add their own checks."""
        check_nonneg(f"{where}['rho']", group["rho"])
        check_finite_options(group, where)
        distributed.shard_group(group["params"], where)  # sharded parameters: a placement we support
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"{where} spans devices {sorted(map(str, devices))}: a fused group must be on one device")
        for d in devices:
            backends.resolve(self.engine.backend, d)  # an unavailable explicit backend fails here, not mid-step

    def _group_added(self, group: dict) -> None:
        """A group that add_param_group appended (validated): set up what the subclass keeps per parameter."""

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group (options default to the constructor's): checked as our constructor and
        the base optimizer's constructor check their groups, before anything is modified."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        where = f"param_groups[{len(self.param_groups)}]"
        params = param_group.get("params")
        if params is None:
            raise ValueError(f"{where} has no 'params'")
        params = [params] if isinstance(params, torch.Tensor) else list(params)  # a generator is read once
        self._check_new_params(params, where)
        if "base_optimizer" not in self.__dict__:  # Optimizer.__init__ adding the first groups
            param_group["params"] = params  # (the instance path: defaults land in the base's own groups)
            return super().add_param_group(param_group)
        group = {**param_group, "params": params}
        for key, value in [*self._own_defaults.items(), *self.base_optimizer.defaults.items()]:
            if value is not required:
                group.setdefault(key, value)
        self._check_group(group, where)
        check_like_constructor(self.base_optimizer, group, where)
        self.base_optimizer.add_param_group(group)  # appends to the shared list
        self._group_added(self.param_groups[-1])
        self.engine.invalidate()

    def _check_new_params(self, params: list, where: str) -> None:
        """Tensors, each listed once and in no other group: a parameter listed twice would be updated twice."""
        seen = {id(p): (i, j) for i, g in enumerate(self.__dict__.get("param_groups", [])) for j, p in
                enumerate(g["params"])}
        for j, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where}['params'][{j}] must be a tensor, got {type(p).__name__}")
            if id(p) in seen:
                i, k = seen[id(p)]
                other = f"param_groups[{i}]['params'][{k}]" if i is not None else f"{where}['params'][{k}]"
                raise ValueError(f"{where}['params'][{j}] (shape {tuple(p.shape)}) is {other} again: "
                                 "each parameter may be listed once")
            seen[id(p)] = (None, j)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # --- copies and pickling ---------------------------------------------------------------

    def _transient(self) -> tuple:
        """Attributes made again after a copy (beyond the engine's own: engine.__getstate__)."""
        return ()

    def _copy_refused(self) -> str | None:
        """Why the optimizer cannot be copied now (None: it can)."""
        return None

    def __getstate__(self) -> dict:
        """copy.deepcopy, pickle and torch.save: everything but what is made again from it (the
        plans, the device flags: their skipped count is carried over), and torch's hooks and its lr
        schedulers' wrapper (as torch's optimizers do). The copy is an independent optimizer that
        steps like the original."""
        refused = self._copy_refused()
        if refused:
            raise RuntimeError(refused)
        return {k: v for k, v in self.__dict__.items()
                if k not in self._transient() and k not in _PATCHED and not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # torch's hooks, as after Optimizer.__init__
        self.base_optimizer.register_load_state_dict_post_hook(self._on_base_load)

    # --- state -------------------------------------------------------------------------------

    def _extra_state(self) -> dict:
        """What the subclass keeps across steps beyond the base optimizer (tensors allowed)."""
        return {}

    def _check_extra_state(self, extra: dict) -> None:
        """Raise (ValueError, naming it) if the extra state of a checkpoint does not fit this
        optimizer; called by load_state_dict before anything changes."""

    def _load_extra_state(self, extra: dict) -> None:
        pass

    @torch.no_grad()
    def init_state(self) -> None:
        """Create now, without stepping, the base optimizer's state of every parameter that requires
        a gradient (momentum buffers, Adam's moments and step counters, at zero; sharded like the
        parameters under FSDP2): the template torch's own checkpoint helper makes (its
        _init_optim_state steps with zero gradients on those parameters), into whose tensors
        torch.distributed.checkpoint loads (python_tests/test_checkpoints.py, test_fsdp.py). A
        parameter that requires a gradient but never got one (a module unused in the forward)
        has no state in a checkpoint, as with torch's optimizers: load with DCP's
        DefaultLoadPlanner(allow_partial_load=True), and its zero state is what a first step
        would start from. Only for the base optimizers we fuse (SGD, Adam, AdamW); others create
        their state in their own step."""
        adapter = fused(self.base_optimizer)
        if adapter is None:
            raise TypeError(f"init_state: {type(self.base_optimizer).__name__} (with these options) is not fused "
                            "here; its own step() creates its state")
        params = self.engine.param_list()
        if params:
            prepare_state(adapter, [(g, [p for p in g["params"] if p.requires_grad]) for g in self.param_groups],
                          self.engine.counters, distributed.local(params[0]).device)
            for p in params:
                if p.requires_grad:
                    for n in self._own_state_keys:
                        self.own_state(p, n)
        self.engine.invalidate()

    def own_state(self, p: torch.Tensor, name: str) -> torch.Tensor:
        """The class's own state tensor `name` of p (_own_state_keys), made at zero on first use
        (contiguous, p's dtype, sharded like p)."""
        st = self.state[p]
        t = st.get(name)
        if t is None or t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
            t = st[name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return t

    def _init_state_for_checkpoint(self) -> None:
        """torch.distributed.checkpoint makes the state to load into through step() without closure at
        lr 0 (_init_optim_state: zero gradients, lr 0, step()): a step that could not move the
        weights; make the state (a base optimizer we do not fuse makes its own, as torch's helper
        expects of it)."""
        if fused_family(self.base_optimizer) is None:
            self.base_optimizer.step()
        else:
            self.init_state()

    @staticmethod
    def _lr_zero(groups) -> bool:
        return bool(groups) and all(not torch.is_tensor(g["lr"]) and g["lr"] == 0 for g in groups)

    def state_dict(self) -> dict:
        """The base optimizer's state_dict (its param_groups hold rho and our options), with ours in
        its first param group under "sam": the step and skipped-step counters and what the class
        keeps across steps (nuSAM's u, GaussSAM's generator, SAMPa's g_y). A param group, because
        torch.distributed.checkpoint's get_optimizer_state_dict / set_optimizer_state_dict carry
        the state and the param groups and nothing else; under FSDP2 what differs between ranks
        is a sharded DTensor (sam_kernels/integrations/distributed.py), so that DCP saves every
        rank's own."""
        refused = self._copy_refused()
        if refused:
            raise RuntimeError(refused.replace("cannot be copied", "state_dict() cannot be taken"))
        sd = self.base_optimizer.state_dict()
        sd["param_groups"][0]["sam"] = {**self.engine.state(), **self._extra_state()}
        if self._own_state_keys:
            for i, p in enumerate(self.engine.param_list()):
                own = {k: v for k, v in self.state.get(p, {}).items() if k in self._own_state_keys}
                if own:  # (a new dict: the base's entries are its live state)
                    sd["state"][i] = {**sd["state"].get(i, {}), **own}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """A state_dict() of this class (capturable or not), also through get_optimizer_state_dict /
        set_optimizer_state_dict; a checkpoint of the earlier layout ("sam" beside "state") too;
        and the peers' (davda54/sam, pytorch_optimizer's SAM): options a loaded group lacks take
        this optimizer's defaults, their SAM scratch (x_old) is dropped. A checkpoint that cannot
        be used (an option our checks or the base optimizer's refuse, a state tensor shaped
        unlike its parameter, extra state that does not fit) is refused here, by name, before
        anything changes, never at a later step."""
        state_dict = dict(state_dict)
        groups = [dict(g) for g in state_dict.get("param_groups", [])]
        extra = dict(state_dict.pop("sam", None) or (groups[0].get("sam") if groups else None) or {})
        for g in groups:
            g.pop("sam", None)
        if len(groups) != len(self.param_groups):
            raise ValueError(f"load_state_dict: the checkpoint has {len(groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        ids = {}
        for i, (g, mine) in enumerate(zip(groups, self.param_groups)):
            if len(g.get("params", ())) != len(mine["params"]):
                raise ValueError(f"load_state_dict: param_groups[{i}] has {len(g.get('params', ()))} parameters in "
                                 f"the checkpoint, {len(mine['params'])} here")
            for key, value in [*self._own_defaults.items(), *self.base_optimizer.defaults.items()]:
                if value is not required:
                    g.setdefault(key, value)
            where = f"load_state_dict: param_groups[{i}]"
            self._check_group({**g, "params": mine["params"]}, where)
            check_like_constructor(self.base_optimizer, {**g, "params": mine["params"]}, where)
            ids.update(zip(g["params"], mine["params"]))
        state, own = {}, {}
        for k, entry in state_dict.get("state", {}).items():
            p = ids.get(k)
            entry = {n: v for n, v in entry.items() if n not in _PEER_SCRATCH}
            if p is not None and any(n in self._own_state_keys for n in entry):
                own[p] = {n: entry.pop(n) for n in list(entry) if n in self._own_state_keys}
            for n, v in [*entry.items(), *own.get(p, {}).items()]:
                if p is not None and (n in _STATE_TENSORS or n in self._own_state_keys) and torch.is_tensor(v) \
                        and v.shape != p.shape:
                    raise ValueError(f"load_state_dict: state[{k!r}][{n!r}] has shape {tuple(v.shape)}, its parameter "
                                     f"{tuple(p.shape)}")
            state[k] = entry
        self._check_extra_state(extra)
        state_dict["param_groups"], state_dict["state"] = groups, state
        self._before_load()
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict makes new group dicts
        for p in self.engine.param_list():
            for n in self._own_state_keys:
                self.state.get(p, {}).pop(n, None)
        for p, entries in own.items():  # cast like torch's own load: to the parameter's device and dtype
            self.state[p].update({n: v.to(device=p.device, dtype=p.dtype, memory_format=torch.contiguous_format)
                                  for n, v in entries.items()})
        self.engine.load_state(extra)
        self._load_extra_state(extra)
        self.engine.invalidate()

    def _before_load(self) -> None:
        """What must be undone before a checkpoint is loaded (a pending perturbation)."""

    def _base_state_bytes(self) -> int:
        return sum(distributed.nbytes(t) for st in self.base_optimizer.state.values() for t in st.values()
                   if torch.is_tensor(t) and t.dim() > 0)  # this rank's bytes (its shards, under FSDP2)
