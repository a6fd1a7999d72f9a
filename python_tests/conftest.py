"""Shared test setup: the Triton interpreter on machines without a GPU, the backends to test,
and the tolerances per dtype (stated once here)."""
import os

import torch

# Set before triton is imported anywhere: with no GPU, every Triton kernel runs (and is
# tested) on CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

# Under pytest-xdist (make test: one worker per core) each worker takes its share of the cores:
# more intra-op threads than cores only contend. test_ops.py runs the C++ kernels on 1 and 4 threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from sam_kernels import backends  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Elementwise outputs: kernels and reference both compute in fp32 (fp64 for fp64) and round
# once, so they differ by FMA contraction: a few fp32 ulps, at most one ulp after rounding to
# the half types. fp64 tensors get fp64 arithmetic, but the norm and the scale are fp32 values
# and the Triton backend passes lr, momentum, betas as fp32 scalars: fp32-level tolerance on
# the update terms. The Triton interpreter (CPU runs) rounds fp32 -> bf16 toward zero where the
# GPU and torch round to nearest: up to one bf16 ulp, inside the bf16 tolerance.
TOL = {
    torch.float64: dict(rtol=1e-6, atol=1e-7),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
}
# Norms: fp32 accumulation in different orders.
NORM_RTOL = 1e-5
# Whole runs (every tolerance of the suite is one of these, stated here once):
TRAJECTORY = dict(rtol=2e-5, atol=2e-6)  # fp32 rounding carried through tens of steps of a small network
NUSAM_TRAJECTORY = dict(rtol=1e-4, atol=1e-5)  # ... and through power iterations, which amplify it
ROUNDING = dict(rtol=2 ** -23, atol=2 ** -24)  # one fp32 rounding (nuSAM's removal of its rank-1 term)
FP64 = dict(rtol=1e-10, atol=1e-12)  # fp64 runs that reduce in other orders (ranks, accumulation)
BF16_FORWARD = dict(rtol=5e-2, atol=5e-3)  # a bf16-autocast forward against the fp32 one
HALF_RANK1 = dict(rtol=2e-2, atol=2e-2)  # rank-1 terms added to bf16 / fp16 matrices (values ~1, one ulp ~8e-3)
FP64_SPEC = dict(rtol=1e-6, atol=1e-9)  # an fp64 optimizer against a closed form (fp32 scalars inside)
PEER_STEPS = dict(rtol=2.5e-7, atol=2.5e-7)  # a peer's fp32 SAM against ours, a few steps (ulps of reordering)
EXACT = dict(rtol=0, atol=0)  # bit for bit, with assert_close's report of where
DISTINCT = dict(rtol=1e-3, atol=1e-4)  # "visibly different" (a test that an option took effect): far above rounding


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_cases(op=None):
    """(backend, device) pairs that can run here (that have primitive `op`, if given); on this CPU
    machine: cpu, triton (interpreter), torch."""
    cases = []
    for dev in devices():
        for b in backends.available(dev):
            if op is None or backends.why_unavailable(b, torch.device(dev), op) is None:
                cases.append(pytest.param(b, dev, id=f"{b}-{dev}"))
    return cases


KERNEL_BACKENDS = [c for c in backend_cases() if c.values[0] != "torch"]
# Known results of an algorithm over many steps (a quadratic's 2-cycle, a convergence bound, ranks
# against one process): on the backends that run natively here. Through the interpreter the Triton
# kernels are checked against the reference primitive by primitive (test_ops.py, test_sampa_ops.py,
# test_nusam.py) and in the optimizer table's tests; on a GPU machine they run natively and are here.
NATIVE_BACKENDS = [c for c in backend_cases() if not (c.values[0] == "triton" and c.values[1] == "cpu")]
# nuSAM's primitives have no CUDA C++ kernels (Triton is their GPU path)
NUSAM_BACKENDS = backend_cases("power_iteration_")
NUSAM_KERNEL_BACKENDS = [c for c in NUSAM_BACKENDS if c.values[0] != "torch"]


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **TOL[dtype], msg=msg or None)


def step_counts(n: int, step, device="cpu") -> list:
    """Adam's step counters of n tensors (fp32 device scalars, the count of the update they take)."""
    return [torch.full((), float(step), dtype=torch.float32, device=device) for _ in range(n)]


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor that a kernel must overwrite with NaN, so unwritten elements fail."""
    return t.fill_(float("nan"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def pairwise(dims: dict, valid=None) -> list:
    """Cases that cover every pair of values of any two dimensions at least once (a greedy covering
    array, deterministic), instead of their full product: the kernels' branches interact in pairs
    (an option with a dtype, a size with an option), and each dimension's every value still runs.
    dims: name -> [(id, value), ...] (a name "a,b" takes tuple values, passed as two arguments);
    valid(case dict of values) -> bool drops impossible cases. Returns pytest.param(*values in
    the order of dims, id=...)."""
    names = list(dims)
    ok = valid or (lambda case: True)

    def pairs_of(row):
        return {(i, row[i], j, row[j]) for i in range(len(names)) for j in range(i + 1, len(names))}

    every = [dict(zip(range(len(names)), combo)) for combo in _product([range(len(dims[n])) for n in names])]
    every = [row for row in every if ok({names[i]: dims[names[i]][v][1] for i, v in row.items()})]
    uncovered = set().union(*(pairs_of(row) for row in every)) if every else set()
    rows = []
    while uncovered:  # the valid row that covers the most pairs still uncovered, first such in product order
        row = max(every, key=lambda r: len(pairs_of(r) & uncovered))
        rows.append(row)
        uncovered -= pairs_of(row)
    def values(row):
        out = []
        for i, n in enumerate(names):
            v = dims[n][row[i]][1]
            out.extend(v if "," in n else (v,))
        return out

    return [pytest.param(*values(row), id="-".join(dims[names[i]][row[i]][0] for i in range(len(names))))
            for row in rows]


def _product(ranges):
    import itertools
    return itertools.product(*ranges)


# Two tiers. `make test` (everyone's feedback loop, within 8 minutes on 2 cores with the install)
# runs every kernel of every backend (the Triton kernels through the interpreter in test_ops.py
# and test_sampa_ops.py) and every optimizer on the C++ and torch backends; the `slow` tier
# (`make test-slow`; .ci/run runs both) adds what costs minutes there: the optimizers' sequences
# on the Triton interpreter, the multi-process runs (DDP, FSDP2, SAMPa's ranks, torchrun
# examples) and the command-line tools end to end, and the large size set of the kernel tests on
# the interpreter (below).
SLOW_FILES = {"test_fsdp.py", "test_ddp.py", "test_sampa_distributed.py", "test_examples.py", "test_cli.py"}
TRITON_IN_THE_FAST_TIER = {"test_ops.py", "test_sampa_ops.py", "test_op_registry.py", "test_triton_ptx.py"}
# ... and nuSAM's primitives, whose kernel tests live beside the optimizer's in test_nusam.py
NUSAM_PRIMITIVE_TESTS = ("test_power_iteration", "test_prepared_power_iteration", "test_rank1",
                         "test_property_power_iteration")


def _fast_triton(item) -> bool:
    name = item.path.name
    return name in TRITON_IN_THE_FAST_TIER or (name == "test_nusam.py" and item.name.startswith(NUSAM_PRIMITIVE_TESTS))


def _large_through_the_interpreter(item) -> bool:
    """A kernel test of the large size set (262,147 elements) on the Triton interpreter: seconds
    each, and nothing the fast tier lacks there (the mixed set's 65,537 already spans 16 Triton
    chunks and a tail), so it runs in the slow tier."""
    return "[large-" in item.nodeid and "triton-cpu" in item.nodeid


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.path.name in SLOW_FILES or ("triton" in item.nodeid and not _fast_triton(item))
                or _large_through_the_interpreter(item)):
            item.add_marker(pytest.mark.slow)
