"""make_graphed_step (sam_kernels/integrations/graphs.py).

On CPU it runs the step eagerly: the same weights, state and counters as the loop the README
gives, bit for bit, for every optimizer class (with an lr scheduler, a rho schedule, a NaN batch,
BatchNorm and a GradScaler), and the same argument checks. On a GPU (skipped here) the graphed
steps equal eager ones over 20 steps, and the capture errors are checked."""
import copy

import pytest
import torch
from conftest import EXACT, NUSAM_TRAJECTORY, TRAJECTORY
from torch import nn

from sam_kernels import FSAM, GSAM, MSAM, PSAM, SAM, GaussSAM, LookSAM, NuSAM, SAMPa, disable_running_stats, \
    enable_running_stats, make_graphed_step

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")


def convnet(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10)).to(device)


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def batches(n, device, nan_at=None):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x, y = torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 10, (16,), generator=g)
        if i == nan_at:
            x[0, 0, 0, 0] = float("nan")
        out.append((x.to(device), y.to(device)))
    return out


def make(name, model, capturable=True, backend="auto"):
    ps = list(model.parameters())
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, backend=backend, capturable=capturable)
    return {
        "sam": lambda: SAM(ps, torch.optim.SGD, rho=lambda t: 0.05 / (1 + 0.1 * t), **kw),
        "asam": lambda: SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, **kw),
        "nusam": lambda: NuSAM(ps, torch.optim.AdamW, rho=0.1, lr=1e-3, backend=backend, capturable=capturable),
        "gausssam": lambda: GaussSAM(ps, torch.optim.SGD, rho=0.05, seed=3, **kw),
        "psam": lambda: PSAM(ps, torch.optim.SGD, rho=0.05, period=3, **kw),
        "gsam": lambda: GSAM(ps, torch.optim.SGD, rho=0.05, alpha=0.4, **kw),
        "fsam": lambda: FSAM(ps, torch.optim.SGD, rho=0.05, **kw),
        "msam": lambda: MSAM(ps, torch.optim.SGD, rho=0.3, start_step=2, **kw),  # base, then its one-gradient step
        "looksam": lambda: LookSAM(ps, torch.optim.SGD, rho=0.05, k=3, start_step=2, **kw),  # base, then sam / reuse
        "sampa": lambda: SAMPa(model, loss_fn, torch.optim.SGD, rho=0.05, lam=0.2, parallel="sequential", **kw),
    }[name]()


def readme_loop(model, opt, data, sched, scaler=None):
    """The loop README.md gives, step by step, as the reference."""
    for b in data:
        if isinstance(opt, SAMPa):
            opt.step(b, grad_scaler=scaler)
        elif opt.step_kind() == "momentum":  # MSAM: the move, then its one forward-backward
            opt.zero_grad()
            opt.first_step(grad_scaler=scaler)
            loss = loss_fn(model, b)
            (scaler.scale(loss) if scaler else loss).backward()
            opt.second_step(grad_scaler=scaler)
        elif not opt.sam_step_due:
            opt.zero_grad()
            loss = loss_fn(model, b)
            (scaler.scale(loss) if scaler else loss).backward()
            opt.base_step(grad_scaler=scaler)
        else:
            opt.zero_grad()
            enable_running_stats(model)
            loss = loss_fn(model, b)
            (scaler.scale(loss) if scaler else loss).backward()
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            disable_running_stats(model)
            loss = loss_fn(model, b)
            (scaler.scale(loss) if scaler else loss).backward()
            enable_running_stats(model)
            opt.second_step(grad_scaler=scaler)
        if scaler is not None:
            scaler.update()
        sched.step()


def graphed_loop(model, opt, data, sched, scaler=None, warmup=2):
    step = make_graphed_step(model, loss_fn, opt, data[0], grad_scaler=scaler, warmup=warmup)
    losses = []
    for b in data:
        losses.append(step(b))
        sched.step()
    return step, losses


def _same(model_a, model_b, opt_a, opt_b, exact=True, tol=TRAJECTORY):
    for (n, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        if exact:  # (a NaN batch makes BatchNorm's running statistics NaN, in both)
            torch.testing.assert_close(a, b, **EXACT, equal_nan=True, msg=n)
        else:
            torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=n)
    assert opt_a.steps == opt_b.steps and opt_a.skipped_steps == opt_b.skipped_steps
    assert all(torch.isfinite(p).all() for p in model_a.parameters())  # the NaN never reached the weights


NAMES = ["sam", "asam", "nusam", "gausssam", "psam", "gsam", "fsam", "msam", "looksam", "sampa"]


@pytest.mark.parametrize("name", NAMES)
def test_cpu_fallback_is_the_readme_loop(name):
    data = batches(8, "cpu", nan_at=4)
    ref, mine = convnet("cpu"), convnet("cpu")
    opt_r, opt_m = make(name, ref, backend="cpu"), make(name, mine, backend="cpu")
    readme_loop(ref, opt_r, data, torch.optim.lr_scheduler.StepLR(opt_r, 3, 0.5))
    step, losses = graphed_loop(mine, opt_m, data, torch.optim.lr_scheduler.StepLR(opt_m, 3, 0.5))
    assert not step.graphed and "not on a CUDA device" in step.why_eager and not step.graphs
    _same(mine, ref, opt_m, opt_r)
    assert opt_m.skipped_steps >= 1  # the NaN batch
    assert all(isinstance(x, torch.Tensor) and x.dim() == 0 for x in losses)


@pytest.mark.parametrize("name", ["sam", "sampa"])
def test_cpu_fallback_with_a_grad_scaler(name):
    data = batches(6, "cpu", nan_at=2)
    ref, mine = convnet("cpu"), convnet("cpu")
    opt_r, opt_m = make(name, ref, backend="cpu"), make(name, mine, backend="cpu")
    sc_r, sc_m = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2))
    readme_loop(ref, opt_r, data, torch.optim.lr_scheduler.StepLR(opt_r, 3, 0.5), sc_r)
    graphed_loop(mine, opt_m, data, torch.optim.lr_scheduler.StepLR(opt_m, 3, 0.5), sc_m)
    _same(mine, ref, opt_m, opt_r)
    assert sc_m.get_scale() == sc_r.get_scale() < 2.0 ** 10  # backed off after the NaN, as eager


def test_a_batch_unlike_the_example_is_named_and_changes_nothing():
    model = convnet("cpu")
    opt = make("sam", model, backend="cpu")
    data = batches(2, "cpu")
    step = make_graphed_step(model, loss_fn, opt, data[0])
    step(data[0])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"batch\[0\] has shape \(8, 3, 6, 6\).*example batch had shape "
                                         r"\(16, 3, 6, 6\)"):
        step((data[1][0][:8], data[1][1]))
    with pytest.raises(ValueError, match=r"batch\[1\] has shape \(16,\), dtype torch.int32"):
        step((data[1][0], data[1][1].int()))
    with pytest.raises(ValueError, match="structure"):
        step([data[1][0]])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))
    assert opt.steps == 1


def test_arguments_are_checked():
    model = convnet("cpu")
    opt = make("sam", model, backend="cpu")
    b = batches(1, "cpu")[0]
    with pytest.raises(TypeError, match="sam_kernels optimizer"):
        make_graphed_step(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), b)
    with pytest.raises(ValueError, match="warmup must be an integer >= 1, got 0"):
        make_graphed_step(model, loss_fn, opt, b, warmup=0)
    with pytest.raises(TypeError, match="example_batch must be a tensor"):
        make_graphed_step(model, loss_fn, opt, (b[0], "labels"))
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler, got float"):
        make_graphed_step(model, loss_fn, opt, b, grad_scaler=2.0 ** 10)


# --- on a GPU ------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("name", NAMES)
def test_graphed_steps_equal_eager_ones(name):
    """20 steps with a scheduler and a NaN batch: the replayed graphs give the weights, BatchNorm
    statistics and counters of the eager loop (the same kernels: to fp32 rounding, the graph may
    order independent kernels differently)."""
    data = batches(20, "cuda", nan_at=9)
    ref, mine = convnet("cuda"), convnet("cuda")
    opt_r, opt_m = make(name, ref), make(name, mine)
    readme_loop(ref, opt_r, data, torch.optim.lr_scheduler.StepLR(opt_r, 4, 0.5))
    step, _ = graphed_loop(mine, opt_m, data, torch.optim.lr_scheduler.StepLR(opt_m, 4, 0.5))
    assert step.graphed and ("momentum" if name == "msam" else "sam") in step.graphs
    _same(mine, ref, opt_m, opt_r, exact=False)
    if name == "sampa":  # its x~-pass read the previous batch from the graph's second static inputs
        assert opt_m.loss_calls == opt_r.loss_calls


@needs_cuda
@pytest.mark.parametrize("name", ["sam", "sampa"])
def test_graphed_fp16_grad_scaler_backs_off_as_eager(name):
    """fp16 autocast with a GradScaler: the graphed step (SAMPa: its two passes forked onto two
    streams) backs the scale off after the NaN batch as the eager loop does."""
    data = batches(12, "cuda", nan_at=7)
    ref, mine = convnet("cuda"), convnet("cuda")

    def amp_loss(model, batch):
        with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
            return loss_fn(model, batch)
    if name == "sampa":
        opt_r, opt_m = (SAMPa(m, amp_loss, torch.optim.SGD, rho=0.05, lam=0.2, parallel=p, capturable=True, lr=0.05,
                              momentum=0.9) for m, p in ((ref, "sequential"), (mine, "auto")))
    else:
        opt_r, opt_m = make("sam", ref), make("sam", mine)
    sc_r, sc_m = (torch.amp.GradScaler("cuda", init_scale=2.0 ** 12) for _ in range(2))
    for b in data:
        if name == "sampa":
            opt_r.step(b, grad_scaler=sc_r)
            sc_r.update()
            continue
        opt_r.zero_grad()
        sc_r.scale(amp_loss(ref, b)).backward()
        opt_r.first_step(zero_grad=True, grad_scaler=sc_r)
        disable_running_stats(ref)
        sc_r.scale(amp_loss(ref, b)).backward()
        enable_running_stats(ref)
        opt_r.second_step(grad_scaler=sc_r)
        sc_r.update()
    step = make_graphed_step(mine, amp_loss, opt_m, data[0], grad_scaler=sc_m, warmup=2)
    for b in data:
        step(b)
    assert step.graphed
    assert sc_m.get_scale() == sc_r.get_scale() < 2.0 ** 12
    _same(mine, ref, opt_m, opt_r, exact=False)


@needs_cuda
def test_changes_after_capture_are_refused():
    model = convnet("cuda")
    opt = make("sam", model)
    data = batches(4, "cuda")
    step = make_graphed_step(model, loss_fn, opt, data[0], warmup=1)
    step(data[0])
    step(data[1])  # captured and replayed
    opt.param_groups[0]["momentum"] = 0.5
    with pytest.raises(RuntimeError, match=r"\['momentum'\] changed after the step was captured"):
        step(data[2])
    opt.param_groups[0]["momentum"] = 0.9
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, device="cuda"))]})
    with pytest.raises(RuntimeError, match="changed after the step was captured"):
        step(data[3])


@needs_cuda
def test_a_step_that_synchronizes_cannot_be_captured():
    model = convnet("cuda")
    opt = make("sam", model)
    data = batches(3, "cuda")

    def syncing_loss(m, b):
        loss = loss_fn(m, b)
        if loss.item() > 1e9:  # a host read: not capturable
            raise AssertionError
        return loss
    step = make_graphed_step(model, syncing_loss, opt, data[0], warmup=1)
    step(data[0])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="capturing the sam step failed"):
        step(data[1])
    assert opt._pending is None
    for a, b in zip(model.state_dict().values(), before.values()):
        assert torch.equal(a, b)


@needs_cuda
def test_graphed_step_of_a_compiled_model():
    """torch.compile (default mode) compiles during the eager warm-up; the graph captures the
    compiled kernels."""
    data = batches(10, "cuda", nan_at=6)
    ref, mine = convnet("cuda"), convnet("cuda")
    opt_r, opt_m = make("sam", ref), make("sam", mine)
    readme_loop(ref, opt_r, data, torch.optim.lr_scheduler.StepLR(opt_r, 4, 0.5))
    step, _ = graphed_loop(torch.compile(mine), opt_m, data, torch.optim.lr_scheduler.StepLR(opt_m, 4, 0.5))
    assert step.graphed
    _same(mine, ref, opt_m, opt_r, exact=False, tol=NUSAM_TRAJECTORY)  # inductor's kernels round differently


@needs_cuda
@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_graphed_sampa_on_two_streams_equals_the_sequential_reference(lam, base, bf16):
    """parallel="auto" forks the two passes onto two streams inside the graph (joined before the
    update): 20 steps equal eager sequential SAMPa to fp32 rounding."""
    def amp_loss(model, batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            return loss_fn(model, batch)

    def build(model, parallel):
        base_cls, kw = ((torch.optim.SGD, dict(lr=0.05, momentum=0.9)) if base == "sgd"
                        else (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)))
        return SAMPa(model, amp_loss, base_cls, rho=0.05, lam=lam, parallel=parallel, capturable=True, **kw)
    data = batches(20, "cuda", nan_at=11)
    ref, mine = convnet("cuda"), convnet("cuda")
    opt_r, opt_m = build(ref, "sequential"), build(mine, "auto")
    for b in data:
        opt_r.step(b)
    step = make_graphed_step(mine, amp_loss, opt_m, data[0], warmup=2)
    for b in data:
        step(b)
    assert step.graphed and opt_m._on_shadows.streams is not None  # the capture forked onto the two streams
    _same(mine, ref, opt_m, opt_r, exact=False, tol=NUSAM_TRAJECTORY if bf16 else TRAJECTORY)
