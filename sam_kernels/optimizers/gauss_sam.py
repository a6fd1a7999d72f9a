"""GaussSAM, the random-direction baseline of the nuSAM paper (ALGORITHMS.md, "GaussSAM"):
e = rho z / ||z|| with z ~ N(0, I), ignoring the gradient. Everything else is SAM's (x_old
kept, fused restore + update, the same failure handling); the first gradient is still checked
(its norm is the first pass's `first_norm`): a NaN in it skips the step like in SAM."""
from __future__ import annotations

import torch

from ..engine.perturbations import Copies, CopyPerturbation, GaussianDirection
from ..integrations import distributed
from ..integrations.distributed import local
from .sam import SAM


class GaussSAM(SAM):
    """SAM perturbed along a normalized Gaussian direction instead of the gradient.

    generator: a torch.Generator on the parameters' device for z; None: the optimizer's own, on
    that device, seeded with `seed` (None: a seed drawn from torch's global RNG when the optimizer
    is built, so torch.manual_seed makes runs repeatable). Either way its state is part of
    state_dict(): a resumed run draws the same z. z is drawn into one buffer per dtype (a copy of
    the perturbed parameters, allocated once; each parameter's part 16-byte aligned), in
    parameter order. Sharded parameters (FSDP2): each rank draws z for its shards from its own
    generator, seeded with seed + its rank (the same distribution as one process, another sample).
    """

    def __init__(self, params=None, base_optimizer=torch.optim.SGD, rho=0.05, backend: str = "auto",
                 nonfinite: str = "skip", generator: torch.Generator | None = None, seed: int | None = None,
                 start_step: int = 0, max_grad_norm=None, capturable: bool = False, **base_kwargs):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an integer or None, got {seed!r}")
        self.direction = GaussianDirection(generator, seed if seed is not None else
                                           int(torch.randint(0, 2**62, (), dtype=torch.int64)))
        super().__init__(params, base_optimizer, rho=rho, adaptive=False, backend=backend, nonfinite=nonfinite,
                         start_step=start_step, max_grad_norm=max_grad_norm, capturable=capturable, **base_kwargs)

    def _perturbation(self) -> CopyPerturbation:
        return CopyPerturbation(Copies(self), self.direction)

    @property
    def seed(self) -> int:
        return self.direction.seed

    @property
    def generator(self) -> torch.Generator | None:
        return self.direction.generator

    def generator_on(self, device) -> torch.Generator:
        """The generator z is drawn from on `device` (a CUDA graph registers its state)."""
        return self.direction.generator_on(device, self.engine.reduce_group())

    def init_state(self) -> None:
        """SAM.init_state, and the generator z is drawn from, so that a checkpoint's generator state
        has a template to load into (torch.distributed.checkpoint)."""
        super().init_state()
        params = self.engine.param_list()
        if params:
            self.generator_on(local(params[0]).device)

    def _extra_state(self) -> dict:
        """The seed and the state of the generator z is drawn from (once it exists)."""
        extra = {**super()._extra_state(), "seed": self.direction.seed}
        gen = self.direction.current()
        if gen is not None:  # under FSDP2 each rank's own (seed + rank): one row per rank
            first = next(p for g in self.param_groups for p in g["params"])
            extra["generator"] = distributed.per_rank(gen.get_state(), first)
            extra["generator_device"] = str(gen.device)
        return extra

    def _check_extra_state(self, extra: dict) -> None:
        super()._check_extra_state(extra)
        device = torch.device(extra.get("generator_device", "cpu"))
        if "generator" in extra and self.direction.generator is not None and self.direction.generator.device != device:
            raise ValueError(f"load_state_dict: the generator state is of a {device} generator, "
                             f"this GaussSAM's generator is on {self.direction.generator.device}")

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self.direction.seed = int(extra.get("seed", self.direction.seed))
        self.direction.forget()
        if "generator" in extra:
            gen = self.generator_on(torch.device(extra.get("generator_device", "cpu")))
            gen.set_state(local(extra["generator"]).reshape(-1).cpu())

    def memory_report(self) -> dict:
        """As SAM's, plus `direction`: the z buffer (one copy of the perturbed parameters)."""
        return {**super().memory_report(), "direction": self.direction.nbytes(self.engine.cached("first"))}
