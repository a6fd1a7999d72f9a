"""SAMPa-lambda (ALGORITHMS.md, "SAMPa-lambda"): SAM's two gradients made independent, so that
they can be computed at the same time.

    x~_t    = x_t + rho g_y / (||g_y|| + eps)        g_y = grad f(y_t; B_t), kept from the last step
    y_{t+1} = the base optimizer's step from x_t with g_y, its state untouched
              (x~_t and y_{t+1} come out of one fused pass over x_t, g_y and the state)
    in parallel:  g~ = grad f(x~_t; B_t)   and   g_y' = grad f(y_{t+1}; B_{t+1})
    d_t     = (1 - lam) g~ + lam g_y'
    x_{t+1} = the base step from x_t with d_t        (one fused pass);  g_y <- g_y', B_t <- B_{t+1}

Concurrent passes (two CUDA streams, two ranks of a process group, a CUDA graph) take both
gradients at shadow copies (x~ and y) through torch.func.functional_call while the model's
parameters hold x_t, so that they share nothing they write. An eager step takes them in turn,
with two parameter copies above SGD: the y-pass at a scratch copy, then the x~-pass at the
model's own parameters, moved to x~ and back (SAMPa._passes_in_turn).

Module buffers (BatchNorm running statistics): they move only with the y-pass, which sees every
batch first, at the unperturbed preview point (the counterpart of the reference SAM, which
updates them in its first pass only). Both passes run on private copies of the buffers; the
y-pass's copies are written back when the step is accepted, the x~-pass's are discarded.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from .. import ops
from ..engine.capturable import capturing
from ..engine.fused_update import fused_kind, prepare_preview, prepare_state, prepare_update, preview_with_own_step
from ..engine.pipeline import NormStage, scaler_inputs, scaler_record
from ..integrations.distributed import is_dtensor
from ..ops.lists import Slot
from .base import SharpnessAwareOptimizer, UpdatePlan, _check_scaler, check_grad, split_rho

PARALLEL = ("auto", "streams", "sequential", "distributed")


def _versions(batch) -> tuple:
    """The version counters of the batch's tensors (host integers: bumped by every in-place write)."""
    return tuple(t._version for t in pytree.tree_leaves(batch) if torch.is_tensor(t)) if batch is not None else ()


def check_lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    return float(lam)


class _LossModule(nn.Module):
    """loss_fn(model, batch) as a module, so that functional_call can swap the model's tensors."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _accumulate(loss: torch.Tensor, leaves: list) -> list:
    """The gradients of loss w.r.t. the leaf tensors `leaves` in their .grad, zeroed in place first
    (capturable: the same addresses every step, which the step plans and a CUDA graph hold, where
    torch.autograd.grad returns new tensors each pass; the gradients are the same, 0 + g = g).
    A leaf the loss does not use gets zeros."""
    held = [t.grad for t in leaves if t.grad is not None]
    if held:
        torch._foreach_zero_(held)
    torch.autograd.backward(loss, inputs=leaves)
    for t in leaves:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    return [t.grad for t in leaves]


class SAMPa(SharpnessAwareOptimizer):
    """SAMPa-lambda around torch.optim.SGD (momentum, nesterov, weight decay), Adam or AdamW (fused),
    or any other torch.optim optimizer (generic: y previews a plain gradient step, x_{t+1} is the
    optimizer's own step with d_t in .grad).

    Args:
        model: the module to train; its parameters that require grad are optimized.
        loss_fn: loss_fn(model, batch) -> scalar loss tensor (called 2T + 1 times over T steps).
        base_optimizer: a torch.optim.Optimizer subclass (built with base_kwargs on the model's
            parameters) or an instance over (some of) the model's parameters.
        rho: perturbation radius (per group: a 'rho' key).  lam: the weight of g_y' in d_t, in [0, 1]
            (per group: a 'lam' key); 0 is SAMPa-0, 0.2 the paper's default.
        parallel: "sequential" (one pass after the other), "streams" (two CUDA streams on one
            device), "distributed" (ranks 2i and 2i+1 of the process group form pair i: the even
            rank takes the x~-pass, the odd one the y-pass; both must be given the pair's batch),
            or "auto": on CUDA two streams inside a CUDA graph (sam_kernels.make_graphed_step), where
            the GPU runs the passes side by side, and sequential in eager mode, where the host
            cannot issue two passes fast enough to overlap them (measured: two streams were 1.14x
            slower than sequential on ViT-S/16 and 3% faster on resnet18, bench/NOTES.md);
            "sequential" on a CPU.
        backend, nonfinite, max_grad_norm: as for SAM (the clipped gradient is the mixed one, d_t).
        process_group: for "distributed" (default: the world).
        start_step: plain base steps before it (one gradient at x_t on the new batch; SAMPa's step
            0, which computes g_y, is then step start_step). rho may be a callable step -> rho.
        capturable: as for SAM; the gradients of each pass also land at fixed addresses (the .grad
            of the shadow parameter sets, zeroed in place), so that a CUDA graph can hold them.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 base_optimizer=torch.optim.SGD, rho=0.1, lam: float = 0.2, parallel: str = "auto",
                 backend: str = "auto", nonfinite: str = "skip", process_group=None, start_step: int = 0,
                 max_grad_norm=None, capturable: bool = False, **base_kwargs):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        rho, rho_fn = split_rho(rho)
        lam = check_lam(lam)
        if parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
        named = dict(model.named_parameters())
        if isinstance(base_optimizer, torch.optim.Optimizer):
            params = None
        else:
            params = [p for p in named.values() if p.requires_grad]
            if not params:
                raise ValueError("model has no parameter that requires grad")
        self._model_names = {id(p): n for n, p in named.items()}  # _check_group reads it
        super().__init__(params, base_optimizer, dict(rho=rho, lam=lam), backend, nonfinite, base_kwargs, start_step,
                         rho_fn, max_grad_norm, capturable)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._names = ["model." + self._model_names[id(p)] for p in self._params]
        self._buffer_names = ["model." + n for n, _ in model.named_buffers()]
        self.model = model
        self.loss_fn = loss_fn
        self._module = _LossModule(model, loss_fn)
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            raise ValueError(f"SAMPa: the parameters span devices {sorted(map(str, devices))}")
        self.device = next(iter(devices))
        self.parallel = self._resolve_parallel(parallel, process_group)
        self._group = process_group
        self._streams = None
        # SAMPa's own state: g_y, its norm and the batch it was computed on (None before step 0)
        self._g_y: list[torch.Tensor] | None = None
        self._g_y_norm: torch.Tensor | None = None
        self._batch: Any = None
        self._batch_versions: tuple = ()  # the kept batch's tensors' version counters when it was kept
        self._shadows: tuple[list, list] | None = None
        self._live: dict[str, list] = {}  # the gradient lists of the step in progress (what plans bind)
        self.loss_calls = 0  # loss_fn evaluations on this process (2T + 1 after T sequential steps)

    # --- configuration ---------------------------------------------------------------------

    def _group_key(self, group: dict) -> tuple:
        return (group["lam"] if group["lam"] in (0.0, 1.0) else None,)

    def _transient(self) -> tuple:
        # streams and the passes' scratch are made again; the names are keyed by id() of the model's parameters
        return (*super()._transient(), "_streams", "_live", "_shadows", "_model_names")

    def __getstate__(self) -> dict:
        if self.parallel == "distributed":
            raise TypeError("a SAMPa with parallel='distributed' holds a process group: it cannot be copied")
        return super().__getstate__()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._streams, self._live, self._shadows = None, {}, None
        self._model_names = {id(p): n for n, p in self.model.named_parameters()}
        self.keep_batch(self._batch)  # the copy's own tensors

    def _check_group(self, group: dict, where: str) -> None:
        super()._check_group(group, where)
        try:
            group["lam"] = check_lam(group["lam"])
        except ValueError:
            raise ValueError(f"{where}['lam'] must be a number in [0, 1], got {group['lam']!r}") from None
        for j, p in enumerate(group["params"]):
            if is_dtensor(p):
                raise NotImplementedError(f"SAMPa: {where}['params'][{j}] is a sharded DTensor: SAMPa runs its passes "
                                          "at parameter copies of its own (torch.func.functional_call), which FSDP2 "
                                          "does not gather; use parallel='distributed' on replicated parameters")
            if id(p) not in self._model_names:
                raise ValueError(f"{where}['params'][{j}] (shape {tuple(p.shape)}) is not a parameter of the model: "
                                 "SAMPa takes its gradients through the model")

    def _group_added(self, group: dict) -> None:
        """The new parameters join the passes; their kept gradient g_y starts at zero (no
        perturbation of them, and a preview without them, until their first step)."""
        if any(p.device != self.device for p in group["params"]):
            raise ValueError(f"SAMPa: the new parameters must be on {self.device}")
        self._params = self._params + list(group["params"])
        self._names = self._names + ["model." + self._model_names[id(p)] for p in group["params"]]
        if self._g_y is not None:
            self._g_y = self._g_y + [torch.zeros_like(p) for p in group["params"]]
        self._shadows = None

    def _resolve_parallel(self, parallel: str, process_group) -> str:
        if parallel == "auto":
            return "auto" if self.device.type == "cuda" else "sequential"
        if parallel == "streams" and self.device.type != "cuda":
            raise ValueError(f"parallel='streams' needs the model on a CUDA device, got {self.device}")
        if parallel == "distributed":
            dist = torch.distributed
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("parallel='distributed' needs torch.distributed initialized "
                                   "(torch.distributed.init_process_group)")
            world = dist.get_world_size(process_group)
            if world < 2 or world % 2:
                raise ValueError(f"parallel='distributed' needs an even number of ranks (pairs), got {world}")
        return parallel

    # --- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, batch=None, grad_scaler=None):
        """One SAMPa step with the new minibatch `batch`; returns the detached loss of the y-pass,
        f(y_{t+1}; batch). An exception in loss_fn leaves model and optimizer as they were, but
        one in the x~-pass of a step in turn, which loses g_y: the next step is a step 0 again
        (README.md, SAMPa; _passes_in_turn).

        grad_scaler: a torch.amp.GradScaler (fp16): each pass backpropagates the loss times its
        scale and unscales its gradients in place (a device scalar, no host read), and the scaler
        gets the step's device flag as from scaler.step(optimizer): call scaler.update() after."""
        if batch is None:
            raise ValueError("SAMPa.step(batch) needs the new minibatch (SAMPa computes its gradients itself; "
                             "loss_fn(model, batch) gives the loss)")
        scale, scaler_state = self._scaler_inputs(grad_scaler)
        if self.sam_step_due and self._g_y is not None:
            self._check_kept_batch()
        if not self.sam_step_due:
            self._begin("SAMPa.step")
            loss = self._plain_step(batch, scale)
            scaler_record(scaler_state, self._flags)
            return loss
        self._apply_rho_schedule()
        self._begin("SAMPa.step")
        kept = self._batch
        if self._g_y is None:  # step 0: g_y = grad f(x_0; B_0), and B_0 for both passes
            _, g_y, _ = self._pass_at_x(batch, scale)
            kept = batch
            self._norm_of("g_y", g_y, self._g_y_norm_buf())  # (and g_y into self._live)
            del g_y
        else:
            self._live["g_y"] = self._g_y
        if self._in_turn():
            (loss_t, g_t, _), (loss_y, g_yn, buffers_y) = self._passes_in_turn(kept, batch, scale)
        else:
            xt, y = self._preview_step(self._live["g_y"])
            g_y = self._live.pop("g_y")
            if self._fixed_grads() and g_y is not self._g_y:
                self.zero_grad()  # step 0's g_y, accumulated in the model's .grad: read, no longer needed
            del g_y
            (loss_t, g_t, _), (loss_y, g_yn, buffers_y) = self._both_passes(xt, kept, y, batch, scale)
        if self.parallel == "distributed":
            g_t, g_yn, buffers_y, loss_y = self._exchange(g_t, g_yn, buffers_y, loss_y)
        self._finish_step(g_t, g_yn, buffers_y)
        scaler_record(scaler_state, self._flags)
        # g_y <- g_y' and B_t <- B_{t+1} always (ALGORITHMS.md); a g_y from a skipped step that is
        # not finite is not used by the next preview (its norm says so on the device)
        self._g_y = list(g_yn)
        self.keep_batch(batch)
        return loss_y.detach()

    @torch.no_grad()
    def _preview_step(self, g_y):
        """x~ and y from x_t and g_y (one fused pass per group) into the shadow parameter sets."""
        xt, y = self._shadow_sets()
        self._live["g_y"] = g_y
        self._plan("preview", self._key_of("g_y", update=True),
                   lambda: self._build_preview([xt[sl] for _, sl in self._group_slices()],
                                               [y[sl] for _, sl in self._group_slices()]))()
        return xt, y

    def _scaler_inputs(self, grad_scaler):
        """((scale, 1 / scale) as fp32 device scalars, the scaler's record of this optimizer) or
        (None, None) without an enabled GradScaler; checked before anything changes."""
        _check_scaler(grad_scaler, self, "SAMPa.step: scaler.unscale_(optimizer) was called, but SAMPa computes (and "
                                         "unscales) its gradients inside step(batch, grad_scaler)")
        scale, _, state = scaler_inputs(self, grad_scaler, self.device)
        if scale is None:
            return None, None
        scale = scale.float()
        return (scale, torch.reciprocal(scale.double()).float()), state

    @property
    def kept_batch(self):
        """The batch of the last step, which the next step's x~-pass reads again (ALGORITHMS.md:
        g~ is taken on B_t); None before the first step and after an exception in an x~-pass."""
        return self._batch

    def keep_batch(self, batch) -> None:
        """Keep `batch` for the next step's x~-pass, with its tensors' version counters (host
        integers): a tensor refilled in place before that step is refused by name then
        (_check_kept_batch). make_graphed_step keeps it in static inputs of its own."""
        self._batch = batch
        self._batch_versions = _versions(batch)

    def _check_kept_batch(self) -> None:
        """Before anything changes: the kept batch as it was when kept. A caller that refills its
        input tensors in place (xb.copy_(next_x), as prefetching loaders do) would change what the
        x~-pass reads, silently; no tensor is read on the host (version counters)."""
        if capturing() or _versions(self._batch) == self._batch_versions:
            return
        tensors = [(path, t) for path, t in pytree.tree_flatten_with_path(self._batch)[0] if torch.is_tensor(t)]
        changed = next((pytree.keystr(path) for (path, t), v in zip(tensors, self._batch_versions) if t._version != v),
                       "")
        raise ValueError(
            f"SAMPa.step: batch{changed} of the last step was modified in place after that "
            "step, but SAMPa's next x~-pass reads that batch again (ALGORITHMS.md: g~ is taken on B_t). Pass new "
            "tensors each step (a DataLoader does), or a copy before refilling them: opt.step(tuple(t.clone() for t in "
            "batch)). Nothing was changed.")

    def _fixed_grads(self) -> bool:
        """Whether the passes' gradients land in fixed buffers, the .grad of the points they are
        taken at (_accumulate): what a graph holds (capturable), and two streams' one set less."""
        return self.capturable or self.parallel == "streams"

    def _in_turn(self) -> bool:
        """Whether this step runs its passes one after the other on scratch sets
        (_passes_in_turn): sequential and not capturable (a graph needs the fixed shadow sets)."""
        return not self.capturable and (self.parallel == "sequential" or
                                        (self.parallel == "auto" and not capturing()))

    @torch.no_grad()
    def _passes_in_turn(self, kept, batch, scale):
        """Both passes, one after the other, holding two parameter sets above SGD at any time
        (SGD: x_t and a gradient; README.md, SAMPa, "Memory"; bench/NOTES.md):
          y-pass   x_t, y (scratch), g_y, g_y' (built by autograd as SGD's gradient is)
          x~-pass  x~ (the model's parameters, perturbed in place), x_t (in y's storage), g_y', g~
        g_y (self._live["g_y"]) is released once x~ is made from it, so the y-pass, which takes
        the new batch, goes first: an exception in it (bad input) leaves everything as it was.
        One in the x~-pass (loss_fn on the kept batch, which already ran in the last step) puts
        x_t back bit for bit but loses g_y: the next step starts again from step 0."""
        n = len(self._params)
        self._live["x~"], self._live["y"] = self._scratch(), self._scratch()
        key = self._key_of("g_y", "x~", "y", update=True)
        preview = self._plan("preview", key, lambda: self._build_preview(self._slots("x~"), self._slots("y")))
        preview()
        self._live.pop("x~")  # x~ is made again below, where no y-pass is alive
        try:
            y_pass = self._grad_at(self._live["y"], batch, scale)
        except BaseException:
            self._live.pop("y")
            self._live.pop("g_y")
            raise
        self._plan("perturb", self._key_of("g_y", "y"), lambda: self._build_perturb(n))()  # y's storage takes x_t
        self._g_y = None
        self._live.pop("g_y")
        try:
            x_pass = self._grad_at(self._params, kept, scale)
        except BaseException:
            self.keep_batch(None)  # g_y is gone: the next step is a step 0
            raise
        finally:
            self._plan("restore", self._key_of("y"), lambda: ops.bind(
                "restore_", self._backend(self.device, "restore_"), self.device,
                {"params": self._params, "olds": Slot(self._live, "y", 0, n)}))()
            self._live.pop("y")
        return x_pass, y_pass

    def _scratch(self) -> list:
        """A parameter set for one step (released by its end: memory_report's step_scratch)."""
        return [torch.empty_like(p, memory_format=torch.contiguous_format).requires_grad_(True)
                for p in self._params]

    def _build_perturb(self, n: int):
        """x_t into y's storage and the model's parameters to x~ = x_t + rho g_y / (||g_y|| + eps), per
        group (ops.perturb_: the x~ of the fused preview; no move where ||g_y|| is not finite)."""
        backend = self._backend(self.device, "perturb_")
        runs = [(group, ops.bind("perturb_", backend, self.device,
                                 {"params": group["params"], "grads": g_y, "olds": olds}))
                for (group, _), g_y, olds in zip(self._group_slices(), self._slots("g_y"), self._slots("y"))]

        def perturb():
            for group, run in runs:
                run(norm=self._g_y_norm, rho=self._rho(group, self.device), adaptive=False, offset=0.0)
        return perturb

    def _plain_step(self, batch, scale):
        """Before start_step: the base step with one gradient at x_t on `batch`."""
        loss, grads, bufs = self._pass_at_x(batch, scale)
        self._finish_step(grads, grads, bufs, plain=True)
        return loss.detach()

    def _key_of(self, *names, extra=(), update: bool = False):
        """A plan's key function: _key (update: with the base state the plan binds), and the
        addresses of the gradient lists it binds (the live lists self._live[name]: autograd gives
        new tensors each pass; when only their addresses changed, the plan's tables take them,
        pipeline.Plans)."""
        def key():
            structure, grads = self._key(*names, *extra, update=update)
            try:
                return structure, (grads, *(tuple(map(torch.Tensor.data_ptr, self._live[n])) for n in names))
            except RuntimeError:  # a gradient without storage: say which (checked only when it fails)
                for n in names:
                    for name, p, g in zip(self._names, self._params, self._live[n]):
                        check_grad(p, f"SAMPa.step: the gradient of '{name[len('model.'):]}'", g)
                raise
        return key

    def _slots(self, name: str) -> list:
        """self._live[name] per param group, read when used (_lists.Slot)."""
        return [Slot(self._live, name, sl.start, sl.stop - sl.start) for _, sl in self._group_slices()]

    def _norm_dtype(self) -> torch.dtype:
        """||g_y||'s dtype: fp64 for fp64 parameters (pipeline.NormStage), else fp32."""
        return torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32

    def _g_y_norm_buf(self) -> torch.Tensor:
        if self._g_y_norm is None:
            self._g_y_norm = torch.empty((), dtype=self._norm_dtype(), device=self.device)
        return self._g_y_norm

    def _norm_of(self, name: str, grads, out) -> None:
        """out <- ||grads|| (grads live as self._live[name])."""
        self._live[name] = grads
        self._plan("norm " + name, self._key_of(name), lambda: NormStage(
            self._backend(self.device, "global_norm"), self.device,
            [(Slot(self._live, name, 0, len(grads)), None, 0, 0.0)])).norm(out)

    @torch.no_grad()
    def _finish_step(self, g_t, g_yn, buffers_y, plain: bool = False) -> None:
        """The optimizer's second half: the guard (a non-finite value in either gradient skips the
        step on the device), the fused update with the mixed gradient, and the y-pass buffers
        committed where the step is taken (plain: the base step with g_t alone, g_y not kept)."""
        if not plain:
            self._norm_of("g_yn", g_yn, self._g_y_norm_buf())  # the next step's ||g_y||, this one's check of g_y'
        self._live["g_t"], self._live["g_yn"] = g_t, g_yn
        plan = self._plan("plain" if plain else "update",
                          self._key_of("g_t", "g_yn", extra=(plain, self.max_grad_norm is not None), update=True),
                          lambda: self._build_update_plan(plain))
        if plan.generic:  # d = (1 - lam) g~ + lam g_y' into .grad, for the base optimizer's own step()
            plan.grads = self._mixed_grads(g_t, g_yn, plain)
        self._t += 1
        self._finish(plan, None if plain else self._g_y_norm, None, None, "SAMPa.step")
        self._mark_stepped()
        if plan.generic:
            self.zero_grad()
        if buffers_y:
            self._commit_buffers(buffers_y)
        self._live.pop("g_t")  # not kept past its step (g_y' is, as g_y)
        self._live.pop("g_yn")

    def _build_update_plan(self, plain: bool):
        """The guard over g~ (with ||g_y'|| as its prior; with max_grad_norm, over the mixed gradient,
        which is what gets clipped) and one fused update per group."""
        plan = UpdatePlan()
        kind = fused_kind(self.base_optimizer)
        plan.generic = kind is None
        device, backend = self.device, self._backend(self.device, "restore_sgd_")
        clip = self.max_grad_norm is not None and not plain
        g_t, g_yn = self._slots("g_t"), self._slots("g_yn")  # per group
        groups = [group for group, _ in self._group_slices()]
        # the mix's weight is read on every call (pipeline.NormStage): lam may change between steps
        classes = [(t, y, 2, lambda group=group: group["lam"]) for group, t, y in zip(groups, g_t, g_yn)] if clip else \
            [(Slot(self._live, "g_t", 0, len(self._params)), None, 0, 0.0)]
        plan.guard = NormStage(self._backend(device, "global_norm"), device, classes)
        if kind is not None:
            prepare_state(self.base_optimizer, kind, [(g, g["params"]) for g, _ in self._group_slices()],
                          self._counters, device)
        adam = []
        for group, gt, gyn in zip(groups, g_t, g_yn):
            ps = group["params"]
            if kind is None:
                continue
            w = 0.0 if plain else group["lam"]
            if w in (0.0, 1.0):  # the plain fused step with the one gradient used: bit for bit, the other unread
                run = prepare_update(self.base_optimizer, kind, group, backend, device, ps, gyn if w else gt,
                                     self._counters, olds=ps, lr=self._lr(group, device))
                plan.updates.append(lambda flags, run=run: run(flags.grad_scale, flags.found_inf))
            else:
                run = prepare_update(self.base_optimizer, kind, group, backend, device, ps, gt, self._counters,
                                     grads2=gyn, lr=self._lr(group, device))
                plan.updates.append(lambda flags, run=run, group=group: run(flags.grad_scale, flags.found_inf,
                                                                           lam=group["lam"]))
            if kind == "adam":
                adam += ps
        if adam:
            plan.steps, plan.steps_mask = self._counters.vec, self._counters.mask(adam)
        return plan

    def _mixed_grads(self, g_t, g_yn, plain):
        """For base optimizers we do not fuse: d = (1 - lam) g~ + lam g_y' into .grad, every step."""
        grads = []
        for group, sl in self._group_slices():
            w = 0.0 if plain else group["lam"]
            d = torch._foreach_mul(g_t[sl], 1 - w)
            torch._foreach_add_(d, g_yn[sl], alpha=w)
            for p, dp in zip(group["params"], d):
                p.grad = dp
            grads += d
        return grads

    def _commit_buffers(self, buffers_y) -> None:
        """The y-pass buffers into the model's, where the step is taken (a device-conditional copy;
        integer buffers as float views of their bits, other dtypes through torch.where)."""
        found = self._flags.found_inf
        views, news = [], []
        for (_, b), nb in zip(self._model_buffers(), buffers_y):
            as_float = {8: torch.float64, 4: torch.float32, 2: torch.float16}.get(b.element_size())
            if b.is_floating_point() or (as_float is not None and b.is_contiguous() and not b.is_complex()):
                views.append(b if b.is_floating_point() else b.view(as_float))
                news.append(nb if nb.is_floating_point() else nb.view(as_float))
            else:
                b.copy_(torch.where(found != 0, b, nb))
        if views:
            ops.restore_(views, news, found, backend=self.backend)

    def _pass_at_x(self, batch, scale):
        """(loss, gradients, buffers after the pass) at x_t on `batch`; in the distributed mode
        the y-rank of each pair computes them and the x~-rank receives them."""
        if self.parallel != "distributed":
            return self._grad_at(self._params, batch, scale)
        loss, grads, bufs = self._zeros() if self._role() == "x~" else self._grad_at(self._params, batch, scale)
        merged = self._all_reduce_mean(grads + bufs + [loss.float().reshape(1)])
        return merged[-1].reshape(()), merged[:len(grads)], merged[len(grads):-1]

    def _build_preview(self, xt, y):
        """x~ and y into the parameter sets xt and y (one list per param group): one fused pass per
        group; for a base optimizer we do not fuse, x~ from the same pass (its preview half at lr 0
        leaves y = x_t), then y <- the base optimizer's own step from x_t with g_y, on a copy of its
        state (fused_update.preview_with_own_step)."""
        kind = fused_kind(self.base_optimizer)
        device, backend = self.device, self._backend(self.device, "sampa_preview_sgd_")
        runs = []
        for (group, sl), g_y, xt_g, y_g in zip(self._group_slices(), self._slots("g_y"), xt, y):
            lists = (group["params"], g_y, xt_g, y_g)
            if kind is None:
                run = ops.bind("sampa_preview_sgd_", backend, device,
                               {"params": lists[0], "grads": lists[1], "perturbed": lists[2], "previews": lists[3],
                                "bufs": None}, {"momentum": 0.0, "init_bufs": False})
                runs.append(lambda run=run, group=group: run(
                    norm=self._g_y_norm, rho=self._rho(group, device), lr=0.0, momentum=0.0, dampening=0.0,
                    nesterov=False, weight_decay=0.0, maximize=False, init_bufs=False))
            else:
                run = prepare_preview(self.base_optimizer, kind, group, backend, device, *lists,
                                      lr=self._lr(group, device))
                runs.append(lambda run=run, group=group: run(self._g_y_norm, self._rho(group, device)))

        def preview():
            for run in runs:
                run()
            if kind is None:
                preview_with_own_step(self.base_optimizer, [g for g, _ in self._group_slices()],
                                      [list(ys) for ys in y], [list(gs) for gs in self._slots("g_y")], self._g_y_norm)
        return preview

    def _group_slices(self):
        """(param group, its slice of the flat parameter order) for the groups with parameters."""
        offset = 0
        for group in self.param_groups:
            n = len(group["params"])
            if n:
                yield group, slice(offset, offset + n)
            offset += n

    # --- gradients ---------------------------------------------------------------------------

    def _model_buffers(self):
        return list(self.model.named_buffers())

    def _grad_at(self, point, batch, scale=None):
        """(loss, gradients w.r.t. `point`, the buffers after the pass) for loss_fn at the
        parameters `point` on `batch`; the model's own buffers are not touched (private copies).
        scale: (a GradScaler's scale, its inverse), device scalars: the gradients of loss * scale,
        unscaled in place."""
        buffers = [b.clone() for _, b in self._model_buffers()]
        tensors = dict(zip(self._buffer_names, buffers))
        if point is not self._params:
            tensors.update(zip(self._names, point))
        self.loss_calls += 1
        with torch.enable_grad():
            loss = functional_call(self._module, tensors, (batch,))
            if not (torch.is_tensor(loss) and loss.numel() == 1 and loss.requires_grad):
                got = loss if not torch.is_tensor(loss) else f"a tensor of shape {tuple(loss.shape)}"
                raise ValueError("loss_fn(model, batch) must return a scalar tensor that depends on the parameters, "
                                 f"got {got}")
            scaled = loss.reshape(()) if scale is None else loss.reshape(()) * scale[0]
            if self._fixed_grads():  # g_y' lands in g_y's storage
                grads = list(_accumulate(scaled, point))
            else:
                grads = list(torch.autograd.grad(scaled, point, allow_unused=True, materialize_grads=True))
        if scale is not None:
            torch._foreach_mul_(grads, scale[1])
        return loss.detach(), grads, buffers

    def _both_passes(self, xt, kept, y, batch, scale):
        if self.parallel == "sequential" or (self.parallel == "auto" and not capturing()):
            return self._grad_at(xt, kept, scale), self._grad_at(y, batch, scale)
        if self.parallel == "distributed":
            # this rank's pass, zeros for the other: the pair's sum in _exchange gives both
            if self._role() == "x~":
                return self._grad_at(xt, kept, scale), self._zeros()
            return self._zeros(), self._grad_at(y, batch, scale)
        return self._on_streams(xt, kept, y, batch, scale)

    def _on_streams(self, xt, kept, y, batch, scale):
        """The two passes on two CUDA streams: the host enqueues one after the other, the device
        runs them concurrently. Each side stream first waits for the preview on the current stream;
        the current stream waits for both before the gradients are read. Tensors allocated on a
        side stream are only reused by it after its next wait on the current stream."""
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        main = torch.cuda.current_stream(self.device)
        results = []
        for stream, (point, b) in zip(self._streams, ((xt, kept), (y, batch))):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                results.append(self._grad_at(point, b, scale))
        for stream in self._streams:
            main.wait_stream(stream)
        return results

    # --- distributed -------------------------------------------------------------------------

    def _role(self) -> str:
        return "x~" if torch.distributed.get_rank(self._group) % 2 == 0 else "y"

    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum over the group divided by the number of pairs, one flat all-reduce per dtype
        (exact for one pair: each value is added to zeros)."""
        dist = torch.distributed
        pairs = dist.get_world_size(self._group) // 2
        out = list(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for dtype, index in by_dtype.items():
            flat = torch.cat([tensors[i].reshape(-1) for i in index])
            dist.all_reduce(flat, group=self._group)
            if pairs > 1:
                flat = flat / pairs if dtype.is_floating_point else flat // pairs
            for i, piece in zip(index, flat.split([tensors[i].numel() for i in index])):
                out[i] = piece.view_as(tensors[i])
        return out

    def _exchange(self, g_t, g_yn, buffers_y, loss_y):
        """Both gradients, the y-pass buffers and its loss on every rank of the pair (and averaged
        over pairs): each rank contributes its own pass and zeros for the other (_both_passes)."""
        merged = self._all_reduce_mean(list(g_t) + list(g_yn) + list(buffers_y) + [loss_y.float().reshape(1)])
        n = len(self._params)
        return merged[:n], merged[n:2 * n], merged[2 * n:-1], merged[-1].reshape(())

    def _zeros(self):
        """What a rank contributes for the pass it does not compute: (loss, gradients, buffers) of zeros."""
        return (torch.zeros((), device=self.device), [torch.zeros_like(p) for p in self._params],
                [torch.zeros_like(b) for _, b in self._model_buffers()])

    # --- state -------------------------------------------------------------------------------

    def _shadow_sets(self):
        """The x~ and y parameter sets: leaf tensors shaped like the parameters, allocated once."""
        if self._shadows is None or any(s.shape != p.shape or s.dtype != p.dtype
                                        for s, p in zip(self._shadows[0], self._params)):
            self._shadows = tuple(
                [torch.empty_like(p, memory_format=torch.contiguous_format).requires_grad_(True) for p in self._params]
                for _ in range(2))
        return self._shadows

    def first_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError("SAMPa computes both gradients itself: call step(batch)")

    second_step = base_step = first_step

    def restore(self) -> None:
        pass  # between steps the model's parameters hold x_t: nothing to restore

    def _extra_state(self) -> dict:
        return {"g_y": self._g_y, "g_y_norm": self._g_y_norm, "batch": self._batch, "loss_calls": self.loss_calls}

    def _check_extra_state(self, extra: dict) -> None:
        g_y = extra.get("g_y")
        if g_y is not None and (len(g_y) != len(self._params) or any(g.shape != p.shape
                                                                     for g, p in zip(g_y, self._params))):
            raise ValueError("load_state_dict: 'g_y' does not match the parameters of this SAMPa")

    def _load_extra_state(self, extra: dict) -> None:
        g_y = extra.get("g_y")
        if g_y is not None:
            g_y = [g.to(p.device, p.dtype) for g, p in zip(g_y, self._params)]
        norm = extra.get("g_y_norm")
        self._g_y = g_y
        self._g_y_norm = norm.to(self.device, self._norm_dtype()) if norm is not None else None
        self.keep_batch(extra.get("batch"))
        self.loss_calls = int(extra.get("loss_calls", 0))

    def memory_report(self) -> dict:
        """Bytes held across steps: `g_y` (the kept gradient), `shadows` (the x~ and y parameter
        sets the concurrent passes run at: streams, capturable), `pass_grads` (capturable or
        streams: the gradients of the passes at fixed addresses, in the shadows' .grad, g_y among
        them, counted once) and `base_state`; and `step_scratch`, what a step in turn
        (_passes_in_turn) allocates and frees: one parameter set (y, then x_t), and for the
        moment of the fused preview, before any pass, a second one (x~)."""
        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors or ())

        shadows = sum(nbytes(s) for s in self._shadows or ())
        kept = {t.data_ptr() for t in self._g_y or ()}
        held = [t.grad for s in self._shadows or () for t in s if t.grad is not None and t.grad.data_ptr() not in kept]
        return {"g_y": nbytes(self._g_y), "shadows": shadows, "pass_grads": nbytes(held),
                "step_scratch": nbytes(self._params) if self._in_turn() else 0, "base_state": self._base_state_bytes()}
