"""rank1_update_: M_i <- M_i + s_i u_i v_i^T for every matrix of a dtype group in one launch,
computed as M + (s u_r) v_c; a zero s_i leaves M_i untouched. Floor: read and write M (8 B
per fp32 element); u and v are small and stay in cache. Also the rank-1 helpers of the fused
nuSAM updates (restore.py's load_old): x_old = M - s u v^T recomputed, never stored."""
from __future__ import annotations

import triton
import triton.language as tl

from ._tables import bind, block_of, compute_dtype, int_column, pick, scalar_ptr, tensor_ptr, tl_dtype


@triton.jit
def rank1_term(ptrs, n_tensors, t, offs, mask, ncols, index, scales, U_LIST: tl.constexpr):
    """(s * u_r) * v_c for the elements offs of matrix t, and s (for the s == 0 test); s is
    scales[index[t]] (index: the matrix's position in the op's lists)."""
    m = tl.load(ncols + t)
    s = tl.load(scales + tl.load(index + t))
    r = offs // m
    u = scalar_ptr(ptrs, n_tensors, t, U_LIST, tl.float32)
    v = scalar_ptr(ptrs, n_tensors, t, U_LIST + 1, tl.float32)
    su = s * tl.load(u + r, mask=mask, other=0.0)
    return su * tl.load(v + (offs - r * m), mask=mask, other=0.0), s


def rank1_columns(mats, index):
    """The per-matrix column counts and list positions of a launch over mats[index] (cached)."""
    device = mats[0].device
    return int_column(tuple(mats[i].shape[1] for i in index), device), int_column(tuple(index), device)


def rank1_lists(lists, params, index, rank1):
    """Append nuSAM's vectors to a fused update's table; the column counts, positions and scales
    (placeholders when rank1 is None: the kernels then never read them)."""
    if rank1 is None:
        return lists, lists[0][0], lists[0][0], lists[0][0]
    us, vs, scales = rank1
    return (lists + [pick(us, index), pick(vs, index)], *rank1_columns(params, index), scales)


@triton.jit
def _rank1_kernel(ptrs, n_tensors, numels, blk_tensor, blk_start, ncols, index, scales,
                  DTYPE: tl.constexpr, CT: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = block_of(numels, blk_tensor, blk_start, VEC, BLOCK)
    x_ptr = tensor_ptr(ptrs, n_tensors, t, 0, DTYPE)
    term, s = rank1_term(ptrs, n_tensors, t, offs, mask, ncols, index, scales, 1)
    x = tl.load(x_ptr + offs, mask=mask).to(CT)
    tl.store(x_ptr + offs, tl.where(s != 0, x + term.to(CT), x).to(DTYPE), mask=mask)


def prepare_rank1_update_(mats, us, vs):
    bound = [(dtype, launch, rank1_columns(mats, index)) for dtype, launch, index in bind(mats, us, vs)]

    def run(scales):
        for dtype, launch, (ncols, index) in bound:
            launch.run(_rank1_kernel, ncols, index, scales, DTYPE=tl_dtype(dtype), CT=compute_dtype(dtype))
    return run


def rank1_update_(mats, us, vs, scales):
    prepare_rank1_update_(mats, us, vs)(scales)
