"""pytest-benchmark suite: `pytest bench --benchmark-only` (compare runs with --benchmark-compare).

Sizes follow the device: ViT-S shapes (~22M parameters, 152 tensors) on CPU, ViT-B shapes
(~86M, 152 tensors) on a GPU. Triton runs only on a GPU here (its CPU interpreter is for tests).
"""
import pytest
import torch

from sam_kernels import backends
from sam_kernels.bench.cases import make_params
from sam_kernels.bench.shapes import PARAM_SETS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PARAMS = "vit_b" if DEVICE.type == "cuda" else "vit_s"
BACKENDS = [b for b in backends.available(DEVICE) if not (b == "triton" and DEVICE.type == "cpu")]
# nuSAM's primitives have no CUDA C++ kernels (Triton is their GPU path)
NUSAM_BACKENDS = [b for b in BACKENDS if backends.why_unavailable(b, DEVICE, "power_iteration_") is None]


@pytest.fixture(scope="module")
def params():
    return make_params(PARAM_SETS[PARAMS](), DEVICE)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
