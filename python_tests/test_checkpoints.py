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
