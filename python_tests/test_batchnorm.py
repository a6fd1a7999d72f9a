"""The BatchNorm helpers (sam_kernels/integrations/batchnorm.py): the second pass leaves every BatchNorm buffer
bit for bit whatever flows through it (an inf made the reference's momentum-0 update NaN for
good), num_batches_tracked counts the first pass only, momentum is never changed, and between
the helpers the model evaluates and saves as it should."""
import copy

import pytest
import torch
from torch import nn

from sam_kernels import SAM, disable_running_stats, enable_running_stats


def model_with_bn(momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=momentum), nn.Tanh(), nn.Linear(6, 3))


def buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e30], ids=["inf", "nan", "huge"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_second_pass_leaves_the_buffers_bit_for_bit(bad, momentum):
    model = model_with_bn(momentum)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    enable_running_stats(model)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    after_first = buffers(model)
    disable_running_stats(model)
    poisoned = x.clone()
    poisoned[0, 0] = bad  # the second pass sees a non-finite (or overflowing) batch statistic
    nn.functional.cross_entropy(model(poisoned), y).backward()
    assert all(torch.equal(after_first[k], v) for k, v in buffers(model).items())
    assert model.state_dict()["1.num_batches_tracked"] == 1  # the first pass only, also mid-step
    assert model[1].momentum == momentum
    opt.second_step(zero_grad=True)
    assert opt.skipped_steps == (0 if bad == 1e30 else 1)
    assert all(torch.equal(after_first[k], v) for k, v in buffers(model).items())
    assert all(torch.isfinite(v).all() for v in buffers(model).values())


def test_between_the_helpers_the_model_evaluates_and_saves_as_after_the_first_pass():
    model = model_with_bn()
    x = torch.randn(8, 4)
    enable_running_stats(model)
    model(x)
    reference = copy.deepcopy(model)
    disable_running_stats(model)
    disable_running_stats(model)  # idempotent
    model(x * 3)
    model.eval()
    reference.eval()
    assert torch.equal(model(x), reference(x))  # eval reads the running statistics: nothing to call
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    model.train()
    enable_running_stats(model)
    enable_running_stats(model)
    model(x)
    assert int(model[1].num_batches_tracked) == 2 and model[1].track_running_stats


def test_layers_without_running_statistics_are_left_alone():
    bn = nn.BatchNorm1d(3, track_running_stats=False)
    model = nn.Sequential(bn)
    disable_running_stats(model)
    enable_running_stats(model)
    assert bn.track_running_stats is False and bn.running_mean is None
