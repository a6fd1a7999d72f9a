"""python -m sam_kernels.bench [--quick] [--device D] [--backends a,b] [--json PATH] [--markdown PATH] [--plot PATH]
python -m sam_kernels.bench --quality [--quick] [--seeds N] [--json PATH] [--markdown PATH] [--plot PATH]

Measures the device's copy bandwidth first, then every primitive and the whole SAM, nuSAM,
SAMPa and MSAM optimizer steps on a many-tensor parameter set (ViT-shaped, ~150 tensors) and one large
flat tensor, for each of our backends and the peers (the torch foreach path, a per-parameter
loop, pytorch-optimizer's SAM, torch's own SGD), and reports median time, GB/s against the
floor bytes, the fraction of the copy bandwidth, and speed-ups measured in the same run.
Then whole training steps (SGD, SAM, SAMPa, pytorch-optimizer's SAM) on CIFAR ResNets and a
ViT-S-sized network on synthetic data, with the SAMPa / SAM ratio of the same run.

--quality instead: test accuracy against cost for every optimizer on the bundled digits data with
0% and 40% label noise, over seeds, each with the same grid of radii (sam_kernels/bench/quality.py).
"""
from __future__ import annotations

import argparse
import json

import torch

from .. import backends
from .cases import (BYTES_PER_ELEMENT, compiled_sam_case, foreach_sam_case, loop_sam_case, make_params,
                    nusam_step_case, peer_sam_case, power_iteration_case, primitive_case, sam_step_case,
                    torch_sgd_case)
from .cases import msam_step_case, sampa_step_case
from .models import MODELS
from .output import colour, implementation, param_set, progress, pyplot, save_figure, sibling, write_text
from .shapes import PARAM_SETS, numel
from .timing import copy_bandwidth_gbps, device_name, host_ms_interleaved, median_ms_interleaved
from .graphed import run_graphed
from .graphed import table as graphed_table
from .train import run_train_steps
from .train import table as train_table

PRIMITIVES = ("grad_norm", "perturb", "restore", "restore_sgd", "restore_adamw")


def plan(device, backend_list, quick, sets=None, compiled=None):
    # host_152 (ViT-B's 152 tensors at 256 elements) prices the host's part of each step on its own
    sets = sets or (["vit_s", "flat_16m", "host_152"] if quick else ["vit_b", "flat_128m", "host_152"])
    jobs = []
    for name in sets:
        host = name.startswith("host")
        for b in backend_list:
            if host and b == "torch":  # the reference's host time says nothing (the oracle, not a contender)
                continue
            if not host:  # the primitives' host time is in the steps'
                for op in PRIMITIVES:
                    jobs.append((name, op, b))
            jobs += [(name, op, b) for op in ("sam_step", "sam_step_adamw", "sampa_step", "sampa_step_adamw",
                                              "msam_step", "msam_step_adamw")]
        jobs.append((name, "sam_step", "loop"))
        jobs.append((name, "sam_step_adamw", "loop"))
        jobs.append((name, "sam_step", "foreach"))
        jobs.append((name, "sam_step_adamw", "foreach"))
        if compiled if compiled is not None else not quick:  # inductor's compile time is not --quick
            jobs.append((name, "sam_step", "compiled"))
            jobs.append((name, "sam_step_adamw", "compiled"))
        try:
            import pytorch_optimizer  # noqa: F401

            jobs.append((name, "sam_step", "peer_sam"))
            jobs.append((name, "sam_step_adamw", "peer_sam"))
        except ImportError:
            pass
        if any(len(s) == 2 for s in PARAM_SETS[name]()):  # nuSAM perturbs matrices only
            for b in [b for b in backend_list if backends.why_unavailable(b, device, "power_iteration_") is None
                      and not (host and b == "torch")]:
                jobs += [(name, "power_iteration", b), (name, "nusam_step", b), (name, "nusam_step_adamw", b)]
        jobs.append((name, "sgd_step", "torch_foreach"))
        jobs.append((name, "sgd_step", "torch_fused"))  # fused=True: CUDA and CPU kernels in torch
    return jobs


def build(op, backend, params):
    if op in PRIMITIVES:
        return primitive_case(op, params, backend)
    if op == "power_iteration":
        return power_iteration_case(params, backend)
    if op.startswith("nusam_step"):
        return nusam_step_case(params, backend, "adamw" if op.endswith("adamw") else "sgd")
    if op.startswith("sampa_step"):
        return sampa_step_case(params, backend, "adamw" if op.endswith("adamw") else "sgd")
    if op.startswith("msam_step"):
        return msam_step_case(params, backend, "adamw" if op.endswith("adamw") else "sgd")
    base = "adamw" if op == "sam_step_adamw" else "sgd"
    if op == "sgd_step":
        return torch_sgd_case(params, backend.split("_", 1)[1])
    if backend == "loop":
        return loop_sam_case(params, base)
    if backend == "foreach":
        return foreach_sam_case(params, base)
    if backend == "compiled":
        return compiled_sam_case(params, base)
    if backend == "peer_sam":
        return peer_sam_case(params, base)
    return sam_step_case(params, backend, base)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if args.backends:
        backend_list = args.backends.split(",")
        for b in backend_list:
            backends.resolve(b, device)
    else:
        backend_list = [b for b in backends.available(device) if not (b == "triton" and device.type == "cpu")]
    copy = copy_bandwidth_gbps(device, mib=256 if args.quick else 1024)
    name = device_name(device)
    records = [{"op": "copy", "backend": "torch", "device": name, "dtype": "float32", "gbps": copy}]
    reps = 10 if args.quick else 20
    jobs = plan(device, backend_list, args.quick, [s for s in args.sets.split(",") if s],
                {"auto": None, "yes": True, "no": False}[args.compiled])
    groups: dict[tuple, list] = {}  # every contender of one (parameter set, op) is timed in the same rounds
    for set_name, op, backend in jobs:
        groups.setdefault((set_name, op), []).append(backend)
    bar = progress(len(jobs), "bench")
    for (set_name, op), group in groups.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shapes = PARAM_SETS[set_name]()
        fns = {b: build(op, b, make_params(shapes, device)) for b in group}
        host = set_name.startswith("host")  # the host's time per call, not the device's
        if host:
            times = host_ms_interleaved(fns, device, warmup=2, reps=5 if args.quick else reps,
                                        calls=5 if args.quick else 20)
        else:
            times = median_ms_interleaved(fns, device, warmup=2 if args.quick else 5, reps=reps)
        n = numel([sh for sh in shapes if len(sh) == 2]) if op == "power_iteration" else numel(shapes)
        for backend, ms in times.items():
            gbps = BYTES_PER_ELEMENT[op] * n / (ms * 1e-3) / 1e9
            tensors = sum(len(sh) == 2 for sh in shapes) if op == "power_iteration" else len(shapes)
            records.append({"op": op, "backend": backend, "device": name, "dtype": "float32", "numel": n,
                            "tensors": tensors, "params": set_name, "median_ms": ms, "gbps": gbps,
                            "frac_of_copy": gbps / copy, "metric": "host" if host else "device"})
        del fns
        bar.update(len(group))
        if args.json:  # as it goes: a run cut short still leaves its records
            write_text(args.json, json.dumps(records, indent=1), announce=False)
    bar.close()
    models = [m for m in args.models.split(",") if m] if args.models is not None else (
        ["resnet20"] if args.quick else ["resnet20", "resnet56", "vit_s"])
    if models:
        batch = args.batch or (32 if args.quick else 128)
        for model in models:
            records += run_train_steps(device, [model], batch, reps=3 if args.quick else 20,
                                       warmup=1 if args.quick else 5)
            if args.json:
                write_text(args.json, json.dumps(records, indent=1), announce=False)
    return records


def table(records) -> str:
    """Every timed case, implementations in words; each ratio is the peer's time over this row's
    (above 1: this row is faster), all from this run; GB/s counts the op's floor bytes (cases.py)."""
    copy = next(r for r in records if r["op"] == "copy")
    peers = ("torch", "loop", "foreach", "peer_sam", "compiled")
    lines = [f"device: {copy['device']}; copy bandwidth {copy['gbps']:.1f} GB/s (read + write)", "",
             "| parameters | op | implementation | tensors | numel | median ms | GB/s | of copy | "
             + " | ".join(f"vs {implementation(p)}" for p in peers) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(peers)]
    rows = [r for r in records if r["op"] not in ("copy", "train_step")]
    ref = {(r["params"], r["op"], r["backend"]): r["median_ms"] for r in rows}
    starred = False
    for r in rows:
        def ratio(peer):
            t = ref.get((r["params"], r["op"], peer))
            return f"{t / r['median_ms']:.2f}x" if t and peer != r["backend"] else ""
        host = r.get("metric") == "host"  # host time per call: bandwidth means nothing there
        ms = f"{r['median_ms']:.3f}" + (" (host)" if host else "")
        gbps, frac = ("", "") if host else (f"{r['gbps']:.1f}", f"{r['frac_of_copy']:.0%}")
        if not host and r["frac_of_copy"] > 1:
            frac, starred = frac + " *", True
        lines.append(f"| {param_set(r['params'])} | {r['op']} | {implementation(r['backend'])} | {r['tensors']} | "
                     f"{r['numel']:,} | {ms} | {gbps} | {frac} | " + " | ".join(ratio(p) for p in peers) + " |")
    if starred:
        lines += ["", ABOVE_COPY.replace("\n ", "")]
    train = train_table(records)
    return "\n".join(lines) + ("\n\nWhole training steps (median ms; ratios of the same run):\n\n" + train
                               if train else "")


ABOVE_COPY = ("* above the copy bandwidth: a copy moves 3 bytes per byte it writes (its stores allocate the line "
              "first) where\n  read-heavy kernels move fewer, and between repetitions part of a working set stays "
              "in the caches (CPU; small sets on a GPU)")


def _bars(plt, records, value, label, title, path, limit=None, log=False):
    """One figure of one quantity: a panel per parameter set, ops along x, one bar (and one
    colour) per implementation, named in words. limit: a dashed line (the copy), bars above it
    starred; log: a log scale (host times span two decades)."""
    sets = list(dict.fromkeys(r["params"] for r in records))
    fig, axes = plt.subplots(len(sets), 1, figsize=(12, 4.6 * len(sets)), squeeze=False)
    starred = False
    for ax, name in zip(axes[:, 0], sets):
        rows = [r for r in records if r["params"] == name]
        ops = list(dict.fromkeys(r["op"] for r in rows))
        impls = list(dict.fromkeys(r["backend"] for r in rows))
        width = 0.8 / max(sum(r["op"] == op for r in rows) for op in ops)
        for impl in impls:
            xs, ys = [], []
            for i, op in enumerate(ops):
                present = [r["backend"] for r in rows if r["op"] == op]  # the bars of one op, centred on it
                if impl in present:
                    xs.append(i + (present.index(impl) - (len(present) - 1) / 2) * width)
                    ys.append(value(next(r for r in rows if r["op"] == op and r["backend"] == impl)))
            ax.bar(xs, ys, width=width, color=colour(impl), label=implementation(impl))
            for x, y in zip(xs, ys):
                if limit is not None and y > limit:
                    ax.annotate("*", (x, y), ha="center", va="bottom", fontsize=12)
                    starred = True
        if limit is not None:
            ax.axhline(limit, linestyle="--", color="k", linewidth=1)
        ax.set_xticks(range(len(ops)), ops, fontsize=10, rotation=25, ha="right")
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=11)
        ax.set_title(f"{title}: {param_set(name)}", fontsize=12)
        ax.tick_params(axis="y", labelsize=10)
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if starred:
        fig.text(0.01, 0.005, ABOVE_COPY, fontsize=9, ha="left", va="bottom")
    save_figure(plt, fig, path, dpi=100, bottom=0.07 if starred else 0.0)


def plot(records, path: str) -> None:
    """One message per figure: `path` how close each device-timed case comes to the copy bandwidth
    measured in the same run (GB/s are in the table), `-host` the host's ms per step (ViT-B's 152
    small tensors, log scale), `-train` the whole training steps' ms."""
    plt = pyplot()
    copy = next(r for r in records if r["op"] == "copy")
    device = [r for r in records if r["op"] not in ("copy", "train_step") and r.get("metric") != "host"]
    host = [r for r in records if r.get("metric") == "host"]
    train = [r for r in records if r["op"] == "train_step"]
    where = f"{copy['device']}, copy {copy['gbps']:.0f} GB/s"
    _bars(plt, device, lambda r: 100 * r["frac_of_copy"], "% of the copy bandwidth",
          f"fraction of the copy ({where})", path, limit=100.0)
    if host:
        _bars(plt, host, lambda r: r["median_ms"], "ms of host time per call (log scale)",
              f"host time per step ({copy['device']})", sibling(path, "host"), log=True)
    if train:
        fig, ax = plt.subplots(figsize=(11, 4.5))
        models = list(dict.fromkeys(r["model"] for r in train))
        opts = list(dict.fromkeys(r["optimizer"] for r in train))
        width = 0.85 / len(opts)
        for j, o in enumerate(opts):
            rows = [(i, r) for i, m in enumerate(models) for r in train if r["model"] == m and r["optimizer"] == o]
            ax.bar([i + (j - (len(opts) - 1) / 2) * width for i, _ in rows], [r["median_ms"] for _, r in rows],
                   width=width, label=o, color=f"C{j}")
        ax.set_xticks(range(len(models)), models, fontsize=10)
        ax.set_ylabel("ms per training step", fontsize=11)
        ax.set_title(f"whole training steps, batch {train[0]['batch']} ({copy['device']})", fontsize=12)
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save_figure(plt, fig, sibling(path, "train"), dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sam_kernels.bench", description=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (ViT-S shapes, 16M flat), a couple of minutes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="the device to time on (default: %(default)s)")
    ap.add_argument("--backends", default="", help="comma-separated subset of our backends (default: all available)")
    ap.add_argument("--compiled", choices=("auto", "yes", "no"), default="auto",
                    help="time a torch.compile'd SAM step too (auto: not with --quick: compiling takes a while)")
    ap.add_argument("--sets", default="", help=f"comma-separated parameter sets of {sorted(PARAM_SETS)}")
    ap.add_argument("--models", default=None,
                    help=f"comma-separated training-step models of {sorted(MODELS)} ('' for none; default: "
                         "resnet20 with --quick, else resnet20,resnet56,vit_s)")
    ap.add_argument("--batch", type=int, default=0, help="training-step batch size (default 32 with --quick, else 128)")
    ap.add_argument("--json", default="", help="write the records as JSON here")
    ap.add_argument("--markdown", default="", help="write the table as markdown here")
    ap.add_argument("--plot", default="", help="write the figures here: PATH.png (times) and, beside it, "
                    "PATH-gbps.png, PATH-host.png and PATH-train.png (--quality: one figure)")
    ap.add_argument("--graphed", action="store_true",
                    help="instead: whole training steps eager and as CUDA graphs (sam_kernels/bench/graphed.py)")
    ap.add_argument("--quality", action="store_true",
                    help="instead: test accuracy vs cost of every optimizer on digits with 0%% and 40%% label noise "
                         "(sam_kernels/bench/quality.py; with --quick: 2 seeds, 8 epochs, the default radii only)")
    ap.add_argument("--seeds", type=int, default=0, help="--quality: seeds per setting (default 5; --quick: 2)")
    ap.add_argument("--epochs", type=int, default=0, help="--quality: epochs per run (default 30; --quick: 8)")
    args = ap.parse_args(argv)
    if args.seeds < 0 or args.epochs < 0:
        ap.error(f"--seeds and --epochs must be >= 1, got {args.seeds} and {args.epochs}")
    if args.quality:
        return _quality(args)
    if args.graphed:
        device = torch.device(args.device)
        records = run_graphed(device, reps=3 if args.quick else 20, warmup=1 if args.quick else 5,
                              models=[m for m in args.models.split(",") if m] if args.models else None,
                              batch_size=args.batch)
        text = graphed_table(records)
        args.plot = ""  # the table says it all
    else:
        records = run(args)
        text = table(records)
    print(text)
    for path, payload in ((args.json, json.dumps(records, indent=1)), (args.markdown, text + "\n")):
        if path:
            write_text(path, payload)
    if args.plot:  # last: the records are saved even where matplotlib is missing
        plot(records, args.plot)
    return records


def _quality(args):
    from . import quality

    seeds = args.seeds or (2 if args.quick else 5)
    epochs = args.epochs or (8 if args.quick else 30)
    grid = (1.0,) if args.quick else quality.RHO_GRID
    n_runs = seeds * sum(len(grid) if m.rho is not None else 1 for m in quality.METHODS) * len(quality.NOISE_LEVELS)
    bar = progress(n_runs, "quality")
    torch.manual_seed(0)
    records = quality.run(seeds=seeds, epochs=epochs, grid=grid, bar=bar)
    bar.close()
    device = device_name(torch.device("cpu"))
    for r in records:
        r["device"] = device
    text = quality.table(records, device)
    print(text)
    for path, payload in ((args.json, json.dumps(records, indent=1)), (args.markdown, text + "\n")):
        if path:
            write_text(path, payload)
    if args.plot:
        quality.plot(records, args.plot, device)
    return records


if __name__ == "__main__":
    main()
