"""python -m sam_kernels.info [--json]: what this installation of sam_kernels can run, and why not
the rest (as torch.utils.collect_env does for torch).

    versions    Python, torch (and the CUDA it was built with), triton, numpy, sam_kernels, the
                native extension (loaded from where, with or without CUDA kernels, or why not)
    toolchain   what building the extension needs: ninja, a C++ compiler, a CUDA toolkit
    devices     per device (the CPU, each CUDA device): every backend, available or why not
                (sam_kernels/ops/backends.py), and what backend="auto" picks for each primitive
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import sys

import torch

from . import __version__
from .ops import backends
from .ops import extension as ext
from .ops.primitives import REGISTRY


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _extension() -> dict:
    info = {"loaded": ext.loaded(), "error": ext.load_error()}
    if ext.loaded():
        from . import _C

        info["path"] = getattr(_C, "__file__", None)
        info["cuda_kernels"] = ext.has_kernel("perturb_", "CUDA")
    return info


def _toolchain() -> dict:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    return {"ninja": shutil.which("ninja") or (_version("ninja") and "python package"), "cxx": cxx,
            "cuda_home": cpp_extension.CUDA_HOME, "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"}


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _device_name(device: torch.device) -> str:
    from .bench.timing import device_name

    return device_name(device)


def report() -> dict:
    """Everything the command prints, as a dict (the JSON of --json)."""
    ops = [name for name, prim in REGISTRY.items() if not prim.internal]
    devices = []
    for device in _devices():
        avail = {b: backends.why_unavailable(b, device) for b in backends.BACKENDS[1:]}
        auto = {}
        for op in ops:
            try:
                auto[op] = backends.resolve("auto", device, op)
            except StopIteration:  # (torch always runs: not reached)
                auto[op] = None
        devices.append({"device": str(device), "name": _device_name(device),
                        "backends": {b: ("available" if why is None else why) for b, why in avail.items()},
                        "auto": auto})
    return {
        "versions": {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
                     "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                     "triton": _version("triton"), "numpy": _version("numpy"), "sam_kernels": __version__},
        "extension": _extension(),
        "toolchain": _toolchain(),
        "devices": devices,
    }


def format_report(r: dict) -> str:
    v, e, t = r["versions"], r["extension"], r["toolchain"]
    lines = ["sam_kernels environment", "",
             f"  sam_kernels    {v['sam_kernels']}",
             f"  python         {v['python']} ({v['platform']})",
             f"  torch          {v['torch']} (CUDA {v['torch_cuda'] or 'none: a CPU build'}; "
             f"a GPU {'is' if v['cuda_available'] else 'is not'} available)",
             f"  triton         {v['triton'] or 'not installed (pip install triton): no Triton backend'}",
             f"  numpy          {v['numpy'] or 'not installed'}"]
    if e["loaded"]:
        kernels = "CPU and CUDA kernels" if e.get("cuda_kernels") else "CPU kernels (built without CUDA)"
        lines.append(f"  extension      loaded, {kernels}: {e.get('path')}")
    else:
        lines.append(f"  extension      not loaded: {e['error']}")
    lines += ["", "toolchain (to build the extension)",
              f"  ninja          {t['ninja'] or 'missing (pip install ninja): builds one file at a time'}",
              f"  C++ compiler   {t['cxx'] or 'missing: the extension cannot be built'}",
              f"  CUDA toolkit   {t['cuda_home'] or 'none: the extension is built with CPU kernels only'}",
              "  TRITON_INTERPRET=1: " + ("yes (Triton kernels run on CPU tensors, slowly)" if t["triton_interpret"]
                                         else "no")]
    for d in r["devices"]:
        lines += ["", f"{d['device']} ({d['name']})", "  backends"]
        for b, state in d["backends"].items():
            lines.append(f"    {b:<8} {state}")
        picks: dict[str, list[str]] = {}
        for op, b in d["auto"].items():
            picks.setdefault(b, []).append(op)
        lines.append("  backend='auto' runs")
        for b, names in picks.items():
            lines.append(f"    {b:<8} {', '.join(names)}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m sam_kernels.info", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    args = ap.parse_args(argv)
    r = report()
    print(json.dumps(r, indent=1) if args.json else format_report(r))
    return r


if __name__ == "__main__":
    main()
