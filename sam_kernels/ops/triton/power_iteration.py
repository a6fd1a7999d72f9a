"""power_iteration_: T warm-started power iterations for every matrix of a dtype group in 2T + 1
launches whatever the number and shapes of the matrices (a grouped-GEMV work table, in the
spirit of Triton's grouped-GEMM tutorial):

    G^T u   one program per (matrix, block of BC_T columns), looping over row tiles
    G v     one program per (matrix, block of BR rows), looping over column tiles
    finish  one program per block of a u or v vector: its normalization, and sigma

Matrices whose rows are 16-byte aligned go to launches that load 16-byte vectors (VEC). The raw
products are written straight into vs / us (each program also writes its partial sum of
squares); their normalization 1 / (||.|| + tau) is a per-matrix scale that the next product
computes from those partials when it reads them, and the finish applies once at the end. The
warm start can be read from other vectors than the ones written (`warm`: nuSAM keeps its warm
start until a step is taken), so no copy is needed.
Floor: every gradient matrix is read twice per iteration (4 + 4 B per fp32 element).

rank1_scales_: nuSAM's per-matrix scales from the sigmas, one program (see ops.rank1_scales_)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import constants as _constants
from ..lists import Live, on_refresh
from ._tables import _pointer_table, device_tensor, launch_kwargs, tl_dtype

BR_T, BC_T = 32, 128  # G^T u: row tile, column block
BR, BC = 16, 256      # G v: row block, column tile
SEG_BLOCK = 128
NORM_EPS = tl.constexpr(_constants.NORM_EPS)  # nuSAM-Norm's guard of sqrt(sum_j sigma_j^2)


@triton.jit
def _norm(partials, start, count, BLOCK: tl.constexpr):
    """sqrt(sum of partials[start:start + count]), added in a fixed order."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, count, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(partials + start + offs, mask=offs < count, other=0.0)
    return tl.sqrt(tl.sum(acc, axis=0))


@triton.jit
def _gemv_t_kernel(g_ptrs, u_ptrs, v_ptrs, ns, ms, it_t, it_c, pr_start, pr_count, partials_r, partials_t, tau,
                   WARM: tl.constexpr, DTYPE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                   SEG: tl.constexpr, VEC: tl.constexpr):
    """v_raw = G^T (u_raw / ||u_raw||) for one column block; WARM: u is the (unit) warm start."""
    pid = tl.program_id(0)
    t = tl.load(it_t + pid)
    n = tl.load(ns + t)
    m = tl.load(ms + t)
    g = tl.load(g_ptrs + t).to(tl.pointer_type(DTYPE))
    if VEC > 1:  # rows 16-byte aligned (an aligned base, m a multiple of the vector): 16-byte loads
        m = tl.multiple_of(m, VEC)
        g = tl.multiple_of(g, 16)
    u = tl.load(u_ptrs + t).to(tl.pointer_type(tl.float32))
    v = tl.load(v_ptrs + t).to(tl.pointer_type(tl.float32))
    u_scale = 1.0
    if not WARM:
        u_scale = 1.0 / (_norm(partials_r, tl.load(pr_start + t), tl.load(pr_count + t), SEG) + tau)
    cols = tl.multiple_of(tl.load(it_c + pid), BC) + tl.arange(0, BC)
    cmask = cols < m
    acc = tl.zeros([BC], dtype=tl.float32)
    for r0 in range(0, n, BR):
        rows = r0 + tl.arange(0, BR)
        rmask = rows < n
        tile = tl.load(g + rows[:, None] * m + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        ur = tl.load(u + rows, mask=rmask, other=0.0)
        acc += tl.sum(tile.to(tl.float32) * ur[:, None], axis=0)
    acc = acc * u_scale
    tl.store(v + cols, acc, mask=cmask)
    tl.store(partials_t + pid, tl.sum(acc * acc, axis=0))


@triton.jit
def _gemv_kernel(g_ptrs, v_ptrs, u_ptrs, ns, ms, it_t, it_r, pt_start, pt_count, partials_t, partials_r, tau,
                 DTYPE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, SEG: tl.constexpr, VEC: tl.constexpr):
    """u_raw = G (v_raw / (||v_raw|| + tau)) for one row block."""
    pid = tl.program_id(0)
    t = tl.load(it_t + pid)
    n = tl.load(ns + t)
    m = tl.load(ms + t)
    g = tl.load(g_ptrs + t).to(tl.pointer_type(DTYPE))
    if VEC > 1:
        m = tl.multiple_of(m, VEC)
        g = tl.multiple_of(g, 16)
    v = tl.load(v_ptrs + t).to(tl.pointer_type(tl.float32))
    u = tl.load(u_ptrs + t).to(tl.pointer_type(tl.float32))
    v_scale = 1.0 / (_norm(partials_t, tl.load(pt_start + t), tl.load(pt_count + t), SEG) + tau)
    rows = tl.load(it_r + pid) + tl.arange(0, BR)
    rmask = rows < n
    acc = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, m, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < m
        tile = tl.load(g + rows[:, None] * m + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        vc = tl.load(v + cols, mask=cmask, other=0.0)
        acc += tl.sum(tile.to(tl.float32) * vc[None, :], axis=1)
    acc = acc * v_scale
    tl.store(u + rows, acc, mask=rmask)
    tl.store(partials_r + pid, tl.sum(acc * acc, axis=0))


@triton.jit
def _finish_kernel(u_ptrs, v_ptrs, ns, ms, it_t, it_s, it_dim, pt_start, pt_count, partials_t, pr_start, pr_count,
                   partials_r, sigmas, sigma_index, tau, BLOCK: tl.constexpr, SEG: tl.constexpr):
    """Normalize one block of u (dim 0, by 1 / (sigma + tau)) or v (dim 1). sigma = ||G v|| is written
    by block 0 of u (by block 0 of v when u is empty: then G v is empty and sigma 0)."""
    pid = tl.program_id(0)
    t = tl.load(it_t + pid)
    dim = tl.load(it_dim + pid)
    start = tl.load(it_s + pid)
    offs = start + tl.arange(0, BLOCK)
    n = tl.load(ns + t)
    if dim == 0:
        nrm = _norm(partials_r, tl.load(pr_start + t), tl.load(pr_count + t), SEG)
        x = tl.load(u_ptrs + t).to(tl.pointer_type(tl.float32))
        mask = offs < n
        if start == 0:
            tl.store(sigmas + tl.load(sigma_index + t), nrm)
    else:
        nrm = _norm(partials_t, tl.load(pt_start + t), tl.load(pt_count + t), SEG)
        x = tl.load(v_ptrs + t).to(tl.pointer_type(tl.float32))
        mask = offs < tl.load(ms + t)
        if (start == 0) & (n == 0):
            tl.store(sigmas + tl.load(sigma_index + t), 0.0)
    tl.store(x + offs, tl.load(x + offs, mask=mask) * (1.0 / (nrm + tau)), mask=mask)


@triton.jit
def _scales_kernel(sigmas, rhos, normalized, scales, first_norm, k, BLOCK: tl.constexpr):
    """One program: scales_i = all sigmas finite ? (normalized_i ? rho_i sigma_i / (c + eps) : rho_i) : 0,
    c = sqrt(sum of the normalized sigma_j^2); first_norm = sum of the sigmas (not finite iff one is not)."""
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, k, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < k
        s = tl.load(sigmas + offs, mask=mask, other=0.0)
        nm = tl.load(normalized + offs, mask=mask, other=0.0)
        bad += tl.where(tl.abs(s) < float("inf"), 0, 1)
        sq += tl.where(nm != 0, s * s, 0.0)
        total += s
    finite = tl.sum(bad, axis=0) == 0
    c = tl.sqrt(tl.sum(sq, axis=0))
    tl.store(first_norm, tl.sum(total, axis=0))
    for i in range(0, k, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < k
        s = tl.load(sigmas + offs, mask=mask, other=0.0)
        r = tl.load(rhos + offs, mask=mask, other=0.0)
        nm = tl.load(normalized + offs, mask=mask, other=0.0)
        scale = tl.where(nm != 0, r * s / (c + NORM_EPS), r)
        tl.store(scales + offs, tl.where(finite, scale, 0.0), mask=mask)


def _dev(values, dtype, device):
    return device_tensor(values, dtype, device)


@functools.lru_cache(maxsize=64)
def _plan(shapes: tuple, device: torch.device):
    """Work tables for a list of matrix shapes: built once per shape list."""
    def items(dim, width):
        t_idx, start, p_start, p_count = [], [], [], []
        for i, s in enumerate(shapes):
            p_start.append(len(t_idx))
            for b in range(0, s[dim], width):
                t_idx.append(i)
                start.append(b)
            p_count.append(len(t_idx) - p_start[-1])
        return (_dev(t_idx, torch.int32, device), _dev(start, torch.int64, device), _dev(p_start, torch.int64, device),
                _dev(p_count, torch.int64, device), len(t_idx))

    ns = _dev([s[0] for s in shapes], torch.int64, device)
    ms = _dev([s[1] for s in shapes], torch.int64, device)
    t_idx, start, dims = [], [], []
    for dim in (0, 1):  # element blocks of the u (dim 0) and v (dim 1) vectors
        for i, s in enumerate(shapes):
            for b in range(0, s[dim], SEG_BLOCK):
                t_idx.append(i)
                start.append(b)
                dims.append(dim)
    finish = (_dev(t_idx, torch.int32, device), _dev(start, torch.int64, device), _dev(dims, torch.int32, device),
              len(t_idx))
    return ns, ms, items(1, BC_T), items(0, BR), finish


def _ptrs(tensors, device):
    return _pointer_table(tuple(t.data_ptr() if not isinstance(t, int) else t for t in tensors), device)


class _Group:
    """The launches of one dtype group: tables built once, partials kept (2T + 1 launches a call)."""

    def __init__(self, mats, warm, us, vs, index, device, vec):
        self.k = len(mats)
        self.vec = vec
        self.dtype = tl_dtype(mats[0].dtype)
        (self.ns, self.ms, (self.tt_t, self.tt_c, self.pt_start, self.pt_count, self.n_t),
         (self.tr_t, self.tr_r, self.pr_start, self.pr_count, self.n_r),
         (self.f_t, self.f_s, self.f_dim, self.n_f)) = _plan(tuple(tuple(m.shape) for m in mats), device)
        self.part_t = torch.empty(max(self.n_t, 1), dtype=torch.float32, device=device)
        self.part_r = torch.empty(max(self.n_r, 1), dtype=torch.float32, device=device)
        self.sigma_index = _dev(index, torch.int64, device)
        self.device = device
        self.lists = (mats, warm, us, vs)
        self._tables()
        if isinstance(mats, Live):  # the gradients of a step plan: new addresses, the same tables
            on_refresh(self._tables)

    def _tables(self):
        mats, warm, us, vs = self.lists
        self.g_ptrs, self.w_ptrs = _ptrs(list(mats), self.device), _ptrs(list(warm), self.device)
        self.u_ptrs, self.v_ptrs = _ptrs(list(us), self.device), _ptrs(list(vs), self.device)

    def run(self, sigmas, iters, tau):
        kw = launch_kwargs()
        tau = float(tau)
        for i in range(iters):
            if self.n_t:
                _gemv_t_kernel[(self.n_t,)](self.g_ptrs, self.w_ptrs if i == 0 else self.u_ptrs, self.v_ptrs, self.ns,
                                            self.ms, self.tt_t, self.tt_c, self.pr_start, self.pr_count, self.part_r,
                                            self.part_t, tau, WARM=i == 0, DTYPE=self.dtype, BR=BR_T, BC=BC_T,
                                            SEG=SEG_BLOCK, VEC=self.vec, **kw)
            if self.n_r:
                _gemv_kernel[(self.n_r,)](self.g_ptrs, self.v_ptrs, self.u_ptrs, self.ns, self.ms, self.tr_t, self.tr_r,
                                          self.pt_start, self.pt_count, self.part_t, self.part_r, tau, DTYPE=self.dtype,
                                          BR=BR, BC=BC, SEG=SEG_BLOCK, VEC=self.vec, **kw)
        if self.n_f:
            _finish_kernel[(self.n_f,)](self.u_ptrs, self.v_ptrs, self.ns, self.ms, self.f_t, self.f_s, self.f_dim,
                                        self.pt_start, self.pt_count, self.part_t, self.pr_start, self.pr_count,
                                        self.part_r, sigmas, self.sigma_index, tau, BLOCK=SEG_BLOCK, SEG=SEG_BLOCK)


def prepare_power_iteration(mats, us, vs, warm=None):
    """run(sigmas, iters, tau): the power iteration of every matrix, warm-started from `warm`
    (default: us itself), u into us, v into vs, sigma_i into sigmas[i]."""
    warm = us if warm is None else warm
    device = mats[0].device
    groups = []

    def vec_of(m):  # 16-byte rows (aligned base, a multiple of the vector width of columns) take wide loads
        vec = max(1, 16 // m.element_size())
        return vec if m.shape[1] % vec == 0 and m.data_ptr() % 16 == 0 else 1

    for key in dict.fromkeys((m.dtype, vec_of(m)) for m in mats):
        idx = [i for i, m in enumerate(mats) if (m.dtype, vec_of(m)) == key]
        mats_g = mats.pick(idx) if isinstance(mats, Live) else [mats[i] for i in idx]
        groups.append(_Group(mats_g, [warm[i] for i in idx], [us[i] for i in idx], [vs[i] for i in idx], idx, device,
                             key[1]))
    empty = [i for i, m in enumerate(mats) if m.shape[0] == 0 and m.shape[1] == 0]  # no program writes their sigma
    empty = _dev(empty, torch.int64, device) if empty else None

    def run(sigmas, iters, tau):
        if empty is not None:
            sigmas.index_fill_(0, empty, 0.0)
        for g in groups:
            g.run(sigmas, int(iters), tau)
    return run


def power_iteration_(mats, us, vs, sigmas, iters, tau):
    prepare_power_iteration(mats, us, vs)(sigmas, iters, tau)


def rank1_scales_(sigmas, rho, normalized, scales, first_norm):
    _scales_kernel[(1,)](sigmas, rho, normalized, scales, first_norm, sigmas.numel(), BLOCK=128)


def prepare_rank1_scales_():
    return rank1_scales_
