"""The SAM / ASAM optimizer: trajectories against a line-by-line reference of ALGORITHMS.md and
against pytorch-optimizer's SAM, the SAM 2-cycle of seed 004, bit-exact restore, failures."""
import copy
import io
import math

import pytest
import pytorch_optimizer
import torch
from conftest import DISTINCT, FP64, NATIVE_BACKENDS, TOL, TRAJECTORY, backend_cases

import sam_kernels
from sam_kernels import SAM

BACKENDS = backend_cases()

BASES = {
    "sgd-momentum-wd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd-plain": (torch.optim.SGD, dict(lr=0.05)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=1e-3)),
}


def mlp(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 9), torch.nn.Tanh(), torch.nn.Linear(9, 1)
    ).to(dtype=dtype, device=device)


def data(device="cpu", dtype=torch.float32, steps=20):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=g).to(device, dtype), torch.randn(32, 1, generator=g).to(device, dtype))
            for _ in range(steps)]


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


def flat(model):
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


def run_ours(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step(lambda: _backward(loss_fn(model, x, y)))
    return flat(model)


def _backward(loss):
    loss.backward()
    return loss


def run_reference(model, base_cls, base_kw, batches, rho, adaptive=False, clip=None):
    """SAM as ALGORITHMS.md states it, one parameter at a time, norm in float64; clip:
    torch.nn.utils.clip_grad_norm_ on the second gradient before the base step."""
    params = list(model.parameters())
    base = base_cls(params, **base_kw)
    for x, y in batches:
        base.zero_grad()
        loss_fn(model, x, y).backward()
        with torch.no_grad():
            T = [p.abs() if adaptive else torch.ones_like(p) for p in params]
            norm = math.sqrt(sum(float(((t * p.grad).double() ** 2).sum()) for t, p in zip(T, params)))
            x_t = [p.clone() for p in params]
            for t, p in zip(T, params):
                p.add_(rho * t * t * p.grad / (norm + 1e-12))
        base.zero_grad()
        loss_fn(model, x, y).backward()
        with torch.no_grad():
            for p, old in zip(params, x_t):
                p.copy_(old)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        base.step()
    return flat(model)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("base", list(BASES))
def test_trajectory_matches_reference_and_pytorch_optimizer(backend, device, base):
    base_cls, kw = BASES[base]
    batches = data(device)
    model = mlp(device=device)
    ours = run_ours(model, SAM(model.parameters(), base_cls, rho=0.05, backend=backend, **kw), batches)

    model = mlp(device=device)
    ref = run_reference(model, base_cls, kw, batches, rho=0.05)
    torch.testing.assert_close(ours, ref, **TRAJECTORY)

    model = mlp(device=device)
    peer = pytorch_optimizer.SAM(model.parameters(), base_cls, rho=0.05, **kw)
    for x, y in batches:
        peer.zero_grad()
        loss_fn(model, x, y).backward()
        peer.step(lambda: _backward(loss_fn(model, x, y)))
    torch.testing.assert_close(ours, flat(model), **TRAJECTORY)
    assert not torch.equal(ours, flat(mlp(device=device))), "the model must have moved"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("base", ["sgd-momentum-wd", "adam-amsgrad"])
def test_max_grad_norm_clips_like_clip_grad_norm(backend, device, base):
    """max_grad_norm: the second gradient clipped to that global norm inside the fused update, as
    torch.nn.utils.clip_grad_norm_ just before the torch base optimizer's step; grad_norm is the
    norm clip_grad_norm_ returns (before clipping)."""
    base_cls, kw = BASES[base]
    batches = data(device, steps=10)
    model = mlp(device=device)
    opt = SAM(model.parameters(), base_cls, rho=0.05, max_grad_norm=0.1, backend=backend, **kw)
    ours = run_ours(model, opt, batches)
    ref_model = mlp(device=device)
    ref = run_reference(ref_model, base_cls, kw, batches, rho=0.05, clip=0.1)
    torch.testing.assert_close(ours, ref, **TRAJECTORY)
    unclipped = run_reference(mlp(device=device), base_cls, kw, batches, rho=0.05)
    assert not torch.allclose(ref, unclipped, **DISTINCT), "the norms must exceed max_grad_norm"
    x, y = batches[-1]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model, x, y).backward()
    want = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    opt.second_step()
    assert opt.grad_norm.item() == pytest.approx(want.item(), rel=1e-5)


FP64_BACKENDS = [c for c in BACKENDS if c.values[0] != "triton"]  # Triton passes rho and lr as fp32 scalars


@pytest.mark.parametrize("backend,device", FP64_BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_float64_parameters_take_a_float64_norm(backend, device, adaptive):
    """float64 parameters: the global norm is accumulated and applied in float64, as
    clip_grad_norm_ takes it (an fp32 norm put the trajectory 3e-8 off davda54's and composer's in
    float64): the fp64 reference to fp64 rounding."""
    base_cls, kw = BASES["sgd-momentum-wd"]
    batches = data(device, dtype=torch.float64, steps=8)
    model, ref_model = mlp(torch.float64, device), mlp(torch.float64, device)
    opt = SAM(model.parameters(), base_cls, rho=0.05, adaptive=adaptive, backend=backend, **kw)
    run_ours(model, opt, batches)
    run_reference(ref_model, base_cls, kw, batches, rho=0.05, adaptive=adaptive)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **FP64)
    x, y = batches[0]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    assert sam_kernels.ops.global_norm([p.grad for p in model.parameters()], backend=backend).dtype == torch.float64


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_asam_trajectory_matches_reference(backend, device):
    base_cls, kw = BASES["sgd-momentum-wd"]
    batches = data(device)
    model = mlp(device=device)
    ours = run_ours(model, SAM(model.parameters(), base_cls, rho=0.5, adaptive=True, backend=backend, **kw), batches)
    ref = run_reference(mlp(device=device), base_cls, kw, batches, rho=0.5, adaptive=True)
    torch.testing.assert_close(ours, ref, **TRAJECTORY)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_parameters_match_the_reference_backend(backend, device, dtype):
    """bf16 / fp16 parameters and state, fp32 math inside the kernels: the same step as the torch
    path (one step: in half precision, one-ulp differences compound over several)."""
    base_cls, kw = BASES["adamw"]
    batches = data(device, dtype, steps=1)
    runs = []
    for b in (backend, "torch"):
        model = mlp(dtype, device)
        runs.append(run_ours(model, SAM(model.parameters(), base_cls, rho=0.05, backend=b, **kw), batches))
    torch.testing.assert_close(runs[0], runs[1], **TOL[dtype])


@pytest.mark.parametrize("backend,device", NATIVE_BACKENDS)
def test_sam_two_cycle_on_a_quadratic(backend, device):
    """Seed 004, Theorem 2: f(w) = 1/2 w^T diag(1, 1/2) w, eta = 1/5, rho = 1, w_0 = (2, 2):
    SAM ends in the 2-cycle +-a e_1 with a = eta rho l1 / (2 - eta l1) = 1/9."""
    w = torch.nn.Parameter(torch.tensor([2.0, 2.0], dtype=torch.float64, device=device))
    lam = torch.tensor([1.0, 0.5], dtype=torch.float64, device=device)
    opt = SAM([w], torch.optim.SGD, rho=1.0, lr=0.2, backend=backend)

    def closure():
        loss = 0.5 * (lam * w * w).sum()
        loss.backward()
        return loss

    trace = []
    for _ in range(400):
        opt.zero_grad()
        closure()
        opt.step(closure)
        trace.append(w.detach().cpu().clone())
    a = 0.2 * 1.0 * 1.0 / (2 - 0.2 * 1.0)
    assert abs(a - 1 / 9) < 1e-15
    for prev, cur in zip(trace[-10:-1], trace[-9:]):
        assert abs(abs(cur[0].item()) - a) < 1e-6  # the norm and scale are fp32 values
        assert cur[0].item() == pytest.approx(-prev[0].item(), abs=1e-6), "iterates alternate sides"
        assert abs(cur[1].item()) < 1e-6


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("base", ["sgd-momentum-wd", "adamw"])
def test_restore_is_bit_exact_over_many_lr0_steps(backend, device, base):
    base_cls, kw = BASES[base]
    model = mlp(device=device)
    start = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), base_cls, rho=0.3, backend=backend, **{**kw, "lr": 0.0, "weight_decay": 0.0})
    for x, y in data(device, steps=30):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step(lambda: _backward(loss_fn(model, x, y)))
    for p, s in zip(model.parameters(), start):
        assert torch.equal(p, s)
    opt.zero_grad()
    loss_fn(model, *data(device, steps=1)[0]).backward()
    opt.first_step()
    assert not all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    opt.restore()
    for p, s in zip(model.parameters(), start):
        assert torch.equal(p, s)


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], io.BytesIO(_save(opt.state_dict())).getvalue()


def _save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def warm(model, opt, device="cpu", steps=3):
    for x, y in data(device, steps=steps):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step(lambda: _backward(loss_fn(model, x, y)))


def assert_unchanged(model, opt, snap):
    params, state = snap
    for p, s in zip(model.parameters(), params):
        assert torch.equal(p, s)
    assert _save(opt.state_dict()) == state


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("base", ["sgd-momentum-wd", "adamw"])
def test_exception_in_closure_restores_weights_and_state(backend, device, base):
    base_cls, kw = BASES[base]
    model = mlp(device=device)
    opt = SAM(model.parameters(), base_cls, backend=backend, **kw)
    warm(model, opt, device)
    snap = snapshot(model, opt)
    x, y = data(device, steps=1)[0]
    opt.zero_grad()
    loss_fn(model, x, y).backward()

    def closure():
        loss_fn(model, x, y).backward()
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt, match="stop"):
        opt.step(closure)
    assert_unchanged(model, opt, snap)
    warm(model, opt, device, steps=1)  # and the optimizer goes on


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("which", ["first", "second"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_gradient_skips_the_step(backend, device, which, bad):
    model = mlp(device=device)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    warm(model, opt, device)
    snap = snapshot(model, opt)
    x, y = data(device, steps=1)[0]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    if which == "first":
        model[0].weight.grad[1, 2] = bad

    def closure():
        loss = loss_fn(model, x, y)
        loss.backward()
        if which == "second":
            model[2].bias.grad[0] = bad
        return loss

    opt.step(closure)
    assert opt.skipped_steps == 1
    before = torch.load(io.BytesIO(snap[1]))
    ours = before["param_groups"][0]["sam"]
    ours.update(skipped_steps=1, step=ours["step"] + 1)
    skipped = before
    assert_unchanged(model, opt, (snap[0], _save(skipped)))
    warm(model, opt, device, steps=1)
    assert opt.skipped_steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("which", ["first", "second"])
def test_nonfinite_raise_mode(which):
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, nonfinite="raise")
    warm(model, opt)
    params = [p.detach().clone() for p in model.parameters()]
    x, y = data(steps=1)[0]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    if which == "first":
        model[0].weight.grad[0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="first_step"):
            opt.first_step()
    else:
        opt.first_step(zero_grad=True)
        loss_fn(model, x, y).backward()
        model[0].weight.grad[0, 0] = float("inf")
        with pytest.raises(FloatingPointError, match="second_step"):
            opt.second_step()
    for p, s in zip(model.parameters(), params):
        assert torch.equal(p, s)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("base", ["sgd-nesterov", "adam-amsgrad"])
def test_state_dict_resume_is_bit_exact(backend, device, base):
    base_cls, kw = BASES[base]
    batches = data(device, steps=10)

    def train(model, opt, bs):
        for x, y in bs:
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step(lambda: _backward(loss_fn(model, x, y)))

    model = mlp(device=device)
    opt = SAM(model.parameters(), base_cls, backend=backend, rho=0.1, **kw)
    train(model, opt, batches[:5])
    ckpt = _save({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, batches[5:])
    straight = flat(model)

    model2 = mlp(device=device)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # make sure the load, not the init, sets the weights
    opt2 = SAM(model2.parameters(), base_cls, backend=backend, rho=0.7, **kw)
    loaded = torch.load(io.BytesIO(ckpt), weights_only=True)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["opt"])
    assert opt2.param_groups[0]["rho"] == 0.1 and opt2.param_groups is opt2.base_optimizer.param_groups
    train(model2, opt2, batches[5:])
    assert torch.equal(flat(model2), straight)


def test_state_dict_layout_and_the_earlier_one():
    """Ours rides in the first param group (torch's get / set_optimizer_state_dict keep the state
    and the param groups only); a checkpoint of the earlier layout ("sam" beside them) loads too."""
    batches = data(steps=6)
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, start_step=1)
    for x, y in batches[:3]:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step(lambda: _backward(loss_fn(model, x, y)))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"} and sd["param_groups"][0]["sam"] == {"skipped_steps": 0, "step": 3}
    old = copy.deepcopy(sd)
    old["sam"] = old["param_groups"][0].pop("sam")
    for layout in (sd, old):
        again = SAM(mlp().parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, start_step=1)
        again.load_state_dict(copy.deepcopy(layout))
        assert again.steps == 3 and "sam" not in again.param_groups[0]
        assert again.state_dict()["param_groups"][0]["sam"] == sd["param_groups"][0]["sam"]


def test_step_without_closure_at_lr_0_makes_the_state():
    """torch.distributed.checkpoint's _init_optim_state: zero gradients, lr 0, step() without a
    closure. It makes the base state (init_state) and moves nothing; at any other lr step() without
    a closure is an error."""
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, lr=1e-3)
    with pytest.raises(ValueError, match="SAM.step needs a closure"):
        opt.step()
    before = flat(model)
    opt.param_groups[0]["lr"] = 0.0
    assert opt.step() is None
    assert torch.equal(flat(model), before) and opt.steps == 0
    assert all(torch.equal(st["exp_avg"], torch.zeros_like(st["exp_avg"])) for st in opt.base_optimizer.state.values())
    assert len(opt.base_optimizer.state) == len(list(model.parameters()))
    generic = SAM(model.parameters(), torch.optim.RMSprop, lr=0.0, momentum=0.9)  # not fused: its own step()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert generic.step() is None and torch.equal(flat(model), before)
    assert all("square_avg" in st for st in generic.base_optimizer.state.values())


def test_two_step_api_matches_closure_api():
    batches = data(steps=5)
    results = []
    for use_closure in (True, False):
        model = mlp()
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            if use_closure:
                opt.step(lambda: _backward(loss_fn(model, x, y)))
            else:
                opt.first_step(zero_grad=True)
                loss_fn(model, x, y).backward()
                opt.second_step(zero_grad=True)
        results.append(flat(model))
    assert torch.equal(results[0], results[1])


def test_base_optimizer_instance_and_lr_scheduler():
    batches = data(steps=4)
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = SAM(None, base_optimizer=base, rho=0.05)
    assert opt.param_groups is base.param_groups and opt.param_groups[0]["rho"] == 0.05
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for x, y in batches:
            loss_fn(model, x, y).backward()
            opt.first_step(zero_grad=True)
            loss_fn(model, x, y).backward()
            opt.second_step(zero_grad=True)
            sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 4)

    model2 = mlp()
    opt2 = SAM(model2.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    for x, y in batches:
        opt2.zero_grad()
        loss_fn(model2, x, y).backward()
        opt2.step(lambda: _backward(loss_fn(model2, x, y)))
        sched2.step()
    assert torch.equal(flat(model), flat(model2))


def test_generic_path_for_other_base_optimizers():
    """Any torch.optim optimizer: restore, then its own step."""
    batches = data(steps=5)
    model = mlp()
    ours = run_ours(model, SAM(model.parameters(), torch.optim.RMSprop, rho=0.05, lr=1e-2), batches)
    ref = run_reference(mlp(), torch.optim.RMSprop, dict(lr=1e-2), batches, rho=0.05)
    torch.testing.assert_close(ours, ref, **TRAJECTORY)


def test_parameters_without_gradient_in_one_pass():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    frozen = model[4].weight.detach().clone()
    x, y = data(steps=1)[0]
    loss_fn(model, x, y).backward()
    model[4].weight.grad = None  # no gradient in the first pass
    before = model[0].weight.detach().clone()
    opt.first_step(zero_grad=True)
    loss_fn(model, x, y).backward()
    model[0].weight.grad = None  # none in the second: restored, not updated
    opt.second_step()
    assert torch.equal(model[0].weight, before)
    assert not torch.equal(model[4].weight, frozen)  # updated from its second gradient only


# --- bad input: clear errors, nothing modified ----------------------------------------------

@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(rho=-0.1), ValueError, r"rho must be a finite number >= 0, got -0.1"),
    (dict(rho=float("nan")), ValueError, r"rho must be a finite number >= 0, got nan"),
    (dict(rho=float("inf")), ValueError, r"rho .* got inf"),
    (dict(lr=-1.0), ValueError, r"Invalid learning rate: -1.0"),
    (dict(base_optimizer=object), TypeError, r"base_optimizer must be a torch.optim.Optimizer"),
    (dict(base_optimizer="sgd"), TypeError, r"base_optimizer must be .* got 'sgd'"),
    (dict(backend="fast"), ValueError, r"backend must be one of .* got 'fast'"),
    (dict(backend="cuda"), sam_kernels.BackendUnavailableError, r"backend='cuda' is unavailable"),
    (dict(nonfinite="ignore"), ValueError, r"nonfinite must be one of .* got 'ignore'"),
    (dict(adaptive_offset=-1), ValueError, r"adaptive_offset .* got -1"),
])
def test_bad_arguments(kwargs, exc, pattern):
    if kwargs.get("backend") == "cuda" and torch.cuda.is_available():
        kwargs = dict(backend="cpu")  # on a GPU machine test the same error on the other side
        model = mlp(device="cuda")
        pattern = r"backend='cpu' is unavailable"
    else:
        model = mlp()
    kw = dict(base_optimizer=torch.optim.SGD, lr=0.1)
    kw.update(kwargs)
    with pytest.raises(exc, match=pattern):
        SAM(model.parameters(), **kw)


def test_group_spanning_devices_is_rejected():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match=r"param_groups\[0\] spans devices \['cpu', 'meta'\]"):
        SAM([a, b], torch.optim.SGD, lr=0.1)


def test_sparse_gradient_is_rejected_before_anything_changes():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 1)
    opt = SAM(list(emb.parameters()) + list(lin.parameters()), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in (emb.weight, lin.weight)]
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients are not supported"):
        opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip((emb.weight, lin.weight), before))
    lin.weight.grad = None
    emb.weight.grad = None


def test_complex_parameters_are_rejected():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = SAM([p], torch.optim.SGD, lr=0.1)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with pytest.raises(TypeError, match="complex parameters are not supported"):
        opt.first_step()
    assert torch.equal(p, before)


def test_step_order_errors():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    loss_fn(model, *data(steps=1)[0]).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    opt.restore()
    opt.state_dict()


def test_first_step_without_any_gradient_is_refused():
    """davda54's SAM raises too: the perturbation follows the gradient at x_t, and there is none
    (it once became a plain base step, silently)."""
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match=r"SAM.first_step\(\): no parameter has a gradient \(.grad is None for "
                                           r"all 6\): .* call loss.backward\(\) first"):
        opt.first_step()
    assert torch.equal(flat(model), flat(mlp())) and opt.steps == 0
    x, y = data(steps=1)[0]
    loss_fn(model, x, y).backward()
    opt.first_step()  # and it goes on
    opt.second_step()


def _reference_steps(model, opt, batches):
    """The README's two-step loop."""
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model, x, y).backward()
        opt.second_step()


@pytest.mark.parametrize("style", ["lbfgs", "composer", "no-zero-grad"])
def test_step_closure_follows_torchs_closure_convention(style):
    """step(closure) with no first gradient given (no .grad: each step(closure) leaves none)
    evaluates the closure at x_t for it, then as usual: the two-step loop's weights, two closure
    calls per step, and the loss at x_t returned, as torch's optimizers return it."""
    batches = data(steps=4)
    model, ref_model = mlp(), mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    ref = SAM(ref_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    calls = []
    for x, y in batches:
        def closure():
            calls.append(1)
            if style == "lbfgs":
                opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            return loss

        if style == "composer":  # Composer zeroes before its step, the closure does not
            opt.zero_grad()
        at_x = loss_fn(model, x, y).detach()
        assert torch.equal(opt.step(closure).detach(), at_x)
    _reference_steps(ref_model, ref, batches)
    assert torch.equal(flat(model), flat(ref_model))
    assert len(calls) == 2 * len(batches)


def test_step_closure_with_the_first_gradient_given_still_calls_it_once():
    """davda54's form: loss.backward(), then step(closure): the gradient in .grad is the first
    gradient, and the step leaves .grad empty."""
    batches = data(steps=4)
    model, ref_model = mlp(), mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    ref = SAM(ref_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    calls = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=i % 2 == 0)
        loss_fn(model, x, y).backward()
        opt.step(lambda: calls.append(1) or _backward(loss_fn(model, x, y)))
        assert all(p.grad is None for p in model.parameters())
    _reference_steps(ref_model, ref, batches)
    assert torch.equal(flat(model), flat(ref_model)) and len(calls) == len(batches)


def test_psam_plain_steps_under_the_closure_convention():
    """PSAM's plain steps (no SAM step due) take one gradient: the closure is called once."""
    batches = data(steps=4)
    model, ref_model = mlp(), mlp()
    opt = sam_kernels.PSAM(model.parameters(), torch.optim.SGD, period=2, lr=0.1)
    ref = sam_kernels.PSAM(ref_model.parameters(), torch.optim.SGD, period=2, lr=0.1)
    calls = []
    for x, y in batches:
        opt.step(lambda: calls.append(1) or _backward(loss_fn(model, x, y)))
    for x, y in batches:
        ref.zero_grad()
        loss_fn(ref_model, x, y).backward()
        if ref.sam_step_due:
            ref.step(lambda: _backward(loss_fn(ref_model, x, y)))
        else:
            ref.base_step()
    assert torch.equal(flat(model), flat(ref_model)) and len(calls) == 2 + 2 + 1 + 1


def test_per_group_rho_and_adaptive():
    model = mlp()
    groups = [{"params": model[0].parameters(), "rho": 0.5, "adaptive": True},
              {"params": list(model[2].parameters()) + list(model[4].parameters())}]
    opt = SAM(groups, torch.optim.SGD, rho=0.05, lr=0.1)
    assert [g["rho"] for g in opt.param_groups] == [0.5, 0.05]
    x, y = data(steps=1)[0]
    loss_fn(model, x, y).backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.first_step()
    # one global norm over both classes: ||T g|| of group 0 and ||g|| of group 1 together
    n0 = sum(float(((before[p].abs() * grads[p]) ** 2).sum()) for p in model[0].parameters())
    n1 = sum(float((grads[p] ** 2).sum()) for p in list(model[2].parameters()) + list(model[4].parameters()))
    norm = math.sqrt(n0 + n1)
    w = model[0].weight
    torch.testing.assert_close(w - before[w], 0.5 * before[w] ** 2 * grads[w] / norm, **TRAJECTORY)
    b = model[4].bias
    torch.testing.assert_close(b - before[b], 0.05 * grads[b] / norm, **TRAJECTORY)
    opt.restore()
