"""No step waits for the device. Every optimizer's first_step / second_step / step / base_step /
restore, on every backend that runs here (the C++ kernels, the Triton kernels through the
interpreter, the torch reference), clean steps and steps with a NaN gradient, with and without
a GradScaler (and the scaler.unscale_ + clipping recipe), with and without max_grad_norm, runs
under a TorchDispatchMode that fails on the ops that read a tensor on the host:
aten._local_scalar_dense (.item(), bool(t), float(t)), aten.is_nonzero and aten.equal. The first
steps (which build the plans and the state) are inside the mode too. On a GPU the same steps run
under torch.cuda.set_sync_debug_mode("error"), which also catches blocking copies."""
import contextlib

import pytest
import torch
from conftest import backend_cases
from optim_db import BASES, FUSED_BASES, class_backend_cases, gradient_before_first_step, make
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from sam_kernels import SAM, SAMPa

_FORBIDDEN = {torch.ops.aten._local_scalar_dense, torch.ops.aten.is_nonzero, torch.ops.aten.equal}


class NoHostReads(TorchDispatchMode):
    """Fails on any op that reads a tensor's value on the host (a synchronization on a GPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _FORBIDDEN:
            raise AssertionError(f"a host read of a tensor in the step: {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_sync(device):
    """NoHostReads, and on CUDA also the sync debug mode set to error."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with NoHostReads():
            yield
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.set_sync_debug_mode(0)


def mlp(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).to(device)


def batches(n, device):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g).to(device), torch.randint(0, 3, (16,), generator=g).to(device))
            for _ in range(n)]


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def two_step(model, opt, batch, scaler=None, poison=None, unscale=False, closure=False):
    """One step of the documented loops; only the optimizer calls run under the mode. poison:
    the gradient that gets a NaN, "first" or "second" (MSAM's one gradient is both)."""
    def backward(*when):
        loss = loss_fn(model, batch)
        (scaler.scale(loss) if scaler else loss).backward()
        if poison in when:
            model[2].weight.grad[0, 0] = float("nan")

    opt.zero_grad()
    if gradient_before_first_step(opt):
        backward("first")
        perturbed = ("second",)
    else:  # MSAM: its one gradient, at the perturbed point
        perturbed = ("first", "second")
    if closure:
        def fn():
            with _disable_current_modes():  # the closure is the user's code
                backward(*perturbed)
        with no_sync(batch[0].device):
            opt.step(fn, grad_scaler=scaler)
    elif opt.sam_step_due:
        with no_sync(batch[0].device):
            opt.first_step(zero_grad=True, grad_scaler=scaler)
        backward(*perturbed)
        if unscale:  # the clipping recipe: unscale, clip, then step
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with no_sync(batch[0].device):
            opt.second_step(grad_scaler=scaler)
    else:
        with no_sync(batch[0].device):
            opt.base_step(grad_scaler=scaler)
    if scaler is not None:
        scaler.update()


def test_the_mode_catches_host_reads():
    """The check can fail: .item(), bool(t) and torch.equal are what it must catch."""
    t = torch.ones(3)
    for read in (lambda: t.sum().item(), lambda: bool(t.sum()), lambda: torch.equal(t, t), lambda: float(t[0])):
        with pytest.raises(AssertionError, match="host read"):
            with NoHostReads():
                read()


@pytest.mark.parametrize("name,backend,device", class_backend_cases())
@pytest.mark.parametrize("base", FUSED_BASES)
def test_steps_never_read_the_device(name, backend, device, base):
    base_cls, kw = BASES[base]
    model = mlp(device)
    opt = make(name, list(model.parameters()), base_cls, backend=backend, **kw)
    data = batches(6, device)
    for i, b in enumerate(data):  # the first steps build the plans and the state inside the mode
        two_step(model, opt, b, poison={2: "first", 4: "second"}.get(i), closure=i == 3)
    with no_sync(device):
        opt.restore()  # nothing pending: a no-op that must not read either
    model.zero_grad()
    loss_fn(model, data[0]).backward()
    with no_sync(device):
        opt.first_step()
        opt.restore()
    assert opt.skipped_steps == 2  # the two poisoned steps (read after the mode)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name,backend,device", class_backend_cases())
def test_grad_scaler_and_clipping_never_read_the_device(name, backend, device):
    base_cls, kw = BASES["sgd"]
    model = mlp(device)
    opt = make(name, list(model.parameters()), base_cls, backend=backend, max_grad_norm=0.5, **kw)
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=2.0 ** 8)
    for i, b in enumerate(batches(6, device)):
        two_step(model, opt, b, scaler, poison="second" if i == 2 else None, unscale=i >= 4)
    assert opt.skipped_steps == 1
    assert scaler.get_scale() < 2.0 ** 8  # backed off once


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("base", FUSED_BASES)
@pytest.mark.parametrize("lam", [0.2, 0.0])
def test_sampa_steps_never_read_the_device(backend, device, base, lam):
    """(lam 0.2: with clipping and a GradScaler, whose update() backs off after the NaN batch)"""
    base_cls, kw = BASES[base]
    model = mlp(device)
    opt = SAMPa(model, loss_fn, base_cls, rho=0.05, lam=lam, backend=backend, parallel="sequential",
                max_grad_norm=1.0 if lam else None, start_step=1, **kw)
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=2.0 ** 10) if lam else None
    for i, b in enumerate(batches(6, device)):
        if i == 3:
            b = (b[0].clone(), b[1])
            b[0][0, 0] = float("nan")  # a NaN in the y-pass's batch: a non-finite g_y'
        with no_sync(device):
            opt.step(b, grad_scaler=scaler)
            if scaler is not None:
                scaler.update()
    assert opt.skipped_steps >= 1
    if scaler is not None:
        assert scaler.get_scale() < 2.0 ** 10
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_generic_path_is_the_documented_exception():
    """Base optimizers we do not fuse (their step() cannot read a device flag) read it on the host:
    the mode sees it, which also shows the tests above would."""
    model = mlp("cpu")
    opt = SAM(model.parameters(), torch.optim.RMSprop, lr=1e-3)
    b = batches(1, "cpu")[0]
    loss_fn(model, b).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model, b).backward()
    with pytest.raises(AssertionError, match="host read"):
        with NoHostReads():
            opt.second_step()
