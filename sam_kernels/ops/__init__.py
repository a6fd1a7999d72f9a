"""The primitives of sam_kernels, each dispatched to one backend (see backends.py).

Every primitive takes whole lists of tensors (all on one device; any mix of fp32 / fp64 /
bf16 / fp16, fp32 arithmetic for the half types) and does the work of the whole list in one
launch per dtype group. Kernel backends need contiguous memory: non-contiguous tensors are
staged through contiguous copies here, once, for every kernel backend (and for Triton, tensors
at addresses that are not 16-byte aligned). No primitive reads a tensor on the host: decisions
that depend on values are made on the device from device scalars (norm, found_inf, grad_scale,
the Adam step counters).

    global_norm(tensors, weights=None, offset=0.)  ||T t|| over all tensors, T = |w| + offset or 1
    check_grads_(grads, flags, ...)                the guard of a step: is it taken, by what is the
                                                   gradient multiplied (unscale, clip), its norm
    perturb_(params, grads, x_old, norm, rho, ...) x_old <- x; x <- x + rho T^2 g / (norm + eps)
    shift_(params, directions, norm, rho, ...)     x <- x +- rho d / (norm + eps) (MSAM's move, no copy)
    lincomb_(out, x, y, a, b)                      out <- a x + b y (a, b device scalars: GSAM, LookSAM, F-SAM)
    restore_(params, x_old, found_inf=None)        x <- x_old (bit for bit; with found_inf, if it is 0)
    restore_sgd_(params, x_old, grads, bufs, ...)  x <- x_old, then one fused torch.optim.SGD step
    restore_adam_(params, x_old, grads, m, v, ...) x <- x_old, then one fused Adam / AdamW step
    shift_restore_sgd_ / shift_restore_adam_       x <- x + rho b / (norm + eps), then the fused step
                                                   (MSAM's way back along the momentum b, in the update)
The fused updates take grad_scale (a multiplier of the gradient: GradScaler's 1 / scale times a
clipping coefficient) and found_inf (!= 0: the step is skipped, x <- x_old and no state is
written), both fp32 device scalars; Adam's take state_steps, one fp32 device scalar per tensor
with its step count for this update (the bias corrections are computed from it on the device).

nuSAM (rank-1 perturbations of weight matrices; us / vs fp32 vectors, scales an fp32 device vector):
    power_iteration_(mats, us, vs, sigmas, iters, tau)   warm-started top singular pairs of every matrix
    rank1_scales_(sigmas, rho, normalized, scales, first_norm)
                                                         the scales of the rank-1 terms (nuSAM-Norm too)
    rank1_update_(mats, us, vs, scales)                  M_i <- M_i + s_i u_i v_i^T
    rank1_restore_sgd_ / rank1_restore_adam_             M <- M - s u v^T, then the fused base step

SAMPa (the two points of a step from one read of x, and the update with the mixed gradient):
    sampa_preview_sgd_ / sampa_preview_adam_(params, grads, perturbed, previews, state, norm, rho, ...)
        perturbed <- x + rho g / (norm + eps);  previews <- the base step from x with g (state read only)
    sampa_update_sgd_ / sampa_update_adam_(params, grads, grads2, state, lam, ...)
        the base step from x with d = (1 - lam) grads + lam grads2

prepare(op, backend, device, **lists) binds a primitive to its lists once (the launch tables of
the kernel backends) and returns a function that launches it with scalars only: what the
optimizers' step plans call on every step (sam_kernels/engine/plans.py).
"""
from __future__ import annotations

import functools
import importlib
import operator

import torch

from . import backends
from .primitives import REGISTRY
from ..integrations.distributed import localize

_IMPL_MODULES = {"torch": ".reference", "cpu": ".native", "cuda": ".native", "triton": ".triton"}
# Lists of scalars or small vectors: read-only, any alignment (never staged).
_UNSTAGED = ("state_steps", "us", "vs")


def _impl(backend: str):
    return importlib.import_module(_IMPL_MODULES[backend], __package__)


_get_device = torch.Tensor.get_device
_contiguous = torch.Tensor.is_contiguous


def _device_of(name: str, lists) -> torch.device:
    indices = set()  # device indices (-1: CPU): ints are cheaper to get than torch.device objects
    for lst in lists:
        indices.update(map(_get_device, lst))
    if len(indices) > 1:
        devices = {t.device for lst in lists for t in lst}
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    return lists[0][0].device


def _check_lists(op: str, params, lists: dict):
    for name, lst in lists.items():
        if lst is not None and len(lst) != len(params):
            raise ValueError(f"{op}: '{name}' has {len(lst)} tensors, params has {len(params)}")


_data_ptr = torch.Tensor.data_ptr


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _all_aligned(lst) -> bool:
    return not functools.reduce(operator.or_, map(_data_ptr, lst), 0) & 15  # C-level loop: no per-tensor call


def stageable(lists: dict, aligned: bool) -> bool:
    """Whether the element lists need no staging (contiguous, and 16-byte aligned for Triton)."""
    present = [v for k, v in lists.items() if v and k not in _UNSTAGED]
    return all(all(map(_contiguous, v)) and (not aligned or _all_aligned(v)) for v in present)


class _Staged:
    """Contiguous stand-ins for non-contiguous tensors (and, with `aligned`, for tensors whose
    address is not a multiple of 16 bytes, which the Triton kernels' vector loads need: a
    contiguous view at an odd offset of a larger buffer); written lists are copied back on exit."""

    def __init__(self, lists: dict, written: tuple[str, ...], aligned: bool = False):
        self.lists = {k: (list(v) if v is not None else None) for k, v in lists.items()}
        self._originals = lists
        self._written = written
        present = [v for k, v in lists.items() if v and k not in _UNSTAGED]
        fine = (lambda t: t.is_contiguous() and _aligned(t)) if aligned else _contiguous
        if stageable(lists, aligned):  # the common case
            self._index = []
        else:
            n = len(present[0])
            self._index = [i for i in range(n) if any(not fine(v[i]) for v in present)]
        for i in self._index:
            for k, v in self.lists.items():
                if k not in _UNSTAGED and v is not None and len(v) and not fine(v[i]):
                    v[i] = v[i].clone(memory_format=torch.contiguous_format)

    def __enter__(self):
        return self.lists

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            for i in self._index:
                for name in self._written:
                    src, dst = self.lists[name], self._originals[name]
                    if dst is not None and len(dst) and src[i] is not dst[i]:
                        dst[i].copy_(src[i])
        return False


def _run(op: str, backend: str, lists: dict, scalars: dict, impl: str | None = None):
    """Primitive `op` (implemented by the backend's function `impl`, default `op`) on `lists`; the
    lists it writes (staged ones are copied back) from its declaration (primitives.py)."""
    written = tuple(p.name for p in REGISTRY[impl or op].lists if p.written)
    params = next(iter(lists.values()))
    _check_lists(op, params, lists)
    if not params:
        return None
    device = _device_of(op, [v for v in lists.values() if v])
    name = backends.resolve(backend, device, op)
    fn = getattr(_impl(name), impl or op)
    if name == "torch":
        return fn(**{k: (v if v is not None else []) for k, v in lists.items()}, **scalars)
    with _Staged(lists, written, aligned=name == "triton") as staged:
        return fn(**{k: (v if v is not None else []) for k, v in staged.items()}, **scalars)


def prepare(op: str, backend: str, device: torch.device, **lists):
    """`op` bound to `lists` on `backend` (resolved for `device`): returns run(**scalars), with the
    launch tables built now and reused by every call. `lists` may hold static values too (momentum,
    amsgrad, init_bufs: which optional lists the binding holds; a plan's key says them). The element
    lists must be contiguous (and aligned for Triton: the step plans check stageable() and otherwise
    call the list op). For the norms, op is "sumsq" (lists tensors, second) and run(partials, mode,
    scalar, at) writes run.n_partials sums of squares; norm_finalize / guard_finalize
    (finalizers(backend)) end them. nuSAM's power iterations from warm starts: op "power_iteration"
    (lists mats, us, vs, warm)."""
    if op not in REGISTRY:
        raise ValueError(f"prepare: no primitive {op!r}")
    return _impl(backend).prepare(op, **_local_lists(lists))


def bind(op: str, backend: str, device: torch.device, lists: dict, static: dict | None = None):
    """prepare(op, ...) when the element lists need no staging, else a function calling the list op
    (which stages them on every call): the same run(**scalars) either way."""
    lists = _local_lists(lists)
    if stageable(lists, aligned=backend == "triton"):
        return prepare(op, backend, device, **lists, **(static or {}))
    fn = globals()[op]
    return lambda **kw: fn(**lists, **kw, backend=backend)


def _local_lists(lists: dict) -> dict:
    """The local shards of DTensor lists (sam_kernels/integrations/distributed.py); live lists take theirs
    when read (_lists.GradsOf), other values pass as they are."""
    return {k: localize(v) if isinstance(v, list) else v for k, v in lists.items()}


def finalizers(backend: str):
    """(norm_finalize(partials, out), guard_finalize(partials, flags, ...)) of a backend."""
    impl = _impl(backend)
    return impl.norm_finalize, impl.guard_finalize


def _scalar(value, device, name: str):
    """An optional fp32 device scalar argument; a Python number becomes one."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.full((), float(value), dtype=torch.float32, device=device)


def _sgd_scalars(op, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs,
                 reads_only: bool = False) -> dict:
    if momentum != 0 and bufs is None and not (reads_only and init_bufs):
        raise ValueError(f"{op}: momentum != 0 needs 'bufs' (the momentum buffers)")
    return {"lr": float(lr), "momentum": float(momentum), "dampening": float(dampening), "nesterov": bool(nesterov),
            "weight_decay": float(weight_decay), "maximize": bool(maximize), "init_bufs": bool(init_bufs)}


def _adam_scalars(op, max_exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize) -> dict:
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError(f"{op}: amsgrad=True needs 'max_exp_avg_sqs'")
    return {"lr": float(lr), "beta1": float(beta1), "beta2": float(beta2), "eps": float(eps),
            "weight_decay": float(weight_decay), "decoupled": bool(decoupled), "amsgrad": bool(amsgrad),
            "maximize": bool(maximize)}


def _adam_lists(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad, state_steps) -> dict:
    return {"exp_avgs": list(exp_avgs), "exp_avg_sqs": list(exp_avg_sqs),
            "max_exp_avg_sqs": list(max_exp_avg_sqs) if amsgrad else None, "state_steps": list(state_steps)}


def _guard_args(op, params, grad_scale, found_inf) -> dict:
    device = params[0].device if params else None
    return {"grad_scale": _scalar(grad_scale, device, "grad_scale"), "found_inf": found_inf}


@torch.no_grad()
def global_norm(tensors, weights=None, offset: float = 0.0, *, backend: str = "auto") -> torch.Tensor:
    """0-dim tensor on the tensors' device: sqrt(sum_i ||T_i t_i||^2), T_i = |w_i| + offset (or 1); fp32,
    or fp64 when a tensor is fp64 (accumulated in that precision, as clip_grad_norm_ does)."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    weights = list(weights) if weights is not None else None
    return _run("global_norm", backend, {"tensors": tensors, "weights": weights}, {"offset": float(offset)})


@torch.no_grad()
def check_grads_(grads, flags, *, grads2=None, lam: float = 0.0, first_norm=None, scale=None, found_inf=None,
                 max_norm=None, steps=None, steps_mask=None, backend: str = "auto") -> None:
    """The guard of a step, on the device. n = ||grads|| (of (1 - lam) grads + lam grads2 with grads2);
    flags (fp32[4]) <- [found_inf, grad_scale, grad_norm, flags[3] + found_inf]:
    found_inf = 1 if n, any element of first_norm (the first pass's norms) is not finite or found_inf
    (a GradScaler's own check) != 0, else 0; grad_scale = inv * min(1, max_norm / (n inv + 1e-6))
    with inv = 1 / scale (GradScaler's scale; 1 without); grad_norm = n inv. steps (fp32, Adam's
    step counters) += (1 - found_inf) * steps_mask: they move only when the step is taken."""
    grads = list(grads)
    grads2 = list(grads2) if grads2 is not None else None
    max_norm = float("inf") if max_norm is None else float(max_norm)
    _run("check_grads_", backend, {"grads": grads, "grads2": grads2},
         {"lam": float(lam), "flags": flags, "first_norm": first_norm, "scale": scale, "found_inf": found_inf,
          "max_norm": max_norm, "steps": steps, "steps_mask": steps_mask})


@torch.no_grad()
def perturb_(params, grads, x_old, norm, rho: float, *, adaptive: bool = False, offset: float = 0.0,
             backend: str = "auto") -> None:
    """x_old <- params; params <- params + rho * T^2 grads / (norm + eps); params untouched if norm is not finite."""
    _run("perturb_", backend, {"params": list(params), "grads": list(grads), "x_old": list(x_old)},
         {"norm": norm, "rho": float(rho), "adaptive": bool(adaptive), "offset": float(offset)})


@torch.no_grad()
def shift_(params, directions, norm, rho: float, *, subtract: bool = False, backend: str = "auto") -> None:
    """params <- params + rho * directions / (norm + eps) (subtract: minus it); params untouched if
    norm is not finite. MSAM moves along minus its momentum buffers with it, and back."""
    _run("shift_", backend, {"params": list(params), "directions": list(directions)},
         {"norm": norm, "rho": float(rho), "subtract": bool(subtract)})


@torch.no_grad()
def lincomb_(out, x, y, a, b, *, backend: str = "auto") -> None:
    """out <- a * x + b * y elementwise (a, b: fp32 device scalars, or numbers; out may be x or y):
    the directions GSAM, LookSAM and F-SAM build from two gradients with coefficients computed on
    the device (a norm, a dot product), so that no step reads them on the host."""
    out = list(out)
    device = out[0].device if out else None
    _run("lincomb_", backend, {"out": out, "x": list(x), "y": list(y)},
         {"a": _scalar(a, device, "a"), "b": _scalar(b, device, "b")})


@torch.no_grad()
def restore_(params, x_old, found_inf=None, *, backend: str = "auto") -> None:
    """params <- x_old, bit for bit; with found_inf (a device scalar), only when found_inf == 0."""
    _run("restore_", backend, {"params": list(params), "x_old": list(x_old)}, {"found_inf": found_inf})


@torch.no_grad()
def restore_sgd_(params, x_old, grads, bufs=None, *, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, maximize: bool = False, init_bufs: bool = False,
                 grad_scale=None, found_inf=None, backend: str = "auto") -> None:
    """params <- x_old, then one torch.optim.SGD step with grads * grad_scale; bufs: momentum buffers,
    updated in place. found_inf != 0: params <- x_old only."""
    params = list(params)
    scalars = _sgd_scalars("restore_sgd_", bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs)
    _run("restore_sgd_", backend,
         {"params": params, "x_old": list(x_old), "grads": list(grads),
          "bufs": list(bufs) if momentum != 0 else None},
         {**scalars, **_guard_args("restore_sgd_", params, grad_scale, found_inf)})


@torch.no_grad()
def restore_adam_(params, x_old, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, state_steps, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float = 0.0, decoupled: bool = False,
                  amsgrad: bool = False, maximize: bool = False, grad_scale=None, found_inf=None,
                  backend: str = "auto") -> None:
    """params <- x_old, then one torch.optim.Adam (decoupled=False) / AdamW (decoupled=True) step with
    grads * grad_scale; state_steps: each tensor's step count for this update (fp32 device scalars).
    found_inf != 0: params <- x_old only."""
    params = list(params)
    scalars = _adam_scalars("restore_adam_", max_exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, decoupled,
                            amsgrad, maximize)
    _run("restore_adam_", backend,
         {"params": params, "x_old": list(x_old), "grads": list(grads),
          **_adam_lists(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad, state_steps)},
         {**scalars, **_guard_args("restore_adam_", params, grad_scale, found_inf)})


@torch.no_grad()
def shift_restore_sgd_(params, grads, bufs, *, norm: torch.Tensor, rho: float, lr: float, momentum: float,
                       dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                       maximize: bool = False, init_bufs: bool = False, grad_scale=None, found_inf=None,
                       backend: str = "auto") -> None:
    """params <- params + rho * bufs / (norm + eps) (MSAM's way back along the momentum buffers it
    moved along with shift_(..., subtract=True); no move for a non-finite norm), then one
    torch.optim.SGD step with grads * grad_scale, in one pass: 20 B per fp32 element, as
    restore_sgd_. found_inf != 0: the move back only."""
    params = list(params)
    if bufs is None:
        raise ValueError("shift_restore_sgd_: needs 'bufs' (the momentum buffers: the direction of the move)")
    scalars = _sgd_scalars("shift_restore_sgd_", bufs, lr, momentum, dampening, nesterov, weight_decay, maximize,
                           init_bufs)
    _run("shift_restore_sgd_", backend, {"params": params, "grads": list(grads), "bufs": list(bufs)},
         {"norm": norm, "rho": float(rho), **scalars,
          **_guard_args("shift_restore_sgd_", params, grad_scale, found_inf)})


@torch.no_grad()
def shift_restore_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, state_steps,
                        norm: torch.Tensor, rho: float, lr: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float = 0.0, decoupled: bool = False, amsgrad: bool = False,
                        maximize: bool = False, grad_scale=None, found_inf=None, backend: str = "auto") -> None:
    """params <- params + rho * exp_avgs / (norm + eps) (MSAM's way back along Adam's first moments),
    then one torch.optim.Adam / AdamW step, in one pass (found_inf != 0: the move back only)."""
    params = list(params)
    scalars = _adam_scalars("shift_restore_adam_", max_exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, decoupled,
                            amsgrad, maximize)
    _run("shift_restore_adam_", backend,
         {"params": params, "grads": list(grads),
          **_adam_lists(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad, state_steps)},
         {"norm": norm, "rho": float(rho), **scalars,
          **_guard_args("shift_restore_adam_", params, grad_scale, found_inf)})


# --- SAMPa -----------------------------------------------------------------------------------

def _lam(op: str, lam) -> float:
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"{op}: lam must be in [0, 1], got {lam!r}")
    return float(lam)


def _update_with_one_gradient(op, impl, backend, params, grads, grads2, lam, state, scalars) -> None:
    """SAMPa's update at lam = 0 / 1: the plain fused step `impl` with the one gradient it uses,
    bit for bit, without reading the other."""
    _check_lists(op, params, {"grads": grads, "grads2": grads2})
    _run(op, backend, {"params": list(params), "x_old": list(params), "grads": list(grads2 if lam else grads), **state},
         scalars, impl=impl)


@torch.no_grad()
def sampa_preview_sgd_(params, grads, perturbed, previews, bufs=None, *, norm: torch.Tensor, rho: float, lr: float,
                       momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                       weight_decay: float = 0.0, maximize: bool = False, init_bufs: bool = False,
                       backend: str = "auto") -> None:
    """perturbed <- x + rho g / (norm + eps); previews <- the torch.optim.SGD step from x with g. Reads
    the momentum buffers without writing them: the optimizer state stays. A non-finite norm: g is
    not used (perturbed <- x, the preview steps with a zero gradient)."""
    scalars = _sgd_scalars("sampa_preview_sgd_", bufs, lr, momentum, dampening, nesterov, weight_decay, maximize,
                           init_bufs, reads_only=True)  # init_bufs: no buffer yet, none read
    _run("sampa_preview_sgd_", backend,
         {"params": list(params), "grads": list(grads), "perturbed": list(perturbed), "previews": list(previews),
          "bufs": list(bufs) if momentum != 0 and bufs is not None else None},
         {"norm": norm, "rho": float(rho), **scalars})


@torch.no_grad()
def sampa_preview_adam_(params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *,
                        state_steps, norm: torch.Tensor, rho: float, lr: float, beta1: float, beta2: float,
                        eps: float, weight_decay: float = 0.0, decoupled: bool = False, amsgrad: bool = False,
                        maximize: bool = False, backend: str = "auto") -> None:
    """perturbed <- x + rho g / (norm + eps); previews <- the Adam / AdamW step from x with g, the
    step after state_steps (count + 1). The moments are read, not written. A non-finite norm as
    for sampa_preview_sgd_."""
    scalars = _adam_scalars("sampa_preview_adam_", max_exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, decoupled,
                            amsgrad, maximize)
    _run("sampa_preview_adam_", backend,
         {"params": list(params), "grads": list(grads), "perturbed": list(perturbed), "previews": list(previews),
          **_adam_lists(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad, state_steps)},
         {"norm": norm, "rho": float(rho), **scalars})


@torch.no_grad()
def sampa_update_sgd_(params, grads, grads2, bufs=None, *, lam: float, lr: float, momentum: float = 0.0,
                      dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                      maximize: bool = False, init_bufs: bool = False, grad_scale=None, found_inf=None,
                      backend: str = "auto") -> None:
    """One torch.optim.SGD step from x with d = (1 - lam) * grads + lam * grads2 (times grad_scale), in
    one pass; nothing is written where found_inf != 0."""
    params = list(params)
    scalars = {**_sgd_scalars("sampa_update_sgd_", bufs, lr, momentum, dampening, nesterov, weight_decay, maximize,
                              init_bufs), **_guard_args("sampa_update_sgd_", params, grad_scale, found_inf)}
    lam = _lam("sampa_update_sgd_", lam)
    if lam in (0.0, 1.0):
        return _update_with_one_gradient("sampa_update_sgd_", "restore_sgd_", backend, params, grads, grads2, lam,
                                         {"bufs": list(bufs) if momentum != 0 else None}, scalars)
    _run("sampa_update_sgd_", backend,
         {"params": params, "grads": list(grads), "grads2": list(grads2),
          "bufs": list(bufs) if momentum != 0 else None},
         {"lam": lam, **scalars})


@torch.no_grad()
def sampa_update_adam_(params, grads, grads2, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, state_steps, lam: float,
                       lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                       decoupled: bool = False, amsgrad: bool = False, maximize: bool = False, grad_scale=None,
                       found_inf=None, backend: str = "auto") -> None:
    """One torch.optim.Adam / AdamW step from x with d = (1 - lam) * grads + lam * grads2, in one pass;
    nothing is written where found_inf != 0."""
    params = list(params)
    scalars = {**_adam_scalars("sampa_update_adam_", max_exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, decoupled,
                               amsgrad, maximize), **_guard_args("sampa_update_adam_", params, grad_scale, found_inf)}
    lam = _lam("sampa_update_adam_", lam)
    state = _adam_lists(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad, state_steps)
    if lam in (0.0, 1.0):
        return _update_with_one_gradient("sampa_update_adam_", "restore_adam_", backend, params, grads, grads2, lam,
                                         state, scalars)
    _run("sampa_update_adam_", backend, {"params": params, "grads": list(grads), "grads2": list(grads2), **state},
         {"lam": lam, **scalars})


# --- nuSAM -----------------------------------------------------------------------------------

def _rank1_lists(op, mats, us, vs):
    mats, us, vs = list(mats), list(us), list(vs)
    shapes = [m.shape for m in mats]
    if (len(us) == len(vs) == len(mats) and all(len(s) == 2 for s in shapes)
            and [(u.dtype, u.shape[0], v.dtype, v.shape[0]) for u, v in zip(us, vs)]
            == [(torch.float32, s[0], torch.float32, s[1]) for s in shapes]
            and all(u.dim() == 1 and v.dim() == 1 for u, v in zip(us, vs))):
        return mats, us, vs  # the common case, checked in a few list passes
    for i, m in enumerate(mats):
        if m.dim() != 2:
            raise ValueError(f"{op}: mats[{i}] must be a matrix, got shape {tuple(m.shape)}")
        for name, vec, n in (("us", us, m.shape[0]), ("vs", vs, m.shape[1])):
            if i < len(vec) and (vec[i].dtype != torch.float32 or vec[i].shape != (n,)):
                raise ValueError(f"{op}: {name}[{i}] must be a float32 vector of {n} values, "
                                 f"got {vec[i].dtype} {tuple(vec[i].shape)}")
    return mats, us, vs


@torch.no_grad()
def power_iteration_(mats, us, vs, sigmas, iters: int = 1, tau: float = 1e-12, *, backend: str = "auto") -> None:
    """T warm-started power iterations per matrix G_i: v = G^T u / (||G^T u|| + tau), u = G v / (||G v|| + tau).
    us (in: warm start, out: u), vs (out: v), sigmas[i] = ||G_i v_i|| (out)."""
    if int(iters) < 1:
        raise ValueError(f"power_iteration_: iters must be >= 1, got {iters}")
    mats, us, vs = _rank1_lists("power_iteration_", mats, us, vs)
    _run("power_iteration_", backend, {"mats": mats, "us": us, "vs": vs},
         {"sigmas": sigmas, "iters": int(iters), "tau": float(tau)})


@torch.no_grad()
def rank1_scales_(sigmas, rho, normalized, scales, first_norm, *, backend: str = "auto") -> None:
    """nuSAM's per-matrix scales (fp32 device vectors of k): scales_i = 0 for every i if a sigma is
    not finite (no perturbation at all), else rho_i sigma_i / (sqrt(sum_j sigma_j^2 over the
    matrices with normalized_j != 0) + 1e-12) where normalized_i != 0 (nuSAM-Norm), rho_i
    elsewhere; first_norm (one value) <- sum of the sigmas (not finite iff one is not)."""
    device = sigmas.device
    name = backends.resolve(backend, device, "rank1_scales_")
    _impl(name).rank1_scales_(sigmas, rho, normalized, scales, first_norm)


@torch.no_grad()
def rank1_update_(mats, us, vs, scales, *, backend: str = "auto") -> None:
    """M_i <- M_i + scales[i] * u_i v_i^T (a zero scale leaves M_i untouched)."""
    mats, us, vs = _rank1_lists("rank1_update_", mats, us, vs)
    _run("rank1_update_", backend, {"mats": mats, "us": us, "vs": vs}, {"scales": scales})


@torch.no_grad()
def rank1_restore_sgd_(params, us, vs, scales, grads, bufs=None, *, lr: float, momentum: float = 0.0,
                       dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                       maximize: bool = False, init_bufs: bool = False, grad_scale=None, found_inf=None,
                       backend: str = "auto") -> None:
    """M <- M - s u v^T, then one torch.optim.SGD step with grads * grad_scale, in one pass (found_inf != 0:
    the removal only)."""
    scalars = _sgd_scalars("rank1_restore_sgd_", bufs, lr, momentum, dampening, nesterov, weight_decay, maximize,
                           init_bufs)
    params, us, vs = _rank1_lists("rank1_restore_sgd_", params, us, vs)
    _run("rank1_restore_sgd_", backend,
         {"params": params, "us": us, "vs": vs, "grads": list(grads),
          "bufs": list(bufs) if momentum != 0 else None},
         {"scales": scales, **scalars, **_guard_args("rank1_restore_sgd_", params, grad_scale, found_inf)})


@torch.no_grad()
def rank1_restore_adam_(params, us, vs, scales, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, state_steps,
                        lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                        decoupled: bool = False, amsgrad: bool = False, maximize: bool = False, grad_scale=None,
                        found_inf=None, backend: str = "auto") -> None:
    """M <- M - s u v^T, then one torch.optim.Adam / AdamW step with grads * grad_scale, in one pass
    (found_inf != 0: the removal only)."""
    scalars = _adam_scalars("rank1_restore_adam_", max_exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, decoupled,
                            amsgrad, maximize)
    params, us, vs = _rank1_lists("rank1_restore_adam_", params, us, vs)
    _run("rank1_restore_adam_", backend,
         {"params": params, "us": us, "vs": vs, "grads": list(grads),
          **_adam_lists(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad, state_steps)},
         {"scales": scales, **scalars, **_guard_args("rank1_restore_adam_", params, grad_scale, found_inf)})
