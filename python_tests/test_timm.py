"""timm's optimizer factory builds ours by name (sam_kernels/integrations/timm.py).

The first two tests need timm (the GPU image has it; beside the pinned CPU torch, PyPI's timm fails
to import torchvision, so they skip in CI). The last checks, without timm, that the registration
runs whichever of `import sam_kernels` and timm's factory is imported first: a one-module package
named timm.optim._optim_factory with the two names we use (OptimInfo, default_registry), in a child
process so that this one's imports stay as they were."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sam_kernels.integrations.timm import OPTIMIZERS


def _timm_optim():
    try:
        import timm.optim
    except Exception as e:  # not installed, or its torchvision import fails beside this torch
        pytest.skip(f"timm not importable here: {type(e).__name__}: {e}")
    return timm.optim


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_create_optimizer_v2_builds_ours(name):
    timm_optim = _timm_optim()
    import sam_kernels  # noqa: F401  (registers)

    assert name in timm_optim.list_optimizers()
    cls, base, fixed, _ = OPTIMIZERS[name]
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    opt = timm_optim.create_optimizer_v2(model, name, lr=0.05, weight_decay=1e-2, rho=0.1)
    assert type(opt) is cls and type(opt.base_optimizer) is base
    for key, value in fixed.items():
        assert all(g[key] == value for g in opt.param_groups)
    # timm's groups: decay for the matrices, none for the 1-d parameters
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 1e-2] and all(g["rho"] == 0.1 and g["lr"] == 0.05 for g in opt.param_groups)
    if base is torch.optim.SGD:
        assert all(g["momentum"] == 0.9 for g in opt.param_groups)  # timm's default momentum


def test_registering_again_leaves_timms_registry_alone(caplog):
    _timm_optim()
    import sam_kernels.integrations.timm as ours

    with caplog.at_level("WARNING"):
        assert ours.register() == list(OPTIMIZERS)
    assert "already registered" not in caplog.text  # timm logs one per name registered twice


def test_a_timm_built_sam_trains_as_ours():
    timm_optim = _timm_optim()
    import sam_kernels

    def run(make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        opt = make(model)
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        for _ in range(3):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        return [p.detach() for p in model.parameters()]

    ours = run(lambda m: sam_kernels.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9))
    timms = run(lambda m: timm_optim.create_optimizer_v2(m, "sam", lr=0.1, rho=0.05))  # no decay: one group
    for a, b in zip(ours, timms):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


STAND_IN = '''
from dataclasses import dataclass
from typing import Any

@dataclass(frozen=True)
class OptimInfo:
    name: str
    opt_class: Any
    description: str = ""
    has_eps: bool = True
    has_momentum: bool = False
    has_betas: bool = False

class OptimizerRegistry:
    def __init__(self):
        self.infos = {}
    def register(self, info):
        if info.name in BROKEN:
            raise TypeError(f"this registry refuses {info.name}")
        self.infos[info.name.lower()] = info
    def list_optimizers(self):
        return sorted(self.infos)

BROKEN = set()

default_registry = OptimizerRegistry()
'''


def _stand_in(folder, factory_source: str) -> None:
    """A package timm.optim in `folder` whose _optim_factory module is `factory_source`."""
    pkg = folder / "timm" / "optim"
    pkg.mkdir(parents=True)
    (folder / "timm" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from ._optim_factory import default_registry\n")
    (pkg / "_optim_factory.py").write_text(factory_source)


def _prints_ok(script: str, folder) -> None:
    """Runs `script` in a child process with `folder` first on its path; it must print ok."""
    env_path = os.pathsep.join([str(folder)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": env_path})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("order", ["sam_kernels_first", "timm_first"])
def test_registration_whatever_the_import_order(tmp_path, order):
    _stand_in(tmp_path, STAND_IN)
    imports = ["import sam_kernels", "import timm.optim"]
    if order == "timm_first":
        imports.reverse()
    script = "\n".join(imports) + textwrap.dedent("""
        from timm.optim import default_registry
        from sam_kernels.integrations.timm import OPTIMIZERS, register
        assert sorted(default_registry.infos) == sorted(OPTIMIZERS), sorted(default_registry.infos)
        import torch
        info = default_registry.infos["asamadamw"]
        opt = info.opt_class([torch.nn.Parameter(torch.ones(3))], lr=0.1, weight_decay=0.0)
        assert type(opt).__name__ == "SAM" and opt.param_groups[0]["adaptive"] is True
        assert type(opt.base_optimizer) is torch.optim.AdamW
        assert info.has_betas and not info.has_momentum
        assert register() == list(OPTIMIZERS)  # again: idempotent
        print("ok")
    """)
    _prints_ok(script, tmp_path)


def test_a_registry_that_refuses_us_warns_and_imports(tmp_path):
    _stand_in(tmp_path, STAND_IN.replace("BROKEN = set()", "BROKEN = {'sam'}"))
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")
        import sam_kernels
        try:
            import timm.optim
        except RuntimeWarning as w:
            assert "could not register" in str(w) and "refuses sam" in str(w), w
            print("ok")
    """)
    _prints_ok(script, tmp_path)
