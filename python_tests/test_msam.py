"""MSAM (ALGORITHMS.md, "MSAM"; sam_kernels/optimizers/msam.py) against a pure-torch oracle that
follows the spec line by line: e_t = -rho b_t / (||b_t|| + eps) from the base optimizer's momentum
before the step (e_0 = 0), the gradient at x_t + e_t, torch.optim's own step from x_t with it. One
gradient per step, no copy of the weights, x_t between steps within one rounding, a bad gradient
skipped, no host read."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import FP64, TRAJECTORY, backend_cases
from test_no_sync import NoHostReads
from torch import nn

from sam_kernels import MSAM

BASES = {"sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
         "sgd-nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2))}
DIRECTION = {torch.optim.SGD: "momentum_buffer", torch.optim.AdamW: "exp_avg"}
RHO = 0.3


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def batches(n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def loss_of(model, b):
    return nn.functional.cross_entropy(model(b[0]), b[1])


def oracle(model, base_cls, kw, data, rho=RHO, moved=None, no_grad_at=None):
    """The spec in plain torch: the weights after each step. moved(params) -> (the perturbed
    group, the others) for subset perturbation (the norm over the perturbed ones; default: all);
    at step `no_grad_at`, params[0] gets no gradient (torch's step skips it)."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    chosen, rest = moved(params) if moved is not None else (params, [])
    base = base_cls([{"params": chosen}] + ([{"params": rest}] if rest else []), **kw)
    key = DIRECTION[base_cls]
    out = []
    for i, b in enumerate(data):
        bufs = [base.state[p].get(key) for p in chosen]
        x_t = [p.detach().clone() for p in params]
        if all(buf is not None for buf in bufs):
            n = torch.linalg.vector_norm(torch.stack([buf.norm() for buf in bufs]))
            with torch.no_grad():
                for p, buf in zip(chosen, bufs):
                    p.sub_(rho * buf / (n + 1e-12))
        base.zero_grad()
        loss_of(model, b).backward()
        if i == no_grad_at:
            params[0].grad = None
        with torch.no_grad():
            for p, x in zip(params, x_t):
                p.copy_(x)
        base.step()
        out.append([p.detach().clone() for p in params])
    return out


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("api", ["two_step", "closure"])
def test_trajectory_matches_the_spec(backend, device, base, api):
    base_cls, kw = BASES[base]
    dtype = torch.float64 if backend != "triton" else torch.float32  # (the interpreter's scalars are fp32)
    model = mlp(dtype)
    want = oracle(model, base_cls, kw, batches(6, dtype))
    model = model.to(device)
    opt = MSAM(model.parameters(), base_cls, rho=RHO, backend=backend, **kw)
    calls = []
    for i, b in enumerate(batches(6, dtype)):
        b = [t.to(device) for t in b]
        if api == "closure":
            def closure(b=b):
                calls.append(i)
                loss = loss_of(model, b)
                loss.backward()
                return loss
            opt.step(closure)
        else:
            opt.first_step()
            loss_of(model, b).backward()
            opt.second_step(zero_grad=True)
        tol = FP64 if dtype == torch.float64 else TRAJECTORY
        for p, w in zip(model.parameters(), want[i]):
            torch.testing.assert_close(p.detach().cpu(), w, **tol)
    if api == "closure":
        assert calls == list(range(6))  # one gradient per step
    assert opt.memory_report()["perturbation"] == 0
    assert not any("old_p" in s for s in opt.state.values())  # no copy of the weights


@pytest.mark.parametrize("base_cls,kw", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1)),
                                         (torch.optim.AdamW, dict(lr=torch.tensor(0.01)))],
                         ids=["sgd-dampening", "adamw-tensor-lr"])
def test_bases_we_do_not_fuse_are_perturbed_too(base_cls, kw):
    """The generic path (dampening, a tensor lr): the move still follows the buffers, which appear
    after the first step (the first plan's key holds them, fused or not)."""
    model = mlp()
    want = oracle(model, base_cls, kw, batches(5))
    opt = MSAM(model.parameters(), base_cls, rho=RHO, backend="cpu", **kw)
    for i, b in enumerate(batches(5)):
        opt.first_step()
        loss_of(model, b).backward()
        opt.second_step(zero_grad=True)
        for p, w in zip(model.parameters(), want[i]):
            torch.testing.assert_close(p.detach(), w, **FP64)


def test_a_buffer_replaced_or_none_is_followed():
    """A momentum buffer replaced by hand is the new direction (not a stale plan's); a None one (an
    old checkpoint's "no buffer yet") is not followed."""
    model = mlp()
    opt = MSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="cpu")
    b = batches(1)[0]
    for _ in range(2):
        opt.first_step()
        loss_of(model, b).backward()
        opt.second_step(zero_grad=True)
    params = list(model.parameters())
    state = opt.base_optimizer.state
    for p in params:
        state[p]["momentum_buffer"] = torch.ones_like(p)  # replaced: the move is now along -1 / ||1||
    x = [p.detach().clone() for p in params]
    opt.first_step()
    n = sum(p.numel() for p in params) ** 0.5
    for p, x0 in zip(params, x):
        torch.testing.assert_close(p.detach(), x0 - RHO / n, **FP64)
    opt.restore()
    state[params[0]]["momentum_buffer"] = None
    x = [p.detach().clone() for p in params]
    opt.first_step()  # the others move, the None one does not
    assert torch.equal(params[0].detach(), x[0]) and not torch.equal(params[1].detach(), x[1])
    opt.restore()


def test_the_first_step_is_not_perturbed_and_later_ones_are():
    model = mlp()
    opt = MSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="cpu")
    x0 = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    assert all(torch.equal(p.detach(), x) for p, x in zip(model.parameters(), x0))  # e_0 = 0
    loss_of(model, batches(1)[0]).backward()
    opt.second_step(zero_grad=True)
    x1 = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    moved = torch.cat([(p.detach() - x).reshape(-1) for p, x in zip(model.parameters(), x1)])
    torch.testing.assert_close(moved.norm(), torch.tensor(RHO, dtype=moved.dtype), **FP64)  # ||e|| = rho
    opt.restore()  # x_t back within one rounding
    for p, x in zip(model.parameters(), x1):
        torch.testing.assert_close(p.detach(), x, **FP64)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_a_nonfinite_gradient_is_skipped(backend, device):
    model = mlp(torch.float32).to(device)
    opt = MSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    data = [[t.to(device) for t in b] for b in batches(3, torch.float32)]
    for b in data[:2]:
        opt.first_step()
        loss_of(model, b).backward()
        opt.second_step(zero_grad=True)
    x_t = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.first_step()
    loss_of(model, data[2]).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.second_step(zero_grad=True)
    assert opt.skipped_steps == 1
    for p, x, buf in zip(model.parameters(), x_t, bufs):
        torch.testing.assert_close(p.detach(), x, **TRAJECTORY)  # x_t within one rounding
        assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], buf)  # no state moved


@pytest.mark.parametrize("backend,device", backend_cases())
def test_steps_never_read_the_device(backend, device):
    model = mlp(torch.float32).to(device)
    opt = MSAM(model.parameters(), torch.optim.AdamW, lr=1e-2, backend=backend, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=2.0 ** 8)
    for b in batches(4, torch.float32):
        b = [t.to(device) for t in b]
        with NoHostReads():
            opt.first_step()
        scaler.scale(loss_of(model, b)).backward()
        with NoHostReads():
            opt.second_step(zero_grad=True, grad_scaler=scaler)
        scaler.update()
    assert opt.steps == 4 and all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_setups_are_refused():
    model = mlp()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['momentum'\] is 0.*needs momentum > 0"):
        MSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="perturbs along the base optimizer's momentum"):
        MSAM(model.parameters(), torch.optim.RMSprop, lr=0.1)
    opt = MSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step\\(\\) called twice"):
        opt.first_step()


def test_checkpoint_resumes_bit_for_bit():
    model = mlp()
    opt = MSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="cpu")
    data = batches(4)
    for b in data[:2]:
        opt.first_step()
        loss_of(model, b).backward()
        opt.second_step(zero_grad=True)
    model2 = copy.deepcopy(model)
    opt2 = MSAM(model2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="cpu")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (model2, opt2)):
        for b in data[2:]:
            o.first_step()
            loss_of(m, b).backward()
            o.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_step_kind_and_make_graphed_step_take_one_gradient_per_step():
    """step_kind() names MSAM's loop ("base" before start_step, then "momentum": the move before the
    one forward-backward); make_graphed_step (eager on CPU, the same body a graph captures) calls
    loss_fn once per step and gives the two-step loop's weights bit for bit."""
    from sam_kernels import make_graphed_step

    data = batches(5, torch.float32)
    models = [mlp(torch.float32) for _ in range(2)]
    opts = [MSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, start_step=2, capturable=True,
                 backend="cpu") for m in models]
    kinds = []
    for b in data:  # the two-step loop
        kinds.append(opts[0].step_kind())
        if kinds[-1] == "momentum":
            opts[0].first_step()
        loss_of(models[0], b).backward()
        opts[0].second_step(zero_grad=True) if kinds[-1] == "momentum" else opts[0].base_step(zero_grad=True)
    assert kinds == ["base", "base", "momentum", "momentum", "momentum"]
    calls = []

    def counted(model, b):
        calls.append(1)
        return loss_of(model, b)

    step = make_graphed_step(models[1], counted, opts[1], data[0])
    for b in data:
        step(b)
    assert len(calls) == len(data) and opts[1].steps == len(data)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_capturable_follows_the_eager_trajectory(backend, device):
    """capturable=True: lr and rho as device scalars the kernels read (an lr scheduler between steps)."""
    def run(capturable):
        model = mlp(torch.float32).to(device)
        opt = MSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, backend=backend,
                   capturable=capturable)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for b in batches(5, torch.float32):
            b = [t.to(device) for t in b]
            opt.first_step()
            loss_of(model, b).backward()
            opt.second_step(zero_grad=True)
            sched.step()
        return [p.detach().cpu() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, **TRAJECTORY)


class _Launches:
    """The kernels the prepared launches run (sam_kernels/ops/native.py), by name; with fail=(kernel,
    n), the n-th launch of that kernel raises instead (stop() ends the interception)."""

    def __init__(self, monkeypatch, fail=None):
        from sam_kernels.ops import native

        real = native._ops()
        self.names = []
        self.stop = lambda: monkeypatch.setattr(native, "_ops", lambda: real)

        class Ops:
            def __getattr__(_, name):
                return getattr(real, name)

            def _launch(_, kernel, *args):
                self.names.append(kernel)
                if fail is not None and kernel == fail[0] and self.names.count(kernel) == fail[1]:
                    raise RuntimeError("launch failed")
                return real._launch(kernel, *args)

        monkeypatch.setattr(native, "_ops", lambda: Ops())


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_the_way_back_is_inside_the_update(monkeypatch, base):
    """One move (shift_) per step and no pass of its own for the way back: the fused update reads
    the buffer once for both (40 B per fp32 parameter with SGD momentum: bench/NOTES.md)."""
    base_cls, kw = BASES[base]
    model = mlp(torch.float32)
    opt = MSAM(model.parameters(), base_cls, rho=RHO, backend="cpu", **kw)
    data = batches(3, torch.float32)
    opt.step(lambda: loss_of(model, data[0]).backward())  # buffers exist from here on
    launches = _Launches(monkeypatch)
    for b in data[1:]:
        opt.first_step()
        loss_of(model, b).backward()
        opt.second_step(zero_grad=True)
    update = "shift_restore_sgd_" if base_cls is torch.optim.SGD else "shift_restore_adam_"
    assert launches.names.count("shift_") == 2 and launches.names.count(update) == 2
    assert not {"restore_sgd_", "restore_adam_"} & set(launches.names)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_a_moved_parameter_without_a_gradient_comes_back(backend, device):
    """A parameter that moved but gets no gradient in the step (frozen after the move, or unused
    in the forward) is put back by shift_ and not stepped, as torch's SGD leaves it; the others
    take the fused way back. Subset perturbation: a group with perturb=False is not moved at all."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    model, data = mlp(dtype), batches(3, dtype)
    kw = dict(lr=0.1, momentum=0.9)
    want = oracle(model, torch.optim.SGD, kw, data, moved=lambda ps: (ps[:3], ps[3:]), no_grad_at=2)[-1]
    model = model.to(device)
    params = list(model.parameters())
    opt = MSAM([{"params": params[:3]}, {"params": params[3:], "perturb": False}], torch.optim.SGD, rho=RHO,
               backend=backend, **kw)
    for i, b in enumerate(data):
        b = [t.to(device) for t in b]
        x_t = [p.detach().clone() for p in params]
        opt.first_step()
        if i == 2:
            assert not torch.equal(params[0], x_t[0]) and torch.equal(params[3], x_t[3])  # moved; not moved
        loss_of(model, b).backward()
        if i == 2:
            params[0].grad = None
        opt.second_step(zero_grad=True)
    tol = FP64 if dtype == torch.float64 else TRAJECTORY
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach().cpu(), w, **tol)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_momentum_set_to_zero_after_construction_is_no_longer_followed(backend, device):
    """A group's momentum set to 0 between steps: its (stale) buffer no longer moves x, and the
    step is torch's SGD without momentum from x_t (the first plan's key says the momentum)."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    model = mlp(dtype).to(device)
    data = [[t.to(device) for t in b] for b in batches(3, dtype)]
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, backend=backend)
    for b in data[:2]:
        opt.first_step()
        loss_of(model, b).backward()
        opt.second_step(zero_grad=True)
    opt.param_groups[0]["momentum"] = 0.0
    x_t = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    assert all(torch.equal(p, x) for p, x in zip(model.parameters(), x_t))  # not moved
    loss_of(model, data[2]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)
    for p, x, g in zip(model.parameters(), x_t, grads):
        torch.testing.assert_close(p.detach(), x - 0.1 * g, **(FP64 if dtype == torch.float64 else TRAJECTORY))


def test_an_update_that_fails_part_way_leaves_nothing_moved(monkeypatch):
    """If a fused update raises after another group's went through, the groups not yet back are
    moved back (x_t within one rounding) and the optimizer can step again."""
    model = mlp()
    params = list(model.parameters())
    opt = MSAM([{"params": params[:2]}, {"params": params[2:]}], torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9,
               backend="cpu")
    data = batches(3)
    for b in data[:2]:
        opt.first_step()
        loss_of(model, b).backward()
        opt.second_step(zero_grad=True)
    x_t = [p.detach().clone() for p in params]
    opt.first_step()
    loss_of(model, data[2]).backward()
    launches = _Launches(monkeypatch, fail=("shift_restore_sgd_", 2))
    with pytest.raises(RuntimeError, match="launch failed"):
        opt.second_step(zero_grad=True)
    launches.stop()
    for p, x in zip(params[2:], x_t[2:]):  # the second group: back at x_t, not stepped
        torch.testing.assert_close(p.detach(), x, **FP64)
    opt.zero_grad()
    opt.first_step()  # nothing pending
    loss_of(model, data[2]).backward()
    opt.second_step(zero_grad=True)


def test_nonfinite_raise_puts_the_weights_back():
    model = mlp()
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, backend="cpu", nonfinite="raise")
    data = batches(2)
    opt.first_step()
    loss_of(model, data[0]).backward()
    opt.second_step(zero_grad=True)
    x_t = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    assert not all(torch.equal(p, x) for p, x in zip(model.parameters(), x_t))
    loss_of(model, data[1]).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.second_step(zero_grad=True)
    for p, x in zip(model.parameters(), x_t):
        torch.testing.assert_close(p.detach(), x, **FP64)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_capturable_keeps_the_rho_of_the_move_for_the_way_back(backend, device):
    """rho changed between first_step and second_step: the way back takes the move's rho (the
    capturable step reloads its device scalars in second_step), as the eager step does."""
    def run(capturable):
        model = mlp(torch.float32).to(device)
        opt = MSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, backend=backend,
                   capturable=capturable)
        for i, b in enumerate(batches(4, torch.float32)):
            b = [t.to(device) for t in b]
            opt.first_step()
            loss_of(model, b).backward()
            opt.param_groups[0]["rho"] = RHO * (2 + i)  # for the next step's move
            opt.second_step(zero_grad=True)
        return [p.detach().cpu() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, **TRAJECTORY)
