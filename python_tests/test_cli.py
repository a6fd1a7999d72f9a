"""The demo and the benchmark CLI run end to end (small sizes) and report what they promise."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from sam_kernels import demo, sam_on_groups
from sam_kernels.bench.__main__ import main as bench_main
from sam_kernels.bench.graphed import CASES as GRAPHED_CASES
from sam_kernels.bench.models import MODELS

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import check_results  # noqa: E402  (bench/check_results.py, what checks a GPU run's files)


def test_demo_trains_every_optimizer(tmp_path, capsys):
    out = tmp_path / "demo" / "demo.json"
    rows = demo.main(["--epochs", "2", "--seeds", "2", "--json", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out  # says where its file went
    assert json.loads(out.read_text()) == rows
    assert [r["optimizer"] for r in rows] == ["SGD", "SAM", "ASAM", "nuSAM", "PSAM", "SAMPa", "MSAM", "GaussSAM"]
    for r in rows:  # mean +- std over the seeds
        assert len(r["test_accs"]) == 2 and r["test_acc"] == pytest.approx(sum(r["test_accs"]) / 2)
        assert r["test_acc_std"] == pytest.approx(abs(r["test_accs"][0] - r["test_accs"][1]) / 2 ** 0.5)
    by = {r["optimizer"]: r for r in rows}
    assert all(r["test_acc"] > 0.5 for r in rows)  # 10 classes: chance is 0.1
    assert by["SAM"]["grad_evals"] == 2 * by["SGD"]["grad_evals"]
    assert by["SAMPa"]["grad_evals"] == 2 * by["SGD"]["grad_evals"] + 1  # 2T + 1
    steps = by["SGD"]["grad_evals"]
    assert by["PSAM"]["grad_evals"] == steps + (steps + 3) // 4  # a second pass every 4th step only
    n_params = sum(p.numel() for p in demo.model_fn(0).parameters())
    # SAMPa keeps g_y, and a step's scratch parameter set, next to SGD's momentum buffer
    assert by["SAMPa"]["opt_bytes"] == 3 * 4 * n_params
    # SGD+momentum keeps one buffer; SAM adds x_old, exactly one more copy of the parameters
    assert by["SGD"]["opt_bytes"] == 4 * n_params and by["SAM"]["opt_bytes"] == 8 * n_params
    # MSAM: one gradient per step and no copy (its direction is the momentum buffer)
    assert by["MSAM"]["grad_evals"] == steps and by["MSAM"]["opt_bytes"] == by["SGD"]["opt_bytes"]
    # nuSAM keeps vectors, not a copy: far less than SAM's extra copy of the parameters
    assert by["SGD"]["opt_bytes"] < by["nuSAM"]["opt_bytes"] < by["SGD"]["opt_bytes"] + 0.05 * 4 * n_params


def test_quality_benchmark_counts_the_costs(tmp_path):
    """`python -m sam_kernels.bench --quality` (one seed, one epoch, the default radii: the grid and
    the seeds are the same code): every method at both noise levels, the passes per step and the
    bytes per parameter each promises, the table and the plot."""
    out, md, png = tmp_path / "q.json", tmp_path / "q.md", tmp_path / "q.png"
    records = bench_main(["--quality", "--quick", "--seeds", "1", "--epochs", "2", "--json", str(out),
                          "--markdown", str(md), "--plot", str(png)])
    assert json.loads(out.read_text()) == records and png.read_bytes()[:4] == b"\x89PNG"
    from sam_kernels.bench.quality import METHODS, summary
    assert {(r["method"], r["noise"]) for r in records} == {(m.name, n) for m in METHODS for n in (0.0, 0.4)}
    by = {r["method"]: r for r in records if r["noise"] == 0.4}
    steps = 2 * -(-1079 // 64)  # two epochs of 60% of digits' 1797 samples, batch 64
    passes = {"SGD": 1, "SAM": 2, "ASAM": 2, "MSAM": 1, "GSAM": 2, "F-SAM": 2, "SAM-ON": 2,
              "PSAM": 1 + -(-steps // 4) / steps, "LookSAM": 1 + -(-steps // 5) / steps}  # T + ceil(T / k)
    for name, want in passes.items():
        assert by[name]["passes_per_step"] == pytest.approx(want), name
    bytes_per = {"SGD": 4, "SAM": 8, "MSAM": 4, "GSAM": 12, "F-SAM": 16, "LookSAM": 12}  # (views padded to 16 B)
    for name, want in bytes_per.items():
        assert by[name]["bytes_per_param"] == pytest.approx(want, abs=0.01), name
    assert by["SAM-ON"]["bytes_per_param"] < 4.1  # x_old of the LayerNorm parameters only
    rows = summary(records)
    assert all(0.1 < r["test_acc"] <= 1 and r["time_vs_sgd"] > 0 for r in rows)
    assert "Label noise 40%" in md.read_text()


def test_bench_cli_quick_records(tmp_path):
    """`python -m sam_kernels.bench --quick` as `make demo` runs it, on the small parameter sets (the
    default ViT-S and 16M sets take minutes on 2 cores; `make demo` runs them): every record has the
    fields bench/check_results.py asks for, ratios are consistent, the peers and training steps are
    there. (The compiled peer, --compiled yes, is left out: inductor's compile takes most of a
    minute here; test_compile.py compiles a step.)"""
    out, md, png = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "bench.png"
    bench_main(["--quick", "--device", "cpu", "--sets", "tiny,host_152", "--json", str(out),
                "--markdown", str(md), "--plot", str(png)])
    for figure in (png, tmp_path / "bench-host.png", tmp_path / "bench-train.png"):
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure  # one figure per quantity
    records = json.loads(out.read_text())
    copy = records[0]
    assert copy["op"] == "copy" and copy["gbps"] > 0
    train = [r for r in records if r["op"] == "train_step"]
    assert {r["optimizer"] for r in train} == {"sgd", "sam", "nusam", "psam", "sampa", "peer_sam"}
    for r in train:
        assert r["model"] == "resnet20" and r["size"] == "small" and r["median_ms"] > 0 and r["batch"] == 32
        assert r["device"] == copy["device"] and r["peak_bytes"] > 0
    peak = {r["optimizer"]: r["peak_bytes"] for r in train}
    n_bytes = 4 * sum(p.numel() for p in MODELS["resnet20"]().parameters())
    assert peak["sam"] - peak["sgd"] >= 0.9 * n_bytes  # SAM keeps x_old: one more copy of the parameters
    text = md.read_text()
    assert "| resnet20 | small | 32 | SAMPa |" in text
    # implementations and parameter sets in words, never the records' keys
    assert "ours, C++ (CPU)" in text and "pytorch-optimizer's SAM" in text
    assert "ViT-B's 152 tensors at 256 elements each (host time)" in text
    assert not any(f"| {key} |" in text for key in ("cpu", "peer_sam", "host_152", "loop", "foreach"))
    assert not (tmp_path / "bench-gbps.png").exists()  # GB/s and % of copy are one message: the table has both
    rows = [r for r in records[1:] if r["op"] != "train_step"]
    assert {"grad_norm", "perturb", "restore", "restore_sgd", "restore_adamw", "sam_step", "sam_step_adamw",
            "power_iteration", "nusam_step", "sampa_step", "sampa_step_adamw"} <= {r["op"] for r in rows}
    assert {r["backend"] for r in rows} >= {"cpu", "torch", "loop", "peer_sam", "torch_foreach", "torch_fused"}
    assert {r["params"] for r in rows} == {"tiny", "host_152"}
    host = [r for r in rows if r["params"] == "host_152"]
    assert host and all(r["metric"] == "host" for r in host)  # the host's time per step
    assert {r["backend"] for r in host if r["op"] == "sam_step"} >= {"cpu", "foreach", "loop"}
    for r in rows:
        for key in ("op", "backend", "device", "dtype", "numel", "tensors", "median_ms", "gbps", "frac_of_copy"):
            assert key in r, key
        assert r["device"] == copy["device"] and r["dtype"] == "float32" and r["median_ms"] > 0
        if r["params"] == "host_152":  # 152 tensors of 256 elements (nuSAM's 49 matrices 16 x 16)
            want = (49 * 256, 49) if r["op"] == "power_iteration" else (152 * 256, 152)
        else:  # tiny: (33, 7), (1000,), (5, 3, 3, 3), (1,)
            want = (33 * 7, 1) if r["op"] == "power_iteration" else (33 * 7 + 1000 + 135 + 1, 4)
        assert (r["numel"], r["tensors"]) == want, r
    assert check_results.bench_problems(records) == []  # what bench/gpu_run.sh checks a GPU run's files with
    assert "| four odd-sized tensors | sam_step | ours, C++ (CPU) |" in md.read_text()


def test_memory_cli_quick_records(tmp_path):
    """`python -m sam_kernels.memory --quick` as `make demo` runs it: the fields, and the bytes each
    optimizer must hold (exact tensor accounting on CPU)."""
    from sam_kernels.memory import main as memory_main

    out, png = tmp_path / "memory.json", tmp_path / "memory.png"
    memory_main(["--quick", "--json", str(out), "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json.loads(out.read_text())
    assert {r["model"] for r in records} == {"vit_s", "resnet20"}
    for model in ("vit_s", "resnet20"):
        by = {r["optimizer"]: r for r in records if r["model"] == model}
        assert set(by) == {"sgd", "adamw", "sam", "sam_on", "nusam", "psam", "sampa"}
        for r in by.values():
            for key in ("optimizer", "model", "device", "params_bytes", "perturbation_bytes", "state_bytes",
                        "peak_bytes"):
                assert key in r, key
            assert r["peak_bytes"] >= r["params_bytes"] + r["state_bytes"] + r["perturbation_bytes"]
        params = by["sgd"]["params_bytes"]
        assert by["sgd"]["perturbation_bytes"] == 0 and by["sgd"]["state_bytes"] == params  # momentum buffers
        assert by["adamw"]["state_bytes"] >= 2 * params  # two moments (and the step counters)
        assert by["sam"]["perturbation_bytes"] == by["psam"]["perturbation_bytes"] == params  # x_old
        # SAM-ON: x_old of the normalization layers' affine parameters only (ViT-S: its LayerNorms, under 1%)
        model_ = MODELS[model]()
        norm_bytes = 4 * sum(p.numel() for g in sam_on_groups(model_)[:1] for p in g["params"])
        assert by["sam_on"]["perturbation_bytes"] == norm_bytes
        if model == "vit_s":
            assert norm_bytes < 0.01 * params
        assert by["sampa"]["perturbation_bytes"] == 2 * params  # g_y and the step's scratch set
        # the peaks: SAM holds one more copy than SGD, plus its step plans' launch tables and norm
        # partials (a few hundred bytes per tensor) and the device flags
        tensors = by["sgd"].get("tensors", 200)
        assert abs(by["sam"]["peak_bytes"] - by["sgd"]["peak_bytes"] - params) <= 0.01 * params + 512 * tensors
        # SAMPa's passes in turn: two more (bench/NOTES.md, SAMPa's memory; the measured peak, not the report)
        assert abs(by["sampa"]["peak_bytes"] - by["sgd"]["peak_bytes"] - 2 * params) <= 0.01 * params + 512 * tensors
        # nuSAM keeps 4 (2n + m) bytes per n x m matrix: under 1% of SAM's copy on ViT-S; ResNet-20's
        # conv matrices are small (16 x 144 ... 64 x 576), so its vectors are ~3% of them
        limit = 0.01 if model == "vit_s" else 0.05
        assert 0 < by["nusam"]["perturbation_bytes"] <= limit * by["sam"]["perturbation_bytes"]
        assert by["nusam"]["peak_bytes"] - by["sgd"]["peak_bytes"] <= 2 * limit * params
    assert check_results.memory_problems(records) == []


def test_memory_cli_under_fsdp2_reports_every_rank(tmp_path):
    """`torchrun --nproc_per_node 2 -m sam_kernels.memory --fsdp`: each rank's shards, state and
    perturbation (SAM: its x_old shard; nuSAM: its rows of u and v), gathered by rank 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "memory.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "sam_kernels.memory", "--fsdp",
           "--quick", "--models", "resnet20", "--optimizers", "sgd,sam,nusam", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "resnet20 (rank 1 of 2) | sam" in run.stdout
    records = json.loads(out.read_text())
    full = sum(p.numel() * 4 for p in MODELS["resnet20"]().parameters())
    by = {(r["optimizer"], r["rank"]): r for r in records}
    assert sorted(by) == [(o, r) for o in ("nusam", "sam", "sgd") for r in (0, 1)]
    assert sum(by["sgd", r]["params_bytes"] for r in (0, 1)) == full
    for r in (0, 1):
        mine = by["sam", r]["params_bytes"]
        assert mine < 0.6 * full and by["sam", r]["perturbation_bytes"] == mine == by["sgd", r]["state_bytes"]
        assert 0 < by["nusam", r]["perturbation_bytes"] < 0.05 * mine


def test_pytest_benchmark_suite_collects_and_runs():
    """`pytest bench --benchmark-only` is how runs are compared across commits: the suite must
    collect (all of it) and run (one kernel, timing disabled) here, not only on a GPU machine."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    base = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider"]
    collected = subprocess.run(base + ["--collect-only"], cwd=root, env=env, capture_output=True, text=True)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert int(re.search(r"(\d+) tests? collected", collected.stdout).group(1)) >= 20
    ran = subprocess.run(base + ["-k", "test_primitive and grad_norm", "--benchmark-disable"], cwd=root, env=env,
                         capture_output=True, text=True)
    assert ran.returncode == 0 and re.search(r"\d+ passed", ran.stdout), ran.stdout + ran.stderr


def test_bench_graphed_cli(tmp_path):
    """`python -m sam_kernels.bench --graphed` on CPU (no timm: ResNet-20; no CUDA: the graphed
    cases run make_graphed_step's eager fallback): every case, its ratios and setup time."""
    out = tmp_path / "graphed.json"
    bench_main(["--graphed", "--quick", "--device", "cpu", "--batch", "4", "--json", str(out)])
    records = json.loads(out.read_text())
    assert [r["case"] for r in records] == list(GRAPHED_CASES)
    for r in records:
        assert r["op"] == "graphed_step" and r["model"] == "resnet20" and r["batch"] == 4
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and not r["graphed"]
        assert r["setup_s"] > 0 if r["case"] in ("sam_graphed", "psam_graphed") else r["setup_s"] >= 0
