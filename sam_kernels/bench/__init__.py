"""Benchmarks of sam_kernels: `python -m sam_kernels.bench --help`."""
