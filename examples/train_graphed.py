"""A whole SAM training step as one CUDA graph (sam_kernels.make_graphed_step), with an lr
scheduler and a rho schedule that change between replays, BatchNorm, and optionally an fp16
GradScaler. On a machine without CUDA the same script runs the same steps eagerly.

    python examples/train_graphed.py [--optimizer sam|asam|nusam|gausssam|psam] [--steps N] [--amp]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import sam_kernels


def make_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))


def make_optimizer(name: str, model: nn.Module):
    ps, kw = model.parameters(), dict(lr=0.05, momentum=0.9, weight_decay=5e-4, capturable=True)
    rho = lambda step: 0.05 * min(1.0, (step + 1) / 10)  # noqa: E731  (a warm-up of rho, read on the device)
    return {"sam": lambda: sam_kernels.SAM(ps, torch.optim.SGD, rho=rho, **kw),
            "asam": lambda: sam_kernels.SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, **kw),
            "nusam": lambda: sam_kernels.NuSAM(ps, torch.optim.SGD, rho=0.1, conv="reshape", **kw),
            "gausssam": lambda: sam_kernels.GaussSAM(ps, torch.optim.SGD, rho=rho, seed=0, **kw),
            "psam": lambda: sam_kernels.PSAM(ps, torch.optim.SGD, rho=rho, period=5, **kw)}[name]()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", default="sam", choices=("sam", "asam", "nusam", "gausssam", "psam"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--amp", action="store_true", help="fp16 autocast with a GradScaler (CUDA)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = make_model().to(device)
    opt = make_optimizer(args.optimizer, model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None

    def loss_fn(m, batch):
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp, cache_enabled=False):
            return F.cross_entropy(m(batch[0]), batch[1])

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(args.batch, 3, 32, 32, generator=g).to(device),
             torch.randint(0, 10, (args.batch,), generator=g).to(device)) for _ in range(8)]
    step = sam_kernels.make_graphed_step(model, loss_fn, opt, data[0], grad_scaler=scaler)
    losses = []
    for i in range(args.steps):
        losses.append(step(data[i % len(data)]))  # device tensors: nothing waits for the GPU
        sched.step()
    losses = torch.stack(losses).tolist()  # one synchronization, at the end
    print(f"{args.optimizer}: {'graphed' if step.graphed else 'eager (' + step.why_eager + ')'}, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, skipped steps {opt.skipped_steps}")
    return model, opt, losses


if __name__ == "__main__":
    main()
