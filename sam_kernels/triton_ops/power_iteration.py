"""power_iteration_: T warm-started power iterations for every matrix of a dtype group, in a
fixed number of launches whatever the number and shapes of the matrices (a grouped-GEMV work
table, in the spirit of Triton's grouped-GEMM tutorial):

    G^T u   one program per (matrix, block of BC columns), looping over row tiles
    G v     one program per (matrix, block of BR rows), looping over column tiles
    norms   one program per matrix, adding its programs' partial sums in a fixed order

The raw products are written straight into vs / us; their normalization 1 / (||.|| + tau) is
a per-matrix scale applied when the next product reads them, and once at the end.
Floor: every gradient matrix is read twice per iteration (4 + 4 B per fp32 element)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._tables import _pointer_table, device_tensor, launch_kwargs, tl_dtype

BR_T, BC_T = 32, 128  # G^T u: row tile, column block
BR, BC = 16, 256      # G v: row block, column tile
SEG_BLOCK = 128


@triton.jit
def _gemv_t_kernel(g_ptrs, u_ptrs, v_ptrs, ns, ms, it_t, it_c, u_scale, partials,
                   DTYPE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(it_t + pid)
    n = tl.load(ns + t)
    m = tl.load(ms + t)
    g = tl.load(g_ptrs + t).to(tl.pointer_type(DTYPE))
    u = tl.load(u_ptrs + t).to(tl.pointer_type(tl.float32))
    v = tl.load(v_ptrs + t).to(tl.pointer_type(tl.float32))
    cols = tl.load(it_c + pid) + tl.arange(0, BC)
    cmask = cols < m
    acc = tl.zeros([BC], dtype=tl.float32)
    for r0 in range(0, n, BR):
        rows = r0 + tl.arange(0, BR)
        rmask = rows < n
        tile = tl.load(g + rows[:, None] * m + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        ur = tl.load(u + rows, mask=rmask, other=0.0)
        acc += tl.sum(tile.to(tl.float32) * ur[:, None], axis=0)
    acc = acc * tl.load(u_scale + t)
    tl.store(v + cols, acc, mask=cmask)
    tl.store(partials + pid, tl.sum(acc * acc, axis=0))


@triton.jit
def _gemv_kernel(g_ptrs, v_ptrs, u_ptrs, ns, ms, it_t, it_r, v_scale, partials,
                 DTYPE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(it_t + pid)
    n = tl.load(ns + t)
    m = tl.load(ms + t)
    g = tl.load(g_ptrs + t).to(tl.pointer_type(DTYPE))
    v = tl.load(v_ptrs + t).to(tl.pointer_type(tl.float32))
    u = tl.load(u_ptrs + t).to(tl.pointer_type(tl.float32))
    rows = tl.load(it_r + pid) + tl.arange(0, BR)
    rmask = rows < n
    acc = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, m, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < m
        tile = tl.load(g + rows[:, None] * m + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        vc = tl.load(v + cols, mask=cmask, other=0.0)
        acc += tl.sum(tile.to(tl.float32) * vc[None, :], axis=1)
    acc = acc * tl.load(v_scale + t)
    tl.store(u + rows, acc, mask=rmask)
    tl.store(partials + pid, tl.sum(acc * acc, axis=0))


@triton.jit
def _segment_norm_kernel(partials, p_start, p_count, norms, inv, tau, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    start = tl.load(p_start + t)
    count = tl.load(p_count + t)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, count, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(partials + start + offs, mask=offs < count, other=0.0)
    nrm = tl.sqrt(tl.sum(acc, axis=0))
    tl.store(norms + t, nrm)
    tl.store(inv + t, 1.0 / (nrm + tau))


@triton.jit
def _scale_kernel(x_ptrs, lens, it_t, it_s, scale, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(it_t + pid)
    offs = tl.load(it_s + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(lens + t)
    x = tl.load(x_ptrs + t).to(tl.pointer_type(tl.float32))
    tl.store(x + offs, tl.load(x + offs, mask=mask) * tl.load(scale + t), mask=mask)


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
    scale_items = {}
    for dim in (0, 1):  # element blocks of the u (dim 0) and v (dim 1) vectors
        t_idx, start = [], []
        for i, s in enumerate(shapes):
            for b in range(0, s[dim], SEG_BLOCK):
                t_idx.append(i)
                start.append(b)
        scale_items[dim] = (_dev(t_idx, torch.int32, device), _dev(start, torch.int64, device), len(t_idx))
    return ns, ms, items(1, BC_T), items(0, BR), scale_items


def _ptrs(tensors, device):
    return _pointer_table(tuple(map(torch.Tensor.data_ptr, tensors)), device)


def power_iteration_(mats, us, vs, sigmas, iters, tau):
    device = mats[0].device
    dtypes = {m.dtype for m in mats}
    if len(dtypes) > 1:  # one launch set per dtype group; the sigmas of each group land at their indices
        for dt in dtypes:
            idx = [i for i, m in enumerate(mats) if m.dtype == dt]
            sub = torch.empty(len(idx), dtype=torch.float32, device=device)
            power_iteration_([mats[i] for i in idx], [us[i] for i in idx], [vs[i] for i in idx], sub, iters, tau)
            sigmas.index_copy_(0, _dev(idx, torch.int64, device), sub)
        return
    k = len(mats)
    ns, ms, (tt_t, tt_c, pt_start, pt_count, n_t), (tr_t, tr_r, pr_start, pr_count, n_r), scale_items = _plan(
        tuple(tuple(m.shape) for m in mats), device)
    g_ptrs, u_ptrs, v_ptrs = _ptrs(mats, device), _ptrs(us, device), _ptrs(vs, device)
    dt = tl_dtype(mats[0].dtype)
    kw = launch_kwargs()
    u_inv = torch.ones(k, dtype=torch.float32, device=device)
    v_inv = torch.empty(k, dtype=torch.float32, device=device)
    v_norm = torch.empty(k, dtype=torch.float32, device=device)
    part_t = torch.empty(max(n_t, 1), dtype=torch.float32, device=device)
    part_r = torch.empty(max(n_r, 1), dtype=torch.float32, device=device)
    for _ in range(iters):
        if n_t:
            _gemv_t_kernel[(n_t,)](g_ptrs, u_ptrs, v_ptrs, ns, ms, tt_t, tt_c, u_inv, part_t, DTYPE=dt, BR=BR_T,
                                   BC=BC_T, **kw)
        _segment_norm_kernel[(k,)](part_t, pt_start, pt_count, v_norm, v_inv, float(tau), BLOCK=SEG_BLOCK)
        if n_r:
            _gemv_kernel[(n_r,)](g_ptrs, v_ptrs, u_ptrs, ns, ms, tr_t, tr_r, v_inv, part_r, DTYPE=dt, BR=BR, BC=BC,
                                 **kw)
        _segment_norm_kernel[(k,)](part_r, pr_start, pr_count, sigmas, u_inv, float(tau), BLOCK=SEG_BLOCK)
    for dim, ptrs, lens_src, scale in ((0, u_ptrs, ns, u_inv), (1, v_ptrs, ms, v_inv)):
        it_t, it_s, count = scale_items[dim]
        if count:
            _scale_kernel[(count,)](ptrs, lens_src, it_t, it_s, scale, BLOCK=SEG_BLOCK)
