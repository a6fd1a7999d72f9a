"""Shared test setup: the Triton interpreter on machines without a GPU, the backends to test,
and the tolerances per dtype (stated once here)."""
import os

import torch

# Set before triton is imported anywhere: with no GPU, every Triton kernel runs (and is
# tested) on CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from sam_kernels import backends  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Elementwise outputs: kernels and reference both compute in fp32 (fp64 for fp64) and round
# once, so they differ by FMA contraction: a few fp32 ulps, at most one ulp after rounding to
# the half types. fp64 tensors get fp64 arithmetic, but the norm and the scale are fp32 values
# and the Triton backend passes lr, momentum, betas as fp32 scalars: fp32-level tolerance on
# the update terms.
TOL = {
    torch.float64: dict(rtol=1e-6, atol=1e-7),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
}
# Norms: fp32 accumulation in different orders.
NORM_RTOL = 1e-5


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_cases(op=None):
    """(backend, device) pairs that can run here (that have primitive `op`, if given); on this CPU
    machine: cpu, triton (interpreter), torch."""
    cases = []
    for dev in devices():
        for b in backends.available(dev):
            if op is None or backends.why_unavailable(b, torch.device(dev), op) is None:
                cases.append(pytest.param(b, dev, id=f"{b}-{dev}"))
    return cases


KERNEL_BACKENDS = [c for c in backend_cases() if c.values[0] != "torch"]
# nuSAM's primitives have no CUDA C++ kernels (Triton is their GPU path)
NUSAM_BACKENDS = backend_cases("power_iteration_")
NUSAM_KERNEL_BACKENDS = [c for c in NUSAM_BACKENDS if c.values[0] != "torch"]


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **TOL[dtype], msg=msg or None)


def step_counts(n: int, step, device="cpu") -> list:
    """Adam's step counters of n tensors (fp32 device scalars, the count of the update they take)."""
    return [torch.full((), float(step), dtype=torch.float32, device=device) for _ in range(n)]


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor that a kernel must overwrite with NaN, so unwritten elements fail."""
    return t.fill_(float("nan"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def test_triton_backend_is_exercised_here():
    """CI has no GPU: the Triton kernels must still run (interpreter), or the GPU path is untested."""
    assert "triton" in backends.available("cuda" if torch.cuda.is_available() else "cpu")
