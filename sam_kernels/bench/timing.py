"""Timing helpers: device-event timing on CUDA, perf_counter on CPU; warm-up, then the median."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def median_ms(fn, device: torch.device, warmup: int = 3, reps: int = 10, min_time_s: float = 0.0) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        t_end = time.perf_counter() + min_time_s
        while len(times) < reps or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _interleaved(fns: dict, warmup: int, reps: int, measure) -> dict:
    """Median of measure(fn) per callable over `reps` rounds of one measurement of each, so that
    drift of a shared machine hits every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(measure(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def median_ms_interleaved(fns: dict, device: torch.device, warmup: int = 3, reps: int = 10) -> dict:
    """Median time of each callable, measured in interleaved rounds (one call of each per round)."""
    return _interleaved(fns, warmup, reps, lambda fn: median_ms(fn, device, warmup=0, reps=1))


def host_ms_interleaved(fns: dict, device: torch.device, warmup: int = 3, reps: int = 10, calls: int = 20) -> dict:
    """The host's time per call of each callable: `calls` back-to-back calls timed on the host
    without waiting for the device (with tensors so small that the device keeps up, this is what a
    step costs the host: Python, launches and any synchronization), median over interleaved rounds."""
    def measure(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        ms = (time.perf_counter() - t0) * 1e3 / calls
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return ms
    return _interleaved(fns, warmup, reps, measure)


def copy_bandwidth_gbps(device: torch.device, mib: int = 512) -> float:
    """Bytes read plus bytes written per second of a large tensor copy: the ceiling we report against."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
