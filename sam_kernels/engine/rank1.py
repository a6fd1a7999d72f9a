"""nuSAM's perturbation (ALGORITHMS.md, "nuSAM"; seed 002): restored by recomputing it, not from a
copy. Only weight matrices M_i (n_i x m_i) are perturbed, by a rank-1 term along the top singular
pair of their gradient, found by warm-started power iteration:

    u_i, v_i = SVD_top1(G_i, u_i)            batched over all matrices (ops.power_iteration_)
    M_i <- M_i + s_i u_i v_i^T               s_i = rho, or rho sigma_i / sqrt(sum_j sigma_j^2) (Norm)
    ... gradient G~ at the perturbed point ...
    M_i <- M_i - s_i u_i v_i^T - update(G~)  one fused pass (ops.rank1_restore_sgd_ / _adam_)

    Rank1Perturbation   the strategy NuSAM composes: the vectors (u, its candidate, v) per matrix,
                        which parameters are matrices, the warm starts
    Rank1Pass           its plan: the power iteration, the scales, the rank-1 move in place, and
                        for the update the rank-1 source of each matrix (bases.Rank1)

Nothing but x, the gradients and the vectors is stored: sum_i (2 n_i + m_i) floats instead of a
copy of the weights. The weights come back to within one rounding of x_t, not bit for bit. The
scales are computed on the device (zero for every matrix when a sigma is not finite), and the new
u_i replaces the warm start only when the step is taken (a device-conditional copy).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from .. import ops
from ..integrations import distributed
from ..integrations.distributed import all_reduce_sum_, is_dtensor, local
from ..ops.lists import GradsOf
from .bases import Rank1, Restore
from .norms import NormStage

CONV = ("skip", "reshape")


def _device_vector(values, device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


class Rank1Perturbation:
    """The strategy (see the module docstring). conv: "skip" (conv kernels are not perturbed, as in
    the paper) or "reshape" ((out, in * kh * kw) matrices); power_iters, tau: the power
    iteration's; the warm starts u_i are normalized N(0, I) draws from torch.Generator(seed), in
    parameter order, on the CPU (the same start on every device)."""

    def __init__(self, conv: str, power_iters: int, tau: float, seed: int):
        self.conv, self.power_iters, self.tau, self.seed = conv, power_iters, tau, seed
        # per matrix: u (the warm start) and v; not in the optimizer's state, which torch's checkpoint
        # helpers read as "the base state exists" (torch.distributed.checkpoint.state_dict)
        self.vectors: dict[torch.Tensor, dict] = defaultdict(dict)

    @staticmethod
    def group_key(group: dict) -> tuple:
        return (group["normalized"], group["perturb"])

    def is_matrix(self, p: torch.Tensor) -> bool:
        return p.dim() == 2 or (p.dim() > 2 and self.conv == "reshape")

    @staticmethod
    def as_matrix(t: torch.Tensor) -> torch.Tensor:
        return t if t.dim() == 2 else t.view(t.shape[0], math.prod(t.shape[1:]))  # (an empty shard has 0 rows)

    def init_warm_starts(self, params, gen: torch.Generator) -> None:
        """The warm starts of these parameters' matrices: normalized N(0, I) draws from gen, in order
        (a row-sharded matrix: this rank's rows of the same draw)."""
        for p in params:
            if self.is_matrix(p):
                u = torch.randn(p.shape[0], generator=gen, dtype=torch.float32)
                u = u / u.norm()
                if is_dtensor(p):
                    u = u[distributed.row_slice(p)]
                self.vectors[p]["u"] = u.to(local(p).device)

    def buffer(self, p, key: str, n: int) -> torch.Tensor:
        st = self.vectors[p]
        buf = st.get(key)
        if buf is None or buf.shape != (n,) or buf.device != p.device:
            buf = st[key] = torch.empty(n, dtype=torch.float32, device=p.device)
        return buf

    def nbytes(self) -> int:
        """u, v and u's candidate: sum(2n + m) fp32 values."""
        vec = sum(t.numel() * t.element_size() for st in self.vectors.values() for t in st.values())
        cand = sum(st["u"].numel() * 4 for st in self.vectors.values() if "u" in st)
        return vec + cand

    def state(self, params) -> dict:
        """The warm-start vectors u_i by parameter index: a resumed run continues bit for bit."""
        return {"u": {i: distributed.rows_like(self.vectors[p]["u"].clone(), p)
                      for i, p in enumerate(params) if "u" in self.vectors[p]}}

    def check_state(self, params, extra: dict) -> None:
        for i, u in extra.get("u", {}).items():
            p = params[int(i)] if 0 <= int(i) < len(params) else None
            if p is None or "u" not in self.vectors[p] or u.shape != (p.shape[0],):
                raise ValueError(f"load_state_dict: 'u' of parameter {i} (shape {tuple(u.shape)}) does not match this "
                                 "NuSAM's matrices")

    def load_state(self, params, extra: dict) -> None:
        for i, u in extra.get("u", {}).items():
            p = params[int(i)]
            self.vectors[p]["u"].copy_(local(u).to(device=local(p).device, dtype=torch.float32))

    def build(self, engine, work, device) -> "Rank1Pass":
        return Rank1Pass(engine, self, work, device)


class Rank1Pass:
    """The first pass of nuSAM over [(group, params with a gradient)]: the batched power iteration
    over the matrix gradients (from candidates of the warm starts), the scales, the rank-1
    perturbation in place. The norm of the other first gradients (biases, norms) is one more entry
    of the sigma vector (rho 0, not normalized), so a non-finite value in any first gradient zeroes
    every scale: nothing is perturbed and a skipped step leaves the weights bit for bit. `first_norm`
    (the sum of that vector) is the first gradient's check."""

    def __init__(self, engine, strategy: Rank1Perturbation, work, device):
        chosen = [(p, g) for g, ps in work for p in ps if g["perturb"] and strategy.is_matrix(p)]
        others = [p for g, ps in work for p in ps if not (g["perturb"] and strategy.is_matrix(p))]
        self.engine, self.strategy, self.device = engine, strategy, device
        self.params = [p for p, _ in chosen]
        self.active = False
        self.index = {id(p): j for j, p in enumerate(self.params)}
        for p in self.params:
            if not p.is_contiguous():
                raise ValueError(f"NuSAM perturbs matrices in place: parameter of shape {tuple(p.shape)} "
                                 "must be contiguous")
        self.mats = [strategy.as_matrix(local(p)) for p in self.params]  # sharded: this rank's rows
        self.grads = GradsOf(self.params, [m.shape for m in self.mats])
        self.group = engine.reduce_group()
        self.us = [strategy.vectors[p]["u"] for p in self.params]  # the warm starts, replaced when a step is taken
        self.cands = [torch.empty_like(u) for u in self.us]
        self.vs = [strategy.buffer(p, "v", m.shape[1]) for p, m in zip(self.params, self.mats)]
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
        self.first_norm = torch.zeros((), dtype=torch.float32, device=device)
        self.check = (NormStage(engine.backend_for(device, "global_norm"), device, [(GradsOf(others), None, 0, 0.0)],
                                group=self.group) if others else None)
        self.backend = engine.backend_for(device, "rank1_update_") if k else None
        if k:
            staged = not ops.stageable({"mats": self.grads}, aligned=self.backend == "triton")
            # the power iteration from the warm starts into the candidates (a skipped step keeps the warm start)
            self._power = (self._sharded_power if self.group is not None else
                           ops.prepare("power_iteration", self.backend, device, mats=self.grads, us=self.cands,
                                       vs=self.vs, warm=self.us) if not staged else self._staged_power)
            self._scales = ops.prepare("rank1_scales_", engine.backend_for(device, "rank1_scales_"), device)
            self._commit = ops.bind("restore_", self.backend, device, {"params": self.us, "x_old": self.cands})
            self._rank1 = ops.bind("rank1_update_", self.backend, device,
                                   {"mats": self.mats, "us": self.cands, "vs": self.vs})

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
        if self.engine.capturable:
            if self.rho is None:
                ds = self.engine.device_scalars(self.device)
                self._rho_rows = _device_vector([ds.row(g) for g in self.groups], self.device).long()
                self.rho = torch.zeros(len(self.groups) + 1, dtype=torch.float32, device=self.device)
                self._rho_column = ds.rho_column()
            torch.index_select(self._rho_column, 0, self._rho_rows, out=self.rho[:-1])
            return self.rho
        key = tuple(g["rho"] for g in self.groups)
        if key != self._rho_key:
            self._rho_key, self.rho = key, _device_vector(list(key) + [0.0], self.device)
        return self.rho

    def perturb(self, raise_nonfinite: bool, scale=None) -> None:
        if self.check is not None and not (self.params and self.group is not None):
            self.check.norm(self.others_norm if self.params else self.first_norm)  # (sharded: inside the iteration)
        if self.params:
            self._power(sigmas=self.sigmas, iters=self.strategy.power_iters, tau=self.strategy.tau)
            # s_i (nuSAM-Norm's too; all 0 if an entry is not finite: no perturbation), first_norm = their sum
            self._scales(self.sigmas_all, self._rhos(), self.normed, self.scales_all, self.first_norm)
        if raise_nonfinite and not bool(torch.isfinite(self.first_norm)):  # raise mode: a synchronization
            raise FloatingPointError("NuSAM.first_step: NaN or inf in a gradient")
        if self.params:
            self._rank1(scales=self.scales)
        self.active = True

    def _scales_of(self, idx):
        """The scales of the matrices idx: the vector itself, or a gather launched every step."""
        if idx == list(range(len(self.params))):
            return lambda source: source
        index = _device_vector(idx, self.device).long()
        buf = torch.empty(len(idx), dtype=torch.float32, device=self.device)
        return lambda source: torch.index_select(source, 0, index, out=buf)

    def sources(self, group, ps):
        """The matrices restore from their rank-1 term (M - s u v^T, recomputed), the others from
        themselves (not perturbed)."""
        out = []
        plain = [p for p in ps if id(p) not in self.index]
        if plain:
            out.append((Restore(x_old=plain), plain, GradsOf(plain), None))
        mats_ps = [p for p in ps if id(p) in self.index]
        if mats_ps:
            idx = [self.index[id(p)] for p in mats_ps]
            mats = [self.mats[j] for j in idx]
            keys = None if all(p is m for p, m in zip(mats_ps, mats)) else mats_ps  # conv kernels: state keys
            scales = self._scales_of(idx)
            out.append((Rank1(us=[self.cands[j] for j in idx], vs=[self.vs[j] for j in idx], keys=keys), mats,
                        GradsOf(mats_ps, [m.shape for m in mats]), lambda flags, scales=scales: scales(self.scales)))
        return out

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

    def prelude(self, engine, params, device):
        return None  # the update takes the second gradient as it is

    def commit(self, engine=None, params=(), device=None):
        """The new warm starts, kept only if the step is taken."""
        if not self.params:
            return None
        return lambda flags: self._commit(found_inf=flags.found_inf)

    def hand_over(self) -> None:
        """The fused updates take the perturbation out (they restore x_t): nothing left to undo."""
        self.active = False

    def undo(self) -> None:
        if self.active and self.params:
            torch.neg(self.scales, out=self.neg_scales)
            self._rank1(scales=self.neg_scales)
        self.active = False
