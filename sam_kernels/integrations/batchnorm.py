"""BatchNorm running statistics in two-pass optimizers: let them move in the first pass only.

    enable_running_stats(model)     # first pass: statistics move
    loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
    disable_running_stats(model)    # second pass, at the perturbed point: they do not
    loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)

The reference SAM sets each layer's momentum to 0 for the second pass, which still computes
running = 1 * running + 0 * batch: an inf in the batch's statistics (an inf input, an fp16
forward overflowing at the perturbed point) makes them 0 * inf = NaN for good, and
num_batches_tracked still counts the pass. Here a frozen layer does not track at all
(track_running_stats=False: its forward normalizes with the batch's statistics exactly as in
training and reads or writes no buffer), so the second pass leaves running_mean, running_var and
num_batches_tracked bit for bit, whatever flows through it, and momentum is never touched.

Evaluation needs nothing: in eval mode a layer normalizes with its running statistics whether or
not they are frozen. A training forward that should move them again (the next step's first
pass, or another training loop) needs enable_running_stats(model) first.

SAMPa needs neither: it applies the same policy itself (its y-pass moves them).
"""
from __future__ import annotations

from torch import nn

_BN = nn.modules.batchnorm._BatchNorm
_FROZEN = "_sam_running_stats_frozen"  # set on the layers disable_running_stats froze


def disable_running_stats(model: nn.Module) -> None:
    """Freeze the running statistics of every BatchNorm layer of `model` that tracks them
    (idempotent): the next forwards use the batch's statistics and change no buffer."""
    for m in model.modules():
        if isinstance(m, _BN) and m.track_running_stats and not getattr(m, _FROZEN, False):
            setattr(m, _FROZEN, True)
            m.track_running_stats = False


def enable_running_stats(model: nn.Module) -> None:
    """Undo disable_running_stats (idempotent): the layers it froze track their statistics again."""
    for m in model.modules():
        if isinstance(m, _BN) and getattr(m, _FROZEN, False):
            m.track_running_stats = True
            delattr(m, _FROZEN)
