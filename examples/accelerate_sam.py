"""SAM in a Hugging Face Accelerate loop: gradient accumulation, mixed precision (bf16 autocast),
and m-SAM under data parallelism (each rank's first gradient its own: accelerator.no_sync).

    accelerate launch examples/accelerate_sam.py [--accumulate 2] [--bf16] [--m-sharpness]

The model and the data loader go through accelerator.prepare; the optimizer stays ours, unwrapped
(Accelerate's wrapper would call step() once per window, and its fp16 GradScaler rejects the
closure SAM needs): a window's first gradients are accumulated under no_sync, first_step()
perturbs, the window runs again at the perturbed point (its last backward synchronizes the
second gradient across ranks), second_step() restores and takes the fused base step.
"""
from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

from sam_kernels import SAM, disable_running_stats, enable_running_stats


def train(accumulate: int = 2, bf16: bool = False, m_sharpness: bool = False, steps: int = 6, seed: int = 0,
          cpu: bool = True):
    """The weights after `steps` optimizer steps (each `accumulate` micro-batches of 8)."""
    accelerator = Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no")
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 3))
    g = torch.Generator().manual_seed(seed + 1)
    data = torch.utils.data.TensorDataset(torch.randn(8 * accumulate * steps, 10, generator=g),
                                          torch.randint(0, 3, (8 * accumulate * steps,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model, loader = accelerator.prepare(model, loader)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, max_grad_norm=1.0)

    def backward(x, y, sync: bool):
        with accelerator.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y) / accumulate
        if sync:
            accelerator.backward(loss)
        else:
            with accelerator.no_sync(model):
                accelerator.backward(loss)

    window = []
    for x, y in loader:
        window.append((x, y))
        last = len(window) == accumulate
        backward(x, y, sync=last and not m_sharpness)  # m-SAM: the first gradient stays this rank's
        if not last:
            continue
        opt.first_step(zero_grad=True)
        disable_running_stats(model)
        for i, (xb, yb) in enumerate(window):
            backward(xb, yb, sync=i == accumulate - 1)  # the second gradient: synchronized
        enable_running_stats(model)
        opt.second_step(zero_grad=True)
        window = []
    return [p.detach().cpu().clone() for p in accelerator.unwrap_model(model).parameters()]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="accelerate launch examples/accelerate_sam.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step (default: 2)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast through Accelerate")
    ap.add_argument("--m-sharpness", action="store_true", help="each rank perturbs with its own first gradient")
    ap.add_argument("--gpu", action="store_true", help="run on the accelerator's device (default: the CPU)")
    args = ap.parse_args(argv)
    weights = train(args.accumulate, args.bf16, args.m_sharpness, cpu=not args.gpu)
    print("trained; weight norm", float(torch.cat([w.reshape(-1) for w in weights]).norm()))


if __name__ == "__main__":
    main()
