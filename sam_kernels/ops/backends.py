"""Which implementation of the primitives runs, and why another cannot.

"cuda" (the CUDA C++ kernels of the extension: the default on CUDA tensors where it has the
primitive), "triton" (on CUDA tensors: the default for the others, nuSAM's, and everything when
the extension was built without CUDA; on CPU tensors only with TRITON_INTERPRET=1), "cpu" (the
extension's C++ CPU kernels, default on CPU tensors), "torch" (pure-torch reference, works
everywhere), "auto" (the best available for the device and primitive). Why CUDA C++ first: the
kernels of both stream alike (within 3 points of copy on the H100), and a step is host-bound on
real models: a prepared C++ launch (torch.ops.sam_kernels._launch) costs the host a dispatcher
call, a Triton launch its Python launcher (bench/NOTES.md, "a sync-free, host-light step").
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import extension as _ext
from .primitives import REGISTRY

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on these tensors."""


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Primitives without a CUDA C++ kernel (Triton is their GPU path): their declarations say so.
NO_CUDA_KERNEL = tuple(name for name, prim in REGISTRY.items() if not prim.cuda)


def why_unavailable(backend: str, device: torch.device, op: str | None = None) -> str | None:
    """None if `backend` can run (primitive `op`) on tensors of `device`, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not _triton_installed():
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
    if backend in ("cpu", "cuda"):
        if not _ext.loaded():
            return f"the native extension is not loaded ({_ext.load_error()})"
        if device.type != backend:
            return f"backend {backend!r} runs on {backend.upper()} tensors, got {device}"
        if backend == "cuda" and not _ext.has_kernel("perturb_", "CUDA"):
            return "the extension was built without CUDA kernels (rebuild with a CUDA toolkit, or FORCE_CUDA=1)"
        if backend == "cuda" and op in NO_CUDA_KERNEL:
            return f"{op} has no CUDA C++ kernel (its GPU path is 'triton')"
        return None
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


def check_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve(backend: str, device: torch.device, op: str | None = None) -> str:
    """The concrete backend for (primitive `op` on) tensors on `device`; raises if an explicit one cannot run."""
    check_name(backend)
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        return next(b for b in order if why_unavailable(b, device, op) is None)
    reason = why_unavailable(backend, device, op)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {reason}")
    return backend


def available(device: torch.device | str = "cpu") -> list[str]:
    """The concrete backends that can run on `device`."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if why_unavailable(b, device) is None]
