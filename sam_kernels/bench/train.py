"""Whole training steps (forward, backward, optimizer) of SGD, SAM, SAMPa and pytorch-optimizer's
SAM on the models of models.py, all timed in the same interleaved rounds. SAM's step is two
dependent passes; SAMPa's two passes are independent (two CUDA streams on a GPU): the ratio
SAMPa / SAM of one run is the number the paper's claim is about."""
from __future__ import annotations

import itertools

import torch

from .. import PSAM, SAM, NuSAM, SAMPa
from .models import MODELS, SIZES, cross_entropy, synthetic_batches
from .output import optimizer_name
from .timing import device_name, median_ms_interleaved

OPTIMIZERS = ("sgd", "sam", "nusam", "psam", "sampa", "peer_sam")
KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def _has_peer() -> bool:
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        return False
    return True


def train_step_case(model_name: str, optimizer: str, batch: int, device, backend: str = "auto"):
    """A zero-argument callable running one training step on the next synthetic batch; its
    `tensors` attribute lists what exists before the first step (the model and the data)."""
    torch.manual_seed(0)
    model = MODELS[model_name]().to(device).train()
    data = synthetic_batches(4, batch, device)
    fn = _train_step_fn(model, optimizer, itertools.cycle(data), backend)
    fn.tensors = list(model.parameters()) + list(model.buffers()) + [t for b in data for t in b]
    return fn


def _train_step_fn(model, optimizer: str, batches, backend: str):
    if optimizer == "sampa":
        opt = SAMPa(model, cross_entropy, torch.optim.SGD, rho=0.1, lam=0.2, backend=backend, **KW)

        def sampa_step():
            opt.step(next(batches))
        return sampa_step
    if optimizer == "sgd":
        base = torch.optim.SGD(model.parameters(), foreach=True, **KW)

        def sgd_step():
            base.zero_grad()
            cross_entropy(model, next(batches)).backward()
            base.step()
        return sgd_step
    if optimizer == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, **KW)
    elif optimizer == "nusam":
        opt = NuSAM(model.parameters(), torch.optim.SGD, rho=0.1, conv="reshape", backend=backend, **KW)
    elif optimizer == "psam":  # the thesis' setting before E: a SAM step every 20 steps
        opt = PSAM(model.parameters(), torch.optim.SGD, rho=0.05, period=20, backend=backend, **KW)

        def psam_step():
            _closure_step(model, opt, next(batches))
        return psam_step
    else:
        import pytorch_optimizer

        opt = pytorch_optimizer.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **KW)

    def sam_step():
        b = next(batches)
        opt.zero_grad()
        cross_entropy(model, b).backward()
        opt.first_step(zero_grad=True)
        cross_entropy(model, b).backward()
        opt.second_step(zero_grad=True)
    return sam_step


def _closure_step(model, opt, b):
    opt.zero_grad()
    cross_entropy(model, b).backward()
    opt.step(lambda: cross_entropy(model, b).backward())


def run_train_steps(device, models, batch: int, reps: int, warmup: int, backend: str = "auto") -> list[dict]:
    records = []
    names = [o for o in OPTIMIZERS if o != "peer_sam" or _has_peer()]
    for model_name in models:
        fns = {o: train_step_case(model_name, o, batch, device, backend) for o in names}
        peaks = {}
        for o, fn in fns.items():
            # the peak of the first step (a SAM step for PSAM too), each optimizer on its own: the
            # model, the data, gradients, the state it creates, the perturbation and activations;
            # measured on CUDA, exact tensor accounting on CPU (sam_kernels.memory.LiveBytes)
            if device.type == "cuda":
                # the other cases are alive too (they are timed together): count this case's own
                # bytes before the step and what the step adds on top of everything allocated
                own = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in fn.tensors}.values())
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                torch.cuda.synchronize(device)
                peaks[o] = torch.cuda.max_memory_allocated(device) - before + own
            else:
                from ..memory import LiveBytes

                with LiveBytes(fn.tensors) as tracker:
                    fn()
                peaks[o] = tracker.peak
        times = median_ms_interleaved(fns, device, warmup=warmup, reps=reps)
        for o, ms in times.items():
            records.append({"op": "train_step", "model": model_name, "size": SIZES[model_name], "optimizer": o,
                            "backend": "torch" if o in ("sgd", "peer_sam") else backend,
                            "device": device_name(device), "batch": batch, "median_ms": ms,
                            "peak_bytes": peaks.get(o)})
        del fns
    return records


def table(records) -> str:
    rows = [r for r in records if r["op"] == "train_step"]
    if not rows:
        return ""
    ms = {(r["model"], r["optimizer"]): r["median_ms"] for r in rows}
    lines = ["| model | size | batch | optimizer | median ms | vs SGD | vs SAM | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sgd, sam = ms.get((r["model"], "sgd")), ms.get((r["model"], "sam"))
        peak = f"{r['peak_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {optimizer_name(r['optimizer'])} | "
                     f"{r['median_ms']:.1f} | "
                     f"{r['median_ms'] / sgd:.2f}x | {r['median_ms'] / sam:.2f}x | {peak} |")
    return "\n".join(lines)
