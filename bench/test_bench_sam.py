"""Per-primitive and whole-step benchmarks (measured, never asserted)."""
import pytest
from conftest import BACKENDS, DEVICE, NUSAM_BACKENDS, sync

from sam_kernels.bench.cases import loop_sam_case, primitive_case, sam_step_case

PRIMITIVES = ["grad_norm", "perturb", "restore", "restore_sgd", "restore_adamw"]


def _timed(benchmark, fn):
    def run():
        fn()
        sync()
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", PRIMITIVES)
def test_primitive(benchmark, params, op, backend):
    benchmark.group = op
    _timed(benchmark, primitive_case(op, params, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_sam_step(benchmark, params, base, backend):
    benchmark.group = f"sam_step_{base}"
    _timed(benchmark, sam_step_case(params, backend, base))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_sam_step_per_parameter_loop(benchmark, params, base):
    benchmark.group = f"sam_step_{base}"
    _timed(benchmark, loop_sam_case(params, base))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_sam_step_pytorch_optimizer(benchmark, params, base):
    pytest.importorskip("pytorch_optimizer", reason="the peer is installed by `make install`")
    from sam_kernels.bench.cases import peer_sam_case

    benchmark.group = f"sam_step_{base}"
    _timed(benchmark, peer_sam_case(params, base))


@pytest.mark.parametrize("backend", NUSAM_BACKENDS)
def test_power_iteration(benchmark, params, backend):
    from sam_kernels.bench.cases import power_iteration_case

    benchmark.group = "power_iteration"
    _timed(benchmark, power_iteration_case(params, backend))


@pytest.mark.parametrize("backend", NUSAM_BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_nusam_step(benchmark, params, base, backend):
    from sam_kernels.bench.cases import nusam_step_case

    benchmark.group = f"sam_step_{base}"  # beside SAM's: the nuSAM / SAM ratio reads off one table
    _timed(benchmark, nusam_step_case(params, backend, base))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_sampa_step(benchmark, params, base, backend):
    """SAMPa's optimizer work of a step (fused preview, guard norms, fused update), no gradients."""
    from sam_kernels.bench.cases import sampa_step_case

    benchmark.group = f"sam_step_{base}"
    _timed(benchmark, sampa_step_case(params, backend, base))


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "sampa"])
@pytest.mark.parametrize("model", ["resnet20", "resnet56", "vit_s"] if DEVICE.type == "cuda" else ["resnet20"])
def test_train_step(benchmark, model, optimizer):
    """A whole training step (forward, backward, optimizer) on synthetic CIFAR-sized data."""
    from sam_kernels.bench.train import train_step_case

    benchmark.group = f"train_step_{model}"
    _timed(benchmark, train_step_case(model, optimizer, 128 if DEVICE.type == "cuda" else 32, DEVICE))
