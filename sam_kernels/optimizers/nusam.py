"""nuSAM and nuSAM-Norm (ALGORITHMS.md, "nuSAM"; seed 002, Algorithms 1-2 and appendix C.1).

Only weight matrices M_i (n_i x m_i) are perturbed, by a rank-1 term along the top singular
pair of their gradient, found by warm-started power iteration:

    u_i, v_i = SVD_top1(G_i, u_i)            batched over all matrices (ops.power_iteration_)
    M_i <- M_i + s_i u_i v_i^T               s_i = rho, or rho sigma_i / sqrt(sum_j sigma_j^2) (Norm)
    ... gradient G~ at the perturbed point ...
    M_i <- M_i - s_i u_i v_i^T - update(G~)  one fused pass (ops.rank1_restore_sgd_ / _adam_)

Nothing but x, the gradients and the vectors is stored: the perturbation costs sum_i(2 n_i + m_i)
floats (u, its warm-start candidate, and v) instead of a copy of the weights. Removing the
rank-1 term recomputes it, so the weights come back to within one rounding of x_t, not bit
for bit (that is the price of not storing x_t). Biases, norms and other non-matrix parameters
are not perturbed; every parameter still gets the base update. The scales s_i are computed on
the device (zero for every matrix when a sigma is not finite), and the new u_i replaces the
warm start only when the step is taken (a device-conditional copy): no host reads.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from .. import ops
from ..engine.fused_update import prepare_update
from ..engine.pipeline import NormStage
from ..integrations import distributed
from ..integrations.distributed import Shard, all_reduce_sum_, is_dtensor, local
from ..ops.lists import GradsOf
from .base import SharpnessAwareOptimizer, check_nonneg, split_rho

CONV = ("skip", "reshape")


def _device_vector(values, device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


class NuSamPlan:
    """The first pass of nuSAM over [(group, params with a gradient)]: the batched power iteration
    over the matrix gradients (from candidates of the warm starts), the scales, the rank-1
    perturbation in place. The norm of the other first gradients (biases, norms) is one more entry
    of the sigma vector (rho 0, not normalized), so a non-finite value in any first gradient zeroes
    every scale: nothing is perturbed and a skipped step leaves the weights bit for bit. `prior`
    (the sum of that vector) is the first gradient's check."""

    def __init__(self, opt: "NuSAM", work, device):
        chosen = [(p, g) for g, ps in work for p in ps if opt._is_matrix(p)]
        others = [p for _, ps in work for p in ps if not opt._is_matrix(p)]
        self.opt, self.device = opt, device
        self.params = [p for p, _ in chosen]
        self.active = False
        self.index = {id(p): j for j, p in enumerate(self.params)}
        for p in self.params:
            if not p.is_contiguous():
                raise ValueError(f"NuSAM perturbs matrices in place: parameter of shape {tuple(p.shape)} "
                                 "must be contiguous")
        self.mats = [opt._as_matrix(local(p)) for p in self.params]  # sharded: this rank's rows
        self.grads = GradsOf(self.params, [m.shape for m in self.mats])
        self.group = opt._reduce_group()
        self.us = [opt.vectors[p]["u"] for p in self.params]  # the warm starts, replaced when a step is taken
        self.cands = [torch.empty_like(u) for u in self.us]
        self.vs = [opt._buffer(p, "v", m.shape[1]) for p, m in zip(self.params, self.mats)]
        k = len(self.params)
        # [sigma_1 .. sigma_k, the other gradients' norm] and their scales (the last one unused)
        self.sigmas_all = torch.zeros(k + 1, dtype=torch.float32, device=device)
        self.sigmas, self.others_norm = self.sigmas_all[:k], self.sigmas_all[k]
        self.scales_all = torch.zeros(k + 1, dtype=torch.float32, device=device)
        self.scales = self.scales_all[:k]
        self.neg_scales = torch.zeros(k, dtype=torch.float32, device=device)
        self.groups = [g for _, g in chosen]
        self.normed = _device_vector([float(g["normalized"]) for g in self.groups] + [0.0], device)
        self._rho_key, self.rho = None, None
        self.prior = torch.zeros((), dtype=torch.float32, device=device)
        self.check = (NormStage(opt._backend(device, "global_norm"), device, [(GradsOf(others), None, 0, 0.0)],
                                group=self.group) if others else None)
        self.backend = opt._backend(device, "rank1_update_") if k else None
        if k:
            staged = not ops.stageable({"mats": self.grads}, aligned=self.backend == "triton")
            # the power iteration from the warm starts into the candidates (a skipped step keeps the warm start)
            self._power = (self._sharded_power if self.group is not None else
                           ops.prepare("power_iteration_", self.backend, device, mats=self.grads, us=self.cands,
                                       vs=self.vs, warm=self.us) if not staged else self._staged_power)
            self._scales = ops.prepare("rank1_scales_", self._backend_of("rank1_scales_"), device)
            self._commit = ops.bind("restore_", self.backend, device, {"params": self.us, "olds": self.cands})
            self._rank1 = ops.bind("rank1_update_", self.backend, device,
                                   {"mats": self.mats, "us": self.cands, "vs": self.vs})

    def _backend_of(self, op):
        return self.opt._backend(self.device, op)

    def _staged_power(self, sigmas, iters, tau):
        """The list op (which stages gradients it cannot take as they are), from a copy of the warm starts."""
        torch._foreach_copy_(self.cands, self.us)
        ops.power_iteration_(list(self.grads), self.cands, self.vs, sigmas, iters, tau, backend=self.backend)

    def _sharded_power(self, sigmas, iters, tau):
        """The power iteration on row-sharded matrices (FSDP2's Shard(0)), as reference.power_iteration_
        computes it on whole ones: each rank holds its rows of G and u, v is replicated. One
        all-reduce per round, of every matrix at once: round r sums the ranks' ||G_l v||^2 together
        with their G_l^T (G_l v), which over (||G v|| + tau) is the next round's G^T u (u = G v /
        (||G v|| + tau)); the first G^T u rides with the other first gradients' sum of squares
        (their check). So T rounds take T + 1 all-reduces, where two per round would take 2T + 1."""
        grads = [g.float() for g in self.grads]
        sizes, k = [v.numel() for v in self.vs], len(grads)
        parts = [g.t() @ u.float() for g, u in zip(grads, self.us)]
        if self.check is not None:
            parts.append(self.check.local_sum())
        flat = torch.cat(parts)
        all_reduce_sum_(flat, self.group)
        if self.check is not None:
            self.check.finish(flat[-1:], self.others_norm)
        gtus = flat[:sum(sizes)].split(sizes)
        for r in range(iters):
            norms = torch.stack([torch.linalg.vector_norm(v) for v in gtus])
            vs = [v / (n + tau) for v, n in zip(gtus, norms)]
            gvs = [g @ v for g, v in zip(grads, vs)]
            last = r == iters - 1
            parts = ([] if last else [g.t() @ gv for g, gv in zip(grads, gvs)]) + [
                torch.stack([gv.square().sum() for gv in gvs])]
            flat = torch.cat(parts)
            all_reduce_sum_(flat, self.group)
            sigma = flat[-k:].sqrt()
            if not last:
                gtus = [w / (s + tau) for w, s in zip(flat[:-k].split(sizes), sigma)]
        torch._foreach_copy_(self.cands, [gv / (s + tau) for gv, s in zip(gvs, sigma)])
        torch._foreach_copy_(self.vs, vs)
        sigmas.copy_(sigma)

    def _rhos(self) -> torch.Tensor:
        """rho per matrix on the device, sent again only when a group's rho changed (capturable:
        gathered on the device from the groups' device scalars, into one buffer)."""
        if self.opt.capturable:
            if self.rho is None:
                ds = self.opt._device_scalars(self.device)
                self._rho_rows = _device_vector([ds.row(g) for g in self.groups], self.device).long()
                self.rho = torch.zeros(len(self.groups) + 1, dtype=torch.float32, device=self.device)
                self._rho_column = ds.rho_column()
            torch.index_select(self._rho_column, 0, self._rho_rows, out=self.rho[:-1])
            return self.rho
        key = tuple(g["rho"] for g in self.groups)
        if key != self._rho_key:
            self._rho_key, self.rho = key, _device_vector(list(key) + [0.0], self.device)
        return self.rho

    def perturb(self, raise_nonfinite: bool) -> None:
        if self.check is not None and not (self.params and self.group is not None):
            self.check.norm(self.others_norm if self.params else self.prior)  # (sharded: inside the iteration)
        if self.params:
            self._power(self.sigmas, self.opt.power_iters, self.opt.tau)
            # s_i (nuSAM-Norm's too; all 0 if an entry is not finite: no perturbation), prior = their sum
            self._scales(self.sigmas_all, self._rhos(), self.normed, self.scales_all, self.prior)
        if raise_nonfinite and not bool(torch.isfinite(self.prior)):  # raise mode: a synchronization
            raise FloatingPointError("NuSAM.first_step: NaN or inf in a gradient")
        if self.params:
            self._rank1(scales=self.scales)
        self.active = True

    def old_of(self, p):
        return p

    def rank1_of(self, p):
        return self.index.get(id(p))

    def _scales_of(self, idx):
        """The scales of the matrices idx: the vector itself, or a gather launched every step."""
        if idx == list(range(len(self.params))):
            return lambda source: source
        index = _device_vector(idx, self.device).long()
        buf = torch.empty(len(idx), dtype=torch.float32, device=self.device)
        return lambda source: torch.index_select(source, 0, index, out=buf)

    def rank1_update(self, base, kind, group, device, ps, counters):
        """The fused update of the perturbed matrices ps of one group: M - s u v^T, then the step."""
        idx = [self.index[id(p)] for p in ps]
        mats = [self.mats[j] for j in idx]
        keys = None if all(p is m for p, m in zip(ps, mats)) else ps  # conv kernels: state keyed by the params
        grads = GradsOf(ps, [m.shape for m in mats])  # the second gradients
        run = prepare_update(base, kind, group, self.opt._backend(device, "rank1_restore_sgd_"), device, mats, grads,
                             counters, rank1=([self.cands[j] for j in idx], [self.vs[j] for j in idx]), keys=keys,
                             lr=self.opt._lr(group, device))
        scales = self._scales_of(idx)
        return lambda flags: run(flags.grad_scale, flags.found_inf, scales=scales(self.scales))

    def restore_left(self, params):
        if not params:
            return None
        idx = [self.index[id(p)] for p in params]
        run = ops.bind("rank1_update_", self.backend, self.device,
                       {"mats": [self.mats[j] for j in idx], "us": [self.cands[j] for j in idx],
                        "vs": [self.vs[j] for j in idx]})
        scales = self._scales_of(idx)

        def left(flags):
            torch.neg(self.scales, out=self.neg_scales)
            run(scales=scales(self.neg_scales))
        return left

    def commit(self):
        if not self.params:
            return None
        return lambda flags: self._commit(found_inf=flags.found_inf)

    def undo(self) -> None:
        if self.active and self.params:
            torch.neg(self.scales, out=self.neg_scales)
            self._rank1(scales=self.neg_scales)
        self.active = False


class NuSAM(SharpnessAwareOptimizer):
    """Memory-efficient SAM with nuclear-norm (rank-1) perturbations of the weight matrices.

    Args:
        params, base_optimizer, backend, nonfinite, max_grad_norm, **base_kwargs: as for sam_kernels.SAM.
        rho: radius of the rank-1 perturbation of each matrix (nuclear norm), per group.
        power_iters: power iterations T per step (1 in the paper).
        normalized: nuSAM-Norm: scale layer i by sigma_i / sqrt(sum_j sigma_j^2).
        conv: "skip" (conv kernels are not perturbed, as in the paper) or "reshape" (treated as
            (out, in * kh * kw) matrices).
        seed: the left vectors u_i start as normalized N(0, I) draws from torch.Generator(seed),
            in parameter order, on the CPU (so the start is the same on every device).
        tau: the guard of the power iteration's divisions (1e-12).
        start_step: plain base steps before it (perturbation delay). Those steps move one gradient
            and do not run the power iteration: the first SAM step starts from the seeded vectors
            (raise power_iters if one iteration from a random start is too rough for you).
        rho may be a callable step -> rho, as for SAM.
    """

    def __init__(self, params=None, base_optimizer=torch.optim.AdamW, rho: float = 0.1, power_iters: int = 1,
                 normalized: bool = False, conv: str = "skip", backend: str = "auto", nonfinite: str = "skip",
                 seed: int = 0, tau: float = 1e-12, start_step: int = 0, max_grad_norm=None, capturable: bool = False,
                 **base_kwargs):
        rho, rho_fn = split_rho(rho)
        check_nonneg("tau", tau)
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
            raise ValueError(f"power_iters must be an integer >= 1, got {power_iters!r}")
        if conv not in CONV:
            raise ValueError(f"conv must be one of {CONV}, got {conv!r}")
        defaults = dict(rho=rho, normalized=bool(normalized))
        # before the groups are checked: _check_group reads conv
        self.power_iters, self.conv, self.tau, self.seed = power_iters, conv, float(tau), seed
        # per matrix: u (the warm start) and v; not in self.state, which torch's checkpoint helpers
        # read as "the base state exists" (torch.distributed.checkpoint.state_dict)
        self.vectors: dict[torch.Tensor, dict] = defaultdict(dict)
        super().__init__(params, base_optimizer, defaults, backend, nonfinite, base_kwargs, start_step, rho_fn,
                         max_grad_norm, capturable)
        gen = torch.Generator().manual_seed(seed)
        for group in self.param_groups:
            self._init_u(group, gen)

    def _init_u(self, group: dict, gen: torch.Generator) -> None:
        """The warm starts u of the group's matrices: normalized N(0, I) draws from gen, in order
        (a row-sharded matrix: this rank's rows of the same draw)."""
        for p in group["params"]:
            if self._is_matrix(p):
                u = torch.randn(p.shape[0], generator=gen, dtype=torch.float32)
                u = u / u.norm()
                if is_dtensor(p):
                    u = u[distributed.row_slice(p)]
                self.vectors[p]["u"] = u.to(local(p).device)

    def _check_group(self, group: dict, where: str) -> None:
        super()._check_group(group, where)
        for j, p in enumerate(group["params"]):
            if is_dtensor(p) and self._is_matrix(p) and tuple(p.placements) != (Shard(0),):
                raise NotImplementedError(
                    f"NuSAM: {where}['params'][{j}] is sharded as {p.placements}: the power iteration on sharded "
                    "matrices takes their rows sharded (Shard(0), what FSDP2's fully_shard makes)")
            if self._is_matrix(p) and not p.is_contiguous():
                raise ValueError(f"NuSAM perturbs matrices in place: {where}['params'][{j}] of shape "
                                 f"{tuple(p.shape)} must be contiguous")

    def _group_added(self, group: dict) -> None:
        """A group added later draws its u from torch.Generator(seed + its index)."""
        self._init_u(group, torch.Generator().manual_seed(self.seed + len(self.param_groups) - 1))

    def _is_matrix(self, p: torch.Tensor) -> bool:
        return p.dim() == 2 or (p.dim() > 2 and self.conv == "reshape")

    @staticmethod
    def _as_matrix(t: torch.Tensor) -> torch.Tensor:
        return t if t.dim() == 2 else t.view(t.shape[0], math.prod(t.shape[1:]))  # (an empty shard has 0 rows)

    def _group_key(self, group: dict) -> tuple:
        return (group["normalized"],)

    def _build_first(self, work, device) -> NuSamPlan:
        return NuSamPlan(self, work, device)

    def _perturb(self, plan: NuSamPlan) -> None:
        plan.perturb(self.nonfinite == "raise")

    def _buffer(self, p, key, n):
        st = self.vectors[p]
        buf = st.get(key)
        if buf is None or buf.shape != (n,) or buf.device != p.device:
            buf = st[key] = torch.empty(n, dtype=torch.float32, device=p.device)
        return buf

    # --- state -----------------------------------------------------------------------------

    def memory_report(self) -> dict:
        """Bytes held: `perturbation` (u, v and u's candidate: sum(2n + m) fp32 values) and
        `base_state` (the base optimizer's tensors)."""
        vec = sum(t.numel() * t.element_size() for st in self.vectors.values() for t in st.values())  # u, v
        cand = sum(st["u"].numel() * 4 for st in self.vectors.values() if "u" in st)
        return {"perturbation": vec + cand, "base_state": self._base_state_bytes()}

    def _extra_state(self) -> dict:
        """The warm-start vectors u_i, in parameter order: a resumed run continues bit for bit."""
        params = [p for g in self.param_groups for p in g["params"]]
        return {"u": {i: distributed.rows_like(self.vectors[p]["u"].clone(), p)
                      for i, p in enumerate(params) if "u" in self.vectors[p]}}

    def _check_extra_state(self, extra: dict) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        for i, u in extra.get("u", {}).items():
            p = params[int(i)] if 0 <= int(i) < len(params) else None
            if p is None or "u" not in self.vectors[p] or u.shape != (p.shape[0],):
                raise ValueError(f"load_state_dict: 'u' of parameter {i} (shape {tuple(u.shape)}) does not match this "
                                 "NuSAM's matrices")

    def _load_extra_state(self, extra: dict) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        for i, u in extra.get("u", {}).items():
            p = params[int(i)]
            self.vectors[p]["u"].copy_(local(u).to(device=local(p).device, dtype=torch.float32))
