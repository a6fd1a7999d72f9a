"""Loading the native extension sam_kernels._C, and the fake (meta) implementations of its ops.

Importing _C registers torch.ops.sam_kernels.* (CPU kernels always, CUDA kernels when built
with them). If it cannot be loaded, sam_kernels still works on its Triton and pure-torch paths
and warns once, saying what is missing.
"""
from __future__ import annotations

import os
import warnings

import torch

_LOADED = False
_ERROR: str | None = None

try:
    if os.environ.get("SAM_KERNELS_DISABLE_EXT", "0") == "1":
        raise ImportError("disabled by SAM_KERNELS_DISABLE_EXT=1")
    from .. import _C  # noqa: F401  (registers the ops)

    _LOADED = True
except ImportError as exc:  # tested in a subprocess with SAM_KERNELS_DISABLE_EXT=1
    _ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "sam_kernels: the native extension sam_kernels._C could not be loaded "
        f"({_ERROR}); the 'cpu' and 'cuda' backends are unavailable and CPU tensors use the "
        "pure-torch path. Rebuild with `pip install --no-build-isolation .` to get them.",
        RuntimeWarning,
        stacklevel=2,
    )


def loaded() -> bool:
    return _LOADED


def load_error() -> str | None:
    return _ERROR


def _fingerprint_py(params) -> tuple:
    """What _C.fingerprint computes (without the extension)."""
    structure, grads = [], []
    for p in params:
        g = p.grad
        strided = g is None or g.layout is torch.strided
        structure.append((p.data_ptr(), (g is not None) | strided << 1
                          | (g is None or not strided or g.is_contiguous()) << 2 | p.is_contiguous() << 3))
        grads.append(g.data_ptr() if g is not None and strided else 0)
    return tuple(structure), tuple(grads)


def fingerprint(params: list) -> tuple:
    """(structure, gradient addresses) of `params`: a step plan stays valid while the first holds
    (each parameter's storage, whether it has a gradient, their layout), and takes the gradients'
    new addresses when only the second changed. One C loop with the extension."""
    return _C.fingerprint(params) if _LOADED else _fingerprint_py(params)


def _state_fingerprint_py(state, params, keys) -> tuple:
    """What _C.state_fingerprint computes (without the extension)."""
    out = []
    for p in params:
        entry = state.get(p)  # dict.get: no entry is created
        for k in keys:
            v = entry.get(k) if isinstance(entry, dict) else None
            out.append(0 if v is None else v.data_ptr() if torch.is_tensor(v) and v.has_storage() else 1)
    return tuple(out)


def state_fingerprint(state: dict, params: list, keys: tuple):
    """Per parameter and key, where state[p][key] is (0: absent): what a step plan binds from the
    optimizer state, so that its key changes when that state is created, replaced or removed.
    One C loop with the extension; never creates an entry in torch's defaultdict state."""
    return _C.state_fingerprint(state, params, keys) if _LOADED else _state_fingerprint_py(state, params, keys)


def grad_addresses(params: list) -> torch.Tensor:
    """The gradients' data pointers (0 without one), an int64 CPU tensor."""
    grads = fingerprint(params)[1]
    if isinstance(grads, bytes):
        return torch.frombuffer(bytearray(grads), dtype=torch.int64)
    return torch.tensor(grads, dtype=torch.int64)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.sam_kernels.<op> has a kernel for `dispatch_key` ("CPU" or "CUDA")."""
    if not _LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_kernels::{op}", dispatch_key)


if _LOADED:
    # Fake implementations: shapes only, so torch.compile / FakeTensor tracing can run
    # through the optimizer without executing kernels.
    @torch.library.register_fake("sam_kernels::global_norm")
    def _global_norm_fake(tensors, weights, offset):
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        return tensors[0].new_empty((), dtype=dtype)

    def _mutating_fake(*args, **kwargs):
        return None

    from .primitives import OPERATORS

    for _prim in OPERATORS:  # every operator that returns nothing (it writes its arguments in place)
        if _prim.returns == "()":
            torch.library.register_fake(f"sam_kernels::{_prim.name}")(_mutating_fake)
    # _table and _launch (the step plans' private ops) are eager-only: they hide what they write
