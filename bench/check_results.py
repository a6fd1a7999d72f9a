"""Check benchmark and memory result files before they are committed under bench/results/: every
record has its fields, ratios follow from the numbers, and on a GPU no kernel moves its floor bytes
faster than a copy (a sign of a broken measurement). bench/gpu_run.sh runs it on what a GPU run
wrote; run it by hand on CPU results:

    python bench/check_results.py bench/results/<run>.json bench/results/<run>-memory.json

Exit status 1, with one line per problem, when a file fails."""
from __future__ import annotations

import json
import sys

KERNEL_FIELDS = ("op", "backend", "device", "dtype", "numel", "tensors", "median_ms", "gbps", "frac_of_copy")
TRAIN_FIELDS = ("op", "model", "size", "optimizer", "backend", "device", "median_ms", "peak_bytes")
MEMORY_FIELDS = ("optimizer", "model", "device", "params_bytes", "perturbation_bytes", "state_bytes", "peak_bytes")


def bench_problems(records: list) -> list[str]:
    copy = records[0]
    if copy.get("op") != "copy" or not copy.get("gbps", 0) > 0:
        return ["the first record is not the copy bandwidth"]
    gpu = copy["device"].startswith("NVIDIA")
    out = []
    for r in records[1:]:
        if r.get("device") != copy["device"]:
            out.append(f"another device: {r}")
        if r.get("op") == "train_step":
            missing = [k for k in TRAIN_FIELDS if k not in r]
            if missing or not r["median_ms"] > 0 or (gpu and not (r["peak_bytes"] or 0) > 0):
                out.append(f"train_step record incomplete ({missing}): {r}")
            continue
        missing = [k for k in KERNEL_FIELDS if k not in r]
        if missing:
            out.append(f"missing {missing}: {r}")
            continue
        if not (r["median_ms"] > 0 and r["numel"] > 0 and r["tensors"] > 0):
            out.append(f"not a measurement: {r}")
        elif abs(r["frac_of_copy"] - r["gbps"] / copy["gbps"]) > 1e-6:
            out.append(f"frac_of_copy is not gbps / copy's: {r}")
        # a CPU copy pays a write-allocate read per byte written, so read-heavy kernels can beat it
        elif not 0 < r["frac_of_copy"] <= (1.3 if gpu else 3.0):
            out.append(f"faster than a copy: {r}")
    return out


def memory_problems(records: list) -> list[str]:
    out = []
    for model in {r["model"] for r in records}:
        by = {r["optimizer"]: r for r in records if r["model"] == model}
        if not {"sgd", "sam", "nusam"} <= set(by):
            out.append(f"{model}: sgd, sam and nusam are needed, got {sorted(by)}")
            continue
        out += [f"missing fields: {r}" for r in by.values() if any(k not in r for k in MEMORY_FIELDS)]
        params = by["sgd"]["params_bytes"]
        if by["sam"]["perturbation_bytes"] != params:
            out.append(f"{model}: SAM's perturbation is not one copy of the parameters")
        limit = 0.01 if model.startswith(("vit", "mixer")) else 0.05  # nuSAM's vectors
        if not 0 < by["nusam"]["perturbation_bytes"] <= limit * by["sam"]["perturbation_bytes"]:
            out.append(f"{model}: nuSAM's vectors above {limit:.0%} of SAM's copy")
        if by["sam"]["peak_bytes"] - by["sgd"]["peak_bytes"] < 0.99 * params:
            out.append(f"{model}: SAM's peak is not one copy above SGD's")
    return out


def main(paths: list[str]) -> int:
    bad = 0
    for path in paths:
        records = json.load(open(path))
        memory = bool(records) and "perturbation_bytes" in records[0]
        problems = (memory_problems if memory else bench_problems)(records) if records else ["no records"]
        for p in problems:
            print(f"{path}: {p}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
