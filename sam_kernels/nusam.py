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
are not perturbed; every parameter still gets the base update.
"""
from __future__ import annotations

import torch

from . import ops
from ._base import SharpnessAwareOptimizer, check_nonneg, split_rho
from .fused_update import UPDATES

CONV = ("skip", "reshape")


class NuSAM(SharpnessAwareOptimizer):
    """Memory-efficient SAM with nuclear-norm (rank-1) perturbations of the weight matrices.

    Args:
        params, base_optimizer, backend, nonfinite, **base_kwargs: as for sam_kernels.SAM.
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
                 seed: int = 0, tau: float = 1e-12, start_step: int = 0, **base_kwargs):
        rho, rho_fn = split_rho(rho)
        check_nonneg("tau", tau)
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
            raise ValueError(f"power_iters must be an integer >= 1, got {power_iters!r}")
        if conv not in CONV:
            raise ValueError(f"conv must be one of {CONV}, got {conv!r}")
        defaults = dict(rho=rho, normalized=bool(normalized))
        super().__init__(params, base_optimizer, defaults, backend, nonfinite, base_kwargs, start_step, rho_fn)
        self.power_iters, self.conv, self.tau, self.seed = power_iters, conv, float(tau), seed
        gen = torch.Generator().manual_seed(seed)
        for group in self.param_groups:
            for p in group["params"]:
                if self._is_matrix(p):
                    if not p.is_contiguous():
                        raise ValueError(f"NuSAM perturbs matrices in place: parameter of shape {tuple(p.shape)} "
                                         "must be contiguous")
                    n = p.shape[0]
                    u = torch.randn(n, generator=gen, dtype=torch.float32)
                    st = self.state[p]
                    st["u"] = (u / u.norm()).to(p.device)
        self._perturbed = None  # (mats, params, us, vs, scales, sigmas) between the two steps

    def _is_matrix(self, p: torch.Tensor) -> bool:
        return p.dim() == 2 or (p.dim() > 2 and self.conv == "reshape")

    @staticmethod
    def _as_matrix(t: torch.Tensor) -> torch.Tensor:
        return t if t.dim() == 2 else t.view(t.shape[0], -1)

    # --- the two steps ---------------------------------------------------------------------

    @torch.no_grad()
    def _sam_first_step(self, zero_grad: bool) -> None:
        """Top singular pairs of the matrix gradients (batched power iteration), then M += s u v^T."""
        if self._perturbed is not None:
            raise RuntimeError("NuSAM.first_step() called twice: call second_step() or restore() in between")
        work = self._params_with_grad("NuSAM first_step")
        chosen = [(p, g) for g, ps in work for p in ps if self._is_matrix(p)]
        params = [p for p, _ in chosen]
        rhos = [g["rho"] for _, g in chosen]
        normed = [g["normalized"] for _, g in chosen]
        if not params:
            self._perturbed = ([], [], [], [], None, None)
            if zero_grad:
                self.zero_grad()
            return
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"NuSAM: the matrices with gradients span devices {sorted(map(str, devices))}")
        device = params[0].device
        mats = [self._as_matrix(p) for p in params]
        grads = [p.grad.reshape(m.shape) for p, m in zip(params, mats)]
        # the warm start is updated in a copy: a skipped step keeps the previous u
        us = [self.state[p]["u"].clone() for p in params]
        vs = [self._buffer(p, "v", m.shape[1]) for p, m in zip(params, mats)]
        sigmas = torch.empty(len(params), dtype=torch.float32, device=device)
        ops.power_iteration_(grads, us, vs, sigmas, self.power_iters, self.tau, backend=self.backend)
        rho = torch.tensor(rhos, dtype=torch.float32).to(device)
        if any(normed):  # nuSAM-Norm: s_i = rho sigma_i / sqrt(sum_j sigma_j^2) over the normalized matrices
            mask = torch.tensor(normed).to(device)
            c = torch.linalg.vector_norm(torch.where(mask, sigmas, 0.0))
            rho = torch.where(mask, rho * sigmas / (c + 1e-12), rho)
        # a non-finite gradient: no perturbation at all (a zero scale leaves M untouched)
        scales = torch.where(torch.isfinite(sigmas).all(), rho, 0.0)
        if self.nonfinite == "raise" and not bool(torch.isfinite(sigmas).all()):
            raise FloatingPointError("NuSAM.first_step: NaN or inf in a matrix gradient")
        ops.rank1_update_(mats, us, vs, scales, backend=self.backend)
        self._perturbed = (mats, params, us, vs, scales, sigmas)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def _sam_second_step(self, zero_grad: bool) -> None:
        """M - s u v^T and the base step with the gradient at the perturbed point, in one pass."""
        if self._perturbed is None:
            raise RuntimeError("NuSAM.second_step() called without first_step()")
        mats, params, us, vs, scales, sigmas = self._perturbed
        if self._second_step(sigmas.sum() if sigmas is not None else None, zero_grad):
            for p, u in zip(params, us):  # accepted: the new u is the next warm start
                self.state[p]["u"] = u
        self._perturbed = None

    def _fused_step(self, kind: str, groups) -> None:
        mats, params, us, vs, scales, _ = self._perturbed
        where = {id(p): i for i, p in enumerate(params)}
        done = set()
        for group, ps in groups:
            rank1 = [i for i, p in enumerate(ps) if id(p) in where]
            plain = [i for i, p in enumerate(ps) if id(p) not in where]
            if rank1:
                idx = [where[id(ps[i])] for i in rank1]
                sel = [mats[j] for j in idx]
                grads = [ps[i].grad.reshape(m.shape) for i, m in zip(rank1, sel)]
                keys = [ps[i] for i in rank1]  # the state's owners: the parameters, not conv views
                sel_scales = scales if idx == list(range(len(params))) else scales[idx]
                UPDATES[kind](self.base_optimizer, group, sel, None, grads, self.backend,
                              rank1=([us[j] for j in idx], [vs[j] for j in idx], sel_scales),
                              grad_scale=self._grad_scale,
                              keys=None if all(k is m for k, m in zip(keys, sel)) else keys)
                done.update(idx)
            if plain:
                pp = [ps[i] for i in plain]
                UPDATES[kind](self.base_optimizer, group, pp, pp, [p.grad for p in pp], self.backend,
                              grad_scale=self._grad_scale)
        left = [j for j in range(len(params)) if j not in done]  # perturbed but no second gradient
        if left:
            ops.rank1_update_([mats[j] for j in left], [us[j] for j in left], [vs[j] for j in left],
                              -scales[left], backend=self.backend)

    @torch.no_grad()
    def _sam_restore(self) -> None:
        """Remove the rank-1 perturbation after first_step() without updating (M - s u v^T)."""
        if self._perturbed is not None:
            mats, _, us, vs, scales, _ = self._perturbed
            if mats:
                ops.rank1_update_(mats, us, vs, -scales, backend=self.backend)
            self._perturbed = None

    def _perturbed_now(self) -> bool:
        return self._perturbed is not None

    def _buffer(self, p, key, n):
        st = self.state[p]
        buf = st.get(key)
        if buf is None or buf.shape != (n,) or buf.device != p.device:
            buf = st[key] = torch.empty(n, dtype=torch.float32, device=p.device)
        return buf

    # --- state -----------------------------------------------------------------------------

    def memory_report(self) -> dict:
        """Bytes held: `perturbation` (u, v and, during a step, u's candidate: sum(2n + m) fp32
        values) and `base_state` (the base optimizer's tensors)."""
        vec = sum(t.numel() * t.element_size() for st in self.state.values() for k, t in st.items() if k in ("u", "v"))
        cand = sum(st["u"].numel() * 4 for st in self.state.values() if "u" in st)
        return {"perturbation": vec + cand, "base_state": self._base_state_bytes()}

    def _extra_state(self) -> dict:
        """The warm-start vectors u_i, in parameter order: a resumed run continues bit for bit."""
        params = [p for g in self.param_groups for p in g["params"]]
        return {"u": {i: self.state[p]["u"].clone() for i, p in enumerate(params) if "u" in self.state[p]}}

    def _load_extra_state(self, extra: dict) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        for i, u in extra.get("u", {}).items():
            p = params[int(i)]
            self.state[p]["u"] = u.to(device=p.device, dtype=torch.float32).clone()
