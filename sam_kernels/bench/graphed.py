"""Whole training steps, eager and captured as CUDA graphs (python -m sam_kernels.bench --graphed):
eager SGD, graphed SGD (the step captured by hand), and for SAM, ASAM, NuSAM, GaussSAM and PSAM
our eager step and our graphed step (sam_kernels.make_graphed_step), beside the peer: a torch-only
SAM (foreach ops + fused SGD, no sync) captured whole by hand. All timed in the same interleaved
rounds (median and spread); also the seconds warm-up + capture took for each graphed case.

Models: timm's resnet18 at CIFAR size (32x32, fp32) and ViT-S/16 (224, bf16 autocast) when timm is
installed (the GPU image), else the CIFAR ResNet-20 of models.py (for a CPU smoke run, where
"graphed" steps run eagerly: make_graphed_step's fallback)."""
from __future__ import annotations

import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from .. import PSAM, SAM, GaussSAM, NuSAM, SAMPa, make_graphed_step
from .models import MODELS
from .output import optimizer_name
from .timing import device_name

KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
RHO = 0.05
CASES = ("sgd", "sgd_graphed", "peer_sam_graphed", "sam", "sam_graphed", "asam_graphed", "nusam_graphed",
         "gausssam_graphed", "psam_graphed", "sampa", "sampa0_graphed", "sampa_graphed",
         # the limit of SAMPa's overlap: one forward-backward pass, two independent ones one after
         # the other, and two forked onto two streams, each captured whole
         "one_pass_graphed", "two_passes_graphed", "two_passes_forked_graphed")


def _models(device):
    """name -> (build(), batch, input size, autocast dtype or None)."""
    try:
        import timm
    except ImportError:
        return {"resnet20": (MODELS["resnet20"], 32, 32, None)}
    return {"resnet18_cifar": (lambda: timm.create_model("resnet18", num_classes=10), 128, 32, None),
            "vit_s16_bf16": (lambda: timm.create_model("vit_small_patch16_224", num_classes=10), 64, 224,
                             torch.bfloat16)}


def _loss_fn(device, dtype):
    def loss_fn(model, batch):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                            cache_enabled=False):
            return F.cross_entropy(model(batch[0]), batch[1])
    return loss_fn


def _batches(n, batch, size, device):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g).to(device),
             torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(n)]


def _ours(name, params, model=None, loss_fn=None):
    kw = dict(KW, capturable=True)
    if name in ("sampa", "sampa0"):  # parallel="auto": two streams inside a graph, sequential in eager mode
        return SAMPa(model, loss_fn, torch.optim.SGD, rho=0.1, lam=0.0 if name == "sampa0" else 0.2, **kw)
    if name == "sam":
        return SAM(params, torch.optim.SGD, rho=RHO, **kw)
    if name == "asam":
        return SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, **kw)
    if name == "nusam":
        return NuSAM(params, torch.optim.SGD, rho=0.1, conv="reshape", **kw)
    if name == "gausssam":
        return GaussSAM(params, torch.optim.SGD, rho=RHO, seed=0, **kw)
    return PSAM(params, torch.optim.SGD, rho=RHO, period=5, **kw)


def _captured(body, static, device):
    """step(batch): copy the batch into `static` and run body() (no arguments; it reads `static`):
    on CUDA captured whole by hand after 3 warm-up runs on a side stream, as torch's graph notes
    show, and replayed; elsewhere eagerly."""
    if device.type != "cuda":
        def eager(b):
            for s, t in zip(static, b):
                s.copy_(t)
            return body()
        return eager
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()

    def step(b):
        for s, t in zip(static, b):
            s.copy_(t, non_blocking=True)
        graph.replay()
        return out
    return step


def _by_hand(model, loss_fn, batch, sam: bool, device):
    """The peer: SGD, or a torch-only SAM (foreach ops, fused SGD), captured whole by hand after a
    warm-up on a side stream, as torch's graph notes show. Returns step(batch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.SGD(params, fused=fused, foreach=not fused, **KW)
    static = [t.clone() for t in batch]

    def body():
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model, static)
        loss.backward()
        if sam:
            with torch.no_grad():
                grads = [p.grad for p in params]
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                e = torch._foreach_mul(grads, RHO / (norm + 1e-12))
                torch._foreach_add_(params, e)
            opt.zero_grad(set_to_none=False)
            loss_fn(model, static).backward()
            with torch.no_grad():
                torch._foreach_sub_(params, e)
        opt.step()
        return loss.detach()

    return _captured(body, static, device)


def _passes(model, other, loss_fn, batch, name, device):
    """Forward-backward passes only (no optimizer), captured whole: of `model` alone, or of `model`
    and the independent `other` one after the other or forked onto a second stream (joined
    before the capture ends). Returns step(batch)."""
    static = [t.clone() for t in batch]
    params = [p for m in (model, other) for p in m.parameters()]
    side = torch.cuda.Stream() if device.type == "cuda" else None

    def body():
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        if name == "two_passes_forked_graphed" and side is not None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # the whole pass, forward included: backward follows its forward's stream
                loss_fn(other, static).backward()
            loss = loss_fn(model, static)
            loss.backward()
            torch.cuda.current_stream().wait_stream(side)
            return loss.detach()
        loss = loss_fn(model, static)
        loss.backward()
        if name != "one_pass_graphed":
            loss_fn(other, static).backward()
        return loss.detach()

    return _captured(body, static, device)


def _case(name, build, loss_fn, data, device):
    """A zero-argument callable running one training step of case `name` on the next batch, and the
    seconds its warm-up and capture took."""
    torch.manual_seed(0)
    model = build().to(device).train()
    batches = itertools.cycle(data)
    t0 = time.perf_counter()
    if name in ("sgd", "sam"):  # eager
        opt = (torch.optim.SGD(model.parameters(), foreach=True, **KW) if name == "sgd"
               else _ours("sam", list(model.parameters())))

        def eager():
            b = next(batches)
            opt.zero_grad()
            loss_fn(model, b).backward()
            if name == "sgd":
                opt.step()
                return
            opt.first_step(zero_grad=True)
            loss_fn(model, b).backward()
            opt.second_step()
        return eager, 0.0
    if name == "sampa":  # eager
        opt = _ours("sampa", None, model, loss_fn)
        return (lambda: opt.step(next(batches))), 0.0
    if name in ("sgd_graphed", "peer_sam_graphed"):
        step = _by_hand(model, loss_fn, data[0], name == "peer_sam_graphed", device)
    elif name.endswith("passes_graphed") or name == "one_pass_graphed":
        torch.manual_seed(1)
        other = build().to(device).train()
        step = _passes(model, other, loss_fn, data[0], name, device)
    else:
        opt = _ours(name[:-len("_graphed")], list(model.parameters()), model, loss_fn)
        step = make_graphed_step(model, loss_fn, opt, data[0], warmup=3)
        for _ in range(4 + (5 if name.startswith("psam") else 0)):  # warm-up, capture (PSAM: both kinds)
            step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    setup_s = time.perf_counter() - t0
    return (lambda: step(next(batches))), setup_s


def run_graphed(device, reps: int = 20, warmup: int = 5, models=None, batch_size: int = 0) -> list[dict]:
    """The records of every case on every model (models: a subset of the names; batch_size: instead of
    each model's own)."""
    records = []
    for model_name, (build, batch, size, dtype) in _models(device).items():
        if models and model_name not in models:
            continue
        batch = batch_size or batch
        data = _batches(4, batch, size, device)
        loss_fn = _loss_fn(device, dtype)
        fns, setup = {}, {}
        for name in CASES:
            fns[name], setup[name] = _case(name, build, loss_fn, data, device)
        samples = {name: [] for name in fns}
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(reps):  # interleaved rounds: every case sees the same machine state
            for name, fn in fns.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                for _ in range(5):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                samples[name].append((time.perf_counter() - t) / 5 * 1e3)
        for name, xs in samples.items():
            records.append({"op": "graphed_step", "model": model_name, "case": name, "batch": batch,
                            "dtype": str(dtype or torch.float32).replace("torch.", ""), "device": device_name(device),
                            "median_ms": statistics.median(xs), "min_ms": min(xs), "max_ms": max(xs),
                            "setup_s": setup[name], "graphed": device.type == "cuda" and name.endswith("_graphed")})
        del fns
    return records


def table(records) -> str:
    rows = [r for r in records if r["op"] == "graphed_step"]
    if not rows:
        return ""
    ms = {(r["model"], r["case"]): r["median_ms"] for r in rows}
    lines = ["| model | batch | dtype | step | graphed | median ms (min-max) | vs eager SGD | vs graphed SGD "
             "| vs torch-only SAM graphed by hand | warm-up + capture s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def ratio(case):
            t = ms.get((r["model"], case))
            return f"{r['median_ms'] / t:.2f}x" if t else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {optimizer_name(r['case'])} | "
                     f"{'yes' if r['graphed'] else 'no'} "
                     f"| {r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | {ratio('sgd')} | "
                     f"{ratio('sgd_graphed')} | {ratio('peer_sam_graphed')} | {r['setup_s']:.2f} |")
    return "\n".join(lines)
