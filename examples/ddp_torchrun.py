"""SAM with DistributedDataParallel, launched by torchrun (gloo on CPU, nccl on GPUs):

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py --steps 50
    torchrun --nproc_per_node 2 examples/ddp_torchrun.py --steps 50 --m-sharpness

The first backward all-reduces, so every rank perturbs along the global gradient; with --m-sharpness
it runs under model.no_sync() and each rank perturbs with its own (m-SAM). The second backward
all-reduces in both cases, so the ranks take the same step and stay bit-identical: the script
checks that at the end.
"""
import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sam_kernels import SAM


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--m-sharpness", action="store_true", help="per-rank perturbations (first backward under no_sync)")
    args = ap.parse_args(argv)
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", "1"))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        train(args, use_cuda)
        gc.collect()  # free the DDP reducer (reference cycles) and its pending work while the group is alive
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train(args, use_cuda):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = DDP(nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 4)).to(device),
                device_ids=[device.index] if use_cuda else None)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=g)
        y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        if args.m_sharpness:
            with model.no_sync():
                loss = loss_fn(model(x), y)
                loss.backward()
        else:
            loss = loss_fn(model(x), y)
            loss.backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
        if rank == 0 and step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        same = all(torch.equal(t, gathered[0]) for t in gathered)
        print(f"ranks bit-identical: {same}")
        if not same:
            raise SystemExit("ranks diverged")


if __name__ == "__main__":
    main()
