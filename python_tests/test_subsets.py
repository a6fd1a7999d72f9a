"""Subset perturbation (ALGORITHMS.md, "Subset perturbation"; sam_kernels/optimizers/subsets.py):
only the param groups with perturb=True are perturbed, the norm is over them, every parameter takes
the base step with its gradient at the perturbed point, the others hold no x_old; SAM-ON's groups
from a model. For every class of the SAM family (optim_db.py) on every backend that runs here."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import EXACT, TOL
from optim_db import BASES, class_backend_cases, make
from torch import nn

from sam_kernels import SAMPa, sam_on_groups

SUBSET_CLASSES = ["sam", "asam", "nusam", "gausssam", "psam"]


def model_with_norms(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 4, bias=False), nn.BatchNorm1d(4),
                         nn.Linear(4, 3))


def batch(seed=1, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def loss_of(model, b):
    return nn.functional.cross_entropy(model(b[0]), b[1])


def sam_step(model, opt, b):
    """One step through the two-pass API, both gradients on batch b."""
    loss_of(model, b).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, b).backward()
    opt.second_step(zero_grad=True)


def test_sam_on_groups_are_the_normalization_layers_affine_parameters():
    model = model_with_norms()
    model[0].bias.requires_grad_(False)
    groups = sam_on_groups(model, lr=0.1)
    norm_params = {id(p) for i in (1, 4) for p in model[i].parameters()}
    assert [g["perturb"] for g in groups] == [True, False] and all(g["lr"] == 0.1 for g in groups)
    assert {id(p) for p in groups[0]["params"]} == norm_params
    rest = {id(p) for p in model.parameters() if p.requires_grad} - norm_params
    assert {id(p) for p in groups[1]["params"]} == rest  # the frozen bias in neither
    with pytest.raises(ValueError, match="no affine parameter of a normalization layer"):
        sam_on_groups(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="sets 'perturb' itself"):
        sam_on_groups(model, perturb=False)


@pytest.mark.parametrize("name,backend,device", class_backend_cases(SUBSET_CLASSES))
def test_only_the_chosen_groups_are_perturbed(name, backend, device):
    """After first_step the unperturbed groups are x_t bit for bit and the perturbed ones moved as
    by the class alone on them (the norm over the chosen parameters only); after second_step every
    parameter took torch.optim's step from x_t with its gradient at the perturbed point."""
    model = model_with_norms().to(device)
    b = [t.to(device) for t in batch()]
    base_cls, kw = BASES["sgd"]
    opt = make(name, sam_on_groups(model), base_cls, backend=backend, **kw)
    # the same class over the chosen parameters alone: what the perturbation must be
    alone_model = copy.deepcopy(model)
    alone = make(name, sam_on_groups(alone_model)[0]["params"], base_cls, backend=backend, **kw)
    chosen = {id(p) for p in opt.param_groups[0]["params"]}
    x_t = [p.detach().clone() for p in model.parameters()]
    loss_of(model, b).backward()
    loss_of(alone_model, b).backward()
    opt.first_step(zero_grad=True)
    alone.first_step(zero_grad=True)
    for p, q, x in zip(model.parameters(), alone_model.parameters(), x_t):
        if id(p) in chosen:
            torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])
        else:
            torch.testing.assert_close(p.detach(), x, **EXACT)
    assert any(not torch.equal(p.detach(), x) for p, x in zip(model.parameters(), x_t) if id(p) in chosen) \
        or name == "nusam"  # nuSAM perturbs matrices only: a LayerNorm / BatchNorm has none
    loss_of(model, b).backward()
    grads2 = [p.grad.clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)
    # the oracle: torch's SGD from x_t with the second gradients
    ref = [nn.Parameter(x.clone()) for x in x_t]
    for r, g in zip(ref, grads2):
        r.grad = g
    base_cls(ref, **kw).step()
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach(), r.detach(), **TOL[torch.float32])


@pytest.mark.parametrize("name", ["sam", "gausssam", "psam"])
def test_unperturbed_parameters_hold_no_copy(name):
    model = model_with_norms()
    opt = make(name, sam_on_groups(model), torch.optim.SGD, lr=0.1, backend="cpu")
    b = batch()
    for _ in range(2):
        sam_step(model, opt, b)
    norm_bytes = sum(p.numel() * p.element_size() for p in opt.param_groups[0]["params"])
    assert opt.memory_report()["perturbation"] == norm_bytes  # x_old of the LayerNorm and BatchNorm only
    assert all("old_p" not in opt.state[p] for p in opt.param_groups[1]["params"])
    opt.param_groups[0]["perturb"] = False  # the other group perturbed instead: the first copies go
    opt.param_groups[1]["perturb"] = True
    first = {id(p) for p in opt.param_groups[0]["params"]}
    x_t = {id(p): p.detach().clone() for p in model.parameters()}
    loss_of(model, b).backward()
    opt.first_step(zero_grad=True)
    for p in model.parameters():
        assert torch.equal(p.detach(), x_t[id(p)]) == (id(p) in first), "the wrong group moved"
    opt.restore()
    assert opt.memory_report()["perturbation"] == sum(p.numel() * 4 for p in opt.param_groups[1]["params"])

@pytest.mark.parametrize("name,backend,device", class_backend_cases([*SUBSET_CLASSES, "msam"]))
def test_nothing_perturbed_is_a_base_step(name, backend, device):
    model = model_with_norms()
    ref_model = copy.deepcopy(model)
    opt = make(name, [{"params": list(model.parameters()), "perturb": False}], torch.optim.SGD, lr=0.1,
               momentum=0.9, backend=backend)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    b = batch()
    for _ in range(2):
        sam_step(model, opt, b)
        ref.zero_grad()
        loss_of(ref_model, b).backward()
        ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])
    if name != "nusam":  # (nuSAM keeps its warm-start vectors of every matrix: a group may be perturbed again)
        assert opt.memory_report()["perturbation"] == 0


def test_bad_perturb_option_names_the_group_and_changes_nothing():
    model = model_with_norms()
    opt = make("sam", sam_on_groups(model), torch.optim.SGD, lr=0.1)
    sd = copy.deepcopy(opt.state_dict())
    with pytest.raises(TypeError, match=r"param_groups\[2\]\['perturb'\] must be True or False .*, got 'yes'"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "perturb": "yes"})
    assert len(opt.param_groups) == 2 and opt.state_dict() == sd
    with pytest.raises(NotImplementedError, match="subset perturbation is for SAM"):
        SAMPa(model, loss_of, torch.optim.SGD([{"params": list(model.parameters()), "perturb": False}], lr=0.1))


def test_checkpoints_without_the_option_load_as_perturbed():
    """A state dict from before the option (no 'perturb' key) loads with perturb=True."""
    model = model_with_norms()
    opt = make("sam", model.parameters(), torch.optim.SGD, lr=0.1)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g.pop("perturb")
    fresh = make("sam", model.parameters(), torch.optim.SGD, lr=0.1)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["perturb"] is True
