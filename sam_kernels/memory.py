"""python -m sam_kernels.memory [--quick] [--device D] [--models a,b] [--json PATH] [--plot PATH] [--fsdp]

The memory of a whole training step for every optimizer of the library and plain SGD / AdamW:
parameters, gradients, base-optimizer state, the perturbation (SAM's x_old, nuSAM's vectors,
SAMPa's g_y, its step's scratch set or, with streams, its fixed parameter and gradient sets) and
the peak of the step. On CUDA the peak is measured
(torch.cuda.max_memory_allocated); on CPU it is exact tensor accounting: every storage alive
during the step (the model, gradients, state, activations, temporaries) counted from allocation
to release, through a TorchDispatchMode. With --fsdp, under torchrun (`torchrun --nproc_per_node N
-m sam_kernels.memory --fsdp ...`), every Linear / Conv2d and the model are sharded with FSDP2's
fully_shard and each rank's bytes are reported (its shards, its state, its perturbation; its
peak on CUDA, where the allocator measures it: FSDP2 frees and refills its all-gather buffers by
resizing storages in place, which the CPU accounting cannot see, so there it is not given).
Rank 0 prints and writes them all; SAMPa does not run on FSDP2.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import weakref

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from . import PSAM, SAM, NuSAM, SAMPa, sam_on_groups
from .integrations import distributed
from .bench.models import MODELS, cross_entropy, synthetic_batches
from .bench.output import model_name, optimizer_name, progress, pyplot, save_figure, write_text
from .bench.timing import device_name

OPTIMIZERS = ("sgd", "adamw", "sam", "sam_on", "nusam", "psam", "sampa", "sampa_streams")
CUDA_ONLY = ("sampa_streams",)
SGD_KW = dict(lr=0.01, momentum=0.9)


def build(name: str, model):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **SGD_KW)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if name == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)
    if name == "sam_on":  # SAM-ON: only the normalization layers' affine parameters perturbed (and copied)
        return SAM(sam_on_groups(model), torch.optim.SGD, rho=0.05, **SGD_KW)
    if name == "nusam":  # conv kernels as (out, in*kh*kw) matrices: every weight gets a rank-1 term
        return NuSAM(model.parameters(), torch.optim.SGD, rho=0.1, conv="reshape", **SGD_KW)
    if name == "psam":
        return PSAM(model.parameters(), torch.optim.SGD, rho=0.05, period=2, **SGD_KW)
    if name == "sampa":  # eager: its passes in turn (two parameter copies above SGD)
        return SAMPa(model, cross_entropy, torch.optim.SGD, rho=0.1, **SGD_KW)
    if name == "sampa_streams":  # the fixed sets of concurrent passes (a CUDA graph's too), and their activations
        return SAMPa(model, cross_entropy, torch.optim.SGD, rho=0.1, parallel="streams", **SGD_KW)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def train_step(name, model, opt, batch):
    if name.startswith("sampa"):
        return opt.step(batch)
    opt.zero_grad(set_to_none=True)
    cross_entropy(model, batch).backward()
    if name in ("sgd", "adamw"):
        return opt.step()
    return opt.step(lambda: cross_entropy(model, batch).backward())


def _nbytes(tensors) -> int:
    return sum(distributed.nbytes(t) for t in tensors if torch.is_tensor(t))  # a DTensor: this rank's shard


def _state_tensors(opt):
    base = getattr(opt, "base_optimizer", opt)
    out = [t for st in base.state.values() for t in st.values() if torch.is_tensor(t)]
    if base is not opt:
        out += [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
        out += [t for st in getattr(opt, "vectors", {}).values() for t in st.values()]  # nuSAM's u, v
        if isinstance(opt, SAMPa):
            out += opt.held_tensors()
    return out


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages alive while the mode is on: the ones given at the start plus
    every storage an op returns, from its allocation until its release (weakref.finalize)."""

    def __init__(self, tensors):
        super().__init__()
        self._seen: set[int] = set()
        self.live = self.peak = 0
        for t in tensors:  # tracked too: a gradient freed by zero_grad() stops counting
            self._add(distributed.local(t).untyped_storage())
        self.peak = self.live

    def _add(self, storage) -> None:
        try:
            key = storage.data_ptr()
        except RuntimeError:  # a storage FSDP2 has resized to nothing (a freed unsharded parameter)
            return
        if not key or key in self._seen:
            return
        self._seen.add(key)
        n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._add(t.untyped_storage())
        return out


def shard(model):
    """FSDP2 (fully_shard) on every attention block, every Linear and Conv2d outside them (an
    attention block reads its out_proj's weight without calling it), then on the model."""
    from torch.distributed.fsdp import fully_shard

    inside = {id(m) for a in model.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) or (isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in inside):
            fully_shard(m)
    fully_shard(model)
    return model


def measure(name: str, model_name: str, device, batch_size: int, fsdp: bool = False) -> dict:
    torch.manual_seed(0)
    model = MODELS[model_name]().to(device).train()
    if fsdp:
        model = shard(model)
    opt = build(name, model)
    batches = synthetic_batches(3, batch_size, device)
    train_step(name, model, opt, batches[0])  # the state exists from the second step on
    params = list(model.parameters())
    report = opt.memory_report() if hasattr(opt, "memory_report") else {}
    state = report.get("base_state", _nbytes(_state_tensors(opt)))
    perturbation = sum(report.values()) - state if report else 0
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for b in batches[1:]:
            train_step(name, model, opt, b)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    elif fsdp:
        for b in batches[1:]:
            train_step(name, model, opt, b)
        peak = None
    else:
        start = params + [p.grad for p in params if p.grad is not None] + list(model.buffers()) + _state_tensors(opt)
        start += [t for b in batches[1:] for t in b]
        tracker = LiveBytes(start)
        del start  # the tracker holds no reference: a gradient zero_grad() frees stops counting
        with tracker:
            for b in batches[1:]:  # PSAM (period 2): one SAM step and one plain step
                train_step(name, model, opt, b)
        peak = tracker.peak
    record = {"optimizer": name, "model": model_name, "device": device_name(device), "batch": batch_size,
              "params_bytes": _nbytes(params), "grads_bytes": _nbytes(params), "state_bytes": state,
              "perturbation_bytes": perturbation, "peak_bytes": peak,
              "peak_method": ("not measured" if peak is None else
                              "measured" if torch.device(device).type == "cuda" else "exact tensor accounting")}
    if fsdp:
        record.update(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size())
    return record


def table(records) -> str:
    methods = sorted({r.get("peak_method", "") for r in records} - {""})
    lines = ([f"peak: {', '.join(methods)}", ""] if methods else []) + [
             "| model | optimizer | params MiB | state MiB | perturbation MiB | peak MiB | peak - SGD's, % of params |",
             "|---|---|---|---|---|---|---|"]
    def where(r):  # under FSDP2, each rank's own row
        return r["model"] + (f" (rank {r['rank']} of {r['world']})" if "rank" in r else "")
    sgd = {where(r): r["peak_bytes"] for r in records if r["optimizer"] == "sgd"}
    mib = 2 ** 20
    for r in records:
        peak, base = r["peak_bytes"], sgd.get(where(r))
        above = f"{(peak - base) / r['params_bytes']:+.1%}" if peak is not None and base is not None else "n/a"
        lines.append(f"| {where(r)} | {r['optimizer']} | {r['params_bytes'] / mib:.1f} | "
                     f"{r['state_bytes'] / mib:.1f} | {r['perturbation_bytes'] / mib:.2f} | "
                     f"{'n/a' if peak is None else f'{peak / mib:.1f}'} | {above} |")
    return "\n".join(lines)


def plot(records, path: str) -> None:
    """A stacked bar per optimizer (parameters, gradients, state, perturbation, the rest of the
    peak: activations and temporaries), one panel per model, its title saying how the peak was
    taken (measured on CUDA, exact tensor accounting on CPU)."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models) + 2.5, 4.5), squeeze=False)
    parts = [("params_bytes", "parameters"), ("grads_bytes", "gradients"), ("state_bytes", "base state"),
             ("perturbation_bytes", "perturbation")]
    for ax, m in zip(axes[0], models):
        rows = [r for r in records if r["model"] == m]
        names = [optimizer_name(r["optimizer"]) for r in rows]
        bottom = [0.0] * len(rows)
        for key, label in parts + [(None, "activations + temporaries")]:
            vals = [(r[key] if key else max((r["peak_bytes"] or 0) - sum(r[k] for k, _ in parts), 0)) / 2 ** 20
                    for r in rows]
            ax.bar(names, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"{model_name(m)} ({rows[0]['device']})\npeak: {rows[0].get('peak_method', 'n/a')}", fontsize=12)
        ax.set_ylabel("MiB", fontsize=11)
        ax.tick_params(axis="x", labelsize=10, rotation=30)
    # beside the panels, never over a bar
    axes[0][-1].legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    save_figure(plt, fig, path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sam_kernels.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models and batches (CPU-sized)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to run (default: %(default)s; CUDA: measured peaks, CPU: exact accounting)")
    ap.add_argument("--models", default="", help=f"comma-separated subset of {sorted(MODELS)}")
    ap.add_argument("--optimizers", default="", help=f"comma-separated subset of {OPTIMIZERS}")
    ap.add_argument("--batch", type=int, default=0, help="batch size (default 4 with --quick, else 128)")
    ap.add_argument("--json", default="", help="write the records as JSON here")
    ap.add_argument("--plot", default="", help="write a stacked bar chart (PNG) here")
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 and report every rank (under torchrun)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.fsdp:
        return _main_fsdp(args, device)
    models = _models(args)
    names = _names(args, device)
    batch = args.batch or (4 if args.quick else 128)
    bar = progress(len(models) * len(names), "memory")
    records = []
    for m in models:
        for name in names:
            records.append(measure(name, m, device, batch))
            bar.update(1)
    bar.close()
    return _report(records, args)


def _models(args) -> list:
    return [m for m in args.models.split(",") if m] or (["vit_s", "resnet20"] if args.quick
                                                        else ["vit_s", "vit_b", "mixer_b", "resnet56"])


def _names(args, device, fsdp: bool = False) -> list:
    unavailable = {o: "needs a CUDA device" for o in CUDA_ONLY if device.type != "cuda"}
    if fsdp:
        unavailable.update({o: "does not run on FSDP2" for o in OPTIMIZERS if o.startswith("sampa")})
    names = [o for o in args.optimizers.split(",") if o] or [o for o in OPTIMIZERS if o not in unavailable]
    wrong = [o for o in names if o in unavailable]
    if wrong:
        raise SystemExit(f"--optimizers {wrong[0]}: {unavailable[wrong[0]]} (device {device})")
    return names


def _report(records, args):
    print(table(records))
    if args.json:
        write_text(args.json, json.dumps(records, indent=1))
    if args.plot:
        plot(records, args.plot)
    return records


def _main_fsdp(args, device):
    """Every rank measures its own bytes; rank 0 prints and writes all of them."""
    dist = torch.distributed
    if "RANK" not in os.environ:
        raise SystemExit("--fsdp runs under torchrun: torchrun --nproc_per_node N -m sam_kernels.memory --fsdp ...")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        names, batch = _names(args, device, fsdp=True), args.batch or (4 if args.quick else 128)
        mine = [measure(name, m, device, batch, fsdp=True) for m in _models(args) for name in names]
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        records = [r for rank in every for r in rank]
        if dist.get_rank() == 0:
            _report(records, args)
        gc.collect()  # FSDP2's module state goes while the group is alive
        dist.barrier()
        return records
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
