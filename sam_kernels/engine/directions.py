"""The directions of SAM's variants that combine two gradients (ALGORITHMS.md, "Beyond the seeds"):
strategies the first pass of a step composes (perturbations.py's CopyPass: x_old, restored bit
for bit), with what they add to the second pass.

    KeptGradient        GSAM: d = g (SAM's), g kept for the second pass, whose prelude writes
                        d = g_p - alpha g_perp = (1 + alpha c) g_p - alpha g,  c = <g, g_p> / (||g_p||^2 + eps)
                        into .grad before the guard
    FriendlyDirection   F-SAM: d = g - sigma m (m the EMA of the first gradients, the optimizer's own
                        state), m <- lambda m + (1 - lambda) g committed only if the step is taken
    LookaheadPass       LookSAM's SAM step (a first pass of its own, momentum.py's ShiftPass: no
                        copy of the weights): x moves along a kept copy of g and back, and
                        g_v = g_s - (<g, g_s> / ||g||^2) g is committed if the step is taken
    reuse_prelude       LookSAM's other steps: .grad <- g + alpha (||g|| / ||g_v||) g_v

Every coefficient is computed on the device from a norm or a dot product (engine/norms.py, the
sums of mode 3) and given to lincomb_ as a device scalar: no step reads a value on the host.
"""
from __future__ import annotations

import torch

from .. import ops
from ..integrations.distributed import local
from ..ops.constants import NORM_EPS
from ..ops.lists import GradsOf
from .momentum import ShiftPass
from .norms import NormStage
from .perturbations import CopyPass, GradientDirection, scratch


def keep_gradients(engine, params, device):
    """Buffers of a plan holding a copy of the first gradients of `params` (scratch(): one copy),
    {id(p): view}, and keep() writing it (a bit copy by restore_; None without parameters). GSAM's
    g for its second pass, LookSAM's g for its g_v."""
    buffers, views = scratch(params, device)
    keep = ops.bind("restore_", engine.backend_for(device, "restore_"), device,
                    {"params": [views[id(p)] for p in params], "x_old": GradsOf(params)}) if params else None
    return buffers, views, keep


def _nbytes(buffers) -> int:
    return sum(t.numel() * t.element_size() for t in buffers)


def _device_scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A number as a device scalar of `like`'s dtype and device (a fill: no synchronization)."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


class KeptGradient(GradientDirection):
    """GSAM's direction (see the module docstring): the first pass perturbs along g as SAM does and
    keeps a copy of g (buffers of the plan: one copy of the perturbed parameters); the second
    pass's prelude turns the gradient at the perturbed point into d, in .grad, over the
    parameters with both gradients (the others take g_p as it is). With a GradScaler both
    gradients carry the same scale: c does not depend on it (up to eps) and d carries it, which the
    guard takes out. alpha: read on every step (GSAM.alpha sets it)."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def prepare(self, engine, first: CopyPass, work, device):
        first.kept_buffers, first.kept, first.keep = keep_gradients(engine, [p for _, ps in work for p in ps], device)
        return GradsOf

    def before(self, first: CopyPass, raise_nonfinite: bool, scale=None) -> None:
        if first.keep is not None:
            first.keep()  # a bit copy of g (a non-finite g is caught by its norm, the first check)

    def prelude(self, engine, first: CopyPass, params, device):
        ps = [p for p in params if id(p) in first.kept]
        if not ps:
            return None
        kept, grads = [first.kept[id(p)] for p in ps], GradsOf(ps)
        norm_backend, group = engine.backend_for(device, "global_norm"), engine.reduce_group()
        dot = NormStage(norm_backend, device, [(kept, grads, 3, 0.0)], group=group)  # <g, g_p>
        norm = NormStage(norm_backend, device, [(grads, None, 0, 0.0)], group=group)  # ||g_p||
        combine = ops.bind("lincomb_", engine.backend_for(device, "lincomb_"), device,
                           {"out": grads, "x": kept, "y": grads})
        dot_out, norm_out = dot.out(), norm.out()

        def run():
            dot.total(dot_out)
            norm.norm(norm_out)
            alpha = self.alpha
            c = dot_out / (norm_out * norm_out + NORM_EPS)
            combine(a=_device_scalar(-alpha, c), b=1.0 + alpha * c)  # d = (1 + alpha c) g_p - alpha g
        return run

    @staticmethod
    def nbytes(first) -> int:
        """The kept copy of g in a plan."""
        return _nbytes(first.kept_buffers) if first is not None else 0


class FriendlyDirection(GradientDirection):
    """F-SAM's direction (see the module docstring). m lives in the optimizer's own state (`m_of(p)`,
    saved with its checkpoints); d is written into buffers of the plan (one copy) before the norm,
    so the perturbation (and ASAM's T^2 scaling, when adaptive) is SAM's along d. The commit takes
    g back as d + sigma m (d = g - sigma m, rounded once), so that m <- lambda m + (1 - lambda) g is
    (lambda + (1 - lambda) sigma) m + (1 - lambda) d, written into m only when the step is taken;
    on the first taken step m <- g (m starts at zero, so d = g there). `started`: a device flag
    (0 / 1) saying whether m holds an average yet (checkpoints carry it). m is kept unscaled: with
    a GradScaler (given to first_step) g carries its scale S, so d = g - sigma S m and the commit
    divides by S. sigma, lam: read on every step. owner: the optimizer whose own state holds m
    (EngineOptimizer.own_state)."""

    KEY = "fsam_m"

    def __init__(self, owner, sigma: float, lam: float):
        self.owner, self.sigma, self.lam = owner, sigma, lam
        self.started_at_load = 0.0
        self.started: torch.Tensor | None = None

    def m_of(self, p: torch.Tensor) -> torch.Tensor:
        return self.owner.own_state(p, self.KEY)

    def started_on(self, device, dtype) -> torch.Tensor:
        """The flag, on the device in the norm's dtype (fp64 for fp64 parameters)."""
        if self.started is None or self.started.device != torch.device(device) or self.started.dtype != dtype:
            value = self.started.to(device, dtype) if self.started is not None else self.started_at_load
            self.started = torch.full((), 0.0, dtype=dtype, device=device)
            self.started.copy_(value if torch.is_tensor(value) else torch.tensor(value, dtype=dtype))
        return self.started

    def state(self) -> dict:
        """What a checkpoint holds: the flag as a number (read from the device once, as the
        engine's skipped_steps: a checkpoint template and a saved one have the same kind)."""
        return {"fsam_started": float(self.started) if self.started is not None else self.started_at_load}

    def load_state(self, extra: dict) -> None:
        value = extra.get("fsam_started", 0.0)
        self.started_at_load = float(value)  # (a checkpoint is read once, at load)
        self.started = None

    def prepare(self, engine, first: CopyPass, work, device):
        params = [p for _, ps in work for p in ps]
        first.d_buffers, first.d = scratch(params, device)
        ms = [self.m_of(p) for p in params]
        ds = [first.d[id(p)] for p in params]
        backend = engine.backend_for(device, "lincomb_")
        first.make_d = ops.bind("lincomb_", backend, device, {"out": ds, "x": GradsOf(params), "y": ms}) \
            if params else None
        first.friendly = (ms, ds)
        first.coefficient_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        return lambda ps: [first.d[id(p)] for p in ps]

    def before(self, first: CopyPass, raise_nonfinite: bool, scale=None) -> None:
        first.scale = scale
        if first.make_d is not None:
            started = self.started_on(first.norm_out.device, first.coefficient_dtype)
            one = torch.ones((), dtype=started.dtype, device=started.device)
            # d = g - sigma m (m = 0 before the first step); m is unscaled, g may carry the scale S
            s = scale.to(started.dtype) if scale is not None else one
            first.make_d(a=one, b=started * s * -self.sigma)

    def commit(self, engine, first: CopyPass, params, device):
        ms, ds = first.friendly
        if not ms:
            return None
        backend = engine.backend_for(device, "lincomb_")
        average = ops.bind("lincomb_", backend, device, {"out": ds, "x": ms, "y": ds})
        keep = ops.bind("restore_", engine.backend_for(device, "restore_"), device, {"params": ms, "x_old": ds})

        def run(flags):
            started, sigma, lam = self.started_on(flags.device, first.coefficient_dtype), self.sigma, self.lam
            # with d = S g - sigma S m (S: the scale of g, 1 without a GradScaler), unscaled:
            # started: m_t = (lam + (1 - lam) sigma) m + (1 - lam) d / S; not yet: m_1 = d / S (= g)
            inv = 1.0 / first.scale.to(started.dtype) if first.scale is not None else 1.0
            average(a=started * (lam + (1 - lam) * sigma), b=(1.0 - started * lam) * inv)
            keep(found_inf=flags.found_inf)  # into m only if the step is taken
            torch.maximum(started, (1.0 - flags.found_inf).to(started.dtype), out=started)
        return run

    @staticmethod
    def nbytes(first) -> int:
        """The d buffers of a plan."""
        return _nbytes(first.d_buffers) if first is not None else 0


LOOKSAM_KEY = "looksam_gv"  # g_v in the optimizer's own state (saved with its checkpoints)


class LookaheadPass(ShiftPass):
    """LookSAM's SAM step over [(group, params with a gradient)] (perturbed groups): g is copied
    into buffers of the plan (one copy), x <- x + rho g / (||g|| + eps) and back by shift_ (x_t
    within one rounding, as MSAM: the copy of g is all it keeps, so that with g_v the step holds
    two copies, as SAM's x_old and g_v would), and the commit turns the kept g into g_v:
    g <- g_s - (<g, g_s> / (||g||^2 + eps)) g, copied into the owner's g_v only if the step is
    taken (a skipped step leaves g_v as it was); a parameter without both gradients in the step
    gets g_v = 0 then, so that g_v is one SAM step's. With a GradScaler both gradients carry its
    scale, and so does g_v: only its direction is used."""

    def __init__(self, engine, work, device, owner):
        work = [(group, ps) for group, ps in work if group["perturb"] and ps]
        self.kept_buffers, self.kept, self.keep = keep_gradients(engine, [p for _, ps in work for p in ps], device)
        super().__init__(engine, work, device, self.kept, subtract=False)
        self.owner = owner

    def perturb(self, raise_nonfinite: bool, scale=None) -> None:
        if self.keep is not None:
            self.keep()
        super().perturb(raise_nonfinite)
        if raise_nonfinite and not bool(torch.isfinite(self.first_norm)):  # raise mode must know: a sync
            raise FloatingPointError(f"first_step: the gradient norm is {self.first_norm.item()} (NaN or inf in "
                                     ".grad)")

    def commit(self, engine=None, params=(), device=None):
        ps = [p for p in params if id(p) in self.kept]
        if not ps:
            return None
        kept, grads = [self.kept[id(p)] for p in ps], GradsOf(ps)
        g_vs = [self.owner.own_state(p, LOOKSAM_KEY) for p in ps]
        dot = NormStage(engine.backend_for(device, "global_norm"), device, [(kept, grads, 3, 0.0)],
                        group=engine.reduce_group())  # <g, g_s>
        orthogonal = ops.bind("lincomb_", engine.backend_for(device, "lincomb_"), device,
                              {"out": kept, "x": kept, "y": grads})
        keep = ops.bind("restore_", engine.backend_for(device, "restore_"), device, {"params": g_vs, "x_old": kept})
        chosen = {id(p) for p in ps}
        others = [st[LOOKSAM_KEY] for p in engine.param_list() if id(p) not in chosen
                  for st in (self.owner.state.get(p, {}),) if LOOKSAM_KEY in st]
        others_local = [local(t) for t in others]  # (sharded: this rank's shards)
        dot_out = dot.out()

        def run(flags):
            dot.total(dot_out)
            c = dot_out / (self.first_norm * self.first_norm + NORM_EPS)
            orthogonal(a=-c, b=torch.ones((), dtype=c.dtype, device=c.device))
            keep(found_inf=flags.found_inf)
            if others:  # 0 if the step is taken (found_inf 0), as they were if not (g_v is finite)
                torch._foreach_mul_(others_local, flags.found_inf)
        return run

    @staticmethod
    def nbytes(first) -> int:
        """The kept copy of g in a plan."""
        return _nbytes(first.kept_buffers) if first is not None else 0


def reuse_prelude(engine, owner, params, device, alpha):
    """LookSAM's step between SAM steps: .grad <- g + alpha (||g|| / ||g_v||) g_v, ||g|| over
    `params` (the perturbed parameters with a gradient), g_v over those of them that have one
    (none before the first SAM step was taken, or ||g_v|| = 0: the gradient as it is), computed on
    the device; alpha: () -> alpha, read on every step. run()."""
    ps = [p for p in params if LOOKSAM_KEY in owner.state.get(p, {})]
    if not ps:
        return None
    grads, g_vs = GradsOf(ps), [owner.state[p][LOOKSAM_KEY] for p in ps]
    norm_backend, group = engine.backend_for(device, "global_norm"), engine.reduce_group()
    g_norm = NormStage(norm_backend, device, [(GradsOf(params), None, 0, 0.0)], group=group)
    v_norm = NormStage(norm_backend, device, [(g_vs, None, 0, 0.0)], group=group)
    add = ops.bind("lincomb_", engine.backend_for(device, "lincomb_"), device, {"out": grads, "x": grads, "y": g_vs})
    ng, nv = g_norm.out(), v_norm.out()

    def run():
        g_norm.norm(ng)
        v_norm.norm(nv)
        coefficient = torch.where(nv > 0, alpha() * ng / nv, torch.zeros_like(nv))
        add(a=torch.ones_like(nv), b=coefficient)
    return run
