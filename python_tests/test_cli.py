"""The demo and the benchmark CLI run end to end (small sizes) and report what they promise."""
import json
import os
import re
import subprocess
import sys

import torch

from sam_kernels import demo
from sam_kernels.bench.__main__ import main as bench_main
from sam_kernels.bench.models import MODELS


def test_demo_trains_every_optimizer():
    rows = demo.main(["--epochs", "2", "--seeds", "1"])
    assert [r["optimizer"] for r in rows] == ["SGD", "SAM", "ASAM", "nuSAM", "PSAM", "SAMPa", "GaussSAM"]
    by = {r["optimizer"]: r for r in rows}
    assert all(r["test_acc"] > 0.5 for r in rows)  # 10 classes: chance is 0.1
    assert by["SAM"]["grad_evals"] == 2 * by["SGD"]["grad_evals"]
    assert by["SAMPa"]["grad_evals"] == 2 * by["SGD"]["grad_evals"] + 1  # 2T + 1
    steps = by["SGD"]["grad_evals"]
    assert by["PSAM"]["grad_evals"] == steps + (steps + 3) // 4  # a second pass every 4th step only
    n_params = sum(p.numel() for p in demo.model_fn(0).parameters())
    # SAMPa keeps g_y and the two shadow parameter sets next to SGD's momentum buffer
    assert by["SAMPa"]["opt_bytes"] == 4 * 4 * n_params
    # SGD+momentum keeps one buffer; SAM adds x_old, exactly one more copy of the parameters
    assert by["SGD"]["opt_bytes"] == 4 * n_params and by["SAM"]["opt_bytes"] == 8 * n_params
    # nuSAM keeps vectors, not a copy: far less than SAM's extra copy of the parameters
    assert by["SGD"]["opt_bytes"] < by["nuSAM"]["opt_bytes"] < by["SGD"]["opt_bytes"] + 0.05 * 4 * n_params


def test_bench_cli_records(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    png = tmp_path / "bench.png"
    bench_main(["--sets", "tiny", "--device", "cpu", "--models", "vit_tiny", "--batch", "4", "--json", str(out),
                "--markdown", str(md), "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json.loads(out.read_text())
    copy = records[0]
    assert copy["op"] == "copy" and copy["gbps"] > 0
    train = [r for r in records if r["op"] == "train_step"]
    assert {r["optimizer"] for r in train} == {"sgd", "sam", "nusam", "psam", "sampa", "peer_sam"}
    for r in train:
        assert r["model"] == "vit_tiny" and r["size"] == "small" and r["median_ms"] > 0 and r["batch"] == 4
        assert r["device"] == copy["device"] and r["peak_bytes"] > 0
    peak = {r["optimizer"]: r["peak_bytes"] for r in train}
    n_bytes = 4 * sum(p.numel() for p in MODELS["vit_tiny"]().parameters())
    assert peak["sam"] - peak["sgd"] >= 0.9 * n_bytes  # SAM keeps x_old: one more copy of the parameters
    assert "| vit_tiny | small | 4 | sampa |" in md.read_text()
    rows = [r for r in records[1:] if r["op"] != "train_step"]
    ops = {r["op"] for r in rows}
    assert {"grad_norm", "perturb", "restore", "restore_sgd", "restore_adamw", "sam_step", "power_iteration",
            "nusam_step", "sampa_step", "sampa_step_adamw"} <= ops
    assert {r["backend"] for r in rows} >= {"cpu", "torch", "loop", "peer_sam", "compiled", "torch_foreach",
                                            "torch_fused"}
    for r in rows:
        for key in ("op", "backend", "device", "dtype", "numel", "tensors", "median_ms", "gbps", "frac_of_copy"):
            assert key in r, key
        if r["op"] == "power_iteration":  # the matrices only
            assert r["numel"] == 33 * 7 and r["tensors"] == 1
        else:
            assert r["numel"] == 33 * 7 + 1000 + 135 + 1 and r["tensors"] == 4
        assert r["median_ms"] > 0
        assert abs(r["frac_of_copy"] - r["gbps"] / copy["gbps"]) < 1e-9
    assert "| tiny | sam_step | cpu |" in md.read_text()
    assert torch.get_num_threads() >= 1


def test_memory_cli_records(tmp_path):
    from sam_kernels.memory import main as memory_main

    out, png = tmp_path / "memory.json", tmp_path / "memory.png"
    memory_main(["--models", "vit_s", "--optimizers", "sgd,sam,nusam,sampa", "--batch", "2", "--json", str(out),
                 "--plot", str(png)])
    records = json.loads(out.read_text())
    by = {r["optimizer"]: r for r in records}
    assert set(by) == {"sgd", "sam", "nusam", "sampa"}
    for r in records:
        for key in ("optimizer", "model", "device", "params_bytes", "perturbation_bytes", "state_bytes", "peak_bytes"):
            assert key in r, key
        assert r["model"] == "vit_s" and r["peak_bytes"] >= r["params_bytes"] + r["state_bytes"] + r["perturbation_bytes"]
    params = by["sgd"]["params_bytes"]
    assert by["sgd"]["perturbation_bytes"] == 0 and by["sgd"]["state_bytes"] == params  # the momentum buffers
    assert by["sam"]["perturbation_bytes"] == params  # x_old: one copy of the parameters
    assert by["nusam"]["perturbation_bytes"] <= 0.01 * by["sam"]["perturbation_bytes"]  # vectors, not a copy
    assert by["sampa"]["perturbation_bytes"] == 3 * params  # g_y and the x~ / y parameter sets
    # the peaks: SAM holds one more copy than SGD (plus small temporaries: norm partials, tables); nuSAM ~ SGD
    assert abs(by["sam"]["peak_bytes"] - by["sgd"]["peak_bytes"] - params) <= 0.01 * params
    assert by["nusam"]["peak_bytes"] - by["sgd"]["peak_bytes"] <= 0.02 * params
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
