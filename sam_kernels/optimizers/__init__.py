"""The optimizer classes: the user-facing API over the step engine (sam_kernels/engine/)."""
from .fsam import FSAM
from .gauss_sam import GaussSAM
from .gsam import GSAM, ProportionalRho
from .looksam import LookSAM
from .msam import MSAM
from .nusam import NuSAM
from .psam import PSAM
from .sam import SAM
from .sampa import SAMPa

__all__ = ["SAM", "NuSAM", "GaussSAM", "PSAM", "SAMPa", "MSAM", "GSAM", "FSAM", "LookSAM", "ProportionalRho"]
