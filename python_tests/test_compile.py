"""torch.compile: a compiled model trains the same with every optimizer, and the SAMPa ops
(like the others, in test_library.py) trace without graph breaks (fake implementations)."""
import pytest
import torch
from conftest import TRAJECTORY
from torch import nn

from sam_kernels import PSAM, SAM, GaussSAM, NuSAM, SAMPa

KW = dict(lr=0.05, momentum=0.9)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def data(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def make(name, model):
    if name == "sampa":
        return SAMPa(model, loss_fn, torch.optim.SGD, **KW)
    params = model.parameters()
    if name == "gausssam":
        return GaussSAM(params, torch.optim.SGD, generator=torch.Generator().manual_seed(0), **KW)
    if name == "psam":
        return PSAM(params, torch.optim.SGD, period=2, **KW)
    return {"sam": SAM, "nusam": NuSAM}[name](params, torch.optim.SGD, **KW)


def train(name, model, opt):
    for b in data():
        if name == "sampa":
            opt.step(b)
            continue
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step(lambda: loss_fn(model, b).backward())


@pytest.mark.parametrize("name", ["sam", "nusam", "gausssam", "psam", "sampa"])
def test_compiled_model_trains_like_the_eager_one(name):
    torch._dynamo.reset()
    eager, compiled_base = mlp(), mlp()
    compiled = torch.compile(compiled_base, backend="aot_eager")
    train(name, eager, make(name, eager))
    train(name, compiled, make(name, compiled))
    torch.testing.assert_close(flat(compiled_base), flat(eager), **TRAJECTORY)


def test_sampa_ops_trace_without_graph_breaks():
    params = [torch.randn(10), torch.randn(3, 4)]
    g, g2 = [torch.randn_like(p) for p in params], [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]

    def sampa_update(params, g, g2, bufs, xt, y):
        norm = torch.ops.sam_kernels.global_norm(g, [], 0.0)
        torch.ops.sam_kernels.sampa_preview_sgd_(params, g, xt, y, bufs, norm, 0.1, 0.05, 0.9, 0.0, False, 0.0,
                                                 False, False)
        torch.ops.sam_kernels.sampa_update_sgd_(params, g, g2, bufs, 0.2, 0.05, 0.9, 0.0, False, 0.0, False, False)
        return norm

    def outs():
        return [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]

    eager = [p.clone() for p in params], [b.clone() for b in bufs], *outs()
    sampa_update(eager[0], g, g2, eager[1], eager[2], eager[3])
    compiled = torch.compile(sampa_update, backend="aot_eager", fullgraph=True)
    xt, y = outs()
    compiled(params, g, g2, bufs, xt, y)
    for a, b in zip(params + bufs + xt + y, eager[0] + eager[1] + eager[2] + eager[3]):
        assert torch.equal(a, b)
