"""Loading the native extension sam_kernels._C, and the fake (meta) implementations of its ops.

Importing _C registers torch.ops.sam_kernels.* (CPU kernels always, CUDA kernels when built
with them). Where the install did not build it (a build-isolated `pip install .` has no torch to
build against) or built it for another torch, it is built on first use from the C++ sources
shipped with the package, with torch.utils.cpp_extension.load (ninja) into a cache
(~/.cache/sam_kernels, or SAM_KERNELS_CACHE), saying so on stderr; SAM_KERNELS_NO_JIT=1 skips
that. If it still cannot be loaded, sam_kernels works on its Triton and pure-torch paths and
warns once, saying plainly what is missing and how to get it (python -m sam_kernels.info).
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import time
import warnings

import torch

_LOADED = False
_ERROR: str | None = None
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # sam_kernels/


def sources_root() -> str | None:
    """The C++ sources: shipped in the package (sam_kernels/_csrc, setup.py copies them), or the
    source tree's csrc/ beside it (an editable install, a checkout)."""
    for root in (os.path.join(_PACKAGE, "_csrc"), os.path.join(os.path.dirname(_PACKAGE), "csrc")):
        if os.path.isfile(os.path.join(root, "sam_kernels.cpp")):
            return root
    return None


def jit_plan() -> dict | None:
    """What a build on first use compiles and where (None without sources): the sources (CUDA ones
    when torch is a CUDA build and a toolkit is present, as setup.py decides) and a cache directory
    named by torch's version and a hash of the sources, so that another torch or other sources
    build again."""
    root = sources_root()
    if root is None:
        return None
    from torch.utils.cpp_extension import CUDA_HOME

    sources = sorted(glob.glob(os.path.join(root, "*.cpp"))) + sorted(glob.glob(os.path.join(root, "cpu", "*.cpp")))
    with_cuda = CUDA_HOME is not None and torch.version.cuda is not None
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(root, "cuda", "*.cu")))
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    cache = os.environ.get("SAM_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sam_kernels")
    tag = f"torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:16]}"
    return {"sources": sources, "with_cuda": with_cuda, "build_directory": os.path.join(cache, tag)}


def _build_on_first_use():
    """torch.utils.cpp_extension.load of the shipped sources (see jit_plan), registered as
    sam_kernels._C; one line on stderr before and after (a build takes minutes, a cached one less
    than a second)."""
    plan = jit_plan()
    if plan is None:
        raise ImportError("it was not built at install time and its C++ sources are not in the package")
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the ninja package's binary, where its venv is not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    os.makedirs(plan["build_directory"], exist_ok=True)
    cached = glob.glob(os.path.join(plan["build_directory"], "_C*.so"))
    if not cached:
        print(f"sam_kernels: building its native extension for torch {torch.__version__} "
              f"({'CPU and CUDA' if plan['with_cuda'] else 'CPU'} kernels; once, a minute or two) into "
              f"{plan['build_directory']} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    cuda = ["-DSAM_KERNELS_WITH_CUDA=1"] if plan["with_cuda"] else []  # as setup.py builds it
    module = cpp_extension.load(
        name="_C", sources=plan["sources"], build_directory=plan["build_directory"],
        extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-g0", *cuda], extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", *cuda], with_cuda=plan["with_cuda"], verbose=False)
    if not cached:
        print(f"sam_kernels: native extension built in {time.perf_counter() - start:.0f} s", file=sys.stderr,
              flush=True)
    sys.modules["sam_kernels._C"] = module
    setattr(sys.modules["sam_kernels"], "_C", module)
    return module


def _not_built(exc: ImportError) -> bool:
    """Whether the import failed because there is no _C (not because it failed to load)."""
    return isinstance(exc, ModuleNotFoundError) or "cannot import name '_C'" in str(exc)


try:
    if os.environ.get("SAM_KERNELS_DISABLE_EXT", "0") == "1":
        raise ImportError("disabled by SAM_KERNELS_DISABLE_EXT=1")
    try:
        from .. import _C  # noqa: F401  (registers the ops)
    except ImportError as exc:
        if os.environ.get("SAM_KERNELS_NO_JIT", "0") == "1":
            raise ImportError("not built at install time, and SAM_KERNELS_NO_JIT=1 turns off the build on first use"
                              if _not_built(exc) else f"{type(exc).__name__}: {exc}") from None
        try:
            _C = _build_on_first_use()
        except Exception as build_exc:  # a missing compiler or ninja, a failed compile
            why = "not built at install time" if _not_built(exc) else f"it failed to load ({exc})"
            raise ImportError(f"{why}, and building it on first use failed: {type(build_exc).__name__}: "
                              f"{str(build_exc).strip().splitlines()[-1] if str(build_exc).strip() else ''}") from None
    _LOADED = True
except ImportError as exc:  # tested in a subprocess with SAM_KERNELS_DISABLE_EXT=1
    _ERROR = str(exc)
    warnings.warn(
        f"sam_kernels: the native extension sam_kernels._C is not available ({_ERROR}); the 'cpu' and 'cuda' "
        "backends are unavailable and CPU tensors use the pure-torch path. `python -m sam_kernels.info` says "
        "what is missing; `pip install --no-build-isolation .` builds it with the torch you have.",
        RuntimeWarning,
        stacklevel=2,
    )


def loaded() -> bool:
    return _LOADED


def load_error() -> str | None:
    return _ERROR


def _address(t) -> int:
    """t's data pointer, 0 for a tensor without storage (as the C loops: at::Tensor::has_storage;
    torch.Tensor has no such method)."""
    return t.data_ptr() if torch._C._has_storage(t) else 0


def _fingerprint_py(params) -> tuple:
    """What _C.fingerprint computes (without the extension)."""
    structure, grads = [], []
    for p in params:
        g = p.grad
        strided = g is None or g.layout is torch.strided
        structure.append((_address(p), (g is not None) | strided << 1
                          | (g is None or not strided or g.is_contiguous()) << 2 | p.is_contiguous() << 3))
        grads.append(_address(g) if g is not None and strided else 0)
    return tuple(structure), tuple(grads)


def fingerprint(params: list) -> tuple:
    """(structure, gradient addresses) of `params`: a step plan stays valid while the first holds
    (each parameter's storage, whether it has a gradient, their layout), and takes the gradients'
    new addresses when only the second changed. One C loop with the extension."""
    return _C.fingerprint(params) if _LOADED else _fingerprint_py(params)


_ABSENT = object()  # a key not in the entry (0); a present None is a value without storage (1), as in C


def _state_fingerprint_py(state, params, keys) -> tuple:
    """What _C.state_fingerprint computes (without the extension)."""
    out = []
    for p in params:
        entry = state.get(p)  # dict.get: no entry is created
        for k in keys:
            v = entry.get(k, _ABSENT) if isinstance(entry, dict) else _ABSENT
            out.append(0 if v is _ABSENT else v.data_ptr() if torch.is_tensor(v) and torch._C._has_storage(v) else 1)
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
