"""A plain PyTorch loop with SAM: mixed precision (GradScaler), gradient accumulation over
micro-batches, an lr scheduler, and checkpoint / resume (model, optimizer, scaler, scheduler)
that continues bit for bit.

    python examples/train_amp_accumulate.py --steps 200 --accum 4
    python examples/train_amp_accumulate.py --steps 200 --stop-at 100 --save ckpt.pt   # stop half-way
    python examples/train_amp_accumulate.py --steps 200 --resume ckpt.pt               # same result as one run

On CUDA the forward runs under fp16 autocast; on CPU under bf16 autocast (the scaler is kept
in the loop either way, so the code is the same).
"""
import argparse

import torch
from torch import nn

from sam_kernels import SAM, disable_running_stats, enable_running_stats


def batch_at(step: int, size: int, device):
    """Deterministic synthetic data: batch `step` is the same in every run (resume included)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(size, 32, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    return x.to(device), y.to(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--batch", type=int, default=64, help="samples per micro-batch")
    ap.add_argument("--stop-at", type=int, default=0, help="stop after this many steps (a preempted run)")
    ap.add_argument("--save", default="", help="write a checkpoint here when stopping")
    ap.add_argument("--resume", default="", help="start from this checkpoint")
    ap.add_argument("--out", default="", help="write the final parameters here (for tests)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 4)).to(device)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 12)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    loss_fn = nn.CrossEntropyLoss()
    start = 0
    if args.resume:
        ckpt = torch.load(args.resume, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        sched.load_state_dict(ckpt["scheduler"])
        start = ckpt["step"]

    def accumulate(micro_batches):
        """Scaled gradients of the mean loss over the micro-batches, summed in .grad."""
        total = 0.0
        for x, y in micro_batches:
            with torch.autocast(device.type, dtype=amp_dtype):
                loss = loss_fn(model(x), y) / len(micro_batches)
            scaler.scale(loss).backward()
            total += loss.item()
        return total

    model.train()
    stop = args.stop_at or args.steps
    for step in range(start, stop):
        x, y = batch_at(step, args.batch * args.accum, device)
        micro = list(zip(x.chunk(args.accum), y.chunk(args.accum)))
        enable_running_stats(model)  # BatchNorm statistics move in the first pass only
        loss = accumulate(micro)
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        disable_running_stats(model)
        accumulate(micro)
        opt.second_step(zero_grad=True, grad_scaler=scaler)
        scaler.update()
        sched.step()
        if step % 50 == 0 or step == stop - 1:
            print(f"step {step:4d}  loss {loss:.4f}  lr {sched.get_last_lr()[0]:.4f}  scale {scaler.get_scale():.0f}"
                  f"  skipped {opt.skipped_steps}")
    enable_running_stats(model)
    if args.save:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                    "scheduler": sched.state_dict(), "step": stop}, args.save)
    if args.out:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, args.out)


if __name__ == "__main__":
    main()
