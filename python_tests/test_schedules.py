"""PSAM, perturbation delay (start_step) and rho schedules (ALGORITHMS.md, "PSAM" and
"Perturbation delay and rho schedules"), each against the same schedule written by hand."""
import io
import math

import pytest
import torch
from conftest import TRAJECTORY
from torch import nn

from sam_kernels import PSAM, SAM, GaussSAM, NuSAM, SAMPa

KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(20, 8, generator=g), torch.randint(0, 4, (20,), generator=g)) for _ in range(n)]


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def closure_steps(model, opt, data):
    """The closure API; returns how many times the closure ran."""
    calls = 0
    for b in data:
        opt.zero_grad()
        loss_fn(model, b).backward()

        def closure():
            nonlocal calls
            calls += 1
            loss = loss_fn(model, b)
            loss.backward()
            return loss
        opt.step(closure)
    return calls


def by_hand(model, data, due, rho_of=lambda t: 0.05, cls=SAM, **kw):
    """SAM steps where due(t), plain base steps elsewhere (base_step(): the fused base update, as
    the schedule's plain steps take it), rho set by hand."""
    opt = cls(model.parameters(), torch.optim.SGD, rho=0.05, **KW, **kw)
    for t, b in enumerate(data):
        opt.zero_grad()
        loss_fn(model, b).backward()
        if due(t):
            for g in opt.param_groups:
                g["rho"] = rho_of(t)
            opt.first_step(zero_grad=True)
            loss_fn(model, b).backward()
            opt.second_step()
        else:
            opt.base_step()


@pytest.mark.parametrize("T,E,n", [(40, 30, 20), (25, 0, 7), (30, 30, 4), (12, 5, 1)])
def test_psam_closure_count_and_trajectory(T, E, n):
    model, ref = mlp(), mlp()
    opt = PSAM(model.parameters(), torch.optim.SGD, rho=0.05, period=n, dense_from=E, **KW)
    calls = closure_steps(model, opt, batches(T))
    assert calls == (T - E) + math.ceil(E / n)  # ALGORITHMS.md: the second pass is really skipped
    by_hand(ref, batches(T), lambda t: t >= E or t % n == 0)
    assert torch.equal(flat(model), flat(ref))
    assert opt.steps == T


def test_psam_two_step_api_with_sam_step_due():
    model, ref = mlp(), mlp()
    opt = PSAM(model.parameters(), torch.optim.SGD, rho=0.05, period=3, **KW)
    second_passes = 0
    for b in batches(10):
        opt.zero_grad()
        loss_fn(model, b).backward()
        if opt.sam_step_due:
            opt.first_step(zero_grad=True)
            loss_fn(model, b).backward()
            second_passes += 1
            opt.second_step()
        else:
            opt.base_step()
    assert second_passes == 4  # t = 0, 3, 6, 9
    by_hand(ref, batches(10), lambda t: t % 3 == 0)
    assert torch.equal(flat(model), flat(ref))


def test_first_step_when_no_sam_step_is_due_is_a_plain_step():
    """A loop that always calls first_step / second_step still follows the schedule."""
    model, ref = mlp(), mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, start_step=2, **KW)
    for b in batches(5):
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model, b).backward()  # at x_t when no SAM step was due: the same gradient
        opt.second_step()
    by_hand(ref, batches(5), lambda t: t >= 2)
    assert torch.equal(flat(model), flat(ref))


@pytest.mark.parametrize("cls", [SAM, GaussSAM, NuSAM], ids=["sam", "gausssam", "nusam"])
def test_start_step_and_callable_rho(cls):
    extra = {"generator": torch.Generator().manual_seed(3)} if cls is GaussSAM else {}
    ref_extra = {"generator": torch.Generator().manual_seed(3)} if cls is GaussSAM else {}
    model, ref = mlp(), mlp()
    schedule = lambda t: 0.01 * (t + 1)  # noqa: E731
    opt = cls(model.parameters(), torch.optim.SGD, rho=schedule, start_step=4, **KW, **extra)
    calls = closure_steps(model, opt, batches(10))
    assert calls == 6
    assert opt.param_groups[0]["rho"] == pytest.approx(schedule(9))
    by_hand(ref, batches(10), lambda t: t >= 4, rho_of=schedule, cls=cls, **ref_extra)
    assert torch.equal(flat(model), flat(ref))


def test_schedule_state_resumes():
    data = batches(12)
    model = mlp()
    opt = PSAM(model.parameters(), torch.optim.SGD, rho=0.05, period=4, dense_from=9, **KW)
    closure_steps(model, opt, data[:5])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    closure_steps(model, opt, data[5:])
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2 = mlp(seed=7)
    model2.load_state_dict(ckpt["model"])
    opt2 = PSAM(model2.parameters(), torch.optim.SGD, rho=0.05, period=4, dense_from=9, **KW)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.steps == 5
    closure_steps(model2, opt2, data[5:])
    assert torch.equal(flat(model), flat(model2))


def test_sampa_start_step_and_callable_rho():
    """SAMPa after k plain steps = a fresh SAMPa taking over the base optimizer after k torch steps."""
    data, k = batches(9), 3
    model, ref = mlp(), mlp()
    schedule = lambda t: 0.05 + 0.01 * t  # noqa: E731
    opt = SAMPa(model, loss_fn, torch.optim.SGD, rho=schedule, start_step=k, **KW)
    for b in data:
        opt.step(b)
    assert opt.loss_calls == k + 2 * (len(data) - k) + 1

    base = torch.optim.SGD(ref.parameters(), **KW)
    for b in data[:k]:
        base.zero_grad()
        loss_fn(ref, b).backward()
        base.step()
    base.zero_grad()
    rest = SAMPa(ref, loss_fn, base)
    for t, b in enumerate(data[k:], start=k):
        rest.param_groups[0]["rho"] = schedule(t)
        rest.step(b)
    torch.testing.assert_close(flat(model), flat(ref), **TRAJECTORY)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(period=0), r"period must be an integer >= 1, got 0"),
    (dict(period=2.5), r"period must be an integer >= 1, got 2.5"),
    (dict(dense_from=-1), r"dense_from must be an integer >= 0, got -1"),
    (dict(start_step=-2), r"start_step must be an integer >= 0, got -2"),
    (dict(rho=lambda t: -1.0), r"rho\(0\) must be a finite number >= 0, got -1.0"),
])
def test_bad_schedule_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        PSAM(mlp().parameters(), torch.optim.SGD, **{"lr": 0.1, **kwargs})


def test_a_schedule_that_goes_negative_fails_before_anything_changes():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=lambda t: 0.1 - 0.1 * t, lr=0.1)
    closure_steps(model, opt, batches(2))
    before = flat(model).clone()
    with pytest.raises(ValueError, match=r"rho\(2\) must be a finite number >= 0, got -0.1"):
        closure_steps(model, opt, batches(1))
    assert torch.equal(flat(model), before)
