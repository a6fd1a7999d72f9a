"""capturable=True (sam_kernels/engine/scalars.py): lr and rho on the device, read by the kernels.

On CPU: capturable steps (the C++ kernels, the Triton kernels through the interpreter, the torch
reference) follow the same trajectory as eager ones, with an lr scheduler and a rho schedule that
change the values every few steps and NaN gradients in either pass, and never read the device
(under test_no_sync's mode); checkpoints move between capturable and not; and the guards that
make capture safe are checked with the capture state faked (a real capture needs a GPU:
python_tests/test_graphs.py)."""
import copy

import pytest
import torch
from conftest import TRAJECTORY, backend_cases, pairwise
from optim_db import BASES, BY_NAME, FUSED_BASES, SAM_FAMILY, make
from test_no_sync import batches, loss_fn, mlp, two_step

from sam_kernels import SAM, SAMPa
from sam_kernels.engine import engine as _engine


def _run(name, backend, device, base, capturable, steps=6, state=None, start=0):
    base_cls, kw = BASES[base]
    model = mlp(device)
    opt = make(name, list(model.parameters()), base_cls, capturable=capturable, backend=backend, **kw)
    if name in ("sam", "psam", "gausssam"):
        opt.engine.rho_fn = lambda t: 0.05 / (1 + t)  # a rho schedule: a new value every step
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
        sched.load_state_dict(state[2])
    for i, b in enumerate(batches(steps, device)[start:]):
        two_step(model, opt, b, poison={2: "first", 4: "second"}.get(i + start))
        sched.step()
    return model, opt, sched


# every optimizer on every backend, each with both base optimizers somewhere (pairwise, not the product)
TRAJECTORY_CASES = pairwise(
    {"name": [(n, n) for n in SAM_FAMILY], "backend,device": [(c.id, tuple(c.values)) for c in backend_cases()],
     "base": [(b, b) for b in FUSED_BASES]},
    valid=lambda c: c["backend,device"] in {tuple(b.values) for b in BY_NAME[c["name"]].backends})


@pytest.mark.parametrize("name,backend,device,base", TRAJECTORY_CASES)
def test_capturable_steps_follow_the_eager_trajectory(name, backend, device, base):
    """two_step runs the optimizer calls under the no-host-read mode: capturable steps load lr and
    rho into the device scalars without reading anything back."""
    eager, opt_e, _ = _run(name, backend, device, base, capturable=False)
    cap, opt_c, _ = _run(name, backend, device, base, capturable=True)
    assert opt_c.engine.scalars is not None and opt_e.engine.scalars is None
    assert opt_c.skipped_steps == opt_e.skipped_steps == 2
    for p, q in zip(cap.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, **TRAJECTORY)
    lr, rho = opt_c.engine.scalars.values[0].tolist()  # those of the last step (the scheduler has halved lr since)
    assert lr == pytest.approx(2 * opt_c.param_groups[0]["lr"]) and rho == pytest.approx(opt_c.param_groups[0]["rho"])


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("lam,base", [(0.2, "adamw"), (0.0, "sgd")])  # Adam's preview with a device lr too
def test_capturable_sampa_follows_the_eager_trajectory(backend, device, lam, base):
    base_cls, kw = BASES[base]

    def run(capturable):
        model = mlp(device)
        opt = SAMPa(model, loss_fn, base_cls, rho=0.05, lam=lam, backend=backend, parallel="sequential",
                    capturable=capturable, start_step=1, **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for b in batches(6, device):
            opt.step(b)
            sched.step()
        return model
    for p, q in zip(run(True).parameters(), run(False).parameters()):
        torch.testing.assert_close(p, q, **TRAJECTORY)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("first", [True, False], ids=["capturable-first", "eager-first"])
def test_checkpoints_move_between_capturable_and_eager(backend, device, first):
    """Saved after 3 steps by one kind, resumed by the other: the run of either kind throughout."""
    whole, _, _ = _run("sam", backend, device, "adamw", capturable=not first)
    half, opt, sched = _run("sam", backend, device, "adamw", capturable=first, steps=3)
    state = (copy.deepcopy(half.state_dict()), copy.deepcopy(opt.state_dict()), sched.state_dict())
    resumed, _, _ = _run("sam", backend, device, "adamw", capturable=not first, state=state, start=3)
    for p, q in zip(resumed.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, **TRAJECTORY)


# --- the guards of a capture, with the capture state faked ------------------------------------

def _warm(capturable, **kw):
    model = mlp("cpu")
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, backend="cpu",
              capturable=capturable, **kw)
    b = batches(2, "cpu")[0]

    def step():
        opt.zero_grad(set_to_none=False)  # the gradients keep their addresses, as in a graph
        loss_fn(model, b).backward()
        opt.first_step()
        opt.zero_grad(set_to_none=False)
        loss_fn(model, b).backward()
        opt.second_step()
    return model, opt, step


@pytest.fixture
def fake_capture(monkeypatch):
    def set_capturing(on: bool):
        monkeypatch.setattr(_engine, "capturing", lambda: on)
    return set_capturing


def test_capture_needs_a_capturable_optimizer(fake_capture):
    model, opt, step = _warm(capturable=False)
    step()
    before = [p.clone() for p in model.parameters()]
    fake_capture(True)
    with pytest.raises(RuntimeError, match="capturable=False"):
        step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_capture_needs_the_plans_of_a_warm_up(fake_capture):
    model, opt, step = _warm(capturable=True)
    fake_capture(True)
    with pytest.raises(RuntimeError, match="step plan changed during CUDA graph capture"):
        step()
    assert opt._pending is None and opt.engine.plans.builds == 0


def test_capture_rejects_raise_mode(fake_capture):
    _, _, step = _warm(capturable=True, nonfinite="raise")
    step()
    fake_capture(True)
    with pytest.raises(RuntimeError, match="nonfinite='raise'"):
        step()


def test_a_captured_step_reads_lr_from_the_device_scalars(fake_capture):
    """Under capture the step does not copy the host lr into the device scalars (the copy would be
    replayed with the capture's value); the graphed step writes them before each replay."""
    model, opt, step = _warm(capturable=True)
    step()
    builds = opt.engine.plans.builds
    opt.param_groups[0]["lr"] = 0.5
    fake_capture(True)
    step()  # runs eagerly here (CPU), reading the device scalars as a replay would
    assert opt.engine.scalars.values[0, 0].item() == pytest.approx(0.05)
    assert opt.engine.plans.builds == builds  # nothing rebuilt
    fake_capture(False)
    step()
    assert opt.engine.scalars.values[0, 0].item() == pytest.approx(0.5)


def test_device_scalars_reject_a_non_finite_lr():
    model, opt, step = _warm(capturable=True)
    step()
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] must be a finite number"):
        step()


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("lr", [1e-150, 0.125], ids=["below-fp32", "exact"])
def test_lr_as_a_number_or_a_device_scalar(backend, device, lr):
    """The kernels take lr as a number or as a device scalar (capturable) with the same result; a
    number below fp32's range is a zero step on every backend (found by hypothesis: the Triton
    interpreter kept it as an fp64 scalar)."""
    from sam_kernels import ops
    g = torch.Generator().manual_seed(0)
    x_old = [torch.randn(n, generator=g).to(device, torch.bfloat16) for n in (1, 33)]
    grads = [torch.randn(t.shape, generator=g).to(device, torch.bfloat16) for t in x_old]
    outs = []
    for value in (lr, torch.tensor(lr, dtype=torch.float32, device=device)):
        x, bufs = [torch.full_like(t, float("nan")) for t in x_old], [torch.zeros_like(t) for t in x_old]
        run = ops.prepare("restore_sgd_", backend, torch.device(device), params=x, x_old=x_old, grads=grads, bufs=bufs,
                          momentum=0.5)  # a step plan's launch: what takes a device scalar
        run(lr=value, momentum=0.5, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False, init_bufs=False)
        outs.append(x)
    for a, b, old in zip(*outs, x_old):
        assert torch.equal(a, b)
        if lr < 1e-100:
            assert torch.equal(a, old)


def test_a_copy_of_a_capturable_optimizer_steps_like_the_original():
    """The device scalars are rebuilt for the copy's own param groups (they are keyed by them)."""
    model, opt, step = _warm(capturable=True)
    step()
    model2, opt2 = copy.deepcopy((model, opt))
    b = batches(2, "cpu")[1]
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        loss_fn(m, b).backward()
        o.first_step(zero_grad=True)
        loss_fn(m, b).backward()
        o.second_step()
    assert opt2.engine.scalars is not opt.engine.scalars
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
