"""What a step decides once (pipeline.Plans): the plans are built on the first steps and reused
while the parameters' storage, the param groups and the set of parameters with a gradient stay
the same; when autograd only moves the gradients their tables take the new addresses (a
refresh, not a rebuild); any other change rebuilds them, and the steps stay right through it."""
import pytest
import torch
from conftest import TRAJECTORY, backend_cases
from torch import nn

from sam_kernels import SAM, NuSAM

BACKENDS = backend_cases()


def mlp(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)


def step(model, opt, b, fresh_grads=False):
    opt.zero_grad(set_to_none=not fresh_grads)
    nn.functional.cross_entropy(model(b[0]), b[1]).backward()
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(b[0]), b[1]).backward()
    opt.second_step()


def batches(n, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g).to(device), torch.randint(0, 3, (8,), generator=g).to(device))
            for _ in range(n)]


def flat(model):
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("cls", [SAM, NuSAM], ids=["sam", "nusam"])
def test_plans_are_built_once_and_refreshed_when_gradients_move(backend, device, cls):
    model = mlp(device)
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    data = batches(8, device)
    for b in data[:2]:
        step(model, opt, b)
    built = opt.engine.plans.builds
    assert built == 2  # the first pass's plan and the second's
    keep = {}
    for b in data[2:5]:  # the same gradient tensors (zero_grad(set_to_none=False)): nothing to do
        step(model, opt, b, fresh_grads=True)
        keep = {id(p.grad) for p in model.parameters()}
    refreshes = opt.engine.plans.refreshes
    for b in data[5:]:  # gradients set to None and reallocated: a refresh at most, never a rebuild
        grads = [torch.empty_like(p) for p in model.parameters()]  # hold memory: new addresses for sure
        step(model, opt, b)
        del grads
    assert opt.engine.plans.builds == built and opt.engine.plans.refreshes > refreshes
    assert keep


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_changes_rebuild_the_plans_and_the_steps_stay_right(backend, device):
    """A parameter's storage replaced, a parameter without gradient, a new param group, a loaded
    state dict: rebuilt, and the trajectory is the one of an optimizer that saw the same changes
    through the list ops alone (the torch reference backend)."""
    runs = []
    for b_name in (backend, "torch"):
        model = mlp(device)
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=b_name)
        data = batches(10, device)
        for i, b in enumerate(data):
            if i == 3:
                model[0].weight.data = model[0].weight.data.clone()  # new storage
            if i == 5:
                model[2].bias.requires_grad_(False)  # no gradient from now on
            if i == 6:
                model[2].bias.requires_grad_(True)
                model[2].bias.grad = None
            if i == 7:
                opt.load_state_dict(opt.state_dict())
            step(model, opt, b)
        runs.append((flat(model), opt.engine.plans.builds))
    torch.testing.assert_close(runs[0][0], runs[1][0], **TRAJECTORY)
    assert runs[0][1] >= 2 + 4 * 2 - 1  # each change rebuilt (two plans each)
