"""The "triton" backend: one primitive per module, each a multi-tensor Triton kernel plus its
wrapper. Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests it)."""
from .adam import rank1_restore_adam_, restore_adam_
from .norm import global_norm
from .perturb import perturb_
from .power_iteration import power_iteration_
from .rank1 import rank1_update_
from .restore import restore_
from .sgd import rank1_restore_sgd_, restore_sgd_

__all__ = ["global_norm", "perturb_", "restore_", "restore_sgd_", "restore_adam_", "power_iteration_",
           "rank1_update_", "rank1_restore_sgd_", "rank1_restore_adam_"]
