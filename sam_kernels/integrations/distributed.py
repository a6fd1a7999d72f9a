"""Sharded parameters: FSDP2 (torch.distributed.fsdp.fully_shard) and other DTensor parameters.

Between iterations FSDP2's registered parameters are DTensors sharded along dim 0 over a 1-D
device mesh, and so are their gradients (reduce-scattered). Our kernels run on the local shards
(local(): the DTensor's local tensor, which aliases its storage, so an in-place perturbation is
what the next all-gather sends), with the optimizer state sharded like the parameters (torch.optim
creates it that way too). The one quantity that is not local is a global norm: each rank sums the
squares of its shards, and one all-reduce of that one fp32 scalar over the mesh (on the device, no
host read) gives every rank the same norm (pipeline.NormStage), so every rank perturbs along the
same global direction and skips the same steps (a NaN on one rank's shard makes the sum NaN
everywhere). Placements other than Shard(d) on a 1-D mesh (Replicate, Partial, HSDP's 2-D mesh)
are refused by name: their squares would be counted once per replica. NuSAM's power iteration on
row-sharded matrices reduces its partial mat-vec products over the mesh (nusam.NuSamPlan._sharded_power).
"""
from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed
    DTensor, Shard = None, None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor (aliasing its storage), or t itself."""
    return t._local_tensor if is_dtensor(t) else t


def localize(tensors):
    """A list with each DTensor replaced by its local shard (None stays None)."""
    if tensors is None or not any(is_dtensor(t) for t in tensors):
        return tensors
    return [local(t) for t in tensors]


def shard_group(params, where: str):
    """The process group over which the squares of `params` are summed: None when none is a
    DTensor; the mesh's group when each is sharded (Shard(d)) over one 1-D mesh; else a
    ValueError naming the parameter and its placements."""
    plain = [j for j, p in enumerate(params) if not is_dtensor(p)]
    if len(plain) == len(params):
        return None
    if plain:
        raise ValueError(f"{where}['params'][{plain[0]}] is a plain tensor among DTensor parameters: "
                         "shard every parameter of the optimizer, or none")
    mesh = None
    for j, p in enumerate(params):
        if p.device_mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
            raise ValueError(f"{where}['params'][{j}] (shape {tuple(p.shape)}) has placements {p.placements} on "
                             f"a {p.device_mesh.ndim}-D mesh: only Shard(d) on a 1-D mesh is supported "
                             "(FSDP2's fully_shard); Replicate / Partial would count a tensor once per replica")
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(f"{where}['params'][{j}] is on another device mesh than the parameters before it")
    return mesh.get_group() if mesh is not None else None


def row_slice(p) -> slice:
    """The rows of a Shard(0) DTensor that this rank holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return slice(offset[0], offset[0] + shape[0])


def rows_like(rows: torch.Tensor, p):
    """A vector over p's rows, of which this rank holds `rows` (nuSAM's u), as a DTensor sharded
    like p (so that torch.distributed.checkpoint saves every rank's piece); as it is otherwise."""
    if not is_dtensor(p):
        return rows
    return DTensor.from_local(rows, p.device_mesh, [Shard(0)], run_check=False, shape=(p.shape[0],), stride=(1,))


def per_rank(t: torch.Tensor, p):
    """A value of this rank's own (GaussSAM's generator state, flattened) as a (world, n) DTensor,
    one row per rank of p's mesh, for the same reason; as it is when p is not a DTensor."""
    if not is_dtensor(p):
        return t
    mesh, n = p.device_mesh, t.numel()
    return DTensor.from_local(t.reshape(1, n).to(mesh.device_type), mesh, [Shard(0)], run_check=False,
                              shape=(mesh.size(), n), stride=(n, 1))


def all_reduce_sum_(t: torch.Tensor, group) -> None:
    """t <- its sum over the ranks of `group` (in place, enqueued: no host read)."""
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)


def fingerprint(params) -> tuple:
    """_ext.fingerprint of the local shards: (structure, gradient addresses)."""
    structure, grads = [], []
    for p in params:
        lp, g = local(p), p.grad
        lg = local(g) if g is not None else None
        structure.append((lp.data_ptr(), g is not None, lg is None or lg.is_contiguous(), lp.is_contiguous()))
        grads.append(lg.data_ptr() if lg is not None else 0)
    return tuple(structure), tuple(grads)


def state_fingerprint(state, params, keys) -> tuple:
    """_ext.state_fingerprint of the local shards (sharded state is DTensors)."""
    out = []
    for p in params:
        entry = state.get(p)
        for k in keys:
            v = entry.get(k) if isinstance(entry, dict) else None
            out.append(0 if v is None else local(v).data_ptr() if torch.is_tensor(v) else 1)
    return tuple(out)


def nbytes(t: torch.Tensor) -> int:
    """Bytes this rank holds for t (its local shard's)."""
    t = local(t)
    return t.numel() * t.element_size()
