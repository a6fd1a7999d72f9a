"""What every sharpness-aware optimizer of sam_kernels shares: building or adopting the base
optimizer (param groups shared with it), argument checks, the schedule, and the step pipeline
(sam_kernels/pipeline.py) that first_step / second_step / base_step / step / restore run:

    first_step    plan "first"   the perturbation the subclass builds (_build_first) and launches
                                 (_perturb); its plan records what the update restores from
    second_step   plan "second"  the guard, then the fused base update restoring x_t (_finish)
    base_step     plan "base"    the guard, then the fused base update from x itself

The non-finite policy is written once, in _finish: the guard decides on the device, the fused
update reads its flag (skipped: the weights get x_t back, no state moves), skipped_steps counts
on the device, and a GradScaler gets the same flag. Nothing reads a tensor on the host, except
nonfinite="raise" (which must know, to raise) and base optimizers we do not fuse (whose own
step() cannot read a device flag): both documented.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer
from torch.optim.optimizer import required

from ..engine.capturable import DeviceScalars, capturing
from ..engine.fused_update import STATE_KEYS, StepCounters, fused_kind, prepare_state, prepare_update, structure
from ..engine.pipeline import SKIPPED, Flags, NormStage, Plans, scaler_inputs, scaler_record
from ..integrations import distributed
from ..ops import backends, extension as _ext
from ..ops.constants import NORM_EPS
from ..ops.lists import GradsOf

NONFINITE = ("skip", "raise")
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
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_step(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def check_max_norm(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"max_grad_norm must be None or a finite number > 0, got {value!r}")
    return float(value)


def check_finite_options(group: dict, where: str) -> None:
    """Every number of a param group (lr, momentum, betas, eps, weight_decay, rho, lam, ...) is
    finite: a NaN or inf learning rate would write NaN into every weight at the first step."""
    for key, value in group.items():
        if key == "params" or isinstance(value, bool):
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if torch.is_tensor(v) and v.is_floating_point():
                ok = bool(torch.isfinite(v).all())  # a tensor lr: read once, when the group is added
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                ok = math.isfinite(v)
            else:
                continue
            if not ok:
                raise ValueError(f"{where}['{key}'] must be finite, got {value!r}")


def check_like_constructor(base: Optimizer, group: dict, where: str) -> None:
    """A param group's options checked as the base optimizer's constructor checks its own (torch's
    optimizers refuse lr < 0, betas outside [0, 1), ...): a probe instance is built over one
    scratch tensor with the group's options (those the constructor takes), nothing else."""
    cls = type(base)
    try:
        signature = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    names = {n for n, p in signature.items() if n not in ("self", "params")
             and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    kwargs = {k: v for k, v in group.items() if k in names or (takes_any and k in base.defaults)}
    like = next((distributed.local(p) for p in group["params"]), None)
    probe = torch.zeros(1, dtype=like.dtype if like is not None else torch.float32,
                        device=like.device if like is not None else "cpu", requires_grad=True)
    try:
        cls([probe], **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{where}: {cls.__name__} refuses these options: {e}") from None


# Options of the peers' SAM classes (pytorch_optimizer 4.x, davda54/sam, the ASAM authors' code):
# passed to us, they would reach the base optimizer, whose **kwargs (pytorch_optimizer's
# optimizers) may swallow them silently. name -> (the value that is what we do anyway, or
# _NEVER, and what to use instead).
_NEVER = object()
_PEER_OPTIONS = {
    "use_gc": (False, "gradient centralization is not implemented here: center the gradients before first_step(), "
                      "or leave it out"),
    "perturb_eps": (NORM_EPS, f"the epsilon of the perturbation's norm is fixed at {NORM_EPS}"),
    "adaptive_eps": (_NEVER, "ASAM's T = |x| + adaptive_offset here: pass adaptive_offset"),
    "eta": (_NEVER, "the ASAM authors' eta is adaptive_offset here"),
    "rho_scheduler": (_NEVER, "pass rho as a callable step -> rho"),
    "max_norm": (_NEVER, "gradient clipping is max_grad_norm here"),
    "alpha": (_NEVER, "GSAM's / LookSAM's alpha is not an option of this class"),
    "k": (_NEVER, "LookSAM's k is not an option of this class (PSAM's period is the nearest)"),
    "sigma": (_NEVER, "FriendlySAM's sigma is not an option of this class"),
    "lmbda": (_NEVER, "FriendlySAM's lmbda is not an option of this class"),
    "gamma": (_NEVER, "WSAM's gamma is not an option of this class"),
    "decouple": (_NEVER, "WSAM's decouple is not an option of this class"),
}


def check_peer_options(cls_name: str, base_optimizer, base_kwargs: dict) -> dict:
    """base_kwargs without the options of other SAM libraries: refused by name where we do not do
    what they ask (use_gc=True), dropped where we do anyway (use_gc=False, perturb_eps=1e-12);
    unless the base optimizer's own constructor names them (RMSprop's alpha is its own)."""
    try:
        own = set(inspect.signature(base_optimizer.__init__).parameters)
    except (TypeError, ValueError):
        own = set()
    for name, value in base_kwargs.items():
        if name in _PEER_OPTIONS and name not in own:
            same, instead = _PEER_OPTIONS[name]
            if same is _NEVER or value != same:
                raise TypeError(f"{cls_name}: {name}={value!r} is an option of another SAM library, not of "
                                f"{cls_name} or {getattr(base_optimizer, '__name__', base_optimizer)}: {instead}")
    return {k: v for k, v in base_kwargs.items() if k not in _PEER_OPTIONS or k in own}


def split_rho(rho):
    """(the radius at step 0, the schedule step -> rho or None): rho is a number or a callable."""
    if callable(rho):
        return check_nonneg("rho(0)", rho(0)), rho
    return check_nonneg("rho", rho), None


def _check_scaler(grad_scaler, opt=None, unscaled: str | None = None) -> None:
    """A torch.amp.GradScaler or None; with `unscaled`, the error raised when scaler.unscale_(opt)
    was called where the step cannot take already unscaled gradients."""
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    if unscaled and grad_scaler is not None and grad_scaler.is_enabled() and (
            grad_scaler._per_optimizer_states[id(opt)]["stage"] is OptState.UNSCALED):
        raise RuntimeError(unscaled)


def check_grad(p: torch.Tensor, where: str, g: torch.Tensor | None = None):
    """where names the parameter (e.g. "SAM first_step: param_groups[0]['params'][3]")."""
    g = p.grad if g is None else g
    if g.layout is torch.strided and g.dtype is p.dtype and p.dtype in _FLOATS and g.shape == p.shape:
        return  # the common case, checked cheaply
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"{where}: sparse gradients are not supported (parameter of shape {tuple(p.shape)}; "
                        "an nn.Embedding with sparse=True makes them)")
    if g.is_complex() or p.is_complex():
        raise TypeError(f"{where}: complex parameters are not supported (dtype {p.dtype})")
    if g.dtype != p.dtype or g.shape != p.shape:
        raise TypeError(
            f"{where}: gradient of dtype {g.dtype} and shape {tuple(g.shape)} does not match its parameter "
            f"({p.dtype}, {tuple(p.shape)})"
        )
    raise TypeError(f"{where}: parameters of dtype {p.dtype} are not supported (expected one of {_FLOATS})")


def _flatten_params(params):
    out = []
    for item in params:
        if isinstance(item, dict):
            out.extend(item["params"] if not isinstance(item["params"], torch.Tensor) else [item["params"]])
        else:
            out.append(item)
    return out


class UpdatePlan:
    """The second pass of a step (or a plain step), built once per key: the guard over the
    gradients, and per param group the fused updates (or, for base optimizers we do not fuse,
    the generic path)."""

    def __init__(self):
        self.guard: NormStage | None = None
        self.updates: list[Callable] = []  # each run(flags) launches one fused update
        self.restores: list[Callable] = []  # run(flags) after them: perturbed weights without a second gradient
        self.commits: list[Callable] = []  # run(flags) last: what the first pass keeps only if the step is taken
        self.generic = False
        self.grads: list[torch.Tensor] = []
        self.steps = self.steps_mask = None  # Adam's counters (StepCounters) and which of them move
        self.counters_version = -1


class SharpnessAwareOptimizer(Optimizer):
    """Base class: subclasses build their perturbation (_build_first, _perturb) and say where the
    update restores each parameter from (the first plan's old_of / rank1_of).

    Shared schedule (ALGORITHMS.md, "Perturbation delay and rho schedules"): before `start_step`
    a step is a plain base step (one gradient); `rho` may be a callable step -> rho, applied to
    every param group when a SAM step starts. `sam_step_due` says which kind the next step is.
    max_grad_norm: clip the gradient that drives the base update to this global norm, as
    torch.nn.utils.clip_grad_norm_ just before the update would (inside the fused update; with a
    GradScaler, of the unscaled gradient).
    """

    def __init__(self, params, base_optimizer, defaults: dict, backend: str, nonfinite: str, base_kwargs: dict,
                 start_step: int = 0, rho_fn: Callable[[int], float] | None = None, max_grad_norm=None,
                 capturable: bool = False):
        if isinstance(params, Optimizer):
            raise TypeError(f"params is a {type(params).__name__} instance: pass the base optimizer as "
                            f"base_optimizer= and params=None, e.g. {type(self).__name__}(base_optimizer=opt, rho=...)")
        backends.check_name(backend)
        if isinstance(base_optimizer, type):
            base_kwargs = check_peer_options(type(self).__name__, base_optimizer, base_kwargs)
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        max_grad_norm = check_max_norm(max_grad_norm)
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
        self.backend = backend
        self.nonfinite = nonfinite
        self.max_grad_norm = max_grad_norm
        self.capturable = bool(capturable)
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f"param_groups[{i}]")
        self.start_step = check_step("start_step", start_step)
        self._rho_fn = rho_fn
        self._t = 0  # steps taken (SAM, plain or skipped): what start_step and the rho schedule count
        self._plain_pending = False  # first_step() found no SAM step due: second_step() is a base step
        self._pending = None  # the first plan between first_step() and second_step()
        self._flags: Flags | None = None  # on the device of the parameters, from the first step on
        self._scalars: DeviceScalars | None = None  # capturable: lr and rho on the device
        self._skipped_at_load = 0.0  # a loaded skipped_steps, before the flags exist
        self._counters = StepCounters()
        self._plans = Plans()
        self._version = 0  # bumped when the param groups or the state change under the plans
        self._params_cache = (-1, [])
        self._sharded = None  # the process group of sharded (DTensor) parameters, set by _param_list
        base.register_load_state_dict_post_hook(self._on_base_load)

    def _on_base_load(self, _base) -> None:
        self._invalidate()

    # --- to implement ------------------------------------------------------------------------

    def _build_first(self, work, device):
        """The first plan from [(group, params with a gradient)]: its launches and buffers."""
        raise NotImplementedError

    def _perturb(self, plan) -> None:
        """Launch the first pass of `plan` (perturb in place)."""
        raise NotImplementedError

    def _group_key(self, group: dict) -> tuple:
        """The options of a param group that decide a plan's launches (not its scalars)."""
        return ()

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
            backends.resolve(self.backend, d)  # an unavailable explicit backend fails here, not mid-step

    def _group_added(self, group: dict) -> None:
        """A group that add_param_group appended (validated): set up what the subclass keeps per parameter."""

    def _extra_state(self) -> dict:
        """What the subclass keeps across steps beyond the base optimizer (tensors allowed)."""
        return {}

    def _check_extra_state(self, extra: dict) -> None:
        """Raise (ValueError, naming it) if the extra state of a checkpoint does not fit this
        optimizer; called by load_state_dict before anything changes."""

    def _load_extra_state(self, extra: dict) -> None:
        pass

    # --- the schedule ------------------------------------------------------------------------

    @property
    def sam_step_due(self) -> bool:
        """Whether the next step is a SAM step (two gradients) rather than a plain base step."""
        return self._t >= self.start_step

    @property
    def steps(self) -> int:
        """Steps taken so far (SAM steps, plain base steps and skipped steps)."""
        return self._t

    def _apply_rho_schedule(self) -> None:
        if self._rho_fn is not None:
            rho = check_nonneg(f"rho({self._t})", self._rho_fn(self._t))
            for group in self.param_groups:
                group["rho"] = rho

    # --- plans -------------------------------------------------------------------------------

    def _invalidate(self) -> None:
        self._version += 1
        self._plans.clear()

    def _param_list(self) -> list:
        version, params = self._params_cache
        if version != self._version or len(params) != sum(len(g["params"]) for g in self.param_groups):
            params = [p for g in self.param_groups for p in g["params"]]
            self._params_cache = (self._version, params)
            self._sharded = distributed.shard_group(params, "param_groups")  # None, or the mesh's group
        return params

    def _reduce_group(self):
        """The process group over which the optimizer's parameters are sharded (None: not sharded):
        what the global norms are all-reduced over (sam_kernels/distributed.py)."""
        self._param_list()
        return self._sharded

    def _key(self, *extra, update: bool = False):
        """A plan's key, (structure, gradient addresses), from what the plan reads when it is built:
        the optimizer's configuration (backend, capturable), the groups' structure and options
        that decide launches (_group_key), the parameters' addresses and layout and which of
        them have a gradient (and `extra`); for an update plan (update=True)
        also the base optimizer's fused kind and options, Adam's counters vector and the state
        entries it binds (which exist, and where: a state created or replaced by hand, or read
        through torch's defaultdict, makes another plan); then where the gradients are. Cheap: C
        loops over the parameters (pipeline.Plans)."""
        params = self._param_list()
        fp = _ext if self._sharded is None else distributed
        params_key, grads = fp.fingerprint(params)
        groups = tuple((len(g["params"]), self._group_key(g)) for g in self.param_groups)
        config = (self._version, self.backend, self.capturable)
        if not update:
            return (config, groups, params_key, *extra), grads
        kind = fused_kind(self.base_optimizer)
        base = tuple(structure(kind, g) for g in self.param_groups) if kind else ()
        state = fp.state_fingerprint(self.base_optimizer.state, params, STATE_KEYS[kind]) if kind else ()
        return (config, groups, params_key, kind, base, self._counters.version, state, *extra), grads

    def _work(self, where: str, need_grad: bool = False):
        """[(group, [params with a gradient])] after checking every gradient, and their device;
        need_grad: a RuntimeError when no parameter has one (a first step perturbs along it)."""
        work, devices = [], set()
        for i, group in enumerate(self.param_groups):
            ps = [p for p in group["params"] if p.grad is not None]
            for j, p in enumerate(group["params"]):
                if p.grad is not None:
                    check_grad(p, f"{where}: param_groups[{i}]['params'][{j}]")
                    devices.add(p.device)
            work.append((group, ps))
        if len(devices) > 1:
            raise ValueError(f"{where}: the parameters with gradients span devices {sorted(map(str, devices))}")
        if need_grad and not devices:
            n = sum(len(g["params"]) for g in self.param_groups)
            raise RuntimeError(f"{where}: no parameter has a gradient (.grad is None for all {n}): the perturbation "
                               "follows the gradient at the current weights; call loss.backward() first, or "
                               "step(closure) with a closure that computes it")
        device = next(iter(devices)) if devices else next(
            (p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        return work, device

    def _flags_on(self, device) -> Flags:
        if self._flags is None or self._flags.device != torch.device(device):
            skipped = self._flags.t[SKIPPED].to(device) if self._flags is not None else self._skipped_at_load
            self._flags = Flags(device)
            self._flags.t[SKIPPED] = skipped
        return self._flags

    def _backend(self, device, op: str) -> str:
        return backends.resolve(self.backend, device, op)

    # --- capturable steps (sam_kernels/capturable.py) --------------------------------------------

    def _device_scalars(self, device) -> DeviceScalars:
        """The device scalars of the param groups; made again when the groups or the device changed,
        which the plans holding views of the old ones did not see: they are dropped."""
        ds = self._scalars
        if ds is None or ds.device != torch.device(device) or not ds.covers(self.param_groups):
            if ds is not None:
                self._invalidate()
            ds = self._scalars = DeviceScalars(self.param_groups, self._flags_on(device).device)
            ds.load_()
        return ds

    def _lr(self, group: dict, device):
        """What a fused update takes for the group's lr: None (group["lr"], read per call) or, when
        capturable, its device scalar."""
        if not self.capturable:
            return None
        return self._device_scalars(device).lr(group)

    def _rho(self, group: dict, device):
        """The group's rho: the number, or (capturable) its device scalar."""
        if not self.capturable:
            return group["rho"]
        return self._device_scalars(device).rho(group)

    def _begin(self, name: str) -> None:
        """Before a step's launches: under CUDA graph capture, only a capturable optimizer may run
        (its host numbers would be baked into the graph); otherwise the device scalars of a
        capturable one get the groups' current lr and rho."""
        if capturing():
            if not self.capturable:
                raise RuntimeError(f"{name} is being captured in a CUDA graph but the optimizer was built with "
                                   "capturable=False: its lr and rho would be fixed at their values of the capture")
            if self.nonfinite == "raise":
                raise RuntimeError(f"{name}: nonfinite='raise' reads the device on the host and cannot be captured")
        elif self.capturable and self._scalars is not None:
            self._scalars.load_()

    def _plan(self, kind: str, key, build):
        """The plan of kind for key() (a function: the key is taken again once a plan is built,
        which may have created what it binds); under capture it must be the one warm-up built (a
        build or a refresh would copy tables from the host into the graph)."""
        if capturing() and not self._plans.holds(kind, key()):
            raise RuntimeError(f"{type(self).__name__}: the {kind!r} step plan changed during CUDA graph capture "
                               "(parameters, gradients, their addresses or the param groups differ from the last "
                               "eager step): run an eager step with the same setup before capturing")
        return self._plans.get(kind, key, build)

    def _build_update(self, work, device, first) -> UpdatePlan:
        """The guard and the fused updates of one pass over [(group, params with a gradient)]:
        each parameter restores from what `first` kept (SAM's copy, nuSAM's rank-1 term) or, not
        perturbed, from itself."""
        plan = UpdatePlan()
        plan.grads = GradsOf([p for _, ps in work for p in ps])
        plan.guard = NormStage(self._backend(device, "global_norm"), device,
                               [(plan.grads, None, 0, 0.0)] if len(plan.grads) else [], group=self._reduce_group())
        kind = fused_kind(self.base_optimizer)
        plan.generic = kind is None
        if kind is not None:
            prepare_state(self.base_optimizer, kind, work, self._counters, device)
        adam_params = []
        for group, ps in work:
            if not ps or kind is None:
                continue
            backend = self._backend(device, "restore_sgd_")
            rank1 = [p for p in ps if first is not None and first.rank1_of(p) is not None]
            plain = [p for p in ps if first is None or first.rank1_of(p) is None]
            if plain:
                olds = [first.old_of(p) if first is not None else p for p in plain]
                run = prepare_update(self.base_optimizer, kind, group, backend, device, plain, GradsOf(plain),
                                     self._counters, olds=olds, lr=self._lr(group, device))
                plan.updates.append(lambda flags, run=run: run(flags.grad_scale, flags.found_inf))
            if rank1:
                plan.updates.append(first.rank1_update(self.base_optimizer, kind, group, device, rank1,
                                                       self._counters))
            if kind == "adam":
                adam_params += ps
        if first is not None:
            with_grad = {id(p) for _, ps in work for p in ps}
            left = first.restore_left([p for p in first.params if id(p) not in with_grad])
            if left is not None:  # perturbed, but no second gradient: x_t back, unconditionally
                plan.restores.append(left)
            commit = first.commit()
            if commit is not None:  # what the first pass keeps only if the step is taken (nuSAM's u)
                plan.commits.append(commit)
        if adam_params:
            plan.steps, plan.steps_mask = self._counters.vec, self._counters.mask(adam_params)
        return plan

    def _finish(self, plan: UpdatePlan, prior, grad_scaler, first, name: str) -> None:
        """The guard, then the update: the one place the non-finite policy is written."""
        flags = self._flags_on(plan.guard.partials.device)
        scale, found_inf, scaler_state = scaler_inputs(self, grad_scaler, flags.device)
        if found_inf is not None and plan.guard.group is not None:  # scaler.unscale_ checked this rank's shards
            found_inf = found_inf.clone()
            distributed.all_reduce_sum_(found_inf, plan.guard.group)
        plan.guard.guard(flags, prior=prior, scale=scale, found_inf=found_inf, max_norm=self.max_grad_norm,
                         steps=plan.steps, steps_mask=plan.steps_mask)
        scaler_record(scaler_state, flags)
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
                self.base_optimizer.step()
            return
        if first is not None:
            first.active = False  # the updates below take the perturbation out
        for run in plan.updates + plan.restores + plan.commits:
            run(flags)

    # --- the steps ---------------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """Perturb the weights along the gradient in .grad, if a SAM step is due (else nothing:
        second_step() will then take a plain base step). With a GradScaler the gradient is scaled:
        the perturbation only uses its direction, and an inf / NaN skips the step in second_step()."""
        name = type(self).__name__
        _check_scaler(grad_scaler)
        if self._plain_pending or self._pending is not None:
            raise RuntimeError(f"{name}.first_step() called twice: call second_step() or restore() in between")
        _check_scaler(grad_scaler, self, f"{name}.first_step(): scaler.unscale_(optimizer) was called before the "
                                         "first step; call it after the second backward, before second_step()")
        if not self.sam_step_due:
            self._plain_pending = True
            if zero_grad:
                self.zero_grad()
            return
        self._apply_rho_schedule()
        self._begin(f"{name}.first_step")
        plan = self._plan("first", self._key,
                          lambda: self._build_first(*self._work(f"{name}.first_step()", need_grad=True)))
        self._perturb(plan)
        self._pending = plan
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """Restore x_t and take the base step with the gradient at the perturbed point (after a
        first_step() that found no SAM step due: a plain base step with the gradient in .grad).
        grad_scaler: the torch.amp.GradScaler that scaled both losses; the gradient is unscaled
        inside the fused update (or was, by scaler.unscale_(optimizer) before this call), and the
        scaler gets the step's device flag, so that scaler.update() backs off after an inf / NaN
        in either pass, as after scaler.step(optimizer)."""
        name = type(self).__name__
        _check_scaler(grad_scaler)
        if self._plain_pending:
            self._plain_pending = False
            self.base_step(zero_grad, grad_scaler)
            return
        first = self._pending
        if first is None:
            raise RuntimeError(f"{name}.second_step() called without first_step()")
        self._pending = None
        try:
            self._begin(f"{name}.second_step")
            plan = self._plan("second", lambda: self._key(first, update=True),
                                   lambda: self._build_update(*self._work(f"{name} second_step"), first))
            self._t += 1
            self._finish(plan, first.prior, grad_scaler, first, f"{name}.second_step")
        except BaseException:
            first.undo()  # x_t back unless the update consumed the perturbation already
            raise
        self._mark_stepped()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def base_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """A plain base-optimizer step with the gradient in .grad (one gradient, no perturbation),
        for the steps where no SAM step is due. The same non-finite and GradScaler handling as a
        SAM step."""
        name = type(self).__name__
        _check_scaler(grad_scaler)
        if self._pending is not None:
            raise RuntimeError(f"{name}.base_step() between first_step() and second_step(): the weights are perturbed")
        self._plain_pending = False
        self._begin(f"{name}.base_step")
        plan = self._plan("base", lambda: self._key(update=True),
                          lambda: self._build_update(*self._work(f"{name} base_step"), None))
        self._t += 1
        self._finish(plan, None, grad_scaler, None, f"{name}.base_step")
        self._mark_stepped()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put x_t back after first_step() without updating (bit for bit for SAM)."""
        self._plain_pending = False
        if self._pending is not None:
            first, self._pending = self._pending, None
            first.undo()

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
        gradient (the first form does not call the closure and returns None)."""
        if closure is None:
            if self.param_groups and all(not torch.is_tensor(g["lr"]) and g["lr"] == 0 for g in self.param_groups):
                # torch.distributed.checkpoint makes the state to load into this way (_init_optim_state:
                # zero gradients, lr 0, step()): a step that could not move the weights; make the state
                # (a base optimizer we do not fuse makes its own, as torch's helper expects of it)
                if fused_kind(self.base_optimizer) is None:
                    self.base_optimizer.step()
                else:
                    self.init_state()
                return None
            raise ValueError(f"{type(self).__name__}.step needs a closure that recomputes the loss and gradients "
                             "(or use first_step / second_step)")
        given = any(p.grad is not None for p in self._param_list())
        first_loss = None
        if not given:
            with torch.enable_grad():
                first_loss = closure()
        if not self.sam_step_due:
            self.base_step(zero_grad=True, grad_scaler=grad_scaler)
            return first_loss
        self.first_step(zero_grad=True, grad_scaler=grad_scaler)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step(zero_grad=True, grad_scaler=grad_scaler)
        return loss if given else first_loss

    def _mark_stepped(self) -> None:
        """What torch's lr schedulers check (`_opt_called`, set by the wrapper they put on step()),
        on this optimizer and on the base: a scheduler attached to either one sees a step, as after
        a plain optimizer.step() (the fused path never calls the base's own step())."""
        self._opt_called = True
        self.base_optimizer._opt_called = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

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
        self._invalidate()

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

    # --- copies and pickling ---------------------------------------------------------------

    def _transient(self) -> tuple:
        """Attributes rebuilt after a copy: plans (tables of addresses), caches keyed by id()."""
        return ("_plans", "_params_cache", "_flags", "_counters", "_scalars", "_sharded")

    def __getstate__(self) -> dict:
        """copy.deepcopy, pickle and torch.save: everything but what is rebuilt from it (the plans,
        the device flags: their skipped count is carried over), and torch's hooks (as torch's
        optimizers do). The copy is an independent optimizer that steps like the original."""
        if self._pending is not None:
            raise RuntimeError(f"{type(self).__name__} cannot be copied between first_step() and second_step(): "
                               "the weights are perturbed")
        state = {k: v for k, v in self.__dict__.items()
                 if k not in self._transient() and k not in _PATCHED and not k.startswith("_optimizer_")}
        state["_skipped_at_load"] = float(self.skipped_steps)  # the device count, read once
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # torch's hooks, as after Optimizer.__init__
        self._plans, self._params_cache, self._flags, self._counters = Plans(), (-1, []), None, StepCounters()
        self._scalars, self._sharded = None, None
        self.base_optimizer.register_load_state_dict_post_hook(self._on_base_load)

    # --- state -------------------------------------------------------------------------------

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held NaN or inf (counted on the device: reading this
        waits for the device, stepping never does)."""
        if self._flags is None:
            return int(self._skipped_at_load)
        return int(self._flags.t[SKIPPED].item())

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """The norm of the (unscaled, unclipped) gradient of the last update, a device scalar."""
        return self._flags.t[2] if self._flags is not None else None

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
        kind = fused_kind(self.base_optimizer)
        if kind is None:
            raise TypeError(f"init_state: {type(self.base_optimizer).__name__} (with these options) is not fused "
                            "here; its own step() creates its state")
        params = self._param_list()
        if params:
            prepare_state(self.base_optimizer, kind,
                          [(g, [p for p in g["params"] if p.requires_grad]) for g in self.param_groups],
                          self._counters, distributed.local(params[0]).device)
        self._invalidate()

    def state_dict(self) -> dict:
        """The base optimizer's state_dict (its param_groups hold rho and our options), with ours in
        its first param group under "sam": the step and skipped-step counters and what the class
        keeps across steps (nuSAM's u, GaussSAM's generator, SAMPa's g_y). A param group, because
        torch.distributed.checkpoint's get_optimizer_state_dict / set_optimizer_state_dict carry
        the state and the param groups and nothing else; under FSDP2 what differs between ranks
        is a sharded DTensor (sam_kernels/distributed.py), so that DCP saves every rank's own."""
        if self._pending is not None:
            raise RuntimeError(f"{type(self).__name__}.state_dict() between first_step() and second_step(): "
                               "the weights are perturbed")
        sd = self.base_optimizer.state_dict()
        sd["param_groups"][0]["sam"] = {"skipped_steps": self.skipped_steps, "step": self._t, **self._extra_state()}
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
        state = {}
        for k, entry in state_dict.get("state", {}).items():
            p = ids.get(k)
            entry = {n: v for n, v in entry.items() if n not in _PEER_SCRATCH}
            for n, v in entry.items():
                if p is not None and n in _STATE_TENSORS and torch.is_tensor(v) and v.shape != p.shape:
                    raise ValueError(f"load_state_dict: state[{k!r}][{n!r}] has shape {tuple(v.shape)}, its parameter "
                                     f"{tuple(p.shape)}")
            state[k] = entry
        self._check_extra_state(extra)
        state_dict["param_groups"], state_dict["state"] = groups, state
        self.restore()
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict makes new group dicts
        skipped = float(extra.pop("skipped_steps", 0))
        if self._flags is not None:
            self._flags.t[SKIPPED] = skipped
        self._skipped_at_load = skipped
        self._t = int(extra.pop("step", 0))
        self._load_extra_state(extra)
        self._invalidate()

    def _base_state_bytes(self) -> int:
        return sum(distributed.nbytes(t) for st in self.base_optimizer.state.values() for t in st.values()
                   if torch.is_tensor(t) and t.dim() > 0)  # this rank's bytes (its shards, under FSDP2)
