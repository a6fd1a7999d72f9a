"""The guarantees of docs/guides/guarantees.md at their edges, for every optimizer class of optim_db.py: duplicate
parameters, copies (deepcopy, pickle, torch.save), add_param_group, sparse gradients, non-finite
values in any gradient of either pass, non-finite hyperparameters, GaussSAM's random stream in
state_dict, a base optimizer instance given as params."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from conftest import ROUNDING, backend_cases
from optim_db import BASES, BY_NAME, FUSED_BASES, PERIODIC, SAM_FAMILY, gradient_before_first_step, make, \
    restores_exactly
from torch import nn

from sam_kernels import SAM, GaussSAM, SAMPa

BACKENDS = backend_cases("power_iteration_")  # the backends every class runs on here


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def data(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def sampa_loss(model, batch):  # module level: a SAMPa holding it can be pickled
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def two_step(model, opt, batch, poison=None):
    """One step through the two-step API; poison = (pass, parameter index, value) writes value into
    that gradient ("first": the one before first_step, which MSAM's loop does not take)."""
    x, y = batch
    params = list(model.parameters())
    if gradient_before_first_step(opt):
        nn.functional.cross_entropy(model(x), y).backward()
        if poison and poison[0] == "first":
            params[poison[1]].grad.view(-1)[0] = poison[2]
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()
    if poison and poison[0] == "second":
        params[poison[1]].grad.view(-1)[0] = poison[2]
    opt.second_step(zero_grad=True)


def snapshot(model, opt):
    """Weights, the state a checkpoint holds (the base optimizer's, and ours: nuSAM's u, SAMPa's
    g_y, ...; not scratch buffers such as SAM's x_old) and the step count, cloned."""
    sd = copy.deepcopy(opt.state_dict())
    # not compared: the counters, and where GaussSAM's random stream is (it advances on a skipped step)
    skip = ("step", "skipped_steps", "loss_calls", "generator")
    ours = {k: v for k, v in sd["param_groups"][0].pop("sam").items() if k not in skip}
    return [p.detach().clone() for p in model.parameters()], sd["state"], ours, opt.steps


def assert_same(a, b):
    """Bit for bit (NaN == NaN)."""
    if torch.is_tensor(a):
        same = torch.equal(a, b) or (a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num()))
        assert same, f"differ: {(a.double() - b.double()).abs().max().item() if a.shape == b.shape else a.shape}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# --- 1. duplicate parameters ---------------------------------------------------------------

@pytest.mark.parametrize("name", SAM_FAMILY)
def test_duplicate_parameters_rejected(name):
    model = mlp()
    w = model[0].weight
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] \(shape \(7, 5\)\) is "
                                         r"param_groups\[0\]\['params'\]\[0\] again"):
        make(name, [w, w], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] .* is param_groups\[0\]"):
        make(name, [{"params": [w]}, {"params": [w]}], torch.optim.SGD, lr=0.1)
    opt = make(name, [w], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="listed once"):
        opt.add_param_group({"params": [model[2].weight, w]})
    assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 1


def test_duplicate_parameters_rejected_sampa():
    model = mlp()
    base = torch.optim.SGD([{"params": [model[0].weight]}, {"params": [model[2].weight]}], lr=0.1)
    base.param_groups[1]["params"].append(model[0].weight)  # slipped past torch's own check
    with pytest.raises(ValueError, match="listed once"):
        SAMPa(model, sampa_loss, base)


# --- 2. copies: deepcopy, pickle, torch.save -------------------------------------------------

def _copies(model, opt):
    """(model, opt) copied three ways; each copy's optimizer holds the copy's parameters."""
    yield copy.deepcopy((model, opt))
    buf = io.BytesIO()
    torch.save((model, opt), buf)
    buf.seek(0)
    yield torch.load(buf, weights_only=False)


@pytest.mark.parametrize("base", FUSED_BASES)
@pytest.mark.parametrize("name", SAM_FAMILY)
def test_copy_steps_like_the_original(name, base):
    cls, kw = BASES[base]
    model = mlp()
    opt = make(name, model.parameters(), cls, backend="cpu", **kw)
    batches = [data(s) for s in range(4)]
    two_step(model, opt, batches[0])
    two_step(model, opt, batches[1], poison=("second", 3, float("nan")))  # a skipped step is carried over
    for model2, opt2 in _copies(model, opt):
        assert opt2.skipped_steps == 1 and opt2.steps == opt.steps
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), model2.parameters()))
        for b in batches[2:]:
            two_step(model2, opt2, b)
        assert opt2.steps == opt.steps + 2
    before = snapshot(model, opt)
    for b in batches[2:]:  # the original, after its copies moved: untouched by them, and the same steps
        two_step(model, opt, b)
    assert_same(snapshot(model2, opt2), snapshot(model, opt))
    assert not all(torch.equal(a, p) for a, p in zip(before[0], model.parameters()))


def test_copy_sampa_steps_like_the_original():
    model = mlp()
    opt = SAMPa(model, sampa_loss, torch.optim.AdamW, lr=1e-2, backend="cpu")
    batches = [data(s) for s in range(4)]
    for b in batches[:2]:
        opt.step(b)
    for model2, opt2 in _copies(model, opt):
        assert opt2.model is model2
        for b in batches[2:]:
            opt2.step(b)
    for b in batches[2:]:
        opt.step(b)
    assert_same(snapshot(model2, opt2), snapshot(model, opt))


@pytest.mark.parametrize("name", ["sampa", "sam"])
def test_copy_with_an_lr_scheduler_attached_steps_the_copy(name):
    """An lr scheduler wraps step() on the instance, holding a weak reference to it: a copy that
    kept the wrapper would step the original, and it cannot be pickled. Copies drop it, as
    torch's optimizers do."""
    model = mlp()
    batch = data()
    if name == "sampa":
        opt = SAMPa(model, sampa_loss, torch.optim.SGD, lr=0.1, momentum=0.9)
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)

    def step(m, o):
        if name == "sampa":
            return o.step(batch)
        nn.functional.cross_entropy(m(batch[0]), batch[1]).backward()
        return o.step(lambda: nn.functional.cross_entropy(m(batch[0]), batch[1]).backward())

    step(model, opt)
    sched.step()
    for model2, opt2 in _copies(model, opt):
        before, before2 = snapshot(model, opt)[0], snapshot(model2, opt2)[0]
        step(model2, opt2)
        assert_same(snapshot(model, opt)[0], before)  # the original did not move
        assert not all(torch.equal(a, p) for a, p in zip(before2, model2.parameters()))
    pickle.loads(pickle.dumps((model, opt)))


def test_scheduler_on_the_base_optimizer_sees_the_steps():
    """davda54's tip: an lr scheduler attached to opt.base_optimizer. The fused path never calls
    the base's own step(), but the base is marked stepped, so torch does not warn that
    lr_scheduler.step() came before optimizer.step()."""
    model = mlp()
    opts = [SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9),
            SAMPa(model, sampa_loss, torch.optim.SGD, lr=0.1, momentum=0.9)]
    for opt in opts:
        sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, 1, 0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(2):
                if isinstance(opt, SAMPa):
                    opt.step(data())
                else:
                    two_step(model, opt, data())
                sched.step()
        assert opt.param_groups[0]["lr"] == 0.025


def test_copy_between_the_two_steps_is_refused():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    nn.functional.cross_entropy(model(data()[0]), data()[1]).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step"):
        copy.deepcopy(opt)


# --- 3-5. add_param_group ------------------------------------------------------------------

@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("name", SAM_FAMILY)
def test_add_param_group_steps_and_round_trips(name, backend, device):
    model = mlp().to(device)
    opt = make(name, model[0].parameters(), torch.optim.AdamW, lr=1e-2, backend=backend)
    batch = tuple(t.to(device) for t in data())
    two_step(model, opt, batch)
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 5e-2, "rho": 0.2})
    assert opt.param_groups[1]["lr"] == 5e-2 and opt.param_groups[1]["rho"] == 0.2
    assert opt.param_groups[1]["weight_decay"] == 1e-2  # the base optimizer's default
    late = [p.detach().clone() for p in model[2].parameters()]
    for _ in range(2):
        two_step(model, opt, batch)
    assert all(not torch.equal(a, p) for a, p in zip(late, model[2].parameters()))
    # the state dict round trip: a fresh optimizer with the same groups steps like this one
    model2 = copy.deepcopy(model)
    opt2 = make(name, model2[0].parameters(), torch.optim.AdamW, lr=1e-2, backend=backend)
    opt2.add_param_group({"params": list(model2[2].parameters()), "lr": 5e-2, "rho": 0.2})
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: torch aliases a live one
    two_step(model, opt, batch)
    two_step(model2, opt2, batch)
    assert_same([p.detach() for p in model2.parameters()], [p.detach() for p in model.parameters()])


def test_add_param_group_sampa():
    model = mlp()
    base = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    opt = SAMPa(model, sampa_loss, base, backend="cpu")
    batches = [data(s) for s in range(4)]
    opt.step(batches[0])
    opt.add_param_group({"params": list(model[2].parameters()), "lam": 0.5})
    late = [p.detach().clone() for p in model[2].parameters()]
    for b in batches[1:3]:
        opt.step(b)
    assert all(not torch.equal(a, p) for a, p in zip(late, model[2].parameters()))
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = SAMPa(model2, sampa_loss, torch.optim.SGD(model2[0].parameters(), lr=0.1, momentum=0.9), backend="cpu")
    opt2.add_param_group({"params": list(model2[2].parameters()), "lam": 0.5})
    opt2.load_state_dict(sd)
    opt.step(batches[3])
    opt2.step(batches[3])
    assert_same([p.detach() for p in model2.parameters()], [p.detach() for p in model.parameters()])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


@pytest.mark.parametrize("bad, match", [
    ({"rho": -1.0}, r"param_groups\[1\]\['rho'\]"),
    ({"lr": float("nan")}, r"param_groups\[1\]\['lr'\] must be finite"),
    ({"weight_decay": float("inf")}, r"param_groups\[1\]\['weight_decay'\] must be finite"),
    ({"betas": (0.9, float("nan"))}, r"param_groups\[1\]\['betas'\] must be finite"),
    ({"params": [torch.zeros(2)], "lr": torch.tensor(float("nan"))}, r"param_groups\[1\]\['lr'\]"),
    # what the base optimizer's own constructor refuses
    ({"lr": -0.1}, r"param_groups\[1\]: AdamW refuses these options: Invalid learning rate: -0.1"),
    ({"betas": (0.9, 1.5)}, r"param_groups\[1\]: AdamW refuses these options: Invalid beta parameter at index 1"),
    ({"eps": -1.0}, r"param_groups\[1\]: AdamW refuses these options: Invalid epsilon value: -1.0"),
])
@pytest.mark.parametrize("name", SAM_FAMILY)
def test_add_param_group_validates_before_changing_anything(name, bad, match):
    model = mlp()
    opt = make(name, model[0].parameters(), torch.optim.AdamW, lr=1e-2)
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": list(model[2].parameters()), **bad})
    assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 1
    assert opt.param_groups[0] == groups[0]
    assert model[2].weight not in opt.state
    two_step(model, opt, data())  # still steps


def test_add_param_group_validates_sampa():
    model = mlp()
    opt = SAMPa(model, sampa_loss, torch.optim.SGD(model[0].parameters(), lr=0.1))
    for bad in ({"lam": 2.0}, {"lam": float("nan")}, {"rho": float("inf")}, {"lr": float("nan")}):
        with pytest.raises(ValueError, match=r"param_groups\[1\]"):
            opt.add_param_group({"params": list(model[2].parameters()), **bad})
    assert len(opt.param_groups) == 1 and len(opt.params) == 2


# --- 6. sparse gradients ---------------------------------------------------------------------

def test_sampa_sparse_gradient_is_named():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 3, sparse=True), "head": nn.Linear(3, 1)})
    opt = SAMPa(model, lambda m, b: m["head"](m["emb"](b)).sum(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="'emb.weight': sparse gradients are not supported"):
        opt.step(torch.tensor([1, 2, 3]))
    assert_same(before, [p.detach() for p in model.parameters()])


@pytest.mark.parametrize("name", SAM_FAMILY)
def test_sparse_gradient_is_named(name):
    emb = nn.Embedding(10, 3, sparse=True)
    lin = nn.Linear(3, 2)
    opt = make(name, [{"params": list(lin.parameters())}, {"params": [emb.weight]}], torch.optim.SGD, lr=0.1)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in (*lin.parameters(), emb.weight)]
    if not gradient_before_first_step(opt):  # MSAM: the first call that reads it is second_step
        opt.first_step()
        lin(emb(torch.tensor([1, 2]))).sum().backward()
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\]: sparse gradients"):
        opt.first_step() if gradient_before_first_step(opt) else opt.second_step()
    assert_same(before, [p.detach() for p in (*lin.parameters(), emb.weight)])


# --- 7. any non-finite value, in any gradient, in either pass --------------------------------

WHERE = {"first-weight": ("first", 0), "first-bias": ("first", 3), "second-bias": ("second", 1),
         "second-weight": ("second", 2)}  # (the gradient: before first_step or at the perturbed point, parameter)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("name, where", [  # MSAM takes no gradient before first_step
    pytest.param(name, where, id=f"{name}-{wid}") for name in SAM_FAMILY for wid, where in WHERE.items()
    if where[0] == "second" or BY_NAME[name].reads_first_gradient])
def test_nonfinite_anywhere_skips_bit_for_bit(name, where, backend, device, value):
    model = mlp()
    opt = make(name, model.parameters(), torch.optim.AdamW, lr=1e-2, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    two_step(model, opt, data(0))  # state exists
    if name in PERIODIC:
        two_step(model, opt, data(3))  # the next step is a SAM step again (PSAM's period, LookSAM's k)
    before = snapshot(model, opt)
    x, y = data(1)
    params = list(model.parameters())
    if gradient_before_first_step(opt):
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if where[0] == "first":
            params[where[1]].grad.view(-1)[0] = value
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if where[0] == "second":
        params[where[1]].grad.view(-1)[0] = value
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    weights, base_state, ours, steps = snapshot(model, opt)
    if not restores_exactly(name) and where[0] == "second":
        # perturbed before the bad gradient showed: the move (nuSAM's rank-1 term, LookSAM's, MSAM's) is
        # removed by recomputing it, within one rounding of x_t (no copy of the weights: docs/guides/algorithms.md)
        for w, w0 in zip(weights, before[0]):
            torch.testing.assert_close(w, w0, **ROUNDING)
        weights = before[0]
    assert_same((weights, base_state, ours), before[:3])
    assert steps == before[3] + 1 and opt.skipped_steps == 1
    assert scaler.get_scale() == 2.0 ** 7  # backed off, as after scaler.step(opt)


@pytest.mark.parametrize("where", ["x~", "y"])
@pytest.mark.parametrize("param", ["0.weight", "2.bias"])
def test_nonfinite_anywhere_sampa(where, param):
    """A NaN in one gradient of either pass (the x~-pass on B_t, the y-pass on B_{t+1}) skips the step."""
    model = mlp()
    poison = {"on": False}

    def loss_fn(m, batch):
        x, y, tag = batch
        loss = nn.functional.cross_entropy(m(x), y)
        if poison["on"] and tag == (1 if where == "x~" else 2):
            loss = loss + dict(m.named_parameters())[param].view(-1)[0] * float("nan")
        return loss

    opt = SAMPa(model, loss_fn, torch.optim.SGD, lr=0.1, momentum=0.9, backend="cpu")
    opt.step((*data(0), 0))
    opt.step((*data(1), 1))  # B_t = batch 1 from here on
    before = snapshot(model, opt)
    poison["on"] = True
    opt.step((*data(2), 2))
    # weights and the base state as they were; g_y and the kept batch move on (docs/guides/sampa.md)
    assert_same(snapshot(model, opt)[:2], before[:2])
    assert opt.skipped_steps == 1


# --- 8. non-finite hyperparameters ---------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(lr=float("nan")), "lr"), (dict(lr=float("inf")), "lr"), (dict(rho=float("nan")), "rho"),
    (dict(momentum=float("nan")), "momentum"), (dict(weight_decay=float("inf")), "weight_decay"),
    (dict(dampening=float("nan")), "dampening"), (dict(max_grad_norm=float("inf")), "max_grad_norm"),
])
@pytest.mark.parametrize("name", SAM_FAMILY)
def test_nonfinite_hyperparameters_rejected(name, kw, match):
    model = mlp()
    kw = {"lr": 0.1, **kw}
    with pytest.raises(ValueError, match=match):
        make(name, model.parameters(), torch.optim.SGD, **kw)


@pytest.mark.parametrize("kw, match", [(dict(betas=(0.9, float("nan"))), "beta"), (dict(eps=float("nan")), "eps")])
def test_nonfinite_adam_hyperparameters_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        SAM(mlp().parameters(), torch.optim.AdamW, lr=0.1, **kw)


@pytest.mark.parametrize("kw", [dict(lam=float("nan")), dict(rho=float("inf")), dict(lr=float("nan")),
                                dict(max_grad_norm=float("nan"))])
def test_nonfinite_hyperparameters_rejected_sampa(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SAMPa(mlp(), sampa_loss, torch.optim.SGD, **{"lr": 0.1, **kw})


# --- 9. every random stream checkpointed -----------------------------------------------------

@pytest.mark.parametrize("own", [True, False], ids=["own-generator", "user-generator"])
def test_gausssam_resume_is_bit_exact(own):
    def make(model):
        gen = None if own else torch.Generator().manual_seed(5)
        return GaussSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, generator=gen, seed=11)

    batches = [data(s) for s in range(5)]
    model = mlp()
    opt = make(model)
    for b in batches[:2]:
        two_step(model, opt, b)
    sd, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    for b in batches[2:]:
        two_step(model, opt, b)
    model2 = mlp(seed=9)
    model2.load_state_dict(weights)
    opt2 = make(model2)
    torch.manual_seed(123)  # the global RNG is not what GaussSAM draws from
    opt2.load_state_dict(sd)
    for b in batches[2:]:
        two_step(model2, opt2, b)
    assert_same([p.detach() for p in model2.parameters()], [p.detach() for p in model.parameters()])


def test_gausssam_seed_from_global_rng():
    torch.manual_seed(0)
    a = GaussSAM(mlp().parameters(), torch.optim.SGD, lr=0.1)
    torch.manual_seed(0)
    b = GaussSAM(mlp().parameters(), torch.optim.SGD, lr=0.1)
    assert a.seed == b.seed


# --- 10. step(closure) returns the loss -------------------------------------------------------

@pytest.mark.parametrize("name", SAM_FAMILY)
def test_step_closure_returns_the_loss(name):
    model = mlp()
    opt = make(name, model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data()
    losses = []

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss)
        return loss

    nn.functional.cross_entropy(model(x), y).backward()
    assert opt.step(closure) is losses[0]


# --- 11. a base optimizer instance where params go ----------------------------------------------

@pytest.mark.parametrize("name", SAM_FAMILY)
def test_base_optimizer_instance_as_params(name):
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match=r"pass the base optimizer as base_optimizer= and params=None"):
        make(name, base, torch.optim.SGD)
    opt = make(name, None, base)  # the way that works
    two_step(model, opt, data())


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                     (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2))], ids=["sgd", "adamw"])
def test_init_state_creates_what_the_first_step_would(base, kw):
    """init_state() (the template a checkpoint loads into): zeros, and steps that follow are the
    steps without it, bit for bit; a base optimizer we do not fuse is refused by name."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [SAM(m.parameters(), base, rho=0.05, **kw) for m in models]
    opts[1].init_state()
    assert all(torch.count_nonzero(t) == 0 for st in opts[1].base_optimizer.state.values() for t in st.values())
    x = torch.randn(8, 4)
    for m, o in zip(models, opts):
        for _ in range(3):
            m(x).square().mean().backward()
            o.first_step(zero_grad=True)
            m(x).square().mean().backward()
            o.second_step(zero_grad=True)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
    with pytest.raises(TypeError, match="init_state: RMSprop"):
        SAM(models[0].parameters(), torch.optim.RMSprop, lr=0.1).init_state()


# --- options of other SAM libraries ------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(use_gc=True), r"SAM: use_gc=True is an option of another SAM library, not of SAM or ASGD: gradient "
                        r"centralization is not implemented"),
    (dict(perturb_eps=1e-8), r"perturb_eps=1e-08 .* fixed at 1e-12"),
    (dict(adaptive_eps=0.01), r"adaptive_eps=0.01 .* pass adaptive_offset"),
    (dict(rho_scheduler=None), r"rho_scheduler=None .* callable step -> rho"),
], ids=["use_gc", "perturb_eps", "adaptive_eps", "rho_scheduler"])
def test_peer_options_are_refused_by_name(kw, match):
    """pytorch_optimizer's optimizers take **kwargs: an option of its SAM (use_gc: gradient
    centralization) reached the base, which swallowed it, and the run silently differed."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    with pytest.raises(TypeError, match=match):
        SAM(mlp().parameters(), pytorch_optimizer.ASGD, lr=0.1, **kw)


def test_peer_options_we_follow_anyway_are_accepted():
    """What we do anyway (use_gc=False, perturb_eps=1e-12) is accepted and not passed to the base
    (torch's SGD would refuse the name); a base optimizer's own option of the same name is its own."""
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, use_gc=False, perturb_eps=1e-12)
    two_step(model, opt, data())
    assert SAM(model.parameters(), torch.optim.RMSprop, lr=0.1, alpha=0.9).param_groups[0]["alpha"] == 0.9
