"""sam_kernels: fused, multi-tensor sharpness-aware optimizers for PyTorch."""
from . import ops  # noqa: F401  (loads the native ops, or warns once)
from .integrations.batchnorm import disable_running_stats, enable_running_stats
from .integrations.graphs import GraphedStep, make_graphed_step
from .ops import backends
from .ops.backends import BackendUnavailableError
from .optimizers import FSAM, GSAM, MSAM, LookSAM, PSAM, SAM, GaussSAM, NuSAM, ProportionalRho, SAMPa
from .optimizers.subsets import sam_on_groups
from .integrations.timm import register_when_imported as _register_in_timm

_register_in_timm()  # our names in timm's optimizer registry, once timm's factory is imported

__all__ = ["SAM", "NuSAM", "GaussSAM", "SAMPa", "PSAM", "MSAM", "GSAM", "FSAM", "LookSAM", "ProportionalRho",
           "sam_on_groups", "ops", "backends",
           "BackendUnavailableError", "disable_running_stats", "enable_running_stats", "make_graphed_step",
           "GraphedStep"]
__version__ = "0.1.0"
