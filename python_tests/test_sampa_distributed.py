"""SAMPa's distributed mode on CPU: two gloo processes, one pair. Rank 0 takes the x~-pass, rank 1
the y-pass; both must end bit-identical, and equal to the sequential mode in one process."""
import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import NATIVE_BACKENDS
from test_sampa import BASES, buffers, flat, loss_fn, make_batches, make_model

from sam_kernels import SAMPa

STEPS = 6


def ours(sd):
    """What SAMPa keeps beyond the base optimizer in a state_dict (in its first param group)."""
    return sd["param_groups"][0]["sam"]


def _worker(rank, world, init_file, out_dir, backend, base):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cls, kw = BASES[base]
        model = make_model(batchnorm=True)
        calls = []

        def counting(m, b):
            calls.append(1)
            return loss_fn(m, b)

        opt = SAMPa(model, counting, cls, rho=0.1, lam=0.2, parallel="distributed", backend=backend, **kw)
        losses = [opt.step(b) for b in make_batches(STEPS)]  # the pair is given the same batches
        torch.save({"params": flat(model), "buffers": buffers(model), "losses": torch.stack(losses),
                    "calls": len(calls), "g_y": ours(opt.state_dict())["g_y"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        gc.collect()  # nothing of the run holds gloo work when the group goes
        dist.barrier()  # (a rank tearing down while the other still sends aborted once in CI-like runs)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend,device", [c for c in NATIVE_BACKENDS if c.values[1] == "cpu"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_two_ranks_are_bit_identical_and_equal_to_sequential(backend, device, base):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp, backend, base), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]

    cls, kw = BASES[base]
    model = make_model(batchnorm=True)
    opt = SAMPa(model, loss_fn, cls, rho=0.1, lam=0.2, parallel="sequential", backend=backend, **kw)
    losses = torch.stack([opt.step(b) for b in make_batches(STEPS)])

    for r in ranks:
        assert torch.equal(r["params"], ranks[0]["params"])  # ranks bit-identical
        assert torch.equal(r["params"], flat(model))  # and equal to the sequential mode
        for a, b in zip(r["buffers"], buffers(model)):
            assert torch.equal(a, b)
        for a, b in zip(r["g_y"], ours(opt.state_dict())["g_y"]):
            assert torch.equal(a, b)
        assert torch.equal(r["losses"], losses)  # every rank reports the y-pass loss
    # the pair shares the work: 2T + 1 evaluations between the two ranks
    assert ranks[0]["calls"] == STEPS and ranks[1]["calls"] == STEPS + 1


def test_odd_world_is_rejected(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="even number of ranks .* got 1"):
            SAMPa(make_model(), loss_fn, lr=0.1, parallel="distributed")
    finally:
        dist.destroy_process_group()
