"""BatchNorm running statistics in two-pass optimizers: let them move in the first pass only.

The reference SAM implementation does this by setting momentum to 0 for the second pass. Here
the counter num_batches_tracked is also put back, so after a SAM step the running statistics
and the counter are exactly those of one forward pass on the batch:

    enable_running_stats(model)     # first pass: statistics move
    loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
    disable_running_stats(model)    # second pass, at the perturbed point: they do not
    loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)

SAMPa needs neither: it applies the same policy itself (its y-pass moves them).
"""
from __future__ import annotations

from torch import nn

_BN = nn.modules.batchnorm._BatchNorm


def disable_running_stats(model: nn.Module) -> None:
    """Freeze the running statistics of every BatchNorm layer of `model` (idempotent)."""
    for m in model.modules():
        if isinstance(m, _BN) and not hasattr(m, "_sam_saved"):
            tracked = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            m._sam_saved = (m.momentum, tracked)
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged, bit for bit


def enable_running_stats(model: nn.Module) -> None:
    """Undo disable_running_stats (idempotent): momentum and num_batches_tracked come back."""
    for m in model.modules():
        if isinstance(m, _BN) and hasattr(m, "_sam_saved"):
            m.momentum, tracked = m._sam_saved
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
            del m._sam_saved
