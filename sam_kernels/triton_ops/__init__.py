"""The "triton" backend: one primitive per module, each a multi-tensor Triton kernel plus its
wrapper. Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests it)."""
from .adam import restore_adam_
from .norm import global_norm
from .perturb import perturb_
from .restore import restore_
from .sgd import restore_sgd_

__all__ = ["global_norm", "perturb_", "restore_", "restore_sgd_", "restore_adam_"]
