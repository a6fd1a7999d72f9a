"""Checkpoints: torch.distributed.checkpoint round trips in one process (the FSDP2 ones on gloo
ranks are in test_fsdp.py), and checkpoints of the peers (pytorch_optimizer's SAM, davda54's
SAM layout) loaded into ours, or refused by load_state_dict with a clear error, never at a
later step."""
from __future__ import annotations

import copy
import tempfile
import warnings

import pytest
import torch
from conftest import PEER_STEPS
from torch import nn

from sam_kernels import SAM, GaussSAM, NuSAM

BASES = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2))}


def mlp(frozen_bias=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    if frozen_bias:
        model[0].bias.requires_grad_(False)  # never a gradient: no state, in torch's optimizers too
    return model


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def sam_step(model, opt, b):
    x, y = b
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("how", ["state_dict", "torch_helpers"])
@pytest.mark.parametrize("base", BASES)
def test_dcp_round_trip_with_a_parameter_that_never_gets_a_gradient(base, how):
    """dcp.save, then a new model and optimizer whose template state is what torch's helper makes
    (init_state(), or get_optimizer_state_dict's step at lr 0): every key of the template is in
    the checkpoint (init_state() made state for a frozen bias, which no step creates), and the
    resumed run is the unbroken one bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    cls, kw = BASES[base]
    model = mlp()
    opt = SAM(model.parameters(), cls, rho=0.05, **kw)
    for s in range(2):
        sam_step(model, opt, batch(s))
    with tempfile.TemporaryDirectory() as ckpt, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no process group is initialized
        dcp.save({"model": model.state_dict(),
                  "optim": get_optimizer_state_dict(model, opt) if how == "torch_helpers" else opt.state_dict()},
                 checkpoint_id=ckpt)
        model2 = mlp()
        opt2 = SAM(model2.parameters(), cls, rho=0.05, **kw)
        if how == "state_dict":
            opt2.init_state()
        state = {"model": model2.state_dict(),
                 "optim": get_optimizer_state_dict(model2, opt2) if how == "torch_helpers" else opt2.state_dict()}
        dcp.load(state, checkpoint_id=ckpt)
        model2.load_state_dict(state["model"])
        if how == "torch_helpers":
            set_optimizer_state_dict(model2, opt2, state["optim"])
        else:
            opt2.load_state_dict(state["optim"])
    for s in range(2, 4):
        sam_step(model, opt, batch(s))
        sam_step(model2, opt2, batch(s))
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(model2)))


@pytest.mark.parametrize("cls", [SAM, NuSAM, GaussSAM], ids=["sam", "nusam", "gausssam"])
def test_init_state_makes_the_template_torch_makes(cls):
    """init_state() creates state for exactly the parameters torch's _init_optim_state would."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model, ref_model = mlp(), mlp()
    opt = cls(model.parameters(), torch.optim.AdamW, lr=1e-2)
    opt.init_state()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    _init_optim_state(ref)
    ours, theirs = opt.state_dict()["state"], ref.state_dict()["state"]
    assert sorted(ours) == sorted(theirs) == [0, 2, 3]
    assert all(sorted(ours[k]) == sorted(theirs[k]) for k in ours)


def test_dcp_partial_load_for_a_module_unused_in_the_forward():
    """A parameter that requires a gradient and never gets one has no state in the checkpoint (as
    with torch's optimizers) but has one in the template: DCP's allow_partial_load leaves its
    zero state, which is what its first step would start from; the run resumes bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    def build():
        model = mlp(frozen_bias=False)
        model.append(nn.Linear(3, 3))  # not called in the forward below
        return model, SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    def step(model, opt, s):
        x, y = batch(s)
        nn.functional.cross_entropy(model[:3](x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model[:3](x), y).backward()
        opt.second_step(zero_grad=True)

    model, opt = build()
    step(model, opt, 0)
    with tempfile.TemporaryDirectory() as ckpt, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"optim": opt.state_dict()}, checkpoint_id=ckpt)
        model2, opt2 = build()
        model2.load_state_dict(model.state_dict())
        opt2.init_state()
        state = {"optim": opt2.state_dict()}
        dcp.load(state, checkpoint_id=ckpt, planner=DefaultLoadPlanner(allow_partial_load=True))
        opt2.load_state_dict(state["optim"])
    for s in range(1, 3):
        step(model, opt, s)
        step(model2, opt2, s)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(model2)))


def davda54_state_dict(model, rho=0.05, **kw):
    """The layout of davda54/sam's SAM.state_dict(): its own state (x_old as "old_p", the base's
    momentum not saved) and groups with rho, adaptive and the base optimizer's options."""
    params = list(model.parameters())
    group = {"rho": rho, "adaptive": False, "lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0,
             "nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": None, **kw,
             "params": list(range(len(params)))}
    return {"state": {i: {"old_p": p.detach().clone()} for i, p in enumerate(params)}, "param_groups": [group]}


def test_pytorch_optimizer_checkpoint_loads_and_steps_like_it():
    """pytorch_optimizer's SAM saved after two steps, loaded into ours (its groups lack our
    options: they take our defaults), then both take two more steps: the same weights."""
    import pytorch_optimizer

    theirs_model, ours_model = mlp(frozen_bias=False), mlp(frozen_bias=False)
    theirs = pytorch_optimizer.SAM(theirs_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for s in range(2):
        x, y = batch(s)
        nn.functional.cross_entropy(theirs_model(x), y).backward()
        theirs.first_step(zero_grad=True)
        nn.functional.cross_entropy(theirs_model(x), y).backward()
        theirs.second_step(zero_grad=True)
    ours_model.load_state_dict(theirs_model.state_dict())
    ours = SAM(ours_model.parameters(), torch.optim.SGD, rho=0.01, lr=0.5)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert ours.param_groups[0]["adaptive_offset"] == 0.0 and ours.param_groups[0]["rho"] == 0.05
    for s in range(2, 4):
        x, y = batch(s)
        for m, o in ((theirs_model, theirs), (ours_model, ours)):
            nn.functional.cross_entropy(m(x), y).backward()
            o.first_step(zero_grad=True)
            nn.functional.cross_entropy(m(x), y).backward()
            o.second_step(zero_grad=True)
    for a, b in zip(weights(theirs_model), weights(ours_model)):
        torch.testing.assert_close(a, b, **PEER_STEPS)


def test_davda54_checkpoint_loads_without_its_scratch():
    model = mlp(frozen_bias=False)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.load_state_dict(davda54_state_dict(model, rho=0.07))
    assert opt.param_groups[0]["rho"] == 0.07
    assert all("old_p" not in st for st in opt.base_optimizer.state.values())
    sam_step(model, opt, batch(0))
    assert sorted(opt.state_dict()["state"][0]) == ["momentum_buffer"]


@pytest.mark.parametrize("bad,match", [
    (dict(rho=-1.0), r"param_groups\[0\]\['rho'\] must be a finite number >= 0, got -1.0"),
    (dict(lr=-0.1), r"param_groups\[0\]: SGD refuses these options: Invalid learning rate: -0.1"),
    (dict(adaptive_offset=float("nan")), r"param_groups\[0\]\['adaptive_offset'\] must be finite"),
    ("shape", r"state\[0\]\['momentum_buffer'\] has shape \(3,\), its parameter \(6, 4\)"),
    ("groups", r"the checkpoint has 2 param groups, this optimizer 1"),
], ids=["rho", "lr", "offset", "shape", "groups"])
def test_a_checkpoint_that_cannot_be_used_is_refused_at_load(bad, match):
    """Refused by load_state_dict, naming what is wrong, with nothing changed (never a KeyError
    or a crash at the next step)."""
    model = mlp(frozen_bias=False)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sam_step(model, opt, batch(0))
    before = copy.deepcopy(opt.state_dict())
    sd = davda54_state_dict(model)
    if bad == "shape":
        sd["state"][0]["momentum_buffer"] = torch.zeros(3)
    elif bad == "groups":
        sd["param_groups"].append(dict(sd["param_groups"][0], params=[]))
    else:
        sd["param_groups"][0].update(bad)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][k][n], v) for k, st in before["state"].items() for n, v in st.items())
    sam_step(model, opt, batch(1))
