"""rank1_update_: M_i <- M_i + s_i u_i v_i^T for every matrix of a dtype group in one launch,
computed as M + (s u_r) v_c; a zero s_i leaves M_i untouched. Floor: read and write M (8 B
per fp32 element); u and v are small and stay in cache."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._tables import Launch, block_of, compute_dtype, dtype_groups, pick, tensor_ptr, tl_dtype


@triton.jit
def rank1_term(ptrs, n_tensors, t, offs, mask, ncols, scales, U_LIST: tl.constexpr):
    """(s * u_r) * v_c for the elements offs of matrix t, and s (for the s == 0 test)."""
    m = tl.load(ncols + t)
    s = tl.load(scales + t)
    r = offs // m
    u = tensor_ptr(ptrs, n_tensors, t, U_LIST, tl.float32)
    v = tensor_ptr(ptrs, n_tensors, t, U_LIST + 1, tl.float32)
    su = s * tl.load(u + r, mask=mask, other=0.0)
    return su * tl.load(v + (offs - r * m), mask=mask, other=0.0), s


@triton.jit
def load_old(ptrs, n_tensors, t, offs, mask, ncols, scales, RANK1: tl.constexpr, U_LIST: tl.constexpr,
             DTYPE: tl.constexpr, CT: tl.constexpr):
    """x_old for the fused updates: list 1 of the table (SAM), or for nuSAM M - s u v^T
    recomputed from list 0 (M) and the vectors at U_LIST, U_LIST + 1."""
    if RANK1:
        term, s = rank1_term(ptrs, n_tensors, t, offs, mask, ncols, scales, U_LIST)
        xm = tl.load(tensor_ptr(ptrs, n_tensors, t, 0, DTYPE) + offs, mask=mask).to(CT)
        x = tl.where(s != 0, xm - term.to(CT), xm)
    else:
        x = tl.load(tensor_ptr(ptrs, n_tensors, t, 1, DTYPE) + offs, mask=mask).to(CT)
    return x


def rank1_lists(lists, params, index, rank1):
    """Append nuSAM's vectors to a fused update's table; the per-tensor column counts and scales
    (placeholders when rank1 is None: the kernels then never read them)."""
    if rank1 is None:
        return lists, lists[0][0], lists[0][0]
    us, vs, scales = rank1
    return (lists + [pick(us, index), pick(vs, index)], ncols_of(lists[0]),
            scales if len(index) == len(params) else scales[index])


@triton.jit
def _rank1_kernel(ptrs, n_tensors, numels, blk_tensor, blk_start, ncols, scales,
                  DTYPE: tl.constexpr, CT: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    x_ptr = tensor_ptr(ptrs, n_tensors, t, 0, DTYPE)
    term, s = rank1_term(ptrs, n_tensors, t, offs, mask, ncols, scales, 1)
    x = tl.load(x_ptr + offs, mask=mask).to(CT)
    tl.store(x_ptr + offs, tl.where(s != 0, x + term.to(CT), x).to(DTYPE), mask=mask)


@functools.lru_cache(maxsize=128)
def _ncols(cols: tuple, device: torch.device):
    return torch.tensor(cols, dtype=torch.int64).to(device)


def ncols_of(mats):
    return _ncols(tuple(m.shape[1] for m in mats), mats[0].device)


def rank1_update_(mats, us, vs, scales):
    for dtype, index in dtype_groups(mats):
        ms = pick(mats, index)
        launch = Launch([ms, pick(us, index), pick(vs, index)])
        launch.run(_rank1_kernel, ncols_of(ms), scales[index] if len(index) != len(mats) else scales,
                   DTYPE=tl_dtype(dtype), CT=compute_dtype(dtype))
