"""SAMPa-lambda against a sequential reference written from ALGORITHMS.md with torch's own
optimizers, Theorem 4.4 of the slides, the BatchNorm policy, state_dict, and the failure cases.
The distributed mode (gloo, two processes) is in test_sampa_distributed.py."""
import copy
import io
import math

import pytest
import torch
from conftest import DISTINCT, EXACT, NATIVE_BACKENDS, TRAJECTORY, backend_cases
from torch import nn

from sam_kernels import SAMPa
from sam_kernels.optimizers.sampa_passes import OnShadows

EPS = 1e-12

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=3e-3, weight_decay=1e-2)),
}


def ours(sd):
    """What SAMPa keeps beyond the base optimizer in a state_dict (in its first param group)."""
    return sd["param_groups"][0]["sam"]


def make_model(batchnorm=False, seed=0, device="cpu"):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if batchnorm else []) + [nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).to(device)


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def make_batches(n, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(24, 6, generator=g).to(device), torch.randint(0, 3, (24,), generator=g).to(device))
            for _ in range(n)]


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()


def buffers(model):
    return [b.detach().clone().cpu() for b in model.buffers()]


# --- the reference: ALGORITHMS.md line by line, torch.optim doing every base step ----------------

def reference_sampa(model, batches, base_cls, base_kw, rho, lam, plain_preview=False, clip=None):
    """Runs SAMPa on `model` in place. plain_preview: y = x - lr g_y (the generic path); clip:
    torch.nn.utils.clip_grad_norm_ on d_t before the base step."""
    params = list(model.parameters())
    opt = base_cls(params, **base_kw)

    def grad_at(values, batch, keep_buffers):
        probe = copy.deepcopy(model)  # carries the current buffers
        with torch.no_grad():
            for p, v in zip(probe.parameters(), values):
                p.copy_(v)
        grads = torch.autograd.grad(loss_fn(probe, batch), list(probe.parameters()))
        if keep_buffers:  # running statistics move with the y-pass only
            with torch.no_grad():
                for b, pb in zip(model.buffers(), probe.buffers()):
                    b.copy_(pb)
        return list(grads)

    def preview(g_y):
        """Where the base optimizer would move x_t with gradient g_y, its state untouched."""
        x = [p.detach().clone() for p in params]
        if plain_preview:
            return [xi - base_kw["lr"] * gi for xi, gi in zip(x, g_y)]
        shadow = [xi.clone().requires_grad_() for xi in x]
        twin = base_cls(shadow, **base_kw)
        twin.load_state_dict(copy.deepcopy(opt.state_dict()))
        for s, g in zip(shadow, g_y):
            s.grad = g.clone()
        twin.step()
        return [s.detach() for s in shadow]

    g_y = grad_at([p.detach() for p in params], batches[0], False)  # step 0: g_y = grad f(x_0; B_0)
    kept = batches[0]
    for batch in batches:
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g_y))
        x_tilde = [p.detach() + rho * g / (norm + EPS) for p, g in zip(params, g_y)]
        y_next = preview(g_y)
        g_tilde = grad_at(x_tilde, kept, False)
        g_y_next = grad_at(y_next, batch, True)
        for p, gt, gy in zip(params, g_tilde, g_y_next):
            p.grad = (1 - lam) * gt + lam * gy
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        g_y, kept = g_y_next, batch
    return model


def run_sampa(model, batches, base_cls, base_kw, rho, lam, **kw):
    opt = SAMPa(model, loss_fn, base_cls, rho=rho, lam=lam, **base_kw, **kw)
    for b in batches:
        opt.step(b)
    return opt


# --- parity with the reference ----------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_max_grad_norm_clips_the_mixed_gradient(backend, device, base):
    """max_grad_norm clips d_t = (1 - lam) g~ + lam g_y', the gradient of the base step, as
    clip_grad_norm_ on it would (its norm is taken in the guard's pass, no pass of its own)."""
    cls, kw = BASES[base]
    batches = make_batches(8, device)
    model, ref = make_model(device=device), make_model(device=device)
    run_sampa(model, batches, cls, kw, rho=0.1, lam=0.2, backend=backend, parallel="sequential", max_grad_norm=0.05)
    reference_sampa(ref, batches, cls, kw, rho=0.1, lam=0.2, clip=0.05)
    torch.testing.assert_close(flat(model), flat(ref), **TRAJECTORY)
    unclipped = make_model(device=device)
    reference_sampa(unclipped, batches, cls, kw, rho=0.1, lam=0.2)
    assert not torch.allclose(flat(ref), flat(unclipped), **DISTINCT), "the norms must exceed 0.05"


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("lam", [0.2, 0.0, 1.0])
def test_trajectory_matches_reference(backend, device, base, lam):
    cls, kw = BASES[base]
    batches = make_batches(12, device)
    model, ref = make_model(device=device), make_model(device=device)
    run_sampa(model, batches, cls, kw, rho=0.1, lam=lam, backend=backend, parallel="sequential")
    reference_sampa(ref, batches, cls, kw, rho=0.1, lam=lam)
    torch.testing.assert_close(flat(model), flat(ref), **TRAJECTORY)


@pytest.mark.parametrize("backend,device", backend_cases())
def test_batchnorm_statistics_move_with_the_y_pass_only(backend, device):
    cls, kw = BASES["sgd"]
    batches = make_batches(6, device)
    model, ref = make_model(batchnorm=True, device=device), make_model(batchnorm=True, device=device)
    run_sampa(model, batches, cls, kw, rho=0.1, lam=0.2, backend=backend, parallel="sequential")
    reference_sampa(ref, batches, cls, kw, rho=0.1, lam=0.2)
    torch.testing.assert_close(flat(model), flat(ref), **TRAJECTORY)
    for a, b in zip(buffers(model), buffers(ref)):
        torch.testing.assert_close(a, b, **TRAJECTORY)
    assert int(model[1].num_batches_tracked) == len(batches)  # one y-pass per step


@pytest.mark.parametrize("base,kw", [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2)),
    (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5))], ids=["sgd-dampening", "rmsprop"])
def test_generic_path_for_other_base_optimizers(base, kw):
    """Base optimizers we do not fuse (SGD with dampening among them): y previews their own step
    from x_t with g_y (on a copy of their state, which does not move), the update is their own
    step with d_t; a non-finite gradient skips its steps and training goes on."""
    batches = make_batches(8)
    model, ref = make_model(), make_model()
    opt = run_sampa(model, batches, base, kw, rho=0.1, lam=0.2)
    reference_sampa(ref, batches, base, kw, rho=0.1, lam=0.2)
    torch.testing.assert_close(flat(model), flat(ref), **TRAJECTORY)
    bad = (batches[0][0].clone().fill_(float("nan")), batches[0][1])
    opt.step(bad)
    opt.step(batches[1])  # g_y is the NaN batch's: no preview move, skipped again
    for b in batches[2:4]:
        opt.step(b)
    assert opt.skipped_steps == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def fresh_from(model, opt, **kw):
    """A copy of the model and a new SAMPa built on it from opt.state_dict(): the optimizer a warm
    one must step exactly like (none of its plans survive)."""
    model2 = copy.deepcopy(model)
    opt2 = SAMPa(model2, loss_fn, type(opt.base_optimizer), **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    return model2, opt2


@pytest.mark.parametrize("disturb", ["read_state", "raise_in_first_step"])
def test_reading_the_base_state_does_not_change_the_preview(disturb):
    """A logger reading opt.base_optimizer.state[p] before training (torch's defaultdict creates an
    empty entry), or an exception in loss_fn during the first step, must not change the plans:
    the preview's plan once keyed "momentum buffers exist" on len(state), and the plan built for
    fresh buffers ignored momentum for the rest of the run."""
    batches = make_batches(6)
    runs = []
    for touched in (False, True):
        model = make_model()
        calls = []

        def flaky(m, b):
            calls.append(1)
            if touched and disturb == "raise_in_first_step" and len(calls) == 2:
                raise RuntimeError("hiccup")
            return loss_fn(m, b)

        opt = SAMPa(model, flaky, torch.optim.SGD, lr=0.1, momentum=0.9)
        if touched and disturb == "read_state":
            for p in model.parameters():
                assert opt.base_optimizer.state[p].get("momentum_buffer") is None
        for b in batches:
            try:
                opt.step(b)
            except RuntimeError:
                opt.step(b)
        runs.append(flat(model))
    assert torch.equal(runs[0], runs[1])


def test_lam_changed_between_steps_reaches_the_clipping_guard():
    """With max_grad_norm the guard takes the norm of the mixed gradient (1 - lam) g~ + lam g_y':
    a new lam must reach it (it was baked into the guard's plan) as it reaches the update."""
    batches = make_batches(6)
    model = make_model()
    kw = dict(lr=0.1, momentum=0.9, lam=0.2, max_grad_norm=0.5)
    opt = SAMPa(model, loss_fn, torch.optim.SGD, **kw)
    for b in batches[:3]:
        opt.step(b)
    opt.param_groups[0]["lam"] = 0.7
    model2, opt2 = fresh_from(model, opt, **kw)
    for b in batches[3:]:
        opt.step(b)
        opt2.step(b)
        assert torch.equal(opt.grad_norm, opt2.grad_norm)
    assert torch.equal(flat(model), flat(model2))


def test_a_kept_batch_refilled_in_place_is_refused_by_name():
    """The x~-pass of a step reads the previous step's batch again. A caller that refills its
    input tensors in place (xb.copy_(next_x), as prefetching loaders do) would change what it
    reads: refused before anything changes (version counters: no host read of a tensor), and the
    step goes on with a copy; fresh tensors, or the same unchanged ones, are fine."""
    batches = make_batches(4)
    model = make_model()
    opt = SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, momentum=0.9)
    xb, yb = batches[0][0].clone(), batches[0][1].clone()
    opt.step((xb, yb))
    opt.step((xb, yb))  # the same tensors, unchanged: the kept batch is what it was
    x, _, sd = snapshot(model, opt)
    xb.copy_(batches[1][0])
    yb.copy_(batches[1][1])
    with pytest.raises(ValueError, match=r"batch\[0\] of the last step was modified in place"):
        opt.step((xb, yb))
    now = opt.state_dict()
    assert torch.equal(flat(model), x) and opt.steps == 2
    assert all(torch.equal(a, b) for a, b in zip(ours(now)["g_y"], ours(sd)["g_y"]))
    ref_model = make_model()
    ref = SAMPa(ref_model, loss_fn, torch.optim.SGD, lr=0.1, momentum=0.9)
    for b in (batches[0], batches[0], batches[1]):
        ref.step(b)
    opt.keep_batch(tuple(t.clone() for t in batches[0]))  # what the caller should have kept
    opt.step((xb.clone(), yb.clone()))
    assert torch.equal(flat(model), flat(ref_model))


@pytest.mark.parametrize("backend,device", backend_cases())
def test_backends_agree(backend, device):
    cls, kw = BASES["adamw"]
    batches = make_batches(6, device)
    a, b = make_model(device=device), make_model(device=device)
    run_sampa(a, batches, cls, kw, rho=0.1, lam=0.2, backend=backend)
    run_sampa(b, batches, cls, kw, rho=0.1, lam=0.2, backend="torch")
    torch.testing.assert_close(flat(a), flat(b), **TRAJECTORY)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="parallel='streams' needs a CUDA device")
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_streams_equal_sequential_on_cuda(base):
    cls, kw = BASES[base]
    batches = make_batches(10, "cuda")
    a, b = make_model(batchnorm=True, device="cuda"), make_model(batchnorm=True, device="cuda")
    run_sampa(a, batches, cls, kw, rho=0.1, lam=0.2, parallel="streams")
    run_sampa(b, batches, cls, kw, rho=0.1, lam=0.2, parallel="sequential")
    torch.testing.assert_close(flat(a), flat(b), **EXACT)
    for x, y in zip(buffers(a), buffers(b)):
        torch.testing.assert_close(x, y, **EXACT)


def test_auto_parallel_is_sequential_on_cpu():
    assert SAMPa(make_model(), loss_fn, lr=0.1).parallel == "sequential"


def test_loss_fn_is_called_2T_plus_1_times():
    calls = []

    def counting(model, batch):
        calls.append(1)
        return loss_fn(model, batch)

    opt = SAMPa(make_model(), counting, lr=0.1, momentum=0.9)
    for b in make_batches(7):
        opt.step(b)
    assert len(calls) == 2 * 7 + 1 == opt.loss_calls


def test_step_returns_the_y_pass_loss_on_the_new_batch():
    model = make_model()
    opt = SAMPa(model, loss_fn, lr=0.1)
    batches = make_batches(2)
    opt.step(batches[0])
    loss = opt.step(batches[1])
    assert loss.requires_grad is False and loss.shape == ()
    assert torch.isfinite(loss)


# --- Theorem 4.4 -----------------------------------------------------------------------------

class Quadratic(nn.Module):
    """f(x) = 1/2 x^T A x, convex and L-smooth with L = the largest eigenvalue of A."""

    def __init__(self, a, x0):
        super().__init__()
        self.register_buffer("a", a)
        self.x = nn.Parameter(x0.clone())

    def loss(self):
        return 0.5 * self.x @ self.a @ self.x


@pytest.mark.parametrize("backend,device", NATIVE_BACKENDS)
def test_theorem_4_4_bound_on_a_convex_quadratic(backend, device):
    torch.manual_seed(0)
    d = 20
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    eig = torch.linspace(0.01, 1.0, d, dtype=torch.float64)
    a = (q * eig) @ q.T
    L, rho, T = float(eig.max()), 0.1, 300
    eta = 0.45 / L  # < 1 / (2L), fixed
    model = Quadratic(a, torch.randn(d, dtype=torch.float64) * 3).to(device)
    opt = SAMPa(model, lambda m, batch: m.loss(), torch.optim.SGD, rho=rho, lam=0.0, lr=eta, backend=backend)
    f0 = float(model.loss().detach())  # inf f = 0
    sq_grads = []
    for _ in range(T):
        with torch.no_grad():
            sq_grads.append(float(((a.to(device) @ model.x) ** 2).sum()))  # ||grad f(x_t)||^2
        opt.step(batch=0)  # deterministic: the batch is ignored
    C = (L ** 2 + L ** 3) / 2 + 2 * L ** 4 / 3
    bound = 4 / 3 * (f0 / (T * eta) + C * rho ** 2 * eta)
    average = sum(sq_grads) / T
    assert average <= bound, (average, bound)
    assert sq_grads[-1] < 1e-2 * sq_grads[0]  # and it does descend


# --- state and resume ------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_state_dict_resume_is_bit_exact(base):
    cls, kw = BASES[base]
    batches = make_batches(12)
    model = make_model(batchnorm=True)
    opt = SAMPa(model, loss_fn, cls, **kw)
    for b in batches[:6]:
        opt.step(b)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for b in batches[6:]:
        opt.step(b)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = make_model(batchnorm=True, seed=99)
    resumed.load_state_dict(ckpt["model"])
    opt2 = SAMPa(resumed, loss_fn, cls, **kw)
    opt2.load_state_dict(ckpt["opt"])
    for b in batches[6:]:
        opt2.step(b)
    assert torch.equal(flat(model), flat(resumed))
    for x, y in zip(buffers(model), buffers(resumed)):
        assert torch.equal(x, y)
    assert opt2.loss_calls == opt.loss_calls


def test_param_groups_are_shared_and_schedulers_drive_them():
    model = make_model()
    opt = SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["lam"] == 0.2 and opt.param_groups[0]["rho"] == 0.1
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(make_batches(1)[0])
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_base_optimizer_instance():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = SAMPa(model, loss_fn, base)
    opt.step(make_batches(1)[0])
    assert opt.base_optimizer is base and len(base.state) == len(list(model.parameters()))


def _wide():
    """Parameters far above the activations (batch 8), so that peaks count parameter copies."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3))


def _peak(model, step, held, batches):
    """The exact peak bytes of two steps on CPU (sam_kernels.memory.LiveBytes), counting from the
    parameters and held() (what the optimizer holds at the start; no reference kept here)."""
    from sam_kernels.memory import LiveBytes

    tracker = LiveBytes(list(model.parameters()) + held())
    with tracker:
        for b in batches:
            step(b)
    return tracker.peak


@pytest.mark.parametrize("capturable", [False, True])
def test_memory_above_sgd(capturable):
    """Peak bytes above SGD's (x_t and a gradient; both with a momentum buffer), counted exactly:
    a step in turn holds two parameter sets more (memory_report: g_y and step_scratch), the
    fixed sets of a capturable step three (x~, y and g~ beside g_y' in g_y's storage: what two
    concurrent passes need) plus one tensor's gradient while autograd adds it into them."""
    batches = [(x[:8], y[:8]) for x, y in make_batches(4)]
    model = _wide()
    n = sum(p.numel() * 4 for p in model.parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def sgd_step(b):
        sgd.zero_grad()
        loss_fn(model, b).backward()
        sgd.step()
    sgd_step(batches[0])
    sgd_peak = _peak(model, sgd_step, lambda: [t for st in sgd.state.values() for t in st.values()], batches[1:3])

    model = _wide()
    opt = SAMPa(model, loss_fn, lr=0.1, momentum=0.9, capturable=capturable)
    opt.step(batches[0])
    opt.step(batches[1])
    report = opt.memory_report()
    assert report == {"g_y": n, "shadows": 2 * n if capturable else 0, "pass_grads": n if capturable else 0,
                      "step_scratch": 0 if capturable else n, "base_state": n}
    assert all(p.grad is None for p in model.parameters())  # step 0's g_y (capturable: in .grad) is not kept
    def held():
        return [t for st in opt.base_optimizer.state.values() for t in st.values()] + opt.held_tensors()
    above = _peak(model, opt.step, held, batches[2:4]) - sgd_peak
    largest = max(p.numel() * 4 for p in model.parameters())
    low, high = (3 * n, 3 * n + largest) if capturable else (2 * n, 2 * n)
    assert low - 0.05 * n <= above <= high + 0.05 * n, above / n  # slack: scalars, activations, temporaries


def test_streams_bookkeeping_on_cpu(monkeypatch):
    """parallel="streams" without CUDA, its two streams replaced by the passes in turn: the fixed
    gradient sets (g_y' in g_y's storage, no gradient left in the model's .grad) and the trajectory
    of the sequential step. (The streams themselves: test_streams_equal_sequential_on_cuda.)"""
    batches = make_batches(6)
    model, ref = make_model(), make_model()
    opt = SAMPa(model, loss_fn, torch.optim.SGD, rho=0.1, lam=0.2, lr=0.05, momentum=0.9)
    opt.parallel = "streams"
    monkeypatch.setattr(OnShadows, "_on_streams", lambda self, device, grad_at, work: [grad_at(*w) for w in work])
    run_sampa(ref, batches, torch.optim.SGD, dict(lr=0.05, momentum=0.9), rho=0.1, lam=0.2, parallel="sequential")
    for b in batches:
        opt.step(b)
    torch.testing.assert_close(flat(model), flat(ref), **TRAJECTORY)
    assert all(p.grad is None for p in model.parameters())
    n = sum(p.numel() * 4 for p in model.parameters())
    assert opt.memory_report() == {"g_y": n, "shadows": 2 * n, "pass_grads": n, "step_scratch": 0, "base_state": n}
    y_set = opt._on_shadows.sets[1]  # the fixed shadow set of the y-pass
    assert ours(opt.state_dict())["g_y"][0].data_ptr() == y_set[0].grad.data_ptr()


# --- GradScaler ------------------------------------------------------------------------------

@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_grad_scaler_follows_the_reference(base, capturable):
    """Each pass backpropagates loss * scale and unscales its gradients (the preview's y uses g_y's
    size, so a gradient left scaled moves it 2^10 times too far): the reference trajectory."""
    cls, kw = BASES[base]
    batches = make_batches(8)
    model, ref = make_model(), make_model()
    opt = SAMPa(model, loss_fn, cls, rho=0.1, lam=0.2, capturable=capturable, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    for b in batches:
        opt.step(b, grad_scaler=scaler)
        scaler.update()
    assert scaler.get_scale() == 2.0 ** 12  # grew twice: no step found an inf
    reference_sampa(ref, batches, cls, kw, rho=0.1, lam=0.2)
    torch.testing.assert_close(flat(model), flat(ref), **TRAJECTORY)


def test_grad_scaler_overflow_skips_backs_off_and_goes_on():
    """A scale that overflows the scaled gradients: those steps are skipped on the device (the
    weights untouched), the scaler halves its scale after each, and training goes on."""
    model = make_model()
    opt = SAMPa(model, lambda m, b: 16 * loss_fn(m, b), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # 16 * loss * scale overflows fp32
    before = flat(model)
    opt.step(make_batches(1)[0], grad_scaler=scaler)
    scaler.update()
    assert torch.equal(flat(model), before) and opt.skipped_steps == 1
    for b in make_batches(40, seed=2):
        opt.step(b, grad_scaler=scaler)
        scaler.update()
    assert scaler.get_scale() < 2.0 ** 127 and opt.steps - opt.skipped_steps > 20
    assert not torch.equal(flat(model), before) and all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_scaler_misuse_is_refused_before_anything_changes():
    model = make_model()
    opt = SAMPa(model, loss_fn, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    b = make_batches(1)[0]
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler, got int"):
        opt.step(b, grad_scaler=1024)
    opt.step(b, grad_scaler=scaler)
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="already recorded a step of this optimizer"):
        opt.step(b, grad_scaler=scaler)  # no scaler.update() in between
    assert_unchanged(model, opt, snap)
    scaler.update()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"SAMPa.step: scaler.unscale_\(optimizer\) was called"):
        opt.step(b, grad_scaler=scaler)
    assert_unchanged(model, opt, snap)


# --- failures --------------------------------------------------------------------------------

def snapshot(model, opt):
    sd = copy.deepcopy(opt.state_dict())
    return flat(model), buffers(model), sd


def assert_unchanged(model, opt, snap):
    x, bufs, sd = snap
    assert torch.equal(flat(model), x)
    for a, b in zip(buffers(model), bufs):
        assert torch.equal(a, b)
    now = opt.state_dict()
    assert ours(now)["skipped_steps"] == ours(sd)["skipped_steps"]
    for a, b in zip(ours(now)["batch"] or (), ours(sd)["batch"] or ()):  # the kept batch
        torch.testing.assert_close(a, b, **EXACT, equal_nan=True)
    for k, st in sd["state"].items():
        for name, t in st.items():
            assert torch.equal(now["state"][k][name], t)
    if ours(sd)["g_y"] is None:
        assert ours(now)["g_y"] is None
    else:
        for a, b in zip(ours(now)["g_y"], ours(sd)["g_y"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("at_call", [1, 2, 3, 4, 6])  # step 0: bootstrap, y, x~; the y-pass of steps 1 and 2
def test_exception_in_loss_fn_leaves_everything_as_it_was(at_call):
    calls = []

    def flaky(model, batch):
        calls.append(1)
        if len(calls) == at_call:
            raise RuntimeError("data loader hiccup")
        return loss_fn(model, batch)

    model = make_model(batchnorm=True)
    opt = SAMPa(model, flaky, torch.optim.SGD, lr=0.1, momentum=0.9)
    batches = make_batches(3)
    done = 0
    while True:
        snap = snapshot(model, opt)
        try:
            opt.step(batches[done])
            done += 1
        except RuntimeError as e:
            assert "hiccup" in str(e)
            break
    assert_unchanged(model, opt, snap)
    opt.step(batches[done])  # and it goes on


@pytest.mark.parametrize("capturable", [False, True])
def test_exception_in_the_x_pass_after_step_0(capturable):
    """The x~-pass takes the kept batch, which already ran in the last step's y-pass. A step in
    turn released g_y to make x~ (two parameter sets above SGD): an exception there puts x_t,
    the buffers and the base state back bit for bit and the next step starts again from step 0.
    The fixed sets of a capturable step keep g_y: everything as it was."""
    calls = []

    def flaky(model, batch):
        calls.append(1)
        if len(calls) == 5:  # step 0: bootstrap, y, x~; step 1: y, then the x~-pass
            raise RuntimeError("hiccup")
        return loss_fn(model, batch)

    model = make_model(batchnorm=True)
    opt = SAMPa(model, flaky, torch.optim.SGD, lr=0.1, momentum=0.9, capturable=capturable)
    batches = make_batches(3)
    opt.step(batches[0])
    x, bufs, sd = snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="hiccup"):
        opt.step(batches[1])
    if capturable:
        assert_unchanged(model, opt, snap)
    else:
        assert torch.equal(flat(model), x) and all(torch.equal(a, b) for a, b in zip(buffers(model), bufs))
        now = opt.state_dict()
        assert ours(now)["g_y"] is None and ours(now)["batch"] is None
        assert all(torch.equal(now["state"][k][n], t) for k, st in sd["state"].items() for n, t in st.items())
    opt.step(batches[1])
    assert len(calls) == (7 if capturable else 8)  # in turn: a bootstrap pass again
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("which", ["x~", "y"])
def test_nonfinite_gradient_skips_the_step(bad, which):
    """A NaN / inf in either gradient: the weights, the base state and the buffers stay as they
    were (decided on the device), skipped_steps counts it; g_y <- g_y' and the kept batch advance
    as every step (ALGORITHMS.md), and a g_y that is not finite is not used by the next preview
    (no perturbation, a zero preview gradient). A bad batch is used twice like every batch (its
    x~-pass comes one step later), so it skips at most two steps; then training goes on."""
    model = make_model(batchnorm=True)
    opt = SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, momentum=0.9)
    batches = make_batches(5)
    opt.step(batches[0])
    opt.step(batches[1])
    poisoned = (batches[2][0].clone(), batches[2][1])
    poisoned[0][0, 0] = bad
    if which == "y":  # the new batch is bad: the y-pass gradient is not finite
        snap = snapshot(model, opt)
        opt.step(poisoned)
        assert not all(torch.isfinite(g).all() for g in ours(opt.state_dict())["g_y"])  # kept, not used
    else:  # the kept batch is bad: plant it, the x~-pass gradient is not finite
        opt.keep_batch(poisoned)
        snap = snapshot(model, opt)
        opt.step(batches[2])
    assert opt.skipped_steps == 1
    x, bufs, sd = snap
    assert torch.equal(flat(model), x)
    for a, b in zip(buffers(model), bufs):
        assert torch.equal(a, b)
    now = opt.state_dict()
    for k, st in sd["state"].items():
        for name, t in st.items():
            assert torch.equal(now["state"][k][name], t)
    assert ours(now)["batch"][0] is not ours(sd)["batch"][0]  # B_t <- B_{t+1}
    opt.step(batches[3])  # "y": the bad batch's x~-pass now; "x~": taken
    assert opt.skipped_steps == (2 if which == "y" else 1)
    before = flat(model)
    opt.step(batches[4])  # taken
    assert opt.skipped_steps == (2 if which == "y" else 1) and not torch.equal(flat(model), before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_raise_mode():
    model = make_model()
    opt = SAMPa(model, loss_fn, lr=0.1, nonfinite="raise")
    x, y = make_batches(1)[0]
    x = x.clone()
    x[0, 0] = float("nan")
    before = flat(model)
    with pytest.raises(FloatingPointError, match="SAMPa.step: NaN or inf"):
        opt.step((x, y))
    assert torch.equal(flat(model), before)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(lam=1.5), ValueError, r"lam must be a number in \[0, 1\], got 1.5"),
    (dict(lam=-0.1), ValueError, r"lam must be a number in \[0, 1\], got -0.1"),
    (dict(rho=-1.0), ValueError, r"rho must be a finite number >= 0, got -1.0"),
    (dict(parallel="threads"), ValueError, r"parallel must be one of .*got 'threads'"),
    (dict(parallel="streams"), ValueError, r"parallel='streams' needs the model on a CUDA device, got cpu"),
    (dict(parallel="distributed"), RuntimeError, r"needs torch.distributed initialized"),
    (dict(backend="fast"), ValueError, r"backend must be one of"),
    (dict(nonfinite="ignore"), ValueError, r"nonfinite must be one of"),
])
def test_bad_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        SAMPa(make_model(), loss_fn, lr=0.1, **kwargs)


def test_bad_model_loss_and_batch():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        SAMPa([nn.Parameter(torch.ones(2))], loss_fn, lr=0.1)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        SAMPa(make_model(), "cross_entropy", lr=0.1)
    opt = SAMPa(make_model(), lambda m, b: m(b[0]), lr=0.1)  # not a scalar
    with pytest.raises(ValueError, match=r"must return a scalar tensor .* shape \(24, 3\)"):
        opt.step(make_batches(1)[0])
    with pytest.raises(ValueError, match="needs the new minibatch"):
        opt.step()
    with pytest.raises(AttributeError, match=r"SAMPa has no first_step\(\): .* call step\(batch\)"):
        opt.first_step()


def test_foreign_parameters_are_rejected():
    model = make_model()
    base = torch.optim.SGD([nn.Parameter(torch.ones(3))], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] .* is not a parameter of the model"):
        SAMPa(model, loss_fn, base)
