"""Build sam_kernels and its native extension sam_kernels._C (the metadata: pyproject.toml).

The C++ CPU kernels are always built. The CUDA kernels in csrc/cuda are added when a CUDA
toolkit and a CUDA build of torch are present, or when FORCE_CUDA=1. SAM_KERNELS_NO_EXT=1
skips the extension (the package then runs on its Triton and pure-torch paths).
`pip install --no-build-isolation .` builds it with the torch you have (the fast path); a plain
`pip install .` builds in an isolated environment without torch, so the package is installed
with the C++ sources (sam_kernels/_csrc) and builds the extension on first use
(sam_kernels/ops/extension.py).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT_CSRC = "csrc"

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
        print("sam_kernels: torch is not importable at build time (pip's isolated build): the native extension "
              "is built on first use instead (once, a minute or two); `pip install --no-build-isolation .` builds it "
              "now with the torch you have")
        return [], {}
    _write_declarations()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # errno-free sqrt vectorizes; -g0 overrides Python's -g: debug info for ATen's templates took
    # 60% of each file's compile time (48 s -> 19 s for the smallest, measured on 2 cores)
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-g0"]
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


class BuildPyWithSources(build_py):
    """The package with the C++ sources in it (sam_kernels/_csrc): what a build on first use
    compiles where the install built no extension."""

    def run(self):
        super().run()
        if not self.editable_mode:  # (an editable install finds the source tree's csrc/)
            target = os.path.join(self.build_lib, "sam_kernels", "_csrc")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(os.path.join(ROOT, ROOT_CSRC), target,
                            ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["sam_kernels", "sam_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass={**cmdclass, "build_py": BuildPyWithSources},
)
