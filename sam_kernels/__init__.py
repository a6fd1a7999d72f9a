"""sam_kernels: fused, multi-tensor sharpness-aware optimizers for PyTorch."""
from . import _ext  # noqa: F401  (loads the native ops, or warns once)
from . import backends, ops
from .backends import BackendUnavailableError
from .batchnorm import disable_running_stats, enable_running_stats
from .gauss_sam import GaussSAM
from .graphs import GraphedStep, make_graphed_step
from .nusam import NuSAM
from .psam import PSAM
from .sam import SAM
from .sampa import SAMPa

__all__ = ["SAM", "NuSAM", "GaussSAM", "SAMPa", "PSAM", "ops", "backends", "BackendUnavailableError",
           "disable_running_stats", "enable_running_stats", "make_graphed_step", "GraphedStep"]
__version__ = "0.1.0"
