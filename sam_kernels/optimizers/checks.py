"""The argument checks of every optimizer class: each raises a ValueError / TypeError naming the
argument and its value, before anything is modified."""
from __future__ import annotations

import inspect
import math

import torch
from torch.optim import Optimizer

from ..integrations import distributed
from ..ops.constants import NORM_EPS

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


