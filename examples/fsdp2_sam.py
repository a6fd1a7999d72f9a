"""SAM on an FSDP2-sharded model (torch.distributed.fsdp.fully_shard), launched by torchrun (gloo
on CPU, nccl on GPUs):

    torchrun --nproc_per_node 2 examples/fsdp2_sam.py --steps 50 [--optimizer sam|asam|nusam|gausssam|psam]
                                                    [--checkpoint DIR]

Parameters, gradients and the optimizer state are sharded along dim 0; each rank's fused kernels
step its own shards, and the gradient norm is one all-reduce of one scalar (sam_kernels/integrations/distributed.py),
so every rank perturbs along the global gradient. The script prints each rank's perturbation
bytes (1/world of a full copy) and checks that the ranks agree on the full weights at the end.
With --checkpoint, it saves model and optimizer with torch.distributed.checkpoint through torch's
get_optimizer_state_dict, loads them into a new model and optimizer (set_optimizer_state_dict),
and checks that one more step of each gives the same weights.
"""
import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

import sam_kernels


def make_optimizer(name: str, params):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    return {"sam": lambda: sam_kernels.SAM(params, torch.optim.SGD, rho=0.05, **kw),
            "asam": lambda: sam_kernels.SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, **kw),
            "nusam": lambda: sam_kernels.NuSAM(params, torch.optim.SGD, rho=0.1, **kw),
            "gausssam": lambda: sam_kernels.GaussSAM(params, torch.optim.SGD, rho=0.05, seed=0, **kw),
            "psam": lambda: sam_kernels.PSAM(params, torch.optim.SGD, rho=0.05, period=4, **kw)}[name]()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--optimizer", default="sam", choices=("sam", "asam", "nusam", "gausssam", "psam"))
    ap.add_argument("--checkpoint", default="", help="save, load into a new model and optimizer, compare")
    args = ap.parse_args(argv)
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", "1"))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        train(args, use_cuda)
        gc.collect()  # FSDP2's module state and its pending work go while the group is alive
        dist.barrier()
    finally:
        dist.destroy_process_group()


def build(args, device):
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, make_optimizer(args.optimizer, model.parameters())


def batch(g, device):
    x = torch.randn(64, 32, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    return x.to(device), y.to(device)


def train_step(model, opt, xy):
    loss_fn = nn.CrossEntropyLoss()
    opt.zero_grad()
    loss = loss_fn(model(xy[0]), xy[1])
    loss.backward()                          # reduce-scattered: each rank holds its shard of the mean gradient
    if opt.sam_step_due:
        opt.first_step(zero_grad=True)       # the local shards move along the global direction
        loss_fn(model(xy[0]), xy[1]).backward()  # FSDP2 gathers the perturbed shards
        opt.second_step()
    else:
        opt.base_step()
    return loss


def checkpoint_round_trip(args, model, opt, xy, device):
    """DCP with torch's state-dict helpers: the new optimizer's state to load into is made by
    get_optimizer_state_dict itself (sam_kernels: a step() without closure at lr 0)."""
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=args.checkpoint)
    model2, opt2 = build(args, device)
    state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=args.checkpoint)
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    train_step(model, opt, xy)
    train_step(model2, opt2, xy)
    same = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(model.parameters(), model2.parameters()))
    if dist.get_rank() == 0:
        print(f"resumed from the checkpoint, one more step: the same weights: {same}")


def train(args, use_cuda):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    model, opt = build(args, device)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(args.steps):
        loss = train_step(model, opt, batch(g, device))
        if rank == 0 and step % 10 == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    if args.checkpoint:
        checkpoint_round_trip(args, model, opt, batch(g, device), device)
    full = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(full) for _ in range(world)]
    dist.all_gather(gathered, full)
    report = opt.memory_report()
    print(f"rank {rank}: perturbation {report['perturbation']} bytes of "
          f"{sum(p.numel() * p.element_size() for p in model.parameters())} (the full copy)")
    if rank == 0:
        print(f"ranks agree on the weights: {all(torch.equal(gathered[0], t) for t in gathered)}; "
              f"skipped steps {opt.skipped_steps}")


if __name__ == "__main__":
    main()
