"""The optimizer table that drives the shared guarantee tests (the pattern of torch's
torch/testing/_internal/common_optimizers.py): every class of sam_kernels/optimizers/ with the
options it is built with here, the options a user may change between steps, and the backends it
runs on; the base optimizers beside them. A new optimizer gets an entry here and is then checked by
test_guarantees.py, test_capturable.py, test_plan_cache.py and test_no_sync.py (and gets a machine in
test_stateful.py, beside an oracle of its step). The loop of each step follows opt.step_kind()
(gradient_before_first_step below): MSAM's move comes before its one forward-backward."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from conftest import NUSAM_BACKENDS, backend_cases

from sam_kernels import FSAM, GSAM, MSAM, PSAM, SAM, GaussSAM, LookSAM, NuSAM, SAMPa


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: type
    defaults: dict  # constructor options besides the base optimizer's (a test's keywords override them)
    options: tuple = ()  # (key, values) of its own a user may change between steps (what its plans key on)
    two_pass: bool = True  # first_step / second_step (SAMPa: step(closure) only, built over a model and a loss)
    reads_first_gradient: bool = True  # MSAM perturbs before the forward: a bad first gradient is not its
    restores_exactly: bool = True  # x_t back bit for bit (a copy); False: by recomputing the move, one rounding
    sgd_momentum: float = 0.0  # given to an SGD base that has none (MSAM perturbs along SGD's momentum)
    backends: list = field(default_factory=backend_cases)  # the (backend, device) cases it runs on here

    def make(self, params, base, **kw):
        """The optimizer over params (for SAMPa: a model; then loss_fn= is required) and base."""
        if self.sgd_momentum and base is torch.optim.SGD:
            kw.setdefault("momentum", self.sgd_momentum)
        if self.two_pass:
            return self.cls(params, base, **{**self.defaults, **kw})
        loss_fn = kw.pop("loss_fn")
        return self.cls(params, loss_fn, base, **{**self.defaults, **kw})


SUBSET = ("perturb", (True, False))  # subset perturbation (optimizers/subsets.py): a group perturbed or not
OPTIM_DB = [
    OptimizerInfo("sam", SAM, dict(rho=0.05), options=(SUBSET,)),
    OptimizerInfo("asam", SAM, dict(rho=0.5, adaptive=True),
                  options=(("adaptive", (True, False)), ("adaptive_offset", (0.0, 0.01)), SUBSET)),
    OptimizerInfo("nusam", NuSAM, dict(rho=0.1), options=(("normalized", (False, True)), SUBSET),
                  backends=NUSAM_BACKENDS),
    OptimizerInfo("nusam_norm", NuSAM, dict(rho=0.1, normalized=True), options=(("normalized", (True, False)),),
                  backends=NUSAM_BACKENDS),
    OptimizerInfo("gausssam", GaussSAM, dict(rho=0.05, seed=3), options=(SUBSET,)),
    OptimizerInfo("psam", PSAM, dict(rho=0.05, period=2), options=(SUBSET,)),
    OptimizerInfo("msam", MSAM, dict(rho=0.3), options=(SUBSET,), reads_first_gradient=False,
                  restores_exactly=False, sgd_momentum=0.9),
    OptimizerInfo("gsam", GSAM, dict(rho=0.05, alpha=0.4), options=(SUBSET,)),
    OptimizerInfo("fsam", FSAM, dict(rho=0.05, sigma=1.0, lam=0.9), options=(SUBSET,)),
    # k=2: every other step is a SAM step (as PSAM's period), the others reuse g_v
    OptimizerInfo("looksam", LookSAM, dict(rho=0.05, k=2, alpha=0.7), options=(SUBSET,), restores_exactly=False),
    OptimizerInfo("sampa", SAMPa, dict(rho=0.05, lam=0.2), options=(("lam", (0.2, 0.7, 0.0, 1.0)),), two_pass=False),
]
BY_NAME = {info.name: info for info in OPTIM_DB}
SAM_FAMILY = [info.name for info in OPTIM_DB if info.two_pass]  # the two-step API (first_step / second_step)
TWO_PASS = [name for name in SAM_FAMILY if BY_NAME[name].reads_first_gradient]  # a gradient before first_step
PERIODIC = ("psam", "looksam")  # SAM steps every other step here (the others: a base or reuse step)


def restores_exactly(name: str) -> bool:
    """Whether `name` puts x_t back bit for bit after a skipped or undone perturbation (else within
    one rounding: nuSAM's rank-1 term, MSAM's and LookSAM's moves, recomputed)."""
    return BY_NAME[name].restores_exactly and not name.startswith("nusam")

# The base optimizers: (class, options). Tests pick the ones they need by name.
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
}
FUSED_BASES = ("sgd", "adamw")  # one of each fused update (engine/bases.py)

# Options of the base optimizers a user may change between steps, by what they apply to.
BASE_OPTIONS = {
    "any": (("lr", (0.1, 0.02)), ("rho", (0.05, 0.2, 0.0)), ("weight_decay", (0.0, 1e-3))),
    "sgd": (("momentum", (0.9, 0.0, 0.5)), ("dampening", (0.0, 0.1)), ("nesterov", (False, True))),
    "adamw": (("betas", ((0.9, 0.999), (0.8, 0.99))), ("eps", (1e-8, 1e-6)), ("amsgrad", (False, True))),
}


def make(name, params, base, **kw):
    """BY_NAME[name].make(params, base, **kw)."""
    return BY_NAME[name].make(params, base, **kw)


def class_backend_cases(names=SAM_FAMILY):
    """pytest params (name, backend, device) of every class in `names` on every backend it runs on."""
    import pytest

    return [pytest.param(name, *c.values, id=f"{name}-{c.id}") for name in names for c in BY_NAME[name].backends]


def gradient_before_first_step(opt) -> bool:
    """Whether the loop of opt's next step computes a gradient before first_step / base_step:
    every step kind but MSAM's "momentum", whose move comes before its one forward-backward
    (opt.step_kind(): docs/guides/training-loops.md)."""
    return opt.step_kind() != "momentum"
