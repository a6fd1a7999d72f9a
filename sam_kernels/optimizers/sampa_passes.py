"""SAMPa's two forward-backward passes of a step, one strategy per way of running them
(SAMPa.step picks one per step, sam_kernels/optimizers/sampa.py):

    InTurn        eager, one after the other, holding two parameter sets above SGD: the y-pass at
                  a scratch copy y, then the x~-pass at the model's own parameters moved to x~
                  (x_t kept in y's storage) and back
    OnShadows     at two fixed shadow parameter sets (x~ and y, allocated once) while the model's
                  parameters hold x_t, so that the passes share nothing they write: one after the
                  other (a capturable eager step), on two CUDA streams ("streams", or "auto"
                  inside a CUDA graph), or on the two ranks of a pair ("distributed")

Each pass is loss_fn at a point through torch.func.functional_call, with private copies of the
module buffers (LossPasses). A strategy returns ((loss, g~, buffers), (loss, g_y', buffers)).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..ops.lists import Current


class _LossModule(nn.Module):
    """loss_fn(model, batch) as a module, so that functional_call can swap the model's tensors."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def accumulate(loss: torch.Tensor, leaves: list) -> list:
    """The gradients of loss w.r.t. the leaf tensors `leaves` in their .grad, zeroed in place first
    (the same addresses every step, which the step plans and a CUDA graph hold, where
    torch.autograd.grad returns new tensors each pass; the gradients are the same, 0 + g = g).
    A leaf the loss does not use gets zeros."""
    held = [t.grad for t in leaves if t.grad is not None]
    if held:
        torch._foreach_zero_(held)
    torch.autograd.backward(loss, inputs=leaves)
    for t in leaves:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    return [t.grad for t in leaves]


class LossPasses:
    """loss_fn's forward-backward at a point: the gradients w.r.t. the parameters (or a parameter
    set standing for them) and the module buffers after the pass, on private copies (the model's
    own buffers are not touched). calls counts loss_fn's evaluations."""

    def __init__(self, model: nn.Module, loss_fn: Callable, params: list, names: list):
        self.model, self.module = model, _LossModule(model, loss_fn)
        self.params, self.names = params, names
        self.buffer_names = ["model." + n for n, _ in model.named_buffers()]
        self.calls = 0

    def buffers(self) -> list:
        return [b for _, b in self.model.named_buffers()]

    def grad_at(self, point, batch, scale=None, fixed: bool = False):
        """(loss, gradients w.r.t. `point`, the buffers after the pass) on `batch`. scale: (a
        GradScaler's scale, its inverse) as device scalars: the gradients of loss * scale,
        unscaled in place. fixed: into the .grad of the point (accumulate)."""
        buffers = [b.clone() for b in self.buffers()]
        tensors = dict(zip(self.buffer_names, buffers))
        if point is not self.params:
            tensors.update(zip(self.names, point))
        self.calls += 1
        with torch.enable_grad():
            loss = functional_call(self.module, tensors, (batch,))
            if not (torch.is_tensor(loss) and loss.numel() == 1 and loss.requires_grad):
                got = loss if not torch.is_tensor(loss) else f"a tensor of shape {tuple(loss.shape)}"
                raise ValueError("loss_fn(model, batch) must return a scalar tensor that depends on the parameters, "
                                 f"got {got}")
            scaled = loss.reshape(()) if scale is None else loss.reshape(()) * scale[0]
            if fixed:
                grads = list(accumulate(scaled, point))
            else:
                grads = list(torch.autograd.grad(scaled, point, allow_unused=True, materialize_grads=True))
        if scale is not None:
            torch._foreach_mul_(grads, scale[1])
        return loss.detach(), grads, buffers

    def zeros(self, device):
        """What a rank contributes for the pass it does not compute: (loss, gradients, buffers) of zeros."""
        return (torch.zeros((), device=device), [torch.zeros_like(p) for p in self.params],
                [torch.zeros_like(b) for b in self.buffers()])


def scratch(params) -> list:
    """A parameter set for one step (released by its end)."""
    return [torch.empty_like(p, memory_format=torch.contiguous_format).requires_grad_(True) for p in params]


class InTurn:
    """Both passes, one after the other, holding two parameter sets above SGD at any time
    (SGD: x_t and a gradient; docs/guides/sampa.md, "Memory"; bench/NOTES.md):
      y-pass   x_t, y (scratch), g_y, g_y' (built by autograd as SGD's gradient is)
      x~-pass  x~ (the model's parameters, perturbed in place), x_t (in y's storage), g_y', g~
    g_y is released once x~ is made from it, so the y-pass, which takes the new batch, goes first:
    an exception in it (bad input) leaves everything as it was. One in the x~-pass (loss_fn on the
    kept batch, which already ran in the last step) puts x_t back bit for bit but loses g_y: the
    next step starts again from step 0 (SAMPa.step).

    Its sets (ops.lists.Current, what its plans bind): x~ (for the fused preview, which writes both
    points at once) and y, made and released within the step."""

    fixed_grads = False

    def __init__(self):
        self.x_tilde, self.y = Current("x~ set"), Current("y set")

    def run(self, opt, kept, batch, scale):
        """opt: the SAMPa whose step this is (its preview, perturb and restore plans)."""
        self.x_tilde.set(scratch(opt.params)), self.y.set(scratch(opt.params))
        opt.run_preview(self.x_tilde, self.y)
        self.x_tilde.clear()  # x~ is made again below, where no y-pass is alive
        try:
            y_pass = opt.passes.grad_at(list(self.y), batch, scale)
        except BaseException:
            self.y.clear()
            opt.g_y.clear()
            raise
        opt.run_perturb(self.y)  # y's storage takes x_t, the model's parameters x~
        opt.release_g_y()
        try:
            x_pass = opt.passes.grad_at(opt.params, kept, scale)
        except BaseException:
            opt.keep_batch(None)  # g_y is gone: the next step is a step 0
            raise
        finally:
            opt.run_restore(self.y)  # x_t back, bit for bit
            self.y.clear()
        return x_pass, y_pass

    def nbytes(self, params) -> int:
        """What a step allocates and frees: one parameter set (y, then x_t), and for the moment of the
        fused preview, before any pass, a second one (x~)."""
        return sum(p.numel() * p.element_size() for p in params)


class OnShadows:
    """Both passes at the fixed shadow sets x~ and y (allocated once), their gradients at fixed
    addresses too where a graph holds them or two streams would add a set (their .grad, zeroed
    in place: accumulate); how they run: "sequential", "streams" (two CUDA streams: the host
    enqueues one pass after the other, the device runs them concurrently) or "pairs" (ranks 2i and
    2i + 1 of a process group: the even rank takes the x~-pass, the odd one the y-pass, zeros for
    the other; SAMPa.step sums them)."""

    def __init__(self, mode: str, fixed_grads: bool):
        self.mode, self.fixed_grads = mode, fixed_grads
        self.sets: tuple[list, list] | None = None
        self.streams = None

    def shadow_sets(self, params):
        """The x~ and y parameter sets: leaf tensors shaped like the parameters, allocated once."""
        if self.sets is None or len(self.sets[0]) != len(params) or any(
                s.shape != p.shape or s.dtype != p.dtype for s, p in zip(self.sets[0], params)):
            self.sets = (scratch(params), scratch(params))
        return self.sets

    def run(self, opt, kept, batch, scale):
        xt, y = self.shadow_sets(opt.params)
        opt.run_preview(Current("x~ set").set(xt), Current("y set").set(y))
        step0 = opt.g_y.tensors is not opt.kept_g_y
        opt.g_y.clear()  # (the kept g_y stays: with fixed gradients g_y' lands in its storage)
        if self.fixed_grads and step0:
            opt.zero_grad()  # step 0's g_y, accumulated in the model's .grad: read, no longer needed
        grad_at = lambda point, b: opt.passes.grad_at(point, b, scale, fixed=self.fixed_grads)  # noqa: E731
        if self.mode == "sequential":
            return grad_at(xt, kept), grad_at(y, batch)
        if self.mode == "pairs":  # this rank's pass, zeros for the other: the pair's sum gives both
            if opt.pair_role() == "x~":
                return grad_at(xt, kept), opt.passes.zeros(opt.device)
            return opt.passes.zeros(opt.device), grad_at(y, batch)
        return self._on_streams(opt.device, grad_at, ((xt, kept), (y, batch)))

    def _on_streams(self, device, grad_at, work):
        """Each side stream first waits for the preview on the current stream; the current stream
        waits for both before the gradients are read. Tensors allocated on a side stream are only
        reused by it after its next wait on the current stream."""
        if self.streams is None:
            self.streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        main = torch.cuda.current_stream(device)
        results = []
        for stream, (point, b) in zip(self.streams, work):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                results.append(grad_at(point, b))
        for stream in self.streams:
            main.wait_stream(stream)
        return results

    def nbytes(self, kept_g_y) -> tuple[int, int]:
        """(the shadow sets, their gradients held at fixed addresses but g_y, counted once)."""
        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors or ())

        shadows = sum(nbytes(s) for s in self.sets or ())
        kept = {t.data_ptr() for t in kept_g_y or ()}
        held = [t.grad for s in self.sets or () for t in s if t.grad is not None and t.grad.data_ptr() not in kept]
        return shadows, nbytes(held)
