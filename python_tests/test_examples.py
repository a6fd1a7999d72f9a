"""The examples in examples/ run (small sizes, CPU) and do what they say."""
import importlib.util
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_amp_accumulation_loop_resumes_bit_for_bit(tmp_path):
    ex = load("train_amp_accumulate")
    common = ["--steps", "8", "--accum", "2", "--batch", "16"]
    ex.main(common + ["--out", str(tmp_path / "straight.pt")])
    ex.main(common + ["--stop-at", "3", "--save", str(tmp_path / "ckpt.pt")])
    ex.main(common + ["--resume", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "resumed.pt")])
    straight, resumed = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


@pytest.mark.parametrize("mode", ["automatic", "manual", "automatic-bf16"])
def test_lightning_matches_a_plain_loop(mode):
    """Automatic optimization (training_step returns the loss; Lightning calls SAM.step(closure))
    and manual optimization give the weights of the README's two-step loop (bf16 autocast: of
    that loop under the same autocast)."""
    pytest.importorskip("lightning", reason="installed by `make install`")
    ex = load("lightning_sam")
    flags = ["--manual"] if mode == "manual" else ["--precision", "bf16-mixed"] if mode.endswith("bf16") else []
    module = ex.main(["--steps", "6", "--batch", "32", *flags])

    from sam_kernels import SAM
    model = ex.make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(ex.dataset(), batch_size=32, shuffle=False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.endswith("bf16"))
    for _, (x, y) in zip(range(6), loader):
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True)
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.second_step(zero_grad=True)
    for a, b in zip(module.model.parameters(), model.parameters()):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("flags", [[], ["--m-sharpness"]], ids=["sam", "m_sharpness"])
def test_ddp_torchrun_example(flags):
    with socket.socket() as sock:  # a free port for the static rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           os.path.join(ROOT, "examples", "ddp_torchrun.py"), "--steps", "4", *flags]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "ranks bit-identical: True" in out.stdout


@pytest.mark.parametrize("name", ["sam", "psam"])
def test_graphed_example_trains_and_equals_the_eager_loop(name):
    """On CPU make_graphed_step runs eagerly: the example's weights are those of the README loop."""
    ex = load("train_graphed")
    model, opt, losses = ex.main(["--optimizer", name, "--steps", "12", "--batch", "8"])
    assert len(losses) == 12 and all(x == x for x in losses)  # finite (no NaN)

    from sam_kernels import disable_running_stats, enable_running_stats
    torch.manual_seed(0)
    ref = ex.make_model()
    ref_opt = ex.make_optimizer(name, ref)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=12)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(8)]
    for i in range(12):
        x, y = data[i % 8]
        ref_opt.zero_grad()
        if ref_opt.sam_step_due:
            enable_running_stats(ref)
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            ref_opt.first_step(zero_grad=True)
            disable_running_stats(ref)
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            enable_running_stats(ref)
            ref_opt.second_step()
        else:
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            ref_opt.base_step()
        sched.step()
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", ["sam", "nusam"])
def test_fsdp2_torchrun_example(optimizer, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           os.path.join(ROOT, "examples", "fsdp2_sam.py"), "--steps", "4", "--optimizer", optimizer,
           *(["--checkpoint", str(tmp_path / "ckpt")] if optimizer == "nusam" else [])]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "ranks agree on the weights: True; skipped steps 0" in out.stdout
    if optimizer == "nusam":  # get / set_optimizer_state_dict through DCP
        assert "resumed from the checkpoint, one more step: the same weights: True" in out.stdout
    per_rank = [int(m) for m in re.findall(r"perturbation (\d+) bytes", out.stdout)]
    full = int(re.search(r"bytes of (\d+)", out.stdout).group(1))
    assert len(per_rank) == 2
    if optimizer == "sam":
        assert sum(per_rank) == full  # each rank holds its shards' copy only
    else:
        assert sum(per_rank) < full / 20  # nuSAM: a few vectors per matrix


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_accelerate_loop_is_our_two_pass_loop(bf16):
    """examples/accelerate_sam.py on one CPU process: accumulation and (bf16) autocast through
    Accelerate; fp32 equals the plain loop over the same micro-batches, bf16 trains to finite weights
    near it."""
    accelerate = pytest.importorskip("accelerate")
    accelerate_sam = load("accelerate_sam")
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)  # one process, several setups

    ours = accelerate_sam.train(accumulate=2, bf16=bf16)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 10, generator=g), torch.randint(0, 3, (96,), generator=g)
    opt = accelerate_sam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, max_grad_norm=1.0)
    for step in range(6):
        window = [(x[i:i + 8], y[i:i + 8]) for i in range(16 * step, 16 * step + 16, 8)]
        for passes in ("first", "second"):
            for xb, yb in window:
                (torch.nn.functional.cross_entropy(model(xb), yb) / 2).backward()
            (opt.first_step if passes == "first" else opt.second_step)(zero_grad=True)
    for p, q in zip(ours, model.parameters()):
        if bf16:
            assert torch.isfinite(p).all()
            torch.testing.assert_close(p, q.detach(), rtol=0.1, atol=0.02)
        else:
            torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
