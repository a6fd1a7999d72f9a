"""Build sam_kernels and its native extension sam_kernels._C.

The C++ CPU kernels are always built. The CUDA kernels in csrc/cuda are added when a CUDA
toolkit and a CUDA build of torch are present, or when FORCE_CUDA=1. SAM_KERNELS_NO_EXT=1
skips the extension (the package then runs on its Triton and pure-torch paths).
Install with `pip install --no-build-isolation .` so the build uses the torch you have.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _write_declarations():
    """csrc/generated/primitives.h from sam_kernels/ops/primitives.py (pure Python: no torch needed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sam_kernels_codegen",
                                                  os.path.join(ROOT, "sam_kernels", "ops", "codegen.py"))
    codegen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codegen)
    codegen.write(ROOT)


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("SAM_KERNELS_NO_EXT"):
        return [], {}
    try:
        import torch
    except ImportError:
        # A build-isolated `pip install .` has no torch to build against: install the pure-Python
        # package (Triton and torch paths; it says so at import) rather than fail.
        print("sam_kernels: torch is not importable at build time; building without the native extension "
              "(use `pip install --no-build-isolation .` to build it)")
        return [], {}
    _write_declarations()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]  # errno-free sqrt vectorizes
    # torch's ParallelOpenMP.h uses `#pragma omp parallel`: without -fopenmp at::parallel_for
    # would run serially. libgomp is already loaded by torch, so the soname resolves to it.
    link = ["-fopenmp"]
    # nvcc is only called when the toolkit is there AND torch can run CUDA code (or forced).
    with_cuda = _flag("FORCE_CUDA") or (CUDA_HOME is not None and torch.version.cuda is not None)
    if with_cuda:
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        ext = CUDAExtension(
            "sam_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
            define_macros=[("SAM_KERNELS_WITH_CUDA", "1")],
        )
    else:
        ext = CppExtension("sam_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="sam_kernels",
    version="0.1.0",
    description="Fused, multi-tensor sharpness-aware optimizers (SAM, ASAM, ...) for PyTorch",
    packages=find_packages(include=["sam_kernels", "sam_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton>=3.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
