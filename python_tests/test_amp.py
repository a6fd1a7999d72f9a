"""Mixed precision: torch.amp.GradScaler with the two-step and closure APIs (on CPU here; the
same code runs on CUDA), gradient accumulation, and the BatchNorm helpers."""
import pytest
import torch
from conftest import BF16_FORWARD, FP64, NUSAM_BACKENDS, TRAJECTORY, backend_cases
from torch import nn

from sam_kernels import PSAM, SAM, NuSAM, disable_running_stats, enable_running_stats

KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
CLASSES = {"sam": SAM, "nusam": NuSAM, "psam": PSAM}


def mlp(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(device=device, dtype=dtype)


def batches(n, seed=1, dtype=torch.float32, device="cpu", size=24):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 8, generator=g).to(device=device, dtype=dtype),
             torch.randint(0, 4, (size,), generator=g).to(device)) for _ in range(n)]


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()


def make_opt(name, model, backend="auto", **extra):
    kw = dict(period=2, **extra) if name == "psam" else dict(extra)
    base = torch.optim.AdamW if name == "nusam" else torch.optim.SGD
    base_kw = dict(lr=1e-3, weight_decay=1e-2) if name == "nusam" else KW
    return CLASSES[name](model.parameters(), base, rho=0.05, backend=backend, **kw, **base_kw)


def scaled_step(model, opt, scaler, b, poison=None):
    """The documented AMP loop: scale both losses, pass the scaler to both steps, update."""
    opt.zero_grad()
    scaler.scale(loss_fn(model, b)).backward()
    if poison == "first":
        model[0].weight.grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(loss_fn(model, b)).backward()
    if poison == "second":
        model[2].bias.grad[1] = float("nan")
    opt.second_step(grad_scaler=scaler)
    scaler.update()


def plain_step(model, opt, b):
    opt.zero_grad()
    loss_fn(model, b).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model, b).backward()
    opt.second_step()


@pytest.mark.parametrize("backend,device,name", [
    pytest.param(*c.values, name, id=f"{name}-{c.id}") for name in CLASSES
    for c in (NUSAM_BACKENDS if name == "nusam" else backend_cases())])
def test_grad_scaler_gives_the_unscaled_trajectory(backend, device, name):
    model, ref = mlp(device=device), mlp(device=device)
    opt, ref_opt = make_opt(name, model, backend), make_opt(name, ref, backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=3)
    for b in batches(8, device=device):
        scaled_step(model, opt, scaler, b)
        plain_step(ref, ref_opt, b)
    # powers of two scale and unscale exactly; only the eps of the norm sees the scale
    torch.testing.assert_close(flat(model), flat(ref), **TRAJECTORY)
    assert scaler.get_scale() == 2.0 ** 12 * 2 ** 2  # grew twice: no step was skipped
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("which", ["first", "second"])
def test_inf_in_either_pass_skips_restores_and_backs_off(backend, device, which):
    model = mlp(device=device)
    opt = make_opt("sam", model, backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    data = batches(3, device=device)
    scaled_step(model, opt, scaler, data[0])
    buffers = (opt.base_optimizer.state[p]["momentum_buffer"] for p in model.parameters())
    before, state = flat(model), [b.clone() for b in buffers]
    scaled_step(model, opt, scaler, data[1], poison=which)
    assert torch.equal(flat(model), before)  # restored bit for bit, nothing applied
    for p, b in zip(model.parameters(), state):
        assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], b)
    assert opt.skipped_steps == 1
    assert scaler.get_scale() == 2.0 ** 9  # halved by update()
    scaled_step(model, opt, scaler, data[2])  # and training goes on
    assert not torch.equal(flat(model), before)


@pytest.mark.parametrize("backend,device,name", [
    pytest.param(*c.values, name, id=f"{name}-{c.id}") for name in CLASSES
    for c in (NUSAM_BACKENDS if name == "nusam" else backend_cases())])
@pytest.mark.parametrize("recipe", ["unscale-and-clip", "max_grad_norm"])
def test_clipping_under_a_scaler(backend, device, name, recipe):
    """Clipping the unscaled gradient with a GradScaler, both ways: the usual recipe (the user's
    scaler.unscale_(opt) and clip_grad_norm_ before second_step: the gradients are unscaled once,
    by the scaler) and max_grad_norm (unscaled and clipped inside the fused update); both equal
    the unscaled run clipped by clip_grad_norm_, and an inf in the second pass still skips."""
    model, ref = mlp(device=device), mlp(device=device)
    opt = make_opt(name, model, backend, **({"max_grad_norm": 0.05} if recipe == "max_grad_norm" else {}))
    ref_opt = make_opt(name, ref, backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=3)
    data = batches(7, device=device)
    for i, b in enumerate(data):
        opt.zero_grad()
        scaler.scale(loss_fn(model, b)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(loss_fn(model, b)).backward()
        if i == 4:
            model[2].bias.grad[1] = float("inf")
        if recipe == "unscale-and-clip":
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.second_step(grad_scaler=scaler)
        scaler.update()
        ref_opt.zero_grad()
        loss_fn(ref, b).backward()
        ref_opt.first_step(zero_grad=True)
        loss_fn(ref, b).backward()
        if i == 4:  # the same skipped step (PSAM's schedule counts it)
            ref[2].bias.grad[1] = float("inf")
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.second_step()
    torch.testing.assert_close(flat(model), flat(ref), **TRAJECTORY)
    assert opt.skipped_steps == 1
    assert scaler.get_scale() == 2.0 ** 12 * 2 ** 1 / 2  # grew after 3 steps, halved at the skip, 2 since


def test_scaler_state_moves_exactly_as_with_scaler_step():
    """The scale and its growth tracker after our steps (a skip included) are those of a torch
    optimizer stepped by scaler.step() through the same inf pattern."""
    model, twin = mlp(), mlp()
    opt = make_opt("sam", model)
    torch_opt = torch.optim.SGD(twin.parameters(), **KW)
    ours, theirs = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2) for _ in range(2))
    for i, b in enumerate(batches(7)):
        scaled_step(model, opt, ours, b, poison="second" if i in (2, 5) else None)
        torch_opt.zero_grad()
        theirs.scale(loss_fn(twin, b)).backward()
        if i in (2, 5):
            twin[2].bias.grad[1] = float("nan")
        theirs.step(torch_opt)
        theirs.update()
        assert ours.get_scale() == theirs.get_scale(), i
        assert int(ours._growth_tracker) == int(theirs._growth_tracker), i


def test_unscale_before_first_step_is_an_error():
    """scaler.unscale_(opt) belongs after the second backward: before first_step it would leave the
    second gradient scaled and unscaled nowhere, so it is refused, before anything moves."""
    model = mlp()
    opt = make_opt("sam", model)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_fn(model, batches(1)[0])).backward()
    before = flat(model)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_.* before the first step"):
        opt.first_step(grad_scaler=scaler)
    assert torch.equal(flat(model), before)


def test_plain_steps_under_a_scaler():
    """PSAM's plain steps (no SAM step due) unscale and inform the scaler too."""
    model, ref = mlp(), mlp()
    opt = PSAM(model.parameters(), torch.optim.SGD, rho=0.05, period=3, **KW)
    ref_opt = PSAM(ref.parameters(), torch.optim.SGD, rho=0.05, period=3, **KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for b in batches(6):
        opt.zero_grad()
        scaler.scale(loss_fn(model, b)).backward()

        def closure():
            loss = loss_fn(model, b)
            scaler.scale(loss).backward()
            return loss
        opt.step(closure, grad_scaler=scaler)
        scaler.update()
        ref_opt.zero_grad()
        loss_fn(ref, b).backward()
        ref_opt.step(lambda: loss_fn(ref, b).backward())
    torch.testing.assert_close(flat(model), flat(ref), **TRAJECTORY)


def test_grad_scaler_argument_is_checked():
    opt = make_opt("sam", mlp())
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler, got float"):
        opt.second_step(grad_scaler=1024.0)


def test_bf16_autocast_needs_nothing_special():
    model, ref = mlp(), mlp()
    opt, ref_opt = make_opt("sam", model), make_opt("sam", ref)
    for b in batches(4):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, b)
        loss.backward()
        opt.first_step(zero_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, b)
        loss.backward()
        opt.second_step()
        plain_step(ref, ref_opt, b)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(flat(model), flat(ref), **BF16_FORWARD)  # bf16 forward: close, not equal


# --- gradient accumulation ------------------------------------------------------------------

@pytest.mark.parametrize("micro", [2, 4])
@pytest.mark.parametrize("name", ["sam", "nusam"])
def test_accumulated_gradients_equal_the_full_batch(micro, name):
    model, ref = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    opt, ref_opt = make_opt(name, model), make_opt(name, ref)
    for b in batches(5, dtype=torch.float64, size=24):
        pieces = list(zip(b[0].chunk(micro), b[1].chunk(micro)))
        opt.zero_grad()
        for piece in pieces:  # mean loss over the batch = the mean of the micro-batch means / micro
            (loss_fn(model, piece) / micro).backward()
        opt.first_step(zero_grad=True)
        for piece in pieces:
            (loss_fn(model, piece) / micro).backward()
        opt.second_step()
        plain_step(ref, ref_opt, b)
    torch.testing.assert_close(flat(model), flat(ref), **FP64)


# --- BatchNorm helpers ----------------------------------------------------------------------

def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def test_running_stats_move_in_the_first_pass_only():
    model, ref = bn_model(), bn_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **KW)
    b = batches(1)[0]
    enable_running_stats(model)
    loss_fn(model, b).backward()
    opt.first_step(zero_grad=True)
    disable_running_stats(model)
    loss_fn(model, b).backward()
    opt.second_step()
    enable_running_stats(model)
    loss_fn(ref, b)  # one forward at x_t in train mode: the statistics SAM must end with
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(ref[1], name)), name
    assert model[1].momentum == 0.1


def test_running_stats_helpers_are_idempotent():
    model = bn_model()
    disable_running_stats(model)
    disable_running_stats(model)
    mean = model[1].running_mean.clone()
    loss_fn(model, batches(1)[0])
    assert torch.equal(model[1].running_mean, mean) and int(model[1].num_batches_tracked) == 0
    enable_running_stats(model)
    enable_running_stats(model)
    assert model[1].momentum == 0.1 and int(model[1].num_batches_tracked) == 0
