"""Our optimizers in timm's optimizer registry, so that timm's factory builds them by name:

    import sam_kernels, timm.optim
    opt = timm.optim.create_optimizer_v2(model, "sam", lr=0.1, weight_decay=5e-4, rho=0.05)
    # the usual SAM loop: loss.backward(); opt.first_step(zero_grad=True); loss.backward(); opt.second_step()

Each name (lowercase, no underscores: timm's factory reads the part after the last underscore as
the name; its `lookahead_` prefix wraps the optimizer in timm's Lookahead, which has no
first_step / second_step, so leave it off) is one of our classes around one torch base optimizer
(the plain name SGD with momentum, `...adamw` AdamW), with timm's weight-decay groups (no decay for
1-d parameters), its momentum default and any extra keyword (rho, adaptive, backend, ...) passed
through. SAMPa is not registered: it needs the model and the loss function, not only parameters.

`import sam_kernels` registers them when timm's optimizer factory is, or later gets, imported
(a hook on that one module: timm itself is never imported by us, it is slow to import and, beside
some torch builds, fails to). `register()` does it by hand; names already registered are left
alone. A registry that refuses them (another timm) gives a warning, never a failed import.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from functools import partial

import torch

from ..optimizers import FSAM, GSAM, MSAM, PSAM, SAM, GaussSAM, LookSAM, NuSAM

FACTORY = "timm.optim._optim_factory"  # where timm keeps OptimInfo and default_registry

# name -> (our class, torch base optimizer, fixed options, description)
_SGD, _ADAMW = torch.optim.SGD, torch.optim.AdamW
OPTIMIZERS: dict[str, tuple] = {
    "sam": (SAM, _SGD, {}, "sam_kernels SAM (fused, sync-free) around SGD with momentum"),
    "samadamw": (SAM, _ADAMW, {}, "sam_kernels SAM around AdamW"),
    "asam": (SAM, _SGD, {"adaptive": True}, "sam_kernels ASAM (adaptive SAM) around SGD with momentum"),
    "asamadamw": (SAM, _ADAMW, {"adaptive": True}, "sam_kernels ASAM around AdamW"),
    "nusam": (NuSAM, _SGD, {}, "sam_kernels nuSAM (nuclear-norm SAM, no weight copy) around SGD with momentum"),
    "nusamadamw": (NuSAM, _ADAMW, {}, "sam_kernels nuSAM around AdamW"),
    "gausssam": (GaussSAM, _SGD, {}, "sam_kernels GaussSAM (random-direction baseline) around SGD with momentum"),
    "psam": (PSAM, _SGD, {}, "sam_kernels PSAM (SAM every k-th step) around SGD with momentum"),
    "psamadamw": (PSAM, _ADAMW, {}, "sam_kernels PSAM around AdamW"),
    "msam": (MSAM, _SGD, {}, "sam_kernels MSAM (momentum SAM, one gradient per step) around SGD with momentum"),
    "msamadamw": (MSAM, _ADAMW, {}, "sam_kernels MSAM around AdamW"),
    "gsam": (GSAM, _SGD, {}, "sam_kernels GSAM (surrogate gap) around SGD with momentum"),
    "gsamadamw": (GSAM, _ADAMW, {}, "sam_kernels GSAM around AdamW"),
    "fsam": (FSAM, _SGD, {}, "sam_kernels F-SAM (friendly SAM) around SGD with momentum"),
    "fsamadamw": (FSAM, _ADAMW, {}, "sam_kernels F-SAM around AdamW"),
    "looksam": (LookSAM, _SGD, {}, "sam_kernels LookSAM (SAM every k-th step, reuse between) around SGD with momentum"),
    "looksamadamw": (LookSAM, _ADAMW, {}, "sam_kernels LookSAM around AdamW"),
}


def register(registry=None) -> list[str]:
    """Register every name of OPTIMIZERS in `registry` (timm's default_registry when None; timm
    must be importable then). Returns the names."""
    factory = sys.modules.get(FACTORY) or importlib.import_module(FACTORY)
    registry = factory.default_registry if registry is None else registry
    present = set(registry.list_optimizers()) if hasattr(registry, "list_optimizers") else set()
    for name, (cls, base, fixed, description) in OPTIMIZERS.items():
        if name in present:
            continue  # timm logs a warning for each name registered twice
        sgd = base is _SGD
        registry.register(factory.OptimInfo(
            name=name, opt_class=partial(cls, base_optimizer=base, **fixed), description=description,
            has_eps=not sgd, has_momentum=sgd, has_betas=not sgd))
    return list(OPTIMIZERS)


def _register_or_warn(registry) -> None:
    try:
        register(registry)
    except Exception as e:  # a timm whose registry differs: our import and timm's must not fail
        warnings.warn(f"sam_kernels: could not register its optimizers in timm's registry ({type(e).__name__}: {e}); "
                      "timm.optim.create_optimizer_v2 will not find them", RuntimeWarning, stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of timm's optimizer factory so that register() runs right after it loads."""

    def find_spec(self, fullname, path, target=None):
        if fullname != FACTORY:
            return None
        sys.meta_path.remove(self)  # find the real spec without this finder, once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register_or_warn(module.default_registry)

        spec.loader.exec_module = exec_and_register
        return spec


def register_when_imported() -> None:
    """register() now if timm's optimizer factory is imported, else as soon as it is (called by
    `import sam_kernels`; costs nothing when timm is not installed or not used)."""
    if FACTORY in sys.modules:
        _register_or_warn(None)
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
