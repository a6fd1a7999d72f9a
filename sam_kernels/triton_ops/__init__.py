"""The "triton" backend: one primitive per module, each a multi-tensor Triton kernel plus its
wrapper. Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests it)."""
from .adam import rank1_restore_adam_, restore_adam_, sampa_update_adam_
from .norm import global_norm
from .perturb import perturb_
from .power_iteration import power_iteration_
from .rank1 import rank1_update_
from .restore import restore_
from .sampa_preview import sampa_preview_adam_, sampa_preview_sgd_
from .sgd import rank1_restore_sgd_, restore_sgd_, sampa_update_sgd_

__all__ = ["global_norm", "perturb_", "restore_", "restore_sgd_", "restore_adam_", "power_iteration_",
           "rank1_update_", "rank1_restore_sgd_", "rank1_restore_adam_", "sampa_preview_sgd_", "sampa_preview_adam_",
           "sampa_update_sgd_", "sampa_update_adam_"]
