"""The optimizer classes: the user-facing API over the step engine (sam_kernels/engine/)."""
from .gauss_sam import GaussSAM
from .msam import MSAM
from .nusam import NuSAM
from .psam import PSAM
from .sam import SAM
from .sampa import SAMPa

__all__ = ["SAM", "NuSAM", "GaussSAM", "PSAM", "SAMPa", "MSAM"]
