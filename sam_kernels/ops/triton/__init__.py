"""The "triton" backend: one primitive per module, each a multi-tensor Triton kernel plus its
wrapper and its prepared form (tables built once, for the step plans: ops.prepare). Runs on CUDA
tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests it)."""
from .adam import (prepare_rank1_restore_adam_, prepare_restore_adam_, prepare_sampa_update_adam_,
                   prepare_shift_restore_adam_, rank1_restore_adam_, restore_adam_, sampa_update_adam_,
                   shift_restore_adam_)
from .norm import check_grads_, global_norm, guard_finalize, norm_finalize, prepare_sumsq
from .perturb import lincomb_, perturb_, prepare_lincomb_, prepare_perturb_, prepare_shift_, shift_
from .power_iteration import power_iteration_, prepare_power_iteration, prepare_rank1_scales_, rank1_scales_
from .rank1 import prepare_rank1_update_, rank1_update_
from .restore import prepare_restore_, restore_
from .sampa_preview import (prepare_sampa_preview_adam_, prepare_sampa_preview_sgd_, sampa_preview_adam_,
                            sampa_preview_sgd_)
from .sgd import (prepare_rank1_restore_sgd_, prepare_restore_sgd_, prepare_sampa_update_sgd_,
                  prepare_shift_restore_sgd_, rank1_restore_sgd_, restore_sgd_, sampa_update_sgd_, shift_restore_sgd_)

__all__ = ["global_norm", "check_grads_", "norm_finalize", "guard_finalize", "prepare_sumsq", "perturb_",
           "prepare_perturb_", "shift_", "prepare_shift_", "lincomb_", "prepare_lincomb_", "restore_",
           "prepare_restore_", "restore_sgd_", "prepare_restore_sgd_",
           "restore_adam_", "prepare_restore_adam_", "power_iteration_", "prepare_power_iteration", "rank1_scales_",
           "prepare_rank1_scales_", "rank1_update_", "prepare_rank1_update_",
           "shift_restore_sgd_", "prepare_shift_restore_sgd_", "shift_restore_adam_", "prepare_shift_restore_adam_",
           "rank1_restore_sgd_", "prepare_rank1_restore_sgd_", "rank1_restore_adam_", "prepare_rank1_restore_adam_",
           "sampa_preview_sgd_", "prepare_sampa_preview_sgd_", "sampa_preview_adam_", "prepare_sampa_preview_adam_",
           "sampa_update_sgd_", "prepare_sampa_update_sgd_", "sampa_update_adam_", "prepare_sampa_update_adam_",
           "prepare"]


def prepare(name: str, **arguments):
    """Primitive `name`'s prepared form (its module's prepare_<name>), bound to the lists and static
    values among `arguments`."""
    fn = globals().get("prepare_" + name)
    if fn is None:
        raise ValueError(f"prepare: the triton backend has no prepared form of {name!r}")
    return fn(**arguments)
