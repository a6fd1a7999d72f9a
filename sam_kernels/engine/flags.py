"""The device flags every step decides on and every fused kernel reads, and the GradScaler's way
in and out of a step: what makes a step sync-free (nothing here reads a tensor on the host).

Flags are fp32[4] on the parameters' device: found_inf (1: the step in progress is skipped),
grad_scale (what the update multiplies the gradient by: the GradScaler's unscale times the
clipping coefficient), grad_norm (of the unscaled gradient of the last update, before clipping),
skipped (steps skipped so far). The guard's finalize kernel writes them (csrc/guard_math.h); the
protocol is torch's fused optimizers' found_inf: the kernels read it, the host never does.
"""
from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState

FOUND_INF, GRAD_SCALE, GRAD_NORM, SKIPPED = range(4)  # csrc/guard_math.h


class Flags:
    """An optimizer's device flags (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.values = torch.zeros(4, dtype=torch.float32, device=device)
        self.found_inf = self.values[FOUND_INF]  # 0-dim views: what the kernels and the GradScaler get
        self.grad_scale = self.values[GRAD_SCALE]
        self.grad_norm = self.values[GRAD_NORM]
        self.skipped = self.values[SKIPPED]
        self.device = self.values.device


def check_scaler(grad_scaler, opt=None, unscaled: str | None = None) -> None:
    """A torch.amp.GradScaler or None; with `unscaled`, the error raised when scaler.unscale_(opt)
    was called where the step cannot take already unscaled gradients."""
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    if unscaled and grad_scaler is not None and grad_scaler.is_enabled() and (
            grad_scaler._per_optimizer_states[id(opt)]["stage"] is OptState.UNSCALED):
        raise RuntimeError(unscaled)


def scaler_inputs(opt, scaler, device):
    """(scale, found_inf, state) for the guard from a torch.amp.GradScaler: its scale (the gradients
    are scaled; the update unscales them) or, after the user's scaler.unscale_(opt), no scale and
    the scaler's own inf check. None for all three without an enabled scaler. No host reads."""
    if scaler is None or not scaler.is_enabled():
        return None, None, None
    state = scaler._per_optimizer_states[id(opt)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("the GradScaler already recorded a step of this optimizer since its last update()")
    if state["stage"] is OptState.UNSCALED:  # scaler.unscale_(opt) ran: the gradients are unscaled already
        found = [f.to(device, non_blocking=True) for f in state["found_inf_per_device"].values()]
        return None, found[0] if len(found) == 1 else torch.stack(found).sum(), state
    if scaler._scale is None:
        scaler._lazy_init_scale_growth_tracker(device)
    scale = scaler._scale
    return (scale if scale.device == device else scale.to(device, non_blocking=True)), None, state


def scaler_record(state, flags: Flags) -> None:
    """Tell the GradScaler what scaler.step(optimizer) would have (state: its record of this
    optimizer, from scaler_inputs): whether the step found an inf / NaN, the device flag itself,
    so that update() backs the scale off without a host read."""
    if state is not None and flags is not None:
        state["found_inf_per_device"] = {flags.device: flags.found_inf}
        state["stage"] = OptState.STEPPED


def scaler_state(scaler, opt):
    """The GradScaler's record of `opt` (None without an enabled scaler)."""
    return scaler._per_optimizer_states[id(opt)] if scaler is not None and scaler.is_enabled() else None


def forget_scaler_record(scaler, opt) -> None:
    """Drop the scaler's record of this optimizer's step (a CUDA graph's capture recorded one)."""
    if scaler is not None and scaler.is_enabled():
        scaler._per_optimizer_states[id(opt)] = scaler._per_optimizer_states.default_factory()
