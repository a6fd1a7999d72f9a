"""SAMPa's primitives (the preview of the base step with the perturbed point, and the update with
the mixed gradient) on every available backend against the pure-torch reference."""
import pytest
import torch
from conftest import DTYPES, KERNEL_BACKENDS, assert_close, pairwise, poison, step_counts
from hypothesis import given
from hypothesis import strategies as st
from test_ops import ADAM_CONFIGS, SGD_CONFIGS, _settings, _sizes, clone_all, make

from sam_kernels import ops
from sam_kernels.ops import reference

# the size / dtype cases of SAMPa's ops: the mixed list in every dtype, one large and one empty
# list in fp32 (the size logic is test_ops.py's, shared with these kernels)
SIZE_DIM = [(f"mixed-{str(dt)[6:]}", ([0, 1, 7, 4095, 4096, 4097, 33, 65537, 3, 300], dt)) for dt in DTYPES] + [
    ("large-float32", ([262_147], torch.float32)), ("empty", ([0], torch.float32))]
SGD_DIM = [(f"{name}-{'init' if init else 'buf'}", (cfg, init))
           for cfg, name in zip(SGD_CONFIGS, ["plain", "momentum-wd", "nesterov", "dampening-maximize"])
           for init in ([False, True] if cfg["momentum"] else [False])]
ADAM_DIM = list(zip(["adam", "adam-l2", "adamw", "adamw-amsgrad-max"], ADAM_CONFIGS))
# lam = 0.2 (the endpoints 0 and 1 take another path: their own test below) and 0.7
LAM_DIM = [("lam0.2", 0.2), ("lam0.7", 0.7)]


def adam_state(sizes, dtype, device):
    m = make(sizes, dtype, device, 0.1)
    v = [t.abs() for t in make(sizes, dtype, device, 0.01)]
    vmax = [t.abs() for t in make(sizes, dtype, device, 0.01)]
    return [m, v, vmax]


def adam_kw(cfg, sizes, device, beta1=0.9, step=3):
    """The preview reads count 3 and previews step 4; the update takes step 3."""
    return dict(lr=1e-3, beta1=beta1, beta2=0.999, eps=1e-8, state_steps=step_counts(len(sizes), step, device), **cfg)


def preview_outputs(x):
    return [poison(torch.empty_like(t)) for t in x], [poison(torch.empty_like(t)) for t in x]


# --- preview: x~ = x + rho g / ||g|| and y = the base step from x, the state left as it was ------

@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("sizes,dtype,cfg,init_bufs", pairwise({"sizes,dtype": SIZE_DIM, "cfg,init_bufs": SGD_DIM}))
def test_preview_sgd(backend, device, sizes, dtype, cfg, init_bufs):
    x, g, bufs = make(sizes, dtype, device), make(sizes, dtype, device), make(sizes, dtype, device)
    x0, bufs0 = clone_all(x), clone_all(bufs)
    norm = ops.global_norm(g, backend="torch").to(device)
    xt, y = preview_outputs(x)
    xt_ref, y_ref = preview_outputs(x)
    kw = dict(norm=norm, rho=0.05, lr=0.1, init_bufs=init_bufs, **cfg)
    ops.sampa_preview_sgd_(x, g, xt, y, bufs, backend=backend, **kw)
    ops.sampa_preview_sgd_(x, g, xt_ref, y_ref, bufs, backend="torch", **kw)
    for a, b in zip(xt + y, xt_ref + y_ref):
        assert_close(a, b)
    for a, b in zip(x + bufs, x0 + bufs0):
        assert torch.equal(a, b), "the preview must not write x or the momentum buffers"


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("sizes,dtype,cfg", pairwise({"sizes,dtype": SIZE_DIM, "cfg": ADAM_DIM}))
def test_preview_adam(backend, device, sizes, dtype, cfg):
    x, g = make(sizes, dtype, device), make(sizes, dtype, device)
    state = adam_state(sizes, dtype, device)
    x0, state0 = clone_all(x), [clone_all(s) for s in state]
    norm = ops.global_norm(g, backend="torch").to(device)
    xt, y = preview_outputs(x)
    xt_ref, y_ref = preview_outputs(x)
    kw = dict(norm=norm, rho=0.05, **adam_kw(cfg, sizes, device))
    ops.sampa_preview_adam_(x, g, xt, y, *state, backend=backend, **kw)
    ops.sampa_preview_adam_(x, g, xt_ref, y_ref, *state, backend="torch", **kw)
    for a, b in zip(xt + y, xt_ref + y_ref):
        assert_close(a, b)
    for a, b in zip(x + sum(state, []), x0 + sum(state0, [])):
        assert torch.equal(a, b), "the preview must not write x or the moments"


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_preview_matches_torch_optim_sgd(backend, device):
    """y is where torch.optim.SGD itself would move x with gradient g (its state untouched)."""
    x = [torch.randn(300, device=device), torch.randn(17, 5, device=device)]
    g = [torch.randn_like(t) for t in x]
    params = [torch.nn.Parameter(t.clone()) for t in x]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    for p, gg in zip(params, g):  # one step so that momentum buffers exist
        p.grad = torch.randn_like(gg)
    opt.step()
    x = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"] for p in params]
    xt, y = preview_outputs(x)
    ops.sampa_preview_sgd_(x, g, xt, y, bufs, norm=ops.global_norm(g), rho=0.1, lr=0.1, momentum=0.9,
                           weight_decay=1e-3, nesterov=True, backend=backend)
    for p, gg in zip(params, g):
        p.grad = gg
    opt.step()
    for a, p in zip(y, params):
        assert_close(a, p.detach())


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_preview_with_nonfinite_norm_keeps_the_perturbed_point_at_x(backend, device, bad):
    x = [torch.randn(100, device=device), torch.randn(7, device=device)]
    g = [torch.randn_like(t) for t in x]
    xt, y = preview_outputs(x)
    ops.sampa_preview_sgd_(x, g, xt, y, norm=torch.tensor(bad, device=device), rho=0.1, lr=0.1, backend=backend)
    for a, b in zip(xt, x):
        assert torch.equal(a, b)


# --- update: the base step from x with d = (1 - lam) g~ + lam g_y' ---------------------------

@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("sizes,dtype,lam,cfg,init_bufs", pairwise(
    {"sizes,dtype": SIZE_DIM, "lam": LAM_DIM, "cfg,init_bufs": SGD_DIM}))
def test_update_sgd(backend, device, sizes, dtype, cfg, init_bufs, lam):
    x, g, g2 = make(sizes, dtype, device), make(sizes, dtype, device), make(sizes, dtype, device)
    bufs = [poison(b) for b in make(sizes, dtype, device)] if init_bufs else make(sizes, dtype, device)
    x_ref, bufs_ref = clone_all(x), clone_all(bufs)
    kw = dict(lr=0.1, init_bufs=init_bufs, **cfg)
    ops.sampa_update_sgd_(x, g, g2, bufs, lam=lam, backend=backend, **kw)
    ops.sampa_update_sgd_(x_ref, g, g2, bufs_ref, lam=lam, backend="torch", **kw)
    for a, b in zip(x + (bufs if cfg["momentum"] else []), x_ref + (bufs_ref if cfg["momentum"] else [])):
        assert_close(a, b)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("sizes,dtype,lam,cfg", pairwise({"sizes,dtype": SIZE_DIM, "lam": LAM_DIM, "cfg": ADAM_DIM}))
def test_update_adam(backend, device, sizes, dtype, cfg, lam):
    x, g, g2 = make(sizes, dtype, device), make(sizes, dtype, device), make(sizes, dtype, device)
    state = adam_state(sizes, dtype, device)
    x_ref, state_ref = clone_all(x), [clone_all(s) for s in state]
    ops.sampa_update_adam_(x, g, g2, *state, lam=lam, backend=backend, **adam_kw(cfg, sizes, device))
    ops.sampa_update_adam_(x_ref, g, g2, *state_ref, lam=lam, backend="torch", **adam_kw(cfg, sizes, device))
    n_state = 3 if cfg["amsgrad"] else 2
    for got, want in zip([x] + state[:n_state], [x_ref] + state_ref[:n_state]):
        for a, b in zip(got, want):
            assert_close(a, b)


def test_update_rejects_lam_outside_the_unit_interval():
    x = [torch.zeros(3)]
    with pytest.raises(ValueError, match="lam must be in \\[0, 1\\], got 1.5"):
        ops.sampa_update_sgd_(x, x, x, lam=1.5, lr=0.1)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_sampa_ops_stage_non_contiguous_tensors(backend, device):
    base = torch.randn(37, 29, device=device)
    x, g, g2 = [base.t()], [torch.randn(37, 29, device=device).t()], [torch.randn(29, 37, device=device)]
    xt, y = [torch.empty(37, 29, device=device).t()], [torch.empty(37, 29, device=device).t()]
    assert not any(t.is_contiguous() for t in x + g + xt + y)
    ops.sampa_preview_sgd_(x, g, xt, y, norm=ops.global_norm(g), rho=0.1, lr=0.1, backend=backend)
    xt_ref, y_ref = [torch.empty(29, 37)], [torch.empty(29, 37)]
    ops.sampa_preview_sgd_([t.cpu() for t in x], [t.cpu() for t in g], xt_ref, y_ref, norm=ops.global_norm(g).cpu(),
                           rho=0.1, lr=0.1, backend="torch")
    for a, b in zip(xt + y, xt_ref + y_ref):
        assert_close(a, b)
    x_ref = [x[0].cpu().clone()]
    ops.sampa_update_sgd_(x, g, g2, lam=0.3, lr=0.1, backend=backend)
    ops.sampa_update_sgd_(x_ref, [g[0].cpu()], [g2[0].cpu()], lam=0.3, lr=0.1, backend="torch")
    assert_close(x[0], x_ref[0])


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@_settings
@given(sizes=_sizes, rho=st.floats(0, 2), lr=st.floats(0, 1), momentum=st.floats(0, 0.99), wd=st.floats(0, 0.1),
       nesterov=st.booleans(), lam=st.floats(0, 1), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_sampa_sgd(backend, device, sizes, rho, lr, momentum, wd, nesterov, lam, dtype):
    x, g, g2, bufs = (make(sizes, dtype, device) for _ in range(4))
    norm = ops.global_norm(g)
    kw = dict(lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov and momentum > 0)
    outs = [preview_outputs(x), preview_outputs(x)]
    for (xt, y), b in zip(outs, (backend, "torch")):
        ops.sampa_preview_sgd_(x, g, xt, y, bufs, norm=norm, rho=rho, backend=b, **kw)
    for a, b in zip(outs[0][0] + outs[0][1], outs[1][0] + outs[1][1]):
        assert_close(a, b)
    x_ref, bufs_ref = clone_all(x), clone_all(bufs)
    ops.sampa_update_sgd_(x, g, g2, bufs, lam=lam, backend=backend, **kw)
    ops.sampa_update_sgd_(x_ref, g, g2, bufs_ref, lam=lam, backend="torch", **kw)
    for a, b in zip(x + bufs, x_ref + bufs_ref):
        assert_close(a, b)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@_settings
@given(sizes=_sizes, lr=st.floats(1e-5, 1e-1), beta1=st.floats(0, 0.99), beta2=st.floats(0.5, 0.9999),
       wd=st.floats(0, 0.1), decoupled=st.booleans(), amsgrad=st.booleans(), step=st.integers(1, 1000),
       lam=st.floats(0, 1))
def test_property_sampa_adam(backend, device, sizes, lr, beta1, beta2, wd, decoupled, amsgrad, step, lam):
    dtype = torch.float32
    x, g, g2 = (make(sizes, dtype, device) for _ in range(3))
    state = adam_state(sizes, dtype, device)
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=wd, decoupled=decoupled, amsgrad=amsgrad,
              state_steps=step_counts(len(sizes), step, device))
    outs = [preview_outputs(x), preview_outputs(x)]
    for (xt, y), b in zip(outs, (backend, "torch")):
        ops.sampa_preview_adam_(x, g, xt, y, *state, norm=ops.global_norm(g), rho=0.1, backend=b, **kw)
    for a, b in zip(outs[0][0] + outs[0][1], outs[1][0] + outs[1][1]):
        assert_close(a, b)
    x_ref, state_ref = clone_all(x), [clone_all(s) for s in state]
    ops.sampa_update_adam_(x, g, g2, *state, lam=lam, backend=backend, **kw)
    ops.sampa_update_adam_(x_ref, g, g2, *state_ref, lam=lam, backend="torch", **kw)
    for a, b in zip(x + state[0] + state[1], x_ref + state_ref[0] + state_ref[1]):
        assert_close(a, b)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_update_at_the_endpoints_reads_one_gradient(backend, device, lam):
    """lam = 0 / 1 is the base step with the one gradient it weighs (the reference's mix with
    zeros for the other), and the other is not read (NaN there changes nothing), for SGD and Adam."""
    sizes = [7, 4097]  # fp32: the Triton interpreter rounds fp32 -> bf16 toward zero (conftest.TOL)
    x, g = make(sizes, torch.float32, device), make(sizes, torch.float32, device)
    unused, zeros = [poison(t.clone()) for t in g], [torch.zeros_like(t) for t in g]
    grads, grads2 = (g, unused) if lam == 0 else (unused, g)
    ref_grads, ref_grads2 = (g, zeros) if lam == 0 else (zeros, g)
    bufs = make(sizes, torch.float32, device)
    x_ref, bufs_ref = clone_all(x), clone_all(bufs)
    kw = dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.0, maximize=True)
    ops.sampa_update_sgd_(x, grads, grads2, bufs, lam=lam, backend=backend, **kw)
    reference.sampa_update_sgd_(x_ref, ref_grads, ref_grads2, bufs_ref, lam=lam, init_bufs=False, **kw)
    for a, b in zip(x + bufs, x_ref + bufs_ref):
        assert_close(a, b)
    state = adam_state(sizes, torch.float32, device)
    state_ref = [clone_all(s) for s in state]
    akw = adam_kw(ADAM_CONFIGS[0], sizes, device)
    ops.sampa_update_adam_(x, grads, grads2, *state, lam=lam, backend=backend, **akw)
    reference.sampa_update_adam_(x_ref, ref_grads, ref_grads2, *state_ref[:3], lam=lam, **akw)
    for a, b in zip(x + state[0] + state[1], x_ref + state_ref[0] + state_ref[1]):
        assert_close(a, b)
