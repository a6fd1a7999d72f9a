"""GSAM, F-SAM and LookSAM (ALGORITHMS.md, "Beyond the seeds") against their spec written out in
plain torch, on every backend; what each adds beside the optimizer table's shared tests
(optim_db.py): LookSAM's gradient count, the reductions to SAM, GSAM's rho schedule, F-SAM's m
under a GradScaler, the memory each keeps, and the argument checks."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import TRAJECTORY, backend_cases
from torch import nn

from sam_kernels import FSAM, GSAM, SAM, LookSAM, ProportionalRho

STEPS = 9
BASES = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2))}


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).to(dtype)


def batches(n=STEPS, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 6, generator=g).to(dtype), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)]


def grad_at(model, batch):
    """The gradient of the batch's loss at the model's current weights (float64 math in the oracle)."""
    model.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def oracle(name, base, opts, data, rho=0.05):
    """The weights after len(data) steps of `name` (ALGORITHMS.md, written out), in float64."""
    model = mlp(torch.float64)
    ps = list(model.parameters())
    base_cls, kw = BASES[base]
    opt = base_cls(ps, **kw)
    m, g_v = None, None
    for t, (x, y) in enumerate(data):
        batch = (x.double(), y)
        g = grad_at(model, batch)
        if name == "looksam" and t % opts["k"] != 0:
            n = _dot(g, g).sqrt()
            nv = _dot(g_v, g_v).sqrt()
            d = [a + opts["alpha"] * n / nv * v for a, v in zip(g, g_v)]
        else:
            direction = g
            if name == "fsam":
                direction = g if m is None else [a - opts["sigma"] * b for a, b in zip(g, m)]
                m = [a.clone() for a in g] if m is None else [opts["lam"] * b + (1 - opts["lam"]) * a
                                                              for a, b in zip(g, m)]
            n = _dot(direction, direction).sqrt()
            x_t = [p.detach().clone() for p in ps]
            with torch.no_grad():
                for p, e in zip(ps, direction):
                    p.add_(rho * e / (n + 1e-12))
            g_s = grad_at(model, batch)
            with torch.no_grad():
                for p, x0 in zip(ps, x_t):
                    p.copy_(x0)
            d = g_s
            if name == "gsam":
                c = _dot(g, g_s) / (_dot(g_s, g_s) + 1e-12)
                d = [b - opts["alpha"] * (a - c * b) for a, b in zip(g, g_s)]
            if name == "looksam":
                c = _dot(g, g_s) / (_dot(g, g) + 1e-12)
                g_v = [b - c * a for a, b in zip(g, g_s)]
        for p, di in zip(ps, d):
            p.grad = di
        opt.step()
    return [p.detach() for p in ps]


CLASSES = {"gsam": (GSAM, dict(alpha=0.4)), "fsam": (FSAM, dict(sigma=1.0, lam=0.9)),
           "looksam": (LookSAM, dict(k=3, alpha=0.7))}


def build(name, params, base, backend="cpu", **kw):
    cls, opts = CLASSES[name]
    base_cls, base_kw = BASES[base]
    return cls(params, base_cls, rho=0.05, backend=backend, **{**opts, **base_kw, **kw})


def run(name, base, backend, data, scaler=None, device="cpu"):
    """Ours, through the two-pass API (LookSAM: base_step() between its SAM steps), on `device`."""
    model = mlp().to(device)
    opt = build(name, model.parameters(), base, backend)

    def backward(batch):
        loss = nn.functional.cross_entropy(model(batch[0].to(device)), batch[1].to(device))
        (scaler.scale(loss) if scaler is not None else loss).backward()
    for batch in data:
        backward(batch)
        if opt.sam_step_due:
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            backward(batch)
            opt.second_step(zero_grad=True, grad_scaler=scaler)
        else:
            opt.base_step(zero_grad=True, grad_scaler=scaler)
        if scaler is not None:
            scaler.update()
    return model, opt


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("backend,device", [c.values for c in backend_cases()], ids=[c.id for c in backend_cases()])
@pytest.mark.parametrize("name", list(CLASSES))
def test_follows_the_spec(name, backend, device, base):
    data = batches()
    model, _ = run(name, base, backend, data, device=device)
    for p, q in zip(model.parameters(), oracle(name, base, CLASSES[name][1], data)):
        torch.testing.assert_close(p.detach().double().cpu(), q, **TRAJECTORY)


def against_sam(make_ours):
    """(ours, SAM's) weights after the same two-pass steps from the same start."""
    data = batches()
    ours, ref = mlp(), mlp()
    pairs = ((ours, make_ours(ours.parameters())),
             (ref, SAM(ref.parameters(), torch.optim.SGD, rho=0.05, backend="cpu", **BASES["sgd"][1])))
    for batch in data:
        for model, opt in pairs:
            nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
            opt.second_step(zero_grad=True)
    return list(ours.parameters()), list(ref.parameters())


@pytest.mark.parametrize("name", ["gsam", "fsam"])
def test_reduces_to_sam_bit_for_bit(name):
    """GSAM at alpha 0 and F-SAM at sigma 0 are SAM (the same kernels after a combination by 0)."""
    ours, ref = against_sam(lambda ps: build(name, ps, "sgd", **({"alpha": 0.0} if name == "gsam" else {"sigma": 0.0})))
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)


def test_looksam_with_k_1_is_sam():
    """Every step a SAM step; x_t comes back by recomputing the move (one rounding per step)."""
    ours, ref = against_sam(lambda ps: LookSAM(ps, torch.optim.SGD, rho=0.05, k=1, backend="cpu", **BASES["sgd"][1]))
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, **TRAJECTORY)


@pytest.mark.parametrize("form", ["closure-convention", "first-gradient-given", "two-pass"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_looksam_gradient_count(k, form):
    """T + ceil(T / k) forward-backward passes over T steps, in every form of the API."""
    steps = 11
    data = batches(steps)
    model = mlp()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=k, backend="cpu", lr=0.1, momentum=0.9)
    calls = 0

    def loss_fn(batch):
        nonlocal calls
        calls += 1
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        return loss
    for batch in data:
        if form == "closure-convention":  # no gradient given: the closure computes both
            opt.step(lambda: loss_fn(batch))
        elif form == "first-gradient-given":  # davda54's form: loss.backward(), then step(closure)
            loss_fn(batch)
            opt.step(lambda: loss_fn(batch))
        else:
            loss_fn(batch)
            if opt.sam_step_due:
                opt.first_step(zero_grad=True)
                loss_fn(batch)
                opt.second_step(zero_grad=True)
            else:
                opt.base_step(zero_grad=True)
    assert calls == steps + math.ceil(steps / k)
    assert opt.steps == steps


def test_proportional_rho_follows_the_learning_rate():
    model = mlp()
    schedule = ProportionalRho(rho_max=0.1, rho_min=0.02, lr_min=0.0)
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=schedule, lr=0.5, momentum=0.9, backend="cpu")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    for batch in batches(6):
        lr = opt.param_groups[0]["lr"]
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.first_step(zero_grad=True)
        assert opt.param_groups[0]["rho"] == pytest.approx(0.02 + 0.08 * lr / 0.5)  # lr_max: initial_lr
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    assert schedule(0) == 0.1  # without a group: at the peak (what a constructor checks)
    with pytest.raises(ValueError, match="initial_lr"):
        schedule(0, {"lr": 0.1})
    with pytest.raises(ValueError, match="lr_max must be above lr_min"):
        ProportionalRho(0.1, lr_max=0.1, lr_min=0.2)


def test_fsam_keeps_m_unscaled_under_a_grad_scaler():
    """The scale changes every step (growth_interval 1): m is an average of unscaled gradients, so
    the run is the one without a scaler (powers of two: the same roundings, up to the EMA's)."""
    data = batches()
    plain, _ = run("fsam", "sgd", "cpu", data)
    scaled, opt = run("fsam", "sgd", "cpu", data, torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=1))
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, **TRAJECTORY)


def test_fsam_needs_the_scaler_in_both_steps():
    model = mlp()
    opt = build("fsam", model.parameters(), "sgd")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    batch = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(nn.functional.cross_entropy(model(batch[0]), batch[1])).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(nn.functional.cross_entropy(model(batch[0]), batch[1])).backward()
    with pytest.raises(ValueError, match="first_step"):
        opt.second_step(grad_scaler=scaler)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # x_t back, nothing stepped


def test_memory_each_keeps():
    """Bytes per fp32 parameter beyond the base state: GSAM x_old + g (8), F-SAM x_old + m + d (12),
    LookSAM g_v + g (8, no copy of the weights)."""
    n = sum(p.numel() for p in mlp().parameters()) * 4
    for name, want in (("gsam", {"perturbation": n, "kept_gradient": n}),
                       ("fsam", {"perturbation": n, "ema": n, "direction": n}),
                       ("looksam", {"perturbation": 0, "reused_direction": n, "kept_gradient": n})):
        _, opt = run(name, "sgd", "cpu", batches(4))
        report = opt.memory_report()
        for key, value in want.items():
            assert abs(report[key] - value) <= 64, (name, key, report)  # views padded to 16 bytes


@pytest.mark.parametrize("build_bad, match", [
    (lambda ps: LookSAM(ps, k=0, lr=0.1), "k must be an integer >= 1"),
    (lambda ps: LookSAM(ps, alpha=float("nan"), lr=0.1), "alpha must be a finite number"),
    (lambda ps: GSAM(ps, alpha="0.4", lr=0.1), "alpha must be a finite number"),
    (lambda ps: FSAM(ps, lam=1.0, lr=0.1), r"lam must be in \[0, 1\)"),
    (lambda ps: FSAM(ps, sigma=float("inf"), lr=0.1), "sigma must be a finite number"),
])
def test_bad_arguments_are_named(build_bad, match):
    with pytest.raises(ValueError, match=match):
        build_bad(list(mlp().parameters()))
