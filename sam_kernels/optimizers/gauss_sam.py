"""GaussSAM, the random-direction baseline of the nuSAM paper (ALGORITHMS.md, "GaussSAM"):
e = rho z / ||z|| with z ~ N(0, I), ignoring the gradient. Everything else is SAM's (x_old
kept, fused restore + update, the same failure handling); the first gradient is still checked
(its norm is the first pass's `prior`): a NaN in it skips the step like in SAM."""
from __future__ import annotations

import torch

from ..engine.pipeline import NormStage
from ..integrations import distributed
from ..integrations.distributed import local
from ..ops.lists import GradsOf
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
        super().__init__(params, base_optimizer, rho=rho, adaptive=False, backend=backend, nonfinite=nonfinite,
                         start_step=start_step, max_grad_norm=max_grad_norm, capturable=capturable, **base_kwargs)
        self.generator = generator
        self.seed = seed if seed is not None else int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self._own: torch.Generator | None = None

    def init_state(self) -> None:
        """SAM.init_state, and the generator z is drawn from, so that a checkpoint's generator state
        has a template to load into (torch.distributed.checkpoint)."""
        super().init_state()
        params = self._param_list()
        if params:
            self._generator(local(params[0]).device)

    def _generator(self, device) -> torch.Generator:
        if self.generator is not None:
            return self.generator
        if self._own is None or self._own.device != torch.device(device):
            group = self._reduce_group()  # sharded parameters: each rank draws its shards' z from its own stream
            offset = torch.distributed.get_rank(group) if group is not None else 0
            self._own = torch.Generator(device).manual_seed(self.seed + offset)
        return self._own

    def _directions(self, plan, work, device):
        """of(params): views of one flat z buffer per dtype (filled each step by _perturb)."""
        params = [p for _, ps in work for p in ps]
        plan.z = []
        views = {}
        for dtype in dict.fromkeys(p.dtype for p in params):
            ps = [p for p in params if p.dtype == dtype]
            shards = [local(p) for p in ps]  # sharded parameters: z of this rank's shards
            vec = max(1, 16 // ps[0].element_size())  # each view 16-byte aligned: the kernels' vector width
            sizes = [-(-s.numel() // vec) * vec for s in shards]
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            plan.z.append(flat)
            for p, s, z in zip(ps, shards, flat.split(sizes)):
                views[id(p)] = z[:s.numel()].view(s.shape)
        # the first gradient's own check: its norm is the prior of the guard
        plan.check = NormStage(self._backend(device, "global_norm"), device, [(GradsOf(params), None, 0, 0.0)],
                               group=self._reduce_group())
        plan.check_out = plan.check.out()
        return lambda ps: [views[id(p)] for p in ps]

    def _perturb(self, plan) -> None:
        plan.check.norm(plan.check_out)
        plan.prior = plan.check_out
        if self.nonfinite == "raise" and not bool(torch.isfinite(plan.check_out)):  # raise mode: a synchronization
            raise FloatingPointError(f"GaussSAM.first_step: the gradient norm is {plan.check_out.item()}")
        gen = self._generator(plan.check_out.device)
        for z in plan.z:
            z.normal_(generator=gen)
        plan.perturb()

    def _extra_state(self) -> dict:
        """The seed and the state of the generator z is drawn from (once it exists)."""
        extra = {**super()._extra_state(), "seed": self.seed}
        gen = self.generator if self.generator is not None else self._own
        if gen is not None:  # under FSDP2 each rank's own (seed + rank): one row per rank
            first = next(p for g in self.param_groups for p in g["params"])
            extra["generator"] = distributed.per_rank(gen.get_state(), first)
            extra["generator_device"] = str(gen.device)
        return extra

    def _check_extra_state(self, extra: dict) -> None:
        super()._check_extra_state(extra)
        device = torch.device(extra.get("generator_device", "cpu"))
        if "generator" in extra and self.generator is not None and self.generator.device != device:
            raise ValueError(f"load_state_dict: the generator state is of a {device} generator, "
                             f"this GaussSAM's generator is on {self.generator.device}")

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self.seed = int(extra.get("seed", self.seed))
        self._own = None
        if "generator" in extra:
            gen = self.generator if self.generator is not None else self._generator(
                torch.device(extra.get("generator_device", "cpu")))
            gen.set_state(local(extra["generator"]).reshape(-1).cpu())

    def memory_report(self) -> dict:
        """As SAM's, plus `direction`: the z buffer (one copy of the perturbed parameters)."""
        report = super().memory_report()
        plan = self._plans.plan("first")
        report["direction"] = sum(z.numel() * z.element_size() for z in plan.z) if plan else 0
        return report
