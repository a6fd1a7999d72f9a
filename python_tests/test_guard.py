"""The guard of a step (ops.check_grads_) and the fused updates that obey its flag, on every
backend: the flags against values computed here in float64 (clip_grad_norm_'s coefficient,
GradScaler's unscale, the skipped count, Adam's counters advanced only when the step is taken),
and a skipped update (found_inf != 0, tested as != 0, not == 1) writes nothing but the restore."""
import math

import pytest
import torch
from conftest import DTYPES, EXACT, KERNEL_BACKENDS, assert_close, backend_cases, pairwise, poison, step_counts

from sam_kernels import backends, ops

BACKENDS = backend_cases()


def make(sizes, dtype, device, scale=1.0):
    return [(torch.randn(n) * scale).to(device=device, dtype=dtype) for n in sizes]


def expected_flags(grads, grads2=None, lam=0.0, first_norm_bad=False, found=None, scale=None, max_norm=None,
                   skipped=0.0):
    d = [g.double() for g in grads] if grads2 is None else [(1 - lam) * g.double() + lam * h.double()
                                                           for g, h in zip(grads, grads2)]
    n = math.sqrt(sum(float((t ** 2).sum()) for t in d)) if d else 0.0
    bad = first_norm_bad or (found is not None and found != 0) or not math.isfinite(n)
    inv = 1.0 / scale if scale is not None else 1.0
    norm = n * inv
    mul = inv * min(1.0, max_norm / (norm + 1e-6)) if max_norm is not None else inv
    return float(bad), mul, norm, skipped + float(bad)


CASES = [
    dict(),
    dict(scale=2.0 ** 7),
    dict(max_norm=0.5),
    dict(max_norm=1e9),
    dict(scale=2.0 ** 7, max_norm=0.5),
    dict(nan=True),
    dict(inf=True, scale=2.0 ** 7),
    dict(first_norm=float("nan")),
    dict(first_norm=float("inf")),
    dict(first_norm=1.5),
    dict(found=0.0),
    dict(found=1.0),
    dict(found=-2.0),  # any non-zero value skips: found_inf is a sum over devices in GradScaler
    dict(mix=0.3, max_norm=0.5),
    dict(mix=0.0, nan2=True),  # lam = 0: the second gradient's NaN still skips (0 * NaN)
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_check_grads_flags(backend, device, case, dtype):
    sizes = [7, 0, 4099, 300]
    grads = make(sizes, dtype, device, 0.1 * (case.get("scale") or 1.0))
    grads2 = make(sizes, dtype, device, 0.1) if "mix" in case else None
    if case.get("nan"):
        grads[2][17] = float("nan")
    if case.get("inf"):
        grads[3][0] = float("inf")
    if case.get("nan2"):
        grads2[0][3] = float("nan")
    first_norm = torch.tensor([1.0, case["first_norm"]], device=device) if "first_norm" in case else None
    found = torch.tensor(case["found"], device=device) if "found" in case else None
    scale = torch.tensor(case["scale"], device=device) if "scale" in case else None
    flags = torch.tensor([float("nan"), float("nan"), float("nan"), 3.0], device=device)  # poisoned but the count
    steps = torch.tensor([4.0, 9.0, 1.0], device=device)
    mask = torch.tensor([1.0, 0.0, 1.0], device=device)
    ops.check_grads_(grads, flags, grads2=grads2, lam=case.get("mix", 0.0), first_norm=first_norm, scale=scale,
                     found_inf=found, max_norm=case.get("max_norm"), steps=steps, steps_mask=mask, backend=backend)
    want = expected_flags([g.cpu() for g in grads], [g.cpu() for g in grads2] if grads2 else None,
                          case.get("mix", 0.0), first_norm is not None and not math.isfinite(case["first_norm"]),
                          case.get("found"), case.get("scale"), case.get("max_norm"), skipped=3.0)
    got = flags.cpu().tolist()
    assert got[0] == want[0] and got[3] == want[3]
    if not want[0]:  # a skipped step's multiplier and norm are not used
        assert got[1] == pytest.approx(want[1], rel=2e-5) and got[2] == pytest.approx(want[2], rel=2e-5)
    taken = 1.0 - want[0]
    assert steps.cpu().tolist() == [4.0 + taken, 9.0, 1.0 + taken]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_check_grads_without_steps_or_clipping_and_empty(backend, device):
    flags = torch.zeros(4, device=device)
    ops.check_grads_([torch.zeros(0, device=device)], flags, backend=backend)
    assert flags.cpu().tolist() == [0.0, 1.0, 0.0, 0.0]


# --- the fused updates obey the flag ------------------------------------------------------------

def _state(sizes, dtype, device):
    return {"bufs": make(sizes, dtype, device), "m": make(sizes, dtype, device, 0.1),
            "v": [t.abs() for t in make(sizes, dtype, device, 0.01)]}


def _run(op, backend, device, x, x_old, g, g2, st, sizes, found_inf, grad_scale):
    steps = step_counts(len(sizes), 2, device)
    adam = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled=True, state_steps=steps)
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    guard = dict(found_inf=found_inf, grad_scale=grad_scale, backend=backend)
    if op == "restore_sgd":
        ops.restore_sgd_(x, x_old, g, st["bufs"], **sgd, **guard)
    elif op == "restore_adam":
        ops.restore_adam_(x, x_old, g, st["m"], st["v"], **adam, **guard)
    elif op == "sampa_update_sgd":
        ops.sampa_update_sgd_(x, g, g2, st["bufs"], lam=0.3, **sgd, **guard)
    elif op == "sampa_update_adam":
        ops.sampa_update_adam_(x, g, g2, st["m"], st["v"], lam=0.3, **adam, **guard)
    elif op == "shift_restore_sgd":
        ops.shift_restore_sgd_(x, g, st["bufs"], norm=SHIFT_NORM.to(device), rho=0.05, **sgd, **guard)
    elif op == "shift_restore_adam":
        ops.shift_restore_adam_(x, g, st["m"], st["v"], norm=SHIFT_NORM.to(device), rho=0.05, **adam, **guard)
    elif op == "restore":
        ops.restore_(x, x_old, found_inf, backend=backend)
    else:  # nuSAM: n x 1 matrices, x_old = M - s u v^T
        mats = [t.reshape(-1, 1) for t in x]
        us = [torch.linspace(-1, 1, n, device=device) for n in sizes]
        vs = [torch.ones(1, device=device) for _ in sizes]
        scales = torch.full((len(sizes),), 0.25, device=device)
        gm = [t.reshape(-1, 1) for t in g]
        if op == "rank1_restore_sgd":
            ops.rank1_restore_sgd_(mats, us, vs, scales, gm, [b.reshape(-1, 1) for b in st["bufs"]], **sgd, **guard)
        else:
            ops.rank1_restore_adam_(mats, us, vs, scales, gm, [t.reshape(-1, 1) for t in st["m"]],
                                    [t.reshape(-1, 1) for t in st["v"]], **adam, **guard)


UPDATES = ["restore", "restore_sgd", "restore_adam", "sampa_update_sgd", "sampa_update_adam", "rank1_restore_sgd",
           "rank1_restore_adam", "shift_restore_sgd", "shift_restore_adam"]
SHIFT_NORM = torch.tensor(3.0)  # MSAM's move: x_t = x + 0.05 d / 3 along the buffers (SGD's bufs, Adam's m)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op,found,dtype", pairwise({
    "op": [(op, op) for op in UPDATES],
    "found": [("1", 1.0), ("-3", -3.0), ("nan", float("nan")), ("0", 0.0)],
    "dtype": [("fp32", torch.float32), ("bf16", torch.bfloat16)]}))
def test_updates_obey_found_inf(backend, device, op, found, dtype):
    """found_inf != 0 (NaN included: it is not 0): SAM's x <- x_old, nuSAM's x <- M - s u v^T,
    MSAM's x <- x + s d, SAMPa's and restore_'s nothing, and no state written, while the gradient holds NaN. found_inf
    == 0: the same as without a flag (the torch reference, the same grad_scale)."""
    if op.startswith("rank1") and backends.why_unavailable(backend, torch.device(device), "rank1_update_"):
        pytest.skip("no CUDA C++ rank-1 kernels (Triton is nuSAM's GPU path)")
    sizes = [5, 4100, 33]
    x, x_old = make(sizes, dtype, device), make(sizes, dtype, device)
    g, g2 = make(sizes, dtype, device), make(sizes, dtype, device)
    st = _state(sizes, dtype, device)
    flag = torch.tensor(found, device=device)
    scale = torch.tensor(0.5, device=device)
    if found != 0:
        g[1][7] = float("nan")  # a skipped step's gradient is what must not reach anything
        x0, st0 = [t.clone() for t in x], {k: [t.clone() for t in v] for k, v in st.items()}
        ref_x = [t.clone() for t in x]
        if op in ("restore_sgd", "restore_adam"):
            ref_x = [t.clone() for t in x_old]
        elif op.startswith("shift"):  # MSAM's way back only, as shift_ on this backend takes it
            ops.shift_(ref_x, st["bufs" if op.endswith("sgd") else "m"], SHIFT_NORM.to(device), 0.05,
                       backend=backend)
        elif op.startswith("rank1"):
            ref_x = [t.clone() for t in x]
            ops.rank1_update_([t.reshape(-1, 1) for t in ref_x],
                              [torch.linspace(-1, 1, n, device=device) for n in sizes],
                              [torch.ones(1, device=device) for _ in sizes], torch.full((3,), -0.25, device=device),
                              backend="torch")
        _run(op, backend, device, x, x_old, g, g2, st, sizes, flag, scale)
        for a, b in zip(x, ref_x):
            assert_close(a, b) if op.startswith("rank1") else torch.testing.assert_close(a, b, **EXACT)
        for k in st:
            for a, b in zip(st[k], st0[k]):
                assert torch.equal(a, b), f"{op}: state '{k}' written by a skipped step"
        if op in ("restore", "sampa_update_sgd", "sampa_update_adam"):
            for a, b in zip(x, x0):
                assert torch.equal(a, b)
    else:
        xr, str_ = [t.clone() for t in x], {k: [t.clone() for t in v] for k, v in st.items()}
        _run(op, backend, device, x, x_old, g, g2, st, sizes, flag, scale)
        _run(op, "torch", device, xr, x_old, g, g2, str_, sizes, None, scale)
        for a, b in zip(x + sum(st.values(), []), xr + sum(str_.values(), [])):
            assert_close(a, b)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_restore_commits_integer_buffers_as_float_views(backend, device):
    """SAMPa commits integer buffers (num_batches_tracked) through restore_ on float views of
    their bits: exact for any value, and only where the step is taken."""
    b = torch.tensor([7, -1, 2 ** 40 + 3], dtype=torch.int64, device=device)
    new = torch.tensor([8, 0, 2 ** 40 + 4], dtype=torch.int64, device=device)
    ops.restore_([b.view(torch.float64)], [new.view(torch.float64)], torch.tensor(1.0, device=device),
                 backend=backend)
    assert b.cpu().tolist() == [7, -1, 2 ** 40 + 3]
    ops.restore_([b.view(torch.float64)], [new.view(torch.float64)], torch.tensor(0.0, device=device),
                 backend=backend)
    assert torch.equal(b, new)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_adam_bias_corrections_come_from_each_tensors_counter(backend, device, dtype):
    """Tensors of one launch at different step counts (a parameter that joined later): each gets
    its own bias corrections, read on the device."""
    sizes = [9, 4100, 31]
    x_old, g = make(sizes, dtype, device), make(sizes, dtype, device)
    m0, v0 = make(sizes, dtype, device, 0.1), [t.abs() for t in make(sizes, dtype, device, 0.01)]
    steps = [torch.tensor(s, device=device) for s in (1.0, 7.0, 1000.0)]
    outs = {}
    for b in (backend, "torch"):
        x = [poison(torch.empty_like(t)) for t in x_old]
        m, v = [t.clone() for t in m0], [t.clone() for t in v0]
        ops.restore_adam_(x, x_old, g, m, v, state_steps=steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                          backend=b)
        outs[b] = x + m + v
    for a, r in zip(outs[backend], outs["torch"]):
        assert_close(a, r)
