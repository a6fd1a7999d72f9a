"""Hugging Face transformers' Trainer with our optimizers: SAMTrainer runs SAM's two passes per
optimizer step (MSAM's one, LookSAM's and PSAM's one on their other steps) inside the Trainer's
own loop, with its gradient accumulation, Accelerate's mixed precision (bf16 autocast), its lr
schedulers and its checkpoints.

    trainer = SAMTrainer(model=model, args=TrainingArguments(..., max_grad_norm=1.0),
                         train_dataset=ds, sam_class=sam_kernels.SAM, sam_kwargs=dict(rho=0.05))
    trainer.train()

How: the Trainer calls training_step once per micro-batch, then (after the last one of an
accumulation window) self.optimizer.step(). SAMTrainer's training_step keeps the window's
micro-batches; after the last one's backward (the first gradient, accumulated and averaged as
the Trainer does) it calls first_step() and runs the window again through the Trainer's own
training_step (the same loss scaling, autocast and backward), with BatchNorm's running statistics
left alone, so that .grad holds the gradient at the perturbed point; the Trainer's
optimizer.step() then completes the step (our step() without a closure after first_step() is
second_step()). MSAM perturbs before the window's first forward. The Trainer's clipping is
replaced by our fused max_grad_norm (args.max_grad_norm), applied to the gradient the base step
takes. The base optimizer is the one args.optim names (torch's SGD, Adam and AdamW are fused; the
Trainer's fused / foreach flags are dropped: our kernels fuse). fp16 (a GradScaler inside
Accelerate's optimizer wrapper) is refused: use bf16.
"""
from __future__ import annotations

import contextlib

from transformers import Trainer

from ..optimizers import SAM
from ..optimizers.base import EngineOptimizer
from .batchnorm import disable_running_stats, enable_running_stats


def _ours(optimizer) -> EngineOptimizer:
    """Our optimizer inside Accelerate's AcceleratedOptimizer (or as it is)."""
    return getattr(optimizer, "optimizer", optimizer)


class SAMTrainer(Trainer):
    """A transformers.Trainer whose optimizer is one of ours (see the module docstring).

    Args:
        sam_class: SAM (the default; ASAM with sam_kwargs adaptive=True), NuSAM, GaussSAM, PSAM,
            GSAM, FSAM, LookSAM or MSAM.
        sam_kwargs: its own options (rho, ...); the base optimizer's come from the
            TrainingArguments (learning rate, weight decay groups, betas, eps) as the Trainer
            makes them.

    The others: transformers.Trainer's.
    """

    def __init__(self, *args, sam_class: type = SAM, sam_kwargs: dict | None = None, **kwargs):
        self.sam_class, self.sam_kwargs = sam_class, dict(sam_kwargs or {})
        self._window: list = []  # the micro-batches of the accumulation window in progress
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise ValueError("SAMTrainer: fp16 (a GradScaler inside Accelerate's optimizer wrapper) is not supported; "
                             "use bf16=True, or our two-pass API with grad_scaler=")

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        base_cls, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        base_kwargs = {k: v for k, v in base_kwargs.items() if k not in ("fused", "foreach")}
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else None
        self.optimizer = self.sam_class(groups, base_cls, max_grad_norm=max_norm, **base_kwargs, **self.sam_kwargs)
        return self.optimizer

    def _clip_grad_norm(self, model):
        return None  # our fused max_grad_norm clips the gradient the base step takes

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = _ours(self.optimizer)
        one_gradient = opt.step_kind() == "momentum"  # MSAM: the move before the forward
        if one_gradient and not self._window:
            opt.first_step()  # before the window's first forward: x_t - rho b / ||b||
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._window.append((inputs, num_items_in_batch))
        if not self.accelerator.gradient_state.sync_gradients:
            return loss
        window, self._window = self._window, []
        if one_gradient or not opt.sam_step_due:
            return loss  # the Trainer's optimizer.step() takes the step from .grad
        opt.first_step(zero_grad=True)
        try:
            disable_running_stats(model)
            for i, (micro, n) in enumerate(window):  # the second pass, as the Trainer ran the first
                sync = contextlib.nullcontext() if i == len(window) - 1 else self.accelerator.no_sync(model)
                with sync:
                    super().training_step(model, micro, n)
        except BaseException:
            opt.restore()
            raise
        finally:
            enable_running_stats(model)
        return loss


__all__ = ["SAMTrainer"]
