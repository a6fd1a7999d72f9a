"""python -m sam_kernels.bench --quality [--quick]: what each optimizer buys of SAM's gain, for what cost.

Every optimizer of sam_kernels (and plain SGD) trains the same small network (an MLP with
LayerNorm, so that SAM-ON has its normalization layers) on scikit-learn's bundled digits data (no
download), with 0% and 40% symmetric label noise on the training and validation labels (the test
labels stay clean: SAM's robustness to label noise is one of its published strengths). Each
optimizer gets the same small grid of radii, multiples RHO_GRID of its default radius (METHODS;
no other tuning), the radius chosen per noise level by mean validation accuracy over the seeds;
the table gives the test accuracy of that radius as mean +- std over the seeds, beside the cost
measured in the same run: forward-backward passes per step (counted), the optimizer's bytes per
parameter (memory_report(), the base state included) and wall time per step relative to SGD's
(the median epoch after the first, which builds the plans).
A method beats SGD "beyond the spread" when the difference of the mean test accuracies exceeds
twice its standard error (sqrt(s1^2 / n + s2^2 / n)).
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import FSAM, GSAM, MSAM, PSAM, SAM, GaussSAM, LookSAM, NuSAM, SAMPa, sam_on_groups
from ..optimizers.two_pass import SharpnessAwareOptimizer

RHO_GRID = (0.5, 1.0, 2.0)  # multiples of each method's default radius: the same grid for every method
NOISE_LEVELS = (0.0, 0.4)
BASE = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


@dataclass(frozen=True)
class Method:
    name: str
    rho: float | None  # the default radius (None: no radius, SGD)
    build: Callable  # (model, loss_fn, rho) -> optimizer
    note: str = ""


def _sgd(model, loss_fn, rho):
    return torch.optim.SGD(model.parameters(), **BASE)


METHODS = [
    Method("SGD", None, _sgd),
    Method("SAM", 0.05, lambda m, f, rho: SAM(m.parameters(), torch.optim.SGD, rho=rho, **BASE)),
    Method("ASAM", 0.5, lambda m, f, rho: SAM(m.parameters(), torch.optim.SGD, rho=rho, adaptive=True, **BASE)),
    Method("nuSAM", 0.01, lambda m, f, rho: NuSAM(m.parameters(), torch.optim.SGD, rho=rho, **BASE)),
    Method("GaussSAM", 0.05, lambda m, f, rho: GaussSAM(m.parameters(), torch.optim.SGD, rho=rho, seed=0, **BASE)),
    Method("PSAM", 0.05, lambda m, f, rho: PSAM(m.parameters(), torch.optim.SGD, rho=rho, period=4, **BASE),
           "a SAM step every 4 steps"),
    Method("SAMPa", 0.1, lambda m, f, rho: SAMPa(m, f, torch.optim.SGD, rho=rho, lam=0.2, **BASE), "lam 0.2"),
    Method("MSAM", 0.3, lambda m, f, rho: MSAM(m.parameters(), torch.optim.SGD, rho=rho, **BASE)),
    Method("LookSAM", 0.05, lambda m, f, rho: LookSAM(m.parameters(), torch.optim.SGD, rho=rho, k=5, alpha=0.7,
                                                      **BASE), "k 5, alpha 0.7"),
    Method("SAM-ON", 0.5, lambda m, f, rho: SAM(sam_on_groups(m), torch.optim.SGD, rho=rho, **BASE),
           "LayerNorm parameters perturbed"),
    Method("GSAM", 0.05, lambda m, f, rho: GSAM(m.parameters(), torch.optim.SGD, rho=rho, alpha=0.4, **BASE),
           "alpha 0.4"),
    Method("F-SAM", 0.05, lambda m, f, rho: FSAM(m.parameters(), torch.optim.SGD, rho=rho, sigma=1.0, lam=0.9,
                                                 **BASE), "sigma 1, lambda 0.9"),
]
BY_NAME = {m.name: m for m in METHODS}


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y, dtype=torch.long)


def load(seed: int, noise: float):
    """Digits, split 60 / 15 / 25 (train / validation / test) by `seed`, standardized by the
    training split; `noise` of the training and validation labels replaced by another class drawn
    uniformly (symmetric noise), the test labels clean."""
    x, y = _digits()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    x, y = x[perm], y[perm]
    n_test, n_val = len(x) // 4, len(x) * 15 // 100
    test, val, train = slice(0, n_test), slice(n_test, n_test + n_val), slice(n_test + n_val, len(x))
    mean, std = x[train].mean(0), x[train].std(0) + 1e-3
    x = (x - mean) / std
    noisy = y.clone()
    flip = torch.rand(len(y), generator=gen) < noise
    flip[test] = False
    noisy[flip] = (y[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=gen)) % 10  # another class
    return (x[train], noisy[train]), (x[val], noisy[val]), (x[test], y[test])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, 128), nn.LayerNorm(128),
                         nn.ReLU(), nn.Linear(128, 10))


def optimizer_bytes(opt) -> int:
    """The optimizer's bytes: memory_report() (ours: the base state included), else its state."""
    if hasattr(opt, "memory_report"):
        return sum(opt.memory_report().values())
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def train_one(method: Method, rho_mult: float, noise: float, seed: int, epochs: int, batch: int) -> dict:
    """One run: the validation and test accuracy, the passes per step, bytes per parameter, s per step."""
    (xtr, ytr), (xval, yval), (xte, yte) = load(seed, noise)
    model = make_model(seed)
    criterion = nn.CrossEntropyLoss()
    rho = None if method.rho is None else method.rho * rho_mult
    opt = method.build(model, lambda m, b: criterion(m(b[0]), b[1]), rho)
    gen = torch.Generator().manual_seed(seed + 1)
    passes = steps = 0
    epoch_s = []  # each epoch's wall time
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            xb, yb = xtr[perm[i:i + batch]], ytr[perm[i:i + batch]]
            steps += 1

            def closure():
                nonlocal passes
                passes += 1
                loss = criterion(model(xb), yb)
                loss.backward()
                return loss
            if isinstance(opt, SAMPa):
                opt.step((xb, yb))
            elif isinstance(opt, MSAM):  # one gradient, at the point its momentum moved to
                opt.step(closure)
            elif isinstance(opt, SharpnessAwareOptimizer):  # the first gradient given, then step(closure)
                opt.zero_grad()
                closure()
                opt.step(closure)  # PSAM's and LookSAM's other steps do not call it
            else:
                opt.zero_grad()
                closure()
                opt.step()
        epoch_s.append(time.perf_counter() - t0)
    # the median epoch after the first (which builds the plans): robust to a busy machine
    per_epoch = statistics.median(epoch_s[1:] or epoch_s)
    if isinstance(opt, SAMPa):
        passes = opt.loss_calls
    with torch.no_grad():
        val = (model(xval).argmax(1) == yval).float().mean().item()
        test = (model(xte).argmax(1) == yte).float().mean().item()
    n_params = sum(p.numel() for p in model.parameters())
    return {"val_acc": val, "test_acc": test, "passes_per_step": passes / steps,
            "bytes_per_param": optimizer_bytes(opt) / n_params, "s_per_step": per_epoch * epochs / steps}


def run(seeds: int = 5, epochs: int = 30, batch: int = 64, grid=RHO_GRID, methods=None, noise_levels=NOISE_LEVELS,
        bar=None) -> list[dict]:
    """Every (method, noise, rho multiple) over `seeds` seeds: one record each, every seed's numbers in it."""
    records = []
    for noise in noise_levels:
        for method in methods or METHODS:
            for mult in (grid if method.rho is not None else (1.0,)):
                runs = [train_one(method, mult, noise, seed, epochs, batch) for seed in range(seeds)]
                if bar is not None:
                    bar.update(seeds)
                records.append({
                    "method": method.name, "noise": noise, "rho": None if method.rho is None else method.rho * mult,
                    "rho_mult": mult, "note": method.note, "seeds": seeds, "epochs": epochs, "batch": batch,
                    "val_accs": [r["val_acc"] for r in runs], "test_accs": [r["test_acc"] for r in runs],
                    "passes_per_step": statistics.fmean(r["passes_per_step"] for r in runs),
                    "bytes_per_param": runs[0]["bytes_per_param"],
                    "s_per_step": statistics.fmean(r["s_per_step"] for r in runs)})
    return records


def _std(xs) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summary(records) -> list[dict]:
    """Per (noise, method): the radius of the best mean validation accuracy, its test accuracy
    (mean, std), its cost (time per step relative to SGD's at that noise level, in this run), and
    whether it beats SGD beyond the spread."""
    rows = []
    for noise in dict.fromkeys(r["noise"] for r in records):
        at = [r for r in records if r["noise"] == noise]
        sgd = next((r for r in at if r["method"] == "SGD"), None)
        for name in dict.fromkeys(r["method"] for r in at):
            best = max((r for r in at if r["method"] == name), key=lambda r: statistics.fmean(r["val_accs"]))
            mean, std, n = statistics.fmean(best["test_accs"]), _std(best["test_accs"]), len(best["test_accs"])
            row = {"noise": noise, "method": name, "rho": best["rho"], "rho_mult": best["rho_mult"],
                   "test_acc": mean, "test_acc_std": std, "passes_per_step": best["passes_per_step"],
                   "bytes_per_param": best["bytes_per_param"], "note": best["note"]}
            if sgd is not None:
                s_mean, s_std = statistics.fmean(sgd["test_accs"]), _std(sgd["test_accs"])
                se = (std ** 2 / n + s_std ** 2 / len(sgd["test_accs"])) ** 0.5
                row["time_vs_sgd"] = best["s_per_step"] / sgd["s_per_step"]
                row["delta_vs_sgd"] = mean - s_mean
                row["beats_sgd"] = name != "SGD" and mean - s_mean > 2 * se
            rows.append(row)
    return rows


def table(records, device: str) -> str:
    rows = summary(records)
    first = records[0]
    lines = [f"Quality vs cost on digits (MLP 64-256-128-10 with LayerNorm), {first['epochs']} epochs, batch "
             f"{first['batch']}, {first['seeds']} seeds, on {device}; rho chosen from {list(RHO_GRID)} x the "
             "default by mean validation accuracy; test accuracy mean +- std; time per step relative to SGD's in "
             "this run. 'beats SGD': the difference exceeds twice its standard error.", ""]
    for noise in dict.fromkeys(r["noise"] for r in rows):
        lines += [f"Label noise {noise:.0%} (train and validation labels; test labels clean):", "",
                  "| method | rho | test accuracy | vs SGD | beats SGD | passes / step | bytes / param | time vs SGD "
                  "| setting |", "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["noise"] == noise):
            rho = "" if r["rho"] is None else f"{r['rho']:g}"
            delta = "" if r["method"] == "SGD" else f"{r.get('delta_vs_sgd', 0):+.2%}"
            beats = "" if r["method"] == "SGD" else ("yes" if r.get("beats_sgd") else "no")
            lines.append(f"| {r['method']} | {rho} | {r['test_acc']:.2%} +- {r['test_acc_std']:.2%} | {delta} | "
                         f"{beats} | {r['passes_per_step']:.2f} | {r['bytes_per_param']:.0f} | "
                         f"{r.get('time_vs_sgd', float('nan')):.2f}x | {r['note']} |")
        lines.append("")
    return "\n".join(lines)


def plot(records, path: str, device: str) -> None:
    """Test accuracy (mean, std error bars) against time per step relative to SGD, one panel per noise level."""
    from .output import pyplot, save_figure

    plt = pyplot()
    rows = summary(records)
    levels = list(dict.fromkeys(r["noise"] for r in rows))
    fig, axes = plt.subplots(1, len(levels), figsize=(6.5 * len(levels), 5), squeeze=False)
    for ax, noise in zip(axes[0], levels):
        for r in (r for r in rows if r["noise"] == noise):
            x = r.get("time_vs_sgd", r["passes_per_step"])
            ax.errorbar([x], [r["test_acc"]], yerr=[r["test_acc_std"]], fmt="o", capsize=3)
            ax.annotate(r["method"], (x, r["test_acc"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel("wall time per step / SGD's")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"label noise {noise:.0%}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"digits, quality vs cost ({device})")
    save_figure(plt, fig, path, dpi=100)
