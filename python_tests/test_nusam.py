"""nuSAM / nuSAM-Norm / GaussSAM (ALGORITHMS.md, "nuSAM"): the power iteration against
torch.linalg.svd, the rank-1 oracle, the layer scaling of nuSAM-Norm, what is (not) perturbed,
restore drift, parity with an exact-SVD reference and across backends, Figure 1 of the paper,
memory, resume and failures."""
import io
import math

import pytest
import torch
from conftest import (
    FP64_SPEC,
    HALF_RANK1,
    NORM_RTOL,
    NUSAM_BACKENDS,
    NUSAM_KERNEL_BACKENDS,
    NUSAM_TRAJECTORY,
    TOL,
    TRAJECTORY,
    poison,
    step_counts,
)

from sam_kernels import SAM, GaussSAM, NuSAM, ops

BACKENDS = NUSAM_BACKENDS
# A known result over many iterations (conftest.py's rule): the fast tier where the kernels run
# natively, the interpreter's in the slow tier (the fast tier checks its power iteration against
# the reference step by step below)
CONVERGENCE_BACKENDS = [pytest.param(*c.values, id=c.id, marks=pytest.mark.slow) if c.values == ("triton", "cpu")
                        else c for c in NUSAM_BACKENDS]


def rank1_tol(dtype):
    return TOL[torch.float32] if dtype == torch.float32 else HALF_RANK1


def planted(n, m, gap=3.0, dtype=torch.float32, seed=0):
    """A random n x m matrix with singular values gap, 1, 1/2, ...: a clear top pair."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, m)
    q1, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    s = torch.tensor([gap] + [1.0 / (i + 1) for i in range(k - 1)], dtype=torch.float64)
    return ((q1 * s) @ q2.t()).to(dtype)


SHAPES = [(1, 9), (9, 1), (1, 1), (40, 7), (7, 40), (33, 33), (130, 70)]


@pytest.mark.parametrize("backend,device", CONVERGENCE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_power_iteration_finds_the_top_singular_pair(backend, device, dtype):
    mats = [planted(n, m, dtype=dtype, seed=i).to(device) for i, (n, m) in enumerate(SHAPES)]
    mats.append(planted(20, 30, seed=99).to(device).t())  # a non-contiguous (transposed) gradient
    g = torch.Generator().manual_seed(5)
    us = [torch.nn.functional.normalize(torch.randn(m.shape[0], generator=g), dim=0).to(device) for m in mats]
    vs = [poison(torch.empty(m.shape[1], device=device)) for m in mats]
    sigmas = poison(torch.empty(len(mats), device=device))
    ops.power_iteration_(mats, us, vs, sigmas, iters=40, backend=backend)
    for m, u, v, s in zip(mats, us, vs, sigmas):
        U, S, Vh = torch.linalg.svd(m.double().cpu())
        assert abs(abs(float(u.double().cpu() @ U[:, 0])) - 1) < 1e-5
        assert abs(abs(float(v.double().cpu() @ Vh[0])) - 1) < 1e-5
        assert float(s) == pytest.approx(float(S[0]), rel=1e-5)
        assert float(u.cpu() @ m.float().cpu() @ v.cpu()) > 0  # u v^T points along G


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_power_iteration_matches_reference_per_step_and_warm_start(backend, device):
    mats = [torch.randn(n, m, device=device) for n, m in SHAPES]
    g = torch.Generator().manual_seed(1)
    start = [torch.nn.functional.normalize(torch.randn(m.shape[0], generator=g), dim=0).to(device) for m in mats]
    outs = {}
    for b in (backend, "torch"):
        us = [u.clone() for u in start]
        vs = [torch.empty(m.shape[1], device=device) for m in mats]
        sig = torch.empty(len(mats), device=device)
        ops.power_iteration_(mats, us, vs, sig, iters=1, backend=b)
        outs[b] = (us, vs, sig)
    for a, r in zip(outs[backend][0] + outs[backend][1], outs["torch"][0] + outs["torch"][1]):
        torch.testing.assert_close(a.cpu(), r.cpu(), **TOL[torch.float32])
    torch.testing.assert_close(outs[backend][2].cpu(), outs["torch"][2].cpu(), **TOL[torch.float32])
    # warm start: from the exact top u, one iteration returns the exact pair
    m = planted(30, 20).to(device)
    U, S, Vh = torch.linalg.svd(m.double().cpu())
    u = [U[:, 0].float().to(device)]
    v = [torch.empty(20, device=device)]
    sig = torch.empty(1, device=device)
    ops.power_iteration_([m], u, v, sig, iters=1, backend=backend)
    assert abs(float(v[0].double().cpu() @ Vh[0])) == pytest.approx(1, abs=1e-6)
    assert float(sig[0]) == pytest.approx(float(S[0]), rel=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_prepared_power_iteration_starts_from_the_warm_vectors_and_keeps_them(backend, device):
    """The step plans' form: the warm starts read, never written (a skipped step keeps them), u into
    separate candidates; the same as the list op from a copy of the warm starts; tables reused when
    called again on new values at the same addresses."""
    mats = [torch.randn(n, m, device=device) for n, m in SHAPES + [(64, 128)]]
    g = torch.Generator().manual_seed(3)
    warm = [torch.nn.functional.normalize(torch.randn(m.shape[0], generator=g), dim=0).to(device) for m in mats]
    warm0 = [w.clone() for w in warm]
    cands = [poison(torch.empty_like(w)) for w in warm]
    vs = [poison(torch.empty(m.shape[1], device=device)) for m in mats]
    sig = poison(torch.empty(len(mats), device=device))
    run = ops.prepare("power_iteration", backend, torch.device(device), mats=mats, us=cands, vs=vs, warm=warm)
    for _ in range(2):
        for m in mats:
            m.normal_()
        run(sigmas=sig, iters=2, tau=1e-12)
        us_ref, vs_ref = [w.clone() for w in warm], [torch.empty_like(v) for v in vs]
        sig_ref = torch.empty_like(sig)
        ops.power_iteration_(mats, us_ref, vs_ref, sig_ref, iters=2, backend="torch")
        for a, r in zip(cands + vs + [sig], us_ref + vs_ref + [sig_ref]):
            torch.testing.assert_close(a.cpu(), r.cpu(), **NUSAM_TRAJECTORY)
        assert all(torch.equal(w, w0) for w, w0 in zip(warm, warm0))


@pytest.mark.parametrize("backend,device", NUSAM_BACKENDS)
@pytest.mark.parametrize("case", ["plain", "normalized", "mixed", "nan", "inf", "empty"])
def test_rank1_scales(backend, device, case):
    """s_i = rho_i, or rho_i sigma_i / sqrt(sum of the normalized sigma_j^2) (nuSAM-Norm), all 0 when a
    sigma is not finite; first_norm = sum of the sigmas. Against float64 values computed here."""
    k = 0 if case == "empty" else 7
    sigmas = torch.rand(k, dtype=torch.float64) * 3
    if case == "nan":
        sigmas[3] = float("nan")
    if case == "inf":
        sigmas[0] = float("inf")
    rho = torch.linspace(0.05, 0.4, k, dtype=torch.float64)
    normed = torch.tensor([{"plain": 0, "normalized": 1}.get(case, i % 2) for i in range(k)], dtype=torch.float64)
    c = math.sqrt(float((sigmas[normed != 0] ** 2).sum())) if k else 0.0
    want = torch.where(normed != 0, rho * sigmas / (c + 1e-12), rho)
    if not torch.isfinite(sigmas).all():
        want = torch.zeros_like(want)
    scales, first_norm = poison(torch.empty(k, device=device)), poison(torch.empty(1, device=device))
    ops.rank1_scales_(sigmas.float().to(device), rho.float().to(device), normed.float().to(device), scales,
                      first_norm[0], backend=backend)
    torch.testing.assert_close(scales.cpu().double(), want, rtol=NORM_RTOL, atol=0)
    total = float(sigmas.sum())
    if math.isfinite(total):
        assert first_norm.item() == pytest.approx(total, rel=1e-5)
    else:
        assert not math.isfinite(first_norm.item())


@pytest.mark.parametrize("backend,device", NUSAM_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_rank1_primitives_match_reference(backend, device, dtype):
    shapes = SHAPES + [(300, 257)]
    us = [torch.randn(n, device=device) for n, _ in shapes]
    vs = [torch.randn(m, device=device) for _, m in shapes]
    scales = torch.randn(len(shapes), device=device)
    scales[2] = 0.0
    us[2][0] = float("nan")  # a zero scale must ignore whatever the vectors hold
    base = [torch.randn(n, m, device=device).to(dtype) for n, m in shapes]
    got, ref = [b.clone() for b in base], [b.clone() for b in base]
    ops.rank1_update_(got, us, vs, scales, backend=backend)
    ops.rank1_update_(ref, us, vs, scales, backend="torch")
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.float().cpu(), r.float().cpu(), **rank1_tol(dtype))
    assert torch.equal(got[2], base[2])
    grads = [torch.randn_like(b) for b in base]
    for kind in ("sgd", "adam"):
        outs = []
        for b in (backend, "torch"):
            xs = [x.clone() for x in base]
            if kind == "sgd":
                bufs = [torch.ones_like(x) for x in xs]
                ops.rank1_restore_sgd_(xs, us, vs, scales, grads, bufs, lr=0.1, momentum=0.9, weight_decay=1e-2,
                                       backend=b)
                outs.append(xs + bufs)
            else:
                ms = [torch.full_like(x, 0.1) for x in xs]
                vv = [torch.full_like(x, 0.01) for x in xs]
                ops.rank1_restore_adam_(xs, us, vs, scales, grads, ms, vv, lr=1e-2, beta1=0.9, beta2=0.999,
                                        eps=1e-8, weight_decay=1e-2, decoupled=True,
                                        state_steps=step_counts(len(xs), 2, device), backend=b)
                outs.append(xs + ms + vv)
        tol = rank1_tol(dtype)
        for a, r in zip(*outs):
            torch.testing.assert_close(a.float().cpu(), r.float().cpu(), **tol)


def mlp(conv=False, device="cpu"):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 17), torch.nn.LayerNorm(17), torch.nn.Tanh(), torch.nn.Linear(17, 9), torch.nn.Tanh(),
              torch.nn.Linear(9, 1)]
    if conv:
        layers = [torch.nn.Conv1d(1, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(12, 17)] + layers[1:]
    return torch.nn.Sequential(*layers).to(device)


def batches(steps, device="cpu", conv=False):
    g = torch.Generator().manual_seed(1)
    shape = (32, 1, 6) if conv else (32, 6)
    return [(torch.randn(*shape, generator=g).to(device), torch.randn(32, 1, generator=g).to(device))
            for _ in range(steps)]


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step(lambda: loss_fn(model, x, y).backward())
    return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])


def test_rank1_gradient_gives_exactly_sams_perturbation():
    a, b = torch.randn(7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    deltas = []
    for cls in (NuSAM, SAM):
        M = torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
        start = M.detach().clone()
        opt = cls([M], torch.optim.SGD, rho=0.3, lr=0.1)
        (a @ M @ b).backward()  # gradient a b^T: rank 1
        opt.first_step()
        deltas.append(M.detach() - start)
        opt.restore()
    torch.testing.assert_close(deltas[0], deltas[1], **FP64_SPEC)
    G = torch.outer(a, b)
    torch.testing.assert_close(deltas[1], 0.3 * G / G.norm(), **FP64_SPEC)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nusam_norm_scales_layers_by_their_top_singular_values(backend, device):
    Ms = [torch.nn.Parameter(torch.zeros(n, m, device=device)) for n, m in [(30, 20), (12, 40)]]
    G = [planted(30, 20, gap=4.0).to(device), planted(12, 40, gap=2.0, seed=3).to(device)]
    opt = NuSAM(Ms, torch.optim.SGD, rho=0.5, power_iters=40, normalized=True, lr=0.1, backend=backend)
    for M, g in zip(Ms, G):
        M.grad = g.clone()
    opt.first_step()
    sig = torch.tensor([float(torch.linalg.svdvals(g.double().cpu())[0]) for g in G])
    want = 0.5 * sig / sig.norm()
    for M, w in zip(Ms, want):
        nuclear = torch.linalg.matrix_norm(M.detach().double().cpu(), ord="nuc")
        assert float(nuclear) == pytest.approx(float(w), rel=1e-4)
    opt.restore()


@pytest.mark.parametrize("conv", ["skip", "reshape"])
def test_only_matrices_are_perturbed(conv):
    model = mlp(conv=True)
    opt = NuSAM(model.parameters(), torch.optim.SGD, rho=0.5, conv=conv, lr=0.1)
    x, y = batches(1, conv=True)[0]
    loss_fn(model, x, y).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.first_step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        if p.dim() == 2:
            assert moved, n
        elif p.dim() == 3:
            assert moved == (conv == "reshape"), n
        else:
            assert not moved, f"{n} (not a matrix) must not be perturbed"
    opt.restore()
    loss_fn(model, x, y).backward()
    opt.step(lambda: loss_fn(model, x, y).backward())
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters()), "every parameter is updated"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_restore_drift_stays_at_rounding_level(backend, device):
    model = mlp(device=device)
    start = [p.detach().clone() for p in model.parameters()]
    opt = NuSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0, backend=backend)
    train(model, opt, batches(40, device))
    for p, s in zip(model.parameters(), start):
        assert (p - s).abs().max().item() < 40 * 2e-7 * max(1.0, s.abs().max().item())


def exact_svd_nusam(model, base_cls, kw, data, rho):
    """nuSAM with the exact top singular pair (torch.linalg.svd), one matrix at a time."""
    mats = [p for p in model.parameters() if p.dim() == 2]
    base = base_cls(model.parameters(), **kw)
    for x, y in data:
        base.zero_grad()
        loss_fn(model, x, y).backward()
        terms = []
        with torch.no_grad():
            for M in mats:
                U, S, Vh = torch.linalg.svd(M.grad.double())
                t = (rho * torch.outer(U[:, 0], Vh[0])).to(M.dtype)
                M.add_(t)
                terms.append(t)
        base.zero_grad()
        loss_fn(model, x, y).backward()
        with torch.no_grad():
            for M, t in zip(mats, terms):
                M.sub_(t)
        base.step()
    return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])


# Not Triton through the interpreter (60 interpreted power iterations per step are slow): its
# power iteration meets the exact top singular pair in test_power_iteration_finds_the_top_singular_pair
# and its trajectories agree with the other backends' in test_backends_agree
@pytest.mark.parametrize("backend,device,base", [
    pytest.param(*c.values, base, id=f"{base}-{c.id}") for c in BACKENDS for base in ("sgd", "adamw")
    if c.values[0] != "triton" or c.values[1] == "cuda"])
def test_trajectory_matches_exact_svd_reference_with_many_power_iterations(backend, device, base):
    base_cls, kw = ((torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)) if base == "sgd"
                    else (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)))
    data = batches(8, device)
    model = mlp(device=device)
    ours = train(model, NuSAM(model.parameters(), base_cls, rho=0.2, power_iters=60, backend=backend, **kw), data)
    ref = exact_svd_nusam(mlp(device=device), base_cls, kw, data, rho=0.2)
    torch.testing.assert_close(ours, ref, **NUSAM_TRAJECTORY)


@pytest.mark.parametrize("backend,device", NUSAM_KERNEL_BACKENDS)
@pytest.mark.parametrize("normalized", [False, True], ids=["nusam", "nusam-norm"])
def test_backends_agree(backend, device, normalized):
    data = batches(6, device)
    runs = []
    for b in (backend, "torch"):
        model = mlp(device=device)
        runs.append(train(model, NuSAM(model.parameters(), torch.optim.AdamW, rho=0.2, normalized=normalized,
                                       backend=b, lr=1e-2), data))
    torch.testing.assert_close(runs[0], runs[1], **NUSAM_TRAJECTORY)


def test_figure_1_gradient_direction_matters():
    """Seed 002, Figure 1: f(X) = 1/2 ||X - B||^2, eta_k = 1/(k + 2), rho = 0.1: SAM and nuSAM
    drive the gradient norm far lower than a random (Gaussian) perturbation of the same size."""
    def run(cls, steps=2000, **kw):
        B = torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        X = torch.nn.Parameter(torch.zeros(10, 10, dtype=torch.float64))
        opt = cls([X], torch.optim.SGD, rho=0.1, lr=0.5, **kw)
        best = float("inf")

        def closure():
            loss = 0.5 * ((X - B) ** 2).sum()
            loss.backward()
            return loss

        for k in range(steps):
            opt.param_groups[0]["lr"] = 1.0 / (k + 2)
            opt.zero_grad()
            closure()
            best = min(best, float((X.grad ** 2).sum()))
            opt.step(closure)
        return best

    sam, nusam = run(SAM), run(NuSAM)
    gauss = run(GaussSAM, generator=torch.Generator().manual_seed(0))
    assert gauss > 1e-6
    assert sam < gauss * 1e-3 and nusam < gauss * 1e-3, (sam, nusam, gauss)


def transformer_mlp(dim=256, blocks=2):
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                   torch.nn.Linear(4 * dim, dim)]
    return torch.nn.Sequential(*layers)


def test_memory_report():
    x = torch.randn(8, 256)
    reports = {}
    for cls in (SAM, NuSAM):
        model = transformer_mlp()
        opt = cls(model.parameters(), torch.optim.SGD, lr=0.1)
        model(x).square().mean().backward()
        opt.step(lambda: model(x).square().mean().backward())
        reports[cls.__name__] = opt.memory_report()
    param_bytes = sum(p.numel() * 4 for p in transformer_mlp().parameters())
    assert reports["SAM"]["perturbation"] == param_bytes
    assert 0 < reports["NuSAM"]["perturbation"] <= 0.01 * param_bytes
    assert reports["NuSAM"]["base_state"] == reports["SAM"]["base_state"] == 0  # SGD without momentum


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_state_dict_resume_is_bit_exact(backend, device):
    data = batches(8, device)
    model = mlp(device=device)
    opt = NuSAM(model.parameters(), torch.optim.AdamW, rho=0.2, backend=backend, lr=1e-2)
    train(model, opt, data[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    straight = train(model, opt, data[4:])
    model2 = mlp(device=device)
    opt2 = NuSAM(model2.parameters(), torch.optim.AdamW, rho=0.2, backend=backend, lr=1e-2, seed=123)
    ck = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert torch.equal(train(model2, opt2, data[4:]), straight)


@pytest.mark.parametrize("which", ["first", "second"])
def test_nonfinite_gradient_skips_and_keeps_the_warm_start(which):
    model = mlp()
    opt = NuSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    train(model, opt, batches(2))
    params = [p.detach().clone() for p in model.parameters()]
    us = {k: v["u"].clone() for k, v in opt.vectors.items() if "u" in v}
    x, y = batches(1)[0]
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    if which == "first":
        model[0].weight.grad[0, 0] = float("nan")

    def closure():
        loss_fn(model, x, y).backward()
        if which == "second":
            model[5].bias.grad[0] = float("inf")

    opt.step(closure)
    assert opt.skipped_steps == 1
    for p, s in zip(model.parameters(), params):
        if which == "first":
            assert torch.equal(p, s)  # no perturbation was applied at all
        else:
            assert (p - s).abs().max() < 1e-6  # perturbation removed: rounding level
    for k, u in us.items():
        assert torch.equal(opt.vectors[k]["u"], u)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(power_iters=0), r"power_iters must be an integer >= 1, got 0"),
    (dict(conv="flatten"), r"conv must be one of \('skip', 'reshape'\), got 'flatten'"),
    (dict(rho=-1.0), r"rho must be a finite number >= 0, got -1.0"),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        NuSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_gauss_sam_ignores_the_gradient():
    deltas = []
    for scale in (1.0, -5.0):
        M = torch.nn.Parameter(torch.ones(6, 4))
        opt = GaussSAM([M], torch.optim.SGD, rho=0.2, lr=0.1, generator=torch.Generator().manual_seed(7))
        M.grad = torch.full_like(M, scale)
        opt.first_step()
        deltas.append(M.detach() - 1.0)
        opt.restore()
    assert torch.equal(deltas[0], deltas[1])
    assert deltas[0].norm().item() == pytest.approx(0.2, rel=1e-5)


# --- property-based: any shapes (empty and degenerate ones included), scales, iterations -----

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_shapes = st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70)), min_size=1, max_size=5)


@pytest.mark.parametrize("backend,device", NUSAM_KERNEL_BACKENDS)
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=_shapes, iters=st.integers(1, 3), scale=st.floats(-2, 2),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_power_iteration_and_rank1(backend, device, shapes, iters, scale, dtype):
    g = torch.Generator().manual_seed(len(shapes) * 100 + iters)
    mats = [torch.randn(n, m, generator=g).to(dtype).to(device) for n, m in shapes]
    start = [torch.nn.functional.normalize(torch.randn(n, generator=g), dim=0).to(device) for n, _ in shapes]
    outs = {}
    for b in (backend, "torch"):
        us = [u.clone() for u in start]
        vs = [poison(torch.empty(m, device=device)) for _, m in shapes]
        sig = poison(torch.empty(len(shapes), device=device))
        ops.power_iteration_(mats, us, vs, sig, iters=iters, backend=b)
        outs[b] = (us, vs, sig)
    for a, r in zip(outs[backend][0] + outs[backend][1] + [outs[backend][2]],
                    outs["torch"][0] + outs["torch"][1] + [outs["torch"][2]]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.cpu(), r.cpu(), **NUSAM_TRAJECTORY)
    us, vs, _ = outs["torch"]
    scales = torch.full((len(shapes),), scale, device=device)
    got, ref = [m.clone() for m in mats], [m.clone() for m in mats]
    ops.rank1_update_(got, us, vs, scales, backend=backend)
    ops.rank1_update_(ref, us, vs, scales, backend="torch")
    tol = rank1_tol(dtype)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.float().cpu(), r.float().cpu(), **tol)


def test_generic_path_for_other_base_optimizers():
    """Any torch.optim optimizer: the rank-1 term is removed, then its own step runs."""
    data = batches(5)
    model = mlp()
    ours = train(model, NuSAM(model.parameters(), torch.optim.RMSprop, rho=0.2, power_iters=60, lr=1e-2), data)
    ref = exact_svd_nusam(mlp(), torch.optim.RMSprop, dict(lr=1e-2), data, rho=0.2)
    torch.testing.assert_close(ours, ref, **NUSAM_TRAJECTORY)


def test_nusam_with_an_instance_and_lr_scheduler():
    model = mlp()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = NuSAM(None, base_optimizer=base, rho=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, y in batches(3):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step(lambda: loss_fn(model, x, y).backward())
        sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)
    assert opt.param_groups[0]["rho"] == 0.1


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_conv_reshape_keeps_the_base_state_on_the_parameters(base):
    """conv="reshape" updates conv kernels through matrix views: the base optimizer's state must
    stay keyed by the parameters, shaped like them, and carried across steps (a regression: it
    was keyed by the per-step views, so momentum restarted every step and the state grew)."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(8 * 6 * 6, 4))

    def make(m, lr):
        if base == "sgd":
            return NuSAM(m.parameters(), torch.optim.SGD, rho=0.05, conv="reshape", lr=lr, momentum=0.9)
        return NuSAM(m.parameters(), torch.optim.AdamW, rho=0.05, conv="reshape", lr=lr, weight_decay=1e-2)

    fused_model, generic_model = model(), model()
    fused = make(fused_model, 0.05 if base == "sgd" else 1e-3)
    generic = make(generic_model, torch.tensor(0.05 if base == "sgd" else 1e-3))  # tensor lr: the unfused path
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)
        for m, opt in ((fused_model, fused), (generic_model, generic)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step(lambda: torch.nn.functional.cross_entropy(m(x), y).backward())
    params = list(fused_model.parameters())
    assert set(map(id, fused.base_optimizer.state)) == set(map(id, params))
    for p in params:
        for t in fused.base_optimizer.state[p].values():
            assert t.dim() == 0 or t.shape == p.shape
    for a, b in zip(params, generic_model.parameters()):
        torch.testing.assert_close(a, b, **TRAJECTORY)


@pytest.mark.parametrize("bad,message", [
    ("vector", r"mats\[1\] must be a matrix, got shape \(5,\)"),
    ("u_size", r"us\[1\] must be a float32 vector of 4 values, got torch.float32 \(3,\)"),
    ("v_dtype", r"vs\[0\] must be a float32 vector of 3 values, got torch.float16 \(3,\)"),
])
def test_rank1_primitives_reject_bad_vectors_before_touching_anything(bad, message):
    mats = [torch.randn(2, 3), torch.randn(4, 6)]
    us, vs = [torch.randn(2), torch.randn(4)], [torch.randn(3), torch.randn(6)]
    if bad == "vector":
        mats[1] = torch.randn(5)
    elif bad == "u_size":
        us[1] = torch.randn(3)
    else:
        vs[0] = vs[0].half()
    before = [t.clone() for t in mats + us + vs]
    with pytest.raises(ValueError, match=message):
        ops.rank1_update_(mats, us, vs, torch.ones(2))
    assert all(torch.equal(a, b) for a, b in zip(mats + us + vs, before))
