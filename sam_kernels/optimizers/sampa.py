"""SAMPa-lambda (ALGORITHMS.md, "SAMPa-lambda"): SAM's two gradients made independent, so that
they can be computed at the same time.

    x~_t    = x_t + rho g_y / (||g_y|| + eps)        g_y = grad f(y_t; B_t), kept from the last step
    y_{t+1} = the base optimizer's step from x_t with g_y, its state untouched
              (x~_t and y_{t+1} come out of one fused pass over x_t, g_y and the state)
    in parallel:  g~ = grad f(x~_t; B_t)   and   g_y' = grad f(y_{t+1}; B_{t+1})
    d_t     = (1 - lam) g~ + lam g_y'
    x_{t+1} = the base step from x_t with d_t        (one fused pass);  g_y <- g_y', B_t <- B_{t+1}

SAMPa is a driver on the step engine: the preview and the update are engine plans (the update
is engine/updates.py's, as for SAM), and the two passes are a strategy per way of running them
(sampa_passes.py: in turn, or at fixed shadow sets one after the other, on two CUDA streams or
on the two ranks of a pair).

Module buffers (BatchNorm running statistics): they move only with the y-pass, which sees every
batch first, at the unperturbed preview point (the counterpart of the reference SAM, which
updates them in its first pass only). Both passes run on private copies of the buffers; the
y-pass's copies are written back when the step is accepted, the x~-pass's are discarded.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .. import ops
from ..engine.bases import Mix, Restore, fused, prepare_preview, preview_with_own_step
from ..engine.flags import check_scaler, scaler_inputs, scaler_record
from ..engine.norms import NormStage
from ..engine.scalars import capturing
from ..engine.updates import build_update, endpoint, mix_weight
from ..integrations.distributed import is_dtensor
from ..ops.lists import Current
from .base import EngineOptimizer
from .checks import check_grad, split_rho
from .sampa_passes import InTurn, LossPasses, OnShadows

PARALLEL = ("auto", "streams", "sequential", "distributed")


def check_lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    return float(lam)


def _versions(batch) -> tuple:
    """The version counters of the batch's tensors (host integers: bumped by every in-place write)."""
    return tuple(t._version for t in pytree.tree_leaves(batch) if torch.is_tensor(t)) if batch is not None else ()


def sampa_group_key(group: dict) -> tuple:
    """What SAMPa's plans read of a group: whether lam is an endpoint of the mix (the update's kind)."""
    return (endpoint(group),)


class SAMPa(EngineOptimizer):
    """SAMPa-lambda around torch.optim.SGD (momentum, nesterov, weight decay), Adam or AdamW (fused),
    or any other torch.optim optimizer (generic: y is its own step from x_t with g_y, on a copy of
    its state; x_{t+1} its own step with d_t in .grad).

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
                         rho_fn, max_grad_norm, capturable, group_key=sampa_group_key)
        self.params = [p for g in self.param_groups for p in g["params"]]
        self.model = model
        self.loss_fn = loss_fn
        self.passes = LossPasses(model, loss_fn, self.params, ["model." + self._model_names[id(p)]
                                                               for p in self.params])
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"SAMPa: the parameters span devices {sorted(map(str, devices))}")
        self.device = next(iter(devices))
        self.parallel = self._resolve_parallel(parallel, process_group)
        self._group = process_group
        # SAMPa's own state: g_y, its norm and the batch it was computed on (None before step 0)
        self.kept_g_y: list[torch.Tensor] | None = None
        self._g_y_norm: torch.Tensor | None = None
        self._batch: Any = None
        self._batch_versions: tuple = ()  # the kept batch's tensors' version counters when it was kept
        # what the step plans bind (set and cleared within a step)
        self.g_y, self.g_t, self.g_yn = Current("kept gradients g_y"), Current("x~-pass gradients"), \
            Current("y-pass gradients")
        self._in_turn, self._on_shadows = InTurn(), OnShadows(self._shadow_mode(), self._fixed_grads())

    def __getattr__(self, name: str):
        """Only for names not found: the SAM family's two-step methods are not SAMPa's (say so)."""
        if name in ("first_step", "second_step", "base_step", "restore"):
            raise AttributeError(f"SAMPa has no {name}(): SAMPa computes both gradients itself: call step(batch)")
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    @property
    def loss_calls(self) -> int:
        """loss_fn evaluations on this process (2T + 1 after T sequential steps)."""
        return self.passes.calls

    @loss_calls.setter
    def loss_calls(self, n: int) -> None:
        self.passes.calls = n

    # --- configuration ---------------------------------------------------------------------

    def _check_group(self, group: dict, where: str) -> None:
        super()._check_group(group, where)
        try:
            group["lam"] = check_lam(group["lam"])
        except ValueError:
            raise ValueError(f"{where}['lam'] must be a number in [0, 1], got {group['lam']!r}") from None
        if "perturb" in group:  # its preview kernel perturbs every parameter it reads
            raise NotImplementedError(f"SAMPa: {where}['perturb']: subset perturbation is for SAM, ASAM, GaussSAM, "
                                      "PSAM and NuSAM")
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
        self.params += list(group["params"])
        self.passes.names += ["model." + self._model_names[id(p)] for p in group["params"]]
        if self.kept_g_y is not None:
            self.kept_g_y = self.kept_g_y + [torch.zeros_like(p) for p in group["params"]]
        self._on_shadows.sets = None

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

    def _fixed_grads(self) -> bool:
        """Whether the passes' gradients land in fixed buffers, the .grad of the points they are
        taken at (sampa_passes.accumulate): what a graph holds (capturable), and two streams' one
        set less."""
        return self.capturable or self.parallel == "streams"

    def _shadow_mode(self) -> str:
        return {"distributed": "pairs", "streams": "streams"}.get(self.parallel, "sequential")

    def _passes_now(self):
        """The strategy of this step: in turn (eager, not capturable), else at the shadow sets (on two
        streams under CUDA graph capture with parallel='auto')."""
        if not self.capturable and (self.parallel == "sequential" or (self.parallel == "auto" and not capturing())):
            return self._in_turn
        self._on_shadows.mode = "streams" if self.parallel == "auto" and capturing() else self._shadow_mode()
        self._on_shadows.fixed_grads = self._fixed_grads()
        return self._on_shadows

    def pair_role(self) -> str:
        """parallel='distributed': which pass this rank computes."""
        return "x~" if torch.distributed.get_rank(self._group) % 2 == 0 else "y"

    # --- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, batch=None, grad_scaler=None):
        """One SAMPa step with the new minibatch `batch`; returns the detached loss of the y-pass,
        f(y_{t+1}; batch). An exception in loss_fn leaves model and optimizer as they were, but
        one in the x~-pass of a step in turn, which loses g_y: the next step is a step 0 again
        (docs/guides/sampa.md; sampa_passes.InTurn).

        grad_scaler: a torch.amp.GradScaler (fp16): each pass backpropagates the loss times its
        scale and unscales its gradients in place (a device scalar, no host read), and the scaler
        gets the step's device flag as from scaler.step(optimizer): call scaler.update() after."""
        if batch is None:
            raise ValueError("SAMPa.step(batch) needs the new minibatch (SAMPa computes its gradients itself; "
                             "loss_fn(model, batch) gives the loss)")
        engine = self.engine
        scale, scaler_state = self._scaler_inputs(grad_scaler)
        if engine.sam_step_due and self.kept_g_y is not None:
            self._check_kept_batch()
        if not engine.sam_step_due:
            engine.begin("SAMPa.step")
            loss = self._plain_step(batch, scale)
            scaler_record(scaler_state, engine.flags)
            return loss
        engine.apply_rho_schedule()
        engine.begin("SAMPa.step")
        kept = self._batch
        if self.kept_g_y is None:  # step 0: g_y = grad f(x_0; B_0), and B_0 for both passes
            _, g_y, _ = self._pass_at_x(batch, scale)
            kept = batch
            self.g_y.set(g_y)
            self._norm_into(self.g_y, self._g_y_norm_buf())
            del g_y
        else:
            self.g_y.set(self.kept_g_y)
        (loss_t, g_t, _), (loss_y, g_yn, buffers_y) = self._passes_now().run(self, kept, batch, scale)
        if self.parallel == "distributed":
            g_t, g_yn, buffers_y, loss_y = self._exchange(g_t, g_yn, buffers_y, loss_y)
        self._finish_step(g_t, g_yn, buffers_y)
        scaler_record(scaler_state, engine.flags)
        # g_y <- g_y' and B_t <- B_{t+1} always (ALGORITHMS.md); a g_y from a skipped step that is
        # not finite is not used by the next preview (its norm says so on the device)
        self.kept_g_y = list(g_yn)
        self.keep_batch(batch)
        return loss_y.detach()

    def _scaler_inputs(self, grad_scaler):
        """((scale, 1 / scale) as fp32 device scalars, the scaler's record of this optimizer) or
        (None, None) without an enabled GradScaler; checked before anything changes."""
        check_scaler(grad_scaler, self, "SAMPa.step: scaler.unscale_(optimizer) was called, but SAMPa computes (and "
                                        "unscales) its gradients inside step(batch, grad_scaler)")
        scale, _, state = scaler_inputs(self, grad_scaler, self.device)
        if scale is None:
            return None, None
        scale = scale.float()
        return (scale, torch.reciprocal(scale.double()).float()), state

    def release_g_y(self) -> None:
        """A step in turn made x~ from g_y: the kept gradient goes (sampa_passes.InTurn)."""
        self.kept_g_y = None
        self.g_y.clear()

    def _plain_step(self, batch, scale):
        """Before start_step: the base step with one gradient at x_t on `batch`."""
        loss, grads, bufs = self._pass_at_x(batch, scale)
        self._finish_step(grads, grads, bufs, plain=True)
        return loss.detach()

    def _pass_at_x(self, batch, scale):
        """(loss, gradients, buffers after the pass) at x_t on `batch`; in the distributed mode
        the y-rank of each pair computes them and the x~-rank receives them."""
        fixed = self._fixed_grads()
        if self.parallel != "distributed":
            return self.passes.grad_at(self.params, batch, scale, fixed=fixed)
        loss, grads, bufs = (self.passes.zeros(self.device) if self.pair_role() == "x~" else
                             self.passes.grad_at(self.params, batch, scale, fixed=fixed))
        merged = self._all_reduce_mean(grads + bufs + [loss.float().reshape(1)])
        return merged[-1].reshape(()), merged[:len(grads)], merged[len(grads):-1]

    @torch.no_grad()
    def _finish_step(self, g_t, g_yn, buffers_y, plain: bool = False) -> None:
        """The optimizer's second half: the guard (a non-finite value in either gradient skips the
        step on the device), the fused update with the mixed gradient, and the y-pass buffers
        committed where the step is taken (plain: the base step with g_t alone, g_y not kept)."""
        engine = self.engine
        self.g_t.set(g_t), self.g_yn.set(g_yn)
        try:
            if not plain:
                self._norm_into(self.g_yn, self._g_y_norm_buf())  # the next step's ||g_y||, this one's check of g_y'
            plan = engine.plan("plain" if plain else "update",
                               self._key(self.g_t, self.g_yn, extra=(plain, self.max_grad_norm is not None),
                                         update=True),
                               lambda: self._build_update(plain))
            if plan.generic:  # d = (1 - lam) g~ + lam g_y' into .grad, for the base optimizer's own step()
                plan.grads = self._mixed_grads(g_t, g_yn, plain)
            engine.record_step()
            engine.finish(plan, None if plain else self._g_y_norm, None, None, "SAMPa.step")
            if plan.generic:
                self.zero_grad()
            if buffers_y:
                self._commit_buffers(buffers_y)
        finally:
            self.g_t.clear()  # not kept past its step (g_y' is, as g_y)
            self.g_yn.clear()

    # --- plans -------------------------------------------------------------------------------

    def _key(self, *sets: Current, extra=(), update: bool = False):
        """A plan's key function: the engine's key (update: with the base state the plan binds), and
        the addresses of the sets it binds (autograd gives new tensors each pass; when only their
        addresses changed, the plan's tables take them: engine/plans.py)."""
        engine = self.engine

        def key():
            structure, grads = engine.key(*(s.name for s in sets), *extra, update=update)
            try:
                return structure, (grads, *(s.addresses_now() for s in sets))
            except RuntimeError:  # a gradient without storage: say which (checked only when it fails)
                for s in sets:
                    for name, p, g in zip(self.passes.names, self.params, s):
                        check_grad(p, f"SAMPa.step: the gradient of '{name[len('model.'):]}'", g)
                raise
        return key

    def _group_slices(self):
        """(param group, its slice of the flat parameter order) for the groups with parameters."""
        offset = 0
        for group in self.param_groups:
            n = len(group["params"])
            if n:
                yield group, slice(offset, offset + n)
            offset += n

    def _parts(self, current: Current) -> list:
        """A set per param group, read when used."""
        return [current.part(sl.start, sl.stop - sl.start) for _, sl in self._group_slices()]

    def _norm_dtype(self) -> torch.dtype:
        """||g_y||'s dtype: fp64 for fp64 parameters (engine/norms.py), else fp32."""
        return torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32

    def _g_y_norm_buf(self) -> torch.Tensor:
        if self._g_y_norm is None:
            self._g_y_norm = torch.empty((), dtype=self._norm_dtype(), device=self.device)
        return self._g_y_norm

    def _norm_into(self, current: Current, out) -> None:
        """out <- ||the tensors `current` holds||."""
        self.engine.plan("norm " + current.name, self._key(current), lambda: NormStage(
            self.engine.backend_for(self.device, "global_norm"), self.device, [(current, None, 0, 0.0)])).norm(out)

    def run_preview(self, x_tilde: Current, y: Current) -> None:
        """x~ and y from x_t and g_y (one fused pass per group) into the parameter sets x_tilde, y."""
        self.engine.plan("preview", self._key(self.g_y, x_tilde, y, update=True),
                         lambda: self._build_preview(self._parts(x_tilde), self._parts(y)))()

    def run_perturb(self, y: Current) -> None:
        """x_t into y's storage and the model's parameters to x~ (a step in turn)."""
        self.engine.plan("perturb", self._key(self.g_y, y), lambda: self._build_perturb(self._parts(y)))()

    def run_restore(self, y: Current) -> None:
        """The model's parameters <- x_t from y's storage, bit for bit."""
        self.engine.plan("restore", self._key(y), lambda: ops.bind(
            "restore_", self.engine.backend_for(self.device, "restore_"), self.device,
            {"params": self.params, "x_old": y.part(0, len(self.params))}))()

    def _build_perturb(self, ys):
        """x_t into y's storage and the model's parameters to x~ = x_t + rho g_y / (||g_y|| + eps), per
        group (ops.perturb_: the x~ of the fused preview; no move where ||g_y|| is not finite)."""
        backend = self.engine.backend_for(self.device, "perturb_")
        runs = [(group, ops.bind("perturb_", backend, self.device,
                                 {"params": group["params"], "grads": g_y, "x_old": x_old}))
                for (group, _), g_y, x_old in zip(self._group_slices(), self._parts(self.g_y), ys)]

        def perturb():
            for group, run in runs:
                run(norm=self._g_y_norm, rho=self.engine.rho(group, self.device), adaptive=False, offset=0.0)
        return perturb

    def _build_preview(self, xt, y):
        """x~ and y into the parameter sets xt and y (one list per param group): one fused pass per
        group; for a base optimizer we do not fuse, x~ from the same pass (its preview half at lr 0
        leaves y = x_t), then y <- the base optimizer's own step from x_t with g_y, on a copy of its
        state (engine/bases.preview_with_own_step)."""
        engine, device = self.engine, self.device
        adapter = fused(self.base_optimizer)
        runs = []
        for (group, sl), g_y, xt_g, y_g in zip(self._group_slices(), self._parts(self.g_y), xt, y):
            lists = (group["params"], g_y, xt_g, y_g)
            if adapter is None:
                run = ops.bind("sampa_preview_sgd_", engine.backend_for(device, "sampa_preview_sgd_"), device,
                               {"params": lists[0], "grads": lists[1], "perturbed": lists[2], "previews": lists[3],
                                "bufs": None}, {"momentum": 0.0, "init_bufs": False})
                runs.append(lambda run=run, group=group: run(
                    norm=self._g_y_norm, rho=engine.rho(group, device), lr=0.0, momentum=0.0, dampening=0.0,
                    nesterov=False, weight_decay=0.0, maximize=False, init_bufs=False))
            else:
                run = prepare_preview(adapter, group, engine.backend_for(device, adapter.preview_primitive), device,
                                      *lists, lr=engine.lr(group, device))
                runs.append(lambda run=run, group=group: run(self._g_y_norm, engine.rho(group, device)))

        def preview():
            for run in runs:
                run()
            if adapter is None:
                preview_with_own_step(self.base_optimizer, [g for g, _ in self._group_slices()],
                                      [list(ys) for ys in y], [list(gs) for gs in self._parts(self.g_y)],
                                      self._g_y_norm)
        return preview

    def _build_update(self, plain: bool):
        """The guard over g~ (with ||g_y'|| as its first_norm; with max_grad_norm, over the mixed gradient,
        which is what gets clipped) and one fused update per group: at an endpoint of the mix the
        plain step with the one gradient it uses (engine/updates.py: endpoint)."""
        g_t, g_yn = self._parts(self.g_t), self._parts(self.g_yn)
        parts = {id(group): (t, y) for (group, _), t, y in zip(self._group_slices(), g_t, g_yn)}
        if self.max_grad_norm is not None and not plain:
            # the mix's weight is read on every call (engine/norms.py): lam may change between steps
            classes = [(t, y, 2, lambda group=group: mix_weight(group)) for (group, _), t, y
                       in zip(self._group_slices(), g_t, g_yn)]
        else:
            classes = [(self.g_t.part(0, len(self.params)), None, 0, 0.0)]

        def sources(group, ps):
            t, y = parts[id(group)]
            w = endpoint(group, plain)
            if w is not None:  # the plain fused step with the one gradient used: bit for bit, the other unread
                return [(Restore(x_old=ps), ps, y if w else t, None)]
            return [(Mix(grads2=y), ps, t, None)]

        work = [(g, g["params"]) for g, _ in self._group_slices()]
        return build_update(self.engine, work, self.device, sources, classes)

    def _mixed_grads(self, g_t, g_yn, plain):
        """For base optimizers we do not fuse: d = (1 - lam) g~ + lam g_y' into .grad, every step."""
        grads = []
        for group, sl in self._group_slices():
            w = mix_weight(group, plain)
            d = torch._foreach_mul(g_t[sl], 1 - w)
            torch._foreach_add_(d, g_yn[sl], alpha=w)
            for p, dp in zip(group["params"], d):
                p.grad = dp
            grads += d
        return grads

    def _commit_buffers(self, buffers_y) -> None:
        """The y-pass buffers into the model's, where the step is taken (a device-conditional copy;
        integer buffers as float views of their bits, other dtypes through torch.where)."""
        found = self.engine.flags.found_inf
        views, news = [], []
        for b, nb in zip(self.passes.buffers(), buffers_y):
            as_float = {8: torch.float64, 4: torch.float32, 2: torch.float16}.get(b.element_size())
            if b.is_floating_point() or (as_float is not None and b.is_contiguous() and not b.is_complex()):
                views.append(b if b.is_floating_point() else b.view(as_float))
                news.append(nb if nb.is_floating_point() else nb.view(as_float))
            else:
                b.copy_(torch.where(found != 0, b, nb))
        if views:
            ops.restore_(views, news, found, backend=self.backend)

    # --- distributed -------------------------------------------------------------------------

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
        over pairs): each rank contributes its own pass and zeros for the other (OnShadows)."""
        merged = self._all_reduce_mean(list(g_t) + list(g_yn) + list(buffers_y) + [loss_y.float().reshape(1)])
        n = len(self.params)
        return merged[:n], merged[n:2 * n], merged[2 * n:-1], merged[-1].reshape(())

    # --- the kept batch ----------------------------------------------------------------------

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

    # --- copies and state ----------------------------------------------------------------------

    def _transient(self) -> tuple:
        # streams and the passes' scratch are made again; the names are keyed by id() of the model's parameters
        return ("_in_turn", "_on_shadows", "_model_names", "g_y", "g_t", "g_yn")

    def __getstate__(self) -> dict:
        if self.parallel == "distributed":
            raise TypeError("a SAMPa with parallel='distributed' holds a process group: it cannot be copied")
        return super().__getstate__()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._model_names = {id(p): n for n, p in self.model.named_parameters()}
        self.g_y, self.g_t, self.g_yn = Current("kept gradients g_y"), Current("x~-pass gradients"), \
            Current("y-pass gradients")
        self._in_turn, self._on_shadows = InTurn(), OnShadows(self._shadow_mode(), self._fixed_grads())
        self.keep_batch(self._batch)  # the copy's own tensors

    def _extra_state(self) -> dict:
        return {"g_y": self.kept_g_y, "g_y_norm": self._g_y_norm, "batch": self._batch, "loss_calls": self.loss_calls}

    def _check_extra_state(self, extra: dict) -> None:
        g_y = extra.get("g_y")
        if g_y is not None and (len(g_y) != len(self.params) or any(g.shape != p.shape
                                                                    for g, p in zip(g_y, self.params))):
            raise ValueError("load_state_dict: 'g_y' does not match the parameters of this SAMPa")

    def _load_extra_state(self, extra: dict) -> None:
        g_y = extra.get("g_y")
        if g_y is not None:
            g_y = [g.to(p.device, p.dtype) for g, p in zip(g_y, self.params)]
        norm = extra.get("g_y_norm")
        self.kept_g_y = g_y
        self._g_y_norm = norm.to(self.device, self._norm_dtype()) if norm is not None else None
        self.keep_batch(extra.get("batch"))
        self.loss_calls = int(extra.get("loss_calls", 0))

    def held_tensors(self) -> list:
        """The tensors SAMPa holds between steps: g_y, the shadow sets and their gradients (what a
        memory profile starts from: python -m sam_kernels.memory)."""
        sets = self._on_shadows.sets or ()
        return list(self.kept_g_y or []) + [t for s in sets for u in s for t in (u, u.grad) if t is not None]

    def optimizer_work(self, grads) -> None:
        """One step's optimizer work without its two passes, with `grads` standing for g_y, g~ and
        g_y' (what the benchmarks time: python -m sam_kernels.bench): the fused preview into the
        shadow sets, the norms of the gradients and the fused update."""
        self.g_y.set(grads)
        if self._g_y_norm is None:
            self._norm_into(self.g_y, self._g_y_norm_buf())
        xt, y = self._on_shadows.shadow_sets(self.params)
        self.run_preview(Current("x~ set").set(xt), Current("y set").set(y))
        self.g_y.clear()
        self._finish_step(grads, grads, [])

    def memory_report(self) -> dict:
        """Bytes held across steps: `g_y` (the kept gradient), `shadows` (the x~ and y parameter
        sets the concurrent passes run at: streams, capturable), `pass_grads` (capturable or
        streams: the gradients of the passes at fixed addresses, in the shadows' .grad, g_y among
        them, counted once) and `base_state`; and `step_scratch`, what a step in turn allocates and
        frees (sampa_passes.InTurn.nbytes)."""
        shadows, pass_grads = self._on_shadows.nbytes(self.kept_g_y)
        in_turn = not self.capturable and self.parallel in ("sequential", "auto")
        return {"g_y": sum(t.numel() * t.element_size() for t in self.kept_g_y or ()), "shadows": shadows,
                "pass_grads": pass_grads, "step_scratch": self._in_turn.nbytes(self.params) if in_turn else 0,
                "base_state": self._base_state_bytes()}
