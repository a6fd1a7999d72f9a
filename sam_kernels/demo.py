"""`make demo`: SGD vs SAM, ASAM, nuSAM, PSAM, SAMPa, MSAM and GaussSAM on scikit-learn's bundled digits data
(no download).

A small MLP is trained with each optimizer on the same splits, batches and initialisations, over
several seeds (each seed its own split, initialisation and batch order); the table gives test
accuracy as mean +- standard deviation over the seeds (differences inside it are noise), wall
time, gradient evaluations and the optimizer's memory.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from . import MSAM, PSAM, SAM, GaussSAM, NuSAM, SAMPa
from .optimizers.two_pass import SharpnessAwareOptimizer


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as _load

    x, y = _load(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(x) // 4
    mean, std = x[n_test:].mean(0), x[n_test:].std(0) + 1e-3
    x = (x - mean) / std
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def model_fn(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "SAM": lambda p: SAM(p, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "ASAM": lambda p: SAM(p, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "nuSAM": lambda p: NuSAM(p, torch.optim.SGD, rho=0.01, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "PSAM": lambda p: PSAM(p, torch.optim.SGD, rho=0.05, period=4, lr=0.05, momentum=0.9, weight_decay=5e-4),
    # SAMPa takes the model and the loss (it computes its two gradients itself): built in train()
    "SAMPa": None,
    "MSAM": lambda p: MSAM(p, torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "GaussSAM": lambda p: GaussSAM(p, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, weight_decay=5e-4,
                                   generator=torch.Generator().manual_seed(0)),
}


def optimizer_bytes(opt) -> int:
    if hasattr(opt, "memory_report"):
        return sum(opt.memory_report().values())
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def train(name, epochs, batch, seed, bar):
    (xtr, ytr), (xte, yte) = load_digits(seed)
    model = model_fn(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    if name == "SAMPa":
        opt = SAMPa(model, lambda m, b: loss_fn(m(b[0]), b[1]), torch.optim.SGD, rho=0.1, lam=0.2, lr=0.05,
                    momentum=0.9, weight_decay=5e-4)
    else:
        opt = OPTIMIZERS[name](model.parameters())
    grads = 0
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            xb, yb = xtr[idx], ytr[idx]
            if isinstance(opt, SAMPa):
                opt.step((xb, yb))
                continue
            if isinstance(opt, MSAM):  # one gradient, at the point its momentum moved to
                def closure():
                    lo = loss_fn(model(xb), yb)
                    lo.backward()
                    return lo
                opt.step(closure)
                grads += 1
                continue
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            grads += 1
            if isinstance(opt, SharpnessAwareOptimizer):
                def closure():
                    lo = loss_fn(model(xb), yb)
                    lo.backward()
                    return lo
                if opt.step(closure) is not None:  # PSAM's plain steps do not call the closure
                    grads += 1
            else:
                opt.step()
        bar.update(1)
    wall = time.perf_counter() - t0
    if isinstance(opt, SAMPa):
        grads = opt.loss_calls
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return {"optimizer": name, "test_acc": acc, "wall_s": wall, "grad_evals": grads, "opt_bytes": optimizer_bytes(opt)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sam_kernels.demo", description=__doc__)
    ap.add_argument("--epochs", type=int, default=30, help="epochs per run (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default: %(default)s)")
    ap.add_argument("--seeds", type=int, default=3, help="runs per optimizer (mean +- std; default: %(default)s)")
    ap.add_argument("--json", help="write the rows (with every seed's accuracy) as JSON here")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(OPTIMIZERS) * args.seeds * args.epochs, desc="training on digits") as bar:
        for name in OPTIMIZERS:
            runs = [train(name, args.epochs, args.batch, seed, bar) for seed in range(args.seeds)]
            accs = [r["test_acc"] for r in runs]
            rows.append({
                "optimizer": name,
                "test_acc": statistics.fmean(accs),
                "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "test_accs": accs,
                "wall_s": statistics.fmean(r["wall_s"] for r in runs),
                "grad_evals": runs[0]["grad_evals"],
                "opt_bytes": runs[0]["opt_bytes"],
            })
    print(f"\nDigits (scikit-learn), MLP 64-256-128-10, {args.epochs} epochs, batch {args.batch}; test accuracy "
          f"as mean +- std over {args.seeds} seeds (differences within the spread are noise)")
    print(f"{'optimizer':<10}{'test acc':>18}{'wall s':>9}{'grad evals':>12}{'optimizer memory':>18}")
    for r in rows:
        acc = f"{r['test_acc']:.2%} +- {r['test_acc_std']:.2%}"
        print(f"{r['optimizer']:<10}{acc:>18}{r['wall_s']:>9.2f}{r['grad_evals']:>12}"
              f"{r['opt_bytes'] / 1024:>15.1f} KiB")
    if args.json:
        from .bench.output import write_text

        write_text(args.json, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
