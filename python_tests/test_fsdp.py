"""SAM, ASAM, NuSAM, GaussSAM, PSAM, GSAM, F-SAM, LookSAM and MSAM on FSDP2-sharded parameters
(fully_shard: DTensors sharded along dim 0), 2 and 4 gloo processes on CPU
(sam_kernels/integrations/distributed.py). Each rank steps its local shards with the fused kernels;
the global gradient norm is one all-reduce of one scalar per norm.
Checked against one process on the full batch: the same weights to fp32 rounding, the same
skipped steps (a NaN on one rank's shard skips the step on every rank), per-rank perturbation
memory 1/world of a full copy, and clear errors for what is not supported."""
import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import NUSAM_TRAJECTORY, TRAJECTORY
from torch import nn

from sam_kernels import FSAM, GSAM, MSAM, PSAM, SAM, GaussSAM, LookSAM, NuSAM

STEPS = 20
NAN_STEP = 13  # rank 0 (in the reference: the same entry) poisons its shard of the first gradient


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 17), nn.Tanh(), nn.Linear(17, 9), nn.Tanh(), nn.Linear(9, 4))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(STEPS)]


CASES = {
    "sam-sgd": lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "asam-adamw": lambda ps: SAM(ps, torch.optim.AdamW, rho=0.5, adaptive=True, lr=1e-2, weight_decay=1e-2,
                                 max_grad_norm=0.5),
    "psam-sgd": lambda ps: PSAM(ps, torch.optim.SGD, rho=0.05, period=2, lr=0.1, momentum=0.9),
    "gausssam-sgd": lambda ps: GaussSAM(ps, torch.optim.SGD, rho=0.05, seed=3, lr=0.1, momentum=0.9),
    "nusam-adamw": lambda ps: NuSAM(ps, torch.optim.AdamW, rho=0.1, power_iters=2, lr=1e-2),
    "nusam-norm-sgd": lambda ps: NuSAM(ps, torch.optim.SGD, rho=0.1, normalized=True, lr=0.1, momentum=0.9),
    "sam-sgd-scaler": lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),  # with a GradScaler
    "gsam-sgd": lambda ps: GSAM(ps, torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1, momentum=0.9),
    "fsam-adamw": lambda ps: FSAM(ps, torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=1e-2),
    "looksam-sgd": lambda ps: LookSAM(ps, torch.optim.SGD, rho=0.05, k=3, lr=0.1, momentum=0.9),
    "msam-sgd": lambda ps: MSAM(ps, torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9),
}


SCALED = {"sam-sgd-scaler"}
# on 4 ranks: the cases whose reductions differ in kind (SAM's norm, ASAM's weights, nuSAM's rows,
# a Gaussian per rank, the scaler, the dot products of GSAM and LookSAM); the others run on 2
FOUR_RANKS = ["sam-sgd", "asam-adamw", "psam-sgd", "gausssam-sgd", "nusam-adamw", "sam-sgd-scaler", "gsam-sgd",
              "looksam-sgd"]
RESUMED = ("asam-adamw", "nusam-adamw", "gausssam-sgd", "fsam-adamw", "looksam-sgd")  # DCP round trips


def train(model, opt, rank=0, world=1, counts=None, steps=range(STEPS), scaled=False):
    """SAM steps `steps`; each rank sees its part of every batch (the mean loss over ranks is the
    full batch's: FSDP2 averages the reduce-scattered gradients). scaled: with a GradScaler (the
    scale it ends with is kept in opt.final_scale). Returns the skipped steps."""
    data = batches()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if scaled else None

    def backward(loss):
        (scaler.scale(loss) if scaler is not None else loss).backward()
    def poison():
        g = model[2].weight.grad
        if world == 1:
            g[0, 0] = float("nan")  # the first row: rank 0's shard under FSDP2
        elif rank == 0:
            g._local_tensor[0, 0] = float("nan")

    one_gradient = opt.step_kind() == "momentum"  # MSAM: its gradient is at the perturbed point (first_step first)
    for i in steps:
        x, y = data[i]
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        before = counts[0] if counts else 0
        if one_gradient:
            opt.first_step(grad_scaler=scaler)
            backward(nn.functional.cross_entropy(model(x), y))
            if i == NAN_STEP:
                poison()
            opt.second_step(grad_scaler=scaler)
            if counts is not None:
                counts[1].append(counts[0] - before)
            continue
        backward(nn.functional.cross_entropy(model(x), y))
        if i == NAN_STEP:
            poison()
        if opt.sam_step_due:
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            backward(nn.functional.cross_entropy(model(x), y))
            opt.second_step(grad_scaler=scaler)
        else:
            opt.base_step(grad_scaler=scaler)
        if scaler is not None:
            scaler.update()
            opt.final_scale = scaler.get_scale()
        if counts is not None:
            counts[1].append(counts[0] - before)
    return opt.skipped_steps


def _count_all_reduces():
    """(counts, restore): torch.distributed.all_reduce counted until restore()."""
    counts = [0, []]
    original = dist.all_reduce

    def counting(*args, **kwargs):
        counts[0] += 1
        return original(*args, **kwargs)

    def restore():
        dist.all_reduce = original
    dist.all_reduce = counting
    return counts, restore


def sharded_mlp():
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def resumed(name, rank, world, ckpt, dsd=False):
    """Half the steps, a torch.distributed.checkpoint save of model and optimizer on every rank,
    then a new model and optimizer that load it and take the other half. The optimizer's
    state_dict() / load_state_dict() (init_state(): the template DCP loads into), or with dsd
    torch's get_optimizer_state_dict / set_optimizer_state_dict (which make the template through
    a step() without closure at lr 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = sharded_mlp()
    opt = CASES[name](model.parameters())
    train(model, opt, rank, world, steps=range(STEPS // 2))
    osd = get_optimizer_state_dict(model, opt) if dsd else opt.state_dict()
    dcp.save({"model": model.state_dict(), "optim": osd}, checkpoint_id=ckpt)
    del model, opt, osd
    model = sharded_mlp()
    opt = CASES[name](model.parameters())
    if not dsd:
        opt.init_state()
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt) if dsd else opt.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)  # in place: the model's shards, the state's tensors
    if dsd:
        set_optimizer_state_dict(model, opt, state["optim"])
    else:
        opt.load_state_dict(state["optim"])
    skipped = train(model, opt, rank, world, steps=range(STEPS // 2, STEPS))
    return [p.full_tensor().detach().clone() for p in model.parameters()], skipped


def _worker(rank, world, init_file, out_dir, names, steps):
    torch.set_num_threads(1)  # world processes on few cores: intra-op threads would only contend
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard

    try:
        results = {}
        for name in names:
            model = sharded_mlp()
            opt = CASES[name](model.parameters())
            counts, restore = _count_all_reduces()
            try:
                skipped = train(model, opt, rank, world, counts, steps, scaled=name in SCALED)
            finally:
                restore()
            results[name] = {"params": [p.full_tensor().detach().clone() for p in model.parameters()],
                             "skipped": skipped, "all_reduces": counts[1],
                             "perturbation": opt.memory_report()["perturbation"],
                             "scale": getattr(opt, "final_scale", None)}
        if world == 2:  # ASAM and F-SAM's m through state_dict(); nuSAM's u, GaussSAM's generators and
            # LookSAM's g_v through torch's DSD
            results["resumed"] = {n: resumed(n, rank, world, os.path.join(out_dir, n),
                                             dsd=n not in ("asam-adamw", "fsam-adamw"))
                                  for n in RESUMED}
        # what is refused, by name (the mesh and the model are built on every rank: collectives)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mesh = init_device_mesh("cpu", (world,))
        errors = {}
        model = mlp()
        fully_shard(model)
        cols = nn.Parameter(DTensor.from_local(torch.ones(4, 6 // world), mesh, [Shard(1)], run_check=False))
        replicated = nn.Parameter(DTensor.from_local(torch.ones(4, 6), mesh, [Replicate()], run_check=False))
        for what, build in (("nusam", lambda: NuSAM([cols], torch.optim.SGD, lr=0.1)),
                            ("replicated", lambda: SAM([replicated], lr=0.1)),
                            ("mixed", lambda: SAM([*model.parameters(), nn.Parameter(torch.ones(3))], lr=0.1))):
            try:
                build()
            except (ValueError, NotImplementedError) as e:
                errors[what] = f"{type(e).__name__}: {e}"
        results["errors"] = errors
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        gc.collect()  # FSDP2's module state and its pending work go while the group is alive
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(world, names, steps=range(STEPS)):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp, names, steps), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(2, list(CASES))


def reference(name, steps=range(STEPS)):
    model = mlp()
    opt = CASES[name](model.parameters())
    skipped = train(model, opt, steps=steps, scaled=name in SCALED)
    return [p.detach() for p in model.parameters()], skipped, opt.memory_report()["perturbation"]


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("gausssam")])
def test_fsdp2_equals_one_process_on_the_full_batch(two_ranks, name):
    """(nuSAM: the power iteration's sums are over the ranks' rows, in another order.)"""
    ref, skipped, _ = reference(name)
    tol = NUSAM_TRAJECTORY if name.startswith("nusam") else TRAJECTORY
    for r in two_ranks:
        for p, q in zip(r[name]["params"], ref):
            torch.testing.assert_close(p, q, **tol)
        assert r[name]["skipped"] == skipped == 1  # the NaN on rank 0's shard: skipped on both ranks


def test_grad_scaler_backs_off_on_every_rank(two_ranks):
    """The scaled gradients are unscaled in the fused update; the NaN on rank 0's shard is in the
    all-reduced guard, so both ranks' scalers back off, as the one process's does."""
    model = mlp()
    opt = CASES["sam-sgd-scaler"](model.parameters())
    train(model, opt, scaled=True)
    assert [r["sam-sgd-scaler"]["scale"] for r in two_ranks] == [opt.final_scale] * 2
    assert opt.final_scale < 2.0 ** 8


def test_one_all_reduce_of_one_scalar_per_norm(two_ranks):
    """SAM step: the first pass's norm and the second pass's guard, one all-reduce each; PSAM's
    plain steps: the guard's only (the module's own gradient reduce-scatters are not all-reduces)."""
    assert two_ranks[0]["sam-sgd"]["all_reduces"] == [2] * STEPS
    assert two_ranks[0]["psam-sgd"]["all_reduces"] == [2, 1] * (STEPS // 2)
    assert two_ranks[0]["msam-sgd"]["all_reduces"] == [2] * STEPS  # ||b|| (first step: of no buffer), the guard
    assert two_ranks[0]["fsam-adamw"]["all_reduces"] == [2] * STEPS
    # GSAM: + <g, g_p> and ||g_p|| of the prelude; LookSAM: + <g, g_s> (SAM steps), ||g|| and ||g_v|| (the others)
    assert two_ranks[0]["gsam-sgd"]["all_reduces"] == [4] * STEPS
    assert two_ranks[0]["looksam-sgd"]["all_reduces"] == ([3, 3, 3] * STEPS)[:STEPS]


def test_nusam_all_reduces_per_round_are_batched_over_matrices(two_ranks):
    """NuSAM-AdamW, 2 power iterations: per SAM step one all-reduce per round (every matrix's
    ||G v||^2 with the next round's G^T G v), one for the first G^T u with the other first
    gradients' sum of squares, and the guard; never one per matrix."""
    assert two_ranks[0]["nusam-adamw"]["all_reduces"] == [2 + 1 + 1] * STEPS
    assert two_ranks[0]["nusam-norm-sgd"]["all_reduces"] == [1 + 1 + 1] * STEPS  # 1 power iteration


def test_per_rank_perturbation_is_a_shard_of_the_copy(two_ranks):
    _, _, full = reference("sam-sgd")
    per_rank = [r["sam-sgd"]["perturbation"] for r in two_ranks]
    assert sum(per_rank) == full and max(per_rank) <= full // 2 + 17 * 4 * 8  # uneven rows: at most one more


def test_gausssam_steps_and_skips_on_every_rank(two_ranks):
    start = [p.detach() for p in mlp().parameters()]
    for r in two_ranks:
        assert r["gausssam-sgd"]["skipped"] == 1
        assert all(torch.isfinite(p).all() for p in r["gausssam-sgd"]["params"])
        assert any(not torch.equal(p, q) for p, q in zip(r["gausssam-sgd"]["params"], start))


def test_unsupported_setups_are_refused_by_name(two_ranks):
    errors = two_ranks[0]["errors"]
    assert errors["nusam"].startswith("NotImplementedError: NuSAM: param_groups[0]['params'][0] is sharded as "
                                      "(Shard(dim=1),)")
    assert errors["replicated"].startswith("ValueError: param_groups[0]['params'][0] (shape (4, 6)) has placements "
                                           "(Replicate(),)")
    assert "plain tensor among DTensor parameters" in errors["mixed"]


def test_four_ranks_equal_one_process():
    """FOUR_RANKS on 4 ranks (4-row matrices: one row each; 9 rows: 3, 3, 3 and an empty shard), 20
    steps: the weights of one process to fp32 rounding (GaussSAM: it steps, it skips), the
    scaler's back-off, the collectives as on 2 ranks."""
    steps = range(STEPS)
    ranks = run_ranks(4, FOUR_RANKS, steps)
    for name in FOUR_RANKS:
        ref, skipped, _ = reference(name, steps)
        for r in ranks:
            assert r[name]["skipped"] == skipped == 1
            if name.startswith("gausssam"):  # z is drawn per rank (seed + rank)
                assert all(torch.isfinite(p).all() for p in r[name]["params"])
                continue
            for p, q in zip(r[name]["params"], ref):
                torch.testing.assert_close(p, q, **(NUSAM_TRAJECTORY if name.startswith("nusam") else TRAJECTORY))
    assert ranks[0]["sam-sgd-scaler"]["scale"] == ranks[3]["sam-sgd-scaler"]["scale"] < 2.0 ** 8
    assert ranks[0]["nusam-adamw"]["all_reduces"] == [2 + 1 + 1] * len(steps)
    assert ranks[0]["sam-sgd"]["all_reduces"] == [2] * len(steps)


@pytest.mark.parametrize("name", RESUMED)
def test_dcp_resume_is_bit_exact(two_ranks, name):
    """Saved with torch.distributed.checkpoint after 10 steps on 2 ranks, loaded into a new model and
    optimizer, 10 more steps (the NaN step among them): the weights of the run without a break
    (nuSAM: each rank's rows of u; GaussSAM: each rank's generator, through get_optimizer_state_dict
    and set_optimizer_state_dict)."""
    for r in two_ranks:
        params, skipped = r["resumed"][name]
        assert skipped == 1
        for p, q in zip(params, r[name]["params"]):
            assert torch.equal(p, q)
