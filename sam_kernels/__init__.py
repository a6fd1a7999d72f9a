"""sam_kernels: fused, multi-tensor sharpness-aware optimizers for PyTorch."""
from . import _ext  # noqa: F401  (loads the native ops, or warns once)
from . import backends, ops
from .backends import BackendUnavailableError
from .gauss_sam import GaussSAM
from .nusam import NuSAM
from .psam import PSAM
from .sam import SAM
from .sampa import SAMPa

__all__ = ["SAM", "NuSAM", "GaussSAM", "SAMPa", "PSAM", "ops", "backends", "BackendUnavailableError"]
__version__ = "0.1.0"
