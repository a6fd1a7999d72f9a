"""The "cpu" and "cuda" backends: the extension's ops, torch.ops.sam_kernels.*; the dispatcher
picks the CPU or CUDA kernel from the tensors' device.

Nothing here is written per primitive: the packing of the arguments comes from each primitive's
declaration (ops/primitives.py), which the C++ side reads too (csrc/generated/primitives.h).
Two ways in:
  - the list ops (public, traceable: a table is built on every call): `native.<name>(**arguments)`
    calls torch.ops.sam_kernels.<name> with the arguments in the declared order;
  - for the optimizers' step plans, prepare(name, **lists, **static), which builds the tables once
    with torch.ops.sam_kernels._table and returns run(**scalars) that launches with scalars only
    (torch.ops.sam_kernels._launch): no list of tensors crosses into C++ per step.
"""
from __future__ import annotations

import torch

from .lists import Live, dtype_groups, on_refresh, pick
from .primitives import REGISTRY, Primitive


def _ops():
    return torch.ops.sam_kernels


def _pack(param, value):
    """One argument as the schema takes it (an absent list is an empty one)."""
    category = param.category
    if category == "list":
        return [] if value is None else value
    if category == "scalar":
        return float(value)
    if category == "option":
        return bool(value) if param.type == "bool" else int(value)
    return value


def _list_op(prim: Primitive):
    params = prim.params

    def run(*args, **arguments):
        arguments.update(zip((p.name for p in params), args))
        return getattr(_ops(), prim.name)(*[_pack(p, arguments.get(p.name)) for p in params])

    run.__name__ = run.__qualname__ = prim.name
    run.__doc__ = prim.doc
    return run


def __getattr__(name: str):
    """native.<primitive>: its list op (module attributes are looked up here only when missing)."""
    prim = REGISTRY.get(name)
    if prim is None or prim.internal:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fn = globals()[name] = _list_op(prim)
    return fn


# --- prepared launches: tables built once, launches with scalars only -------------------------

class Bound:
    """Primitive `prim`'s kernel bound to its lists (one table per dtype group), called with its
    scalars, options and device tensors by name. `static` holds the values the caller fixes for
    the binding's lifetime (momentum, amsgrad, init_bufs: a step plan's key holds them): a list
    whose presence rule they fail is left out (its table slot null), and a call whose values would
    need it is refused, so that a kernel never reads a null list."""

    def __init__(self, prim: Primitive, lists: dict, static: dict):
        self.prim = prim
        self.absent_checked = []  # optional lists left out: a call must not need them
        given = []
        for p in prim.lists:
            lst = lists.get(p.name)
            wanted = prim.is_present(p.name, {**static}, unknown=lst is not None)
            if lst is not None and wanted:
                given.append(lst)
                continue
            if p.name not in prim.present:
                raise ValueError(f"{prim.name}: list {p.name!r} is required")
            given.append(None)
            self.absent_checked.append(p.name)
        self.scalar_names = prim.scalars
        self.option_names = prim.options
        self.option_types = tuple(bool if p.type == "bool" else int for p in prim.of("option"))
        self.tensor_names = prim.tensors
        self.parts = []  # (table, meta) per dtype group
        first = given[0]
        values = [_value_column(rule, first) for rule in prim.values]
        for _, index in dtype_groups(first):
            picked = [pick(lst, index) if lst is not None else None for lst in given]
            flat = [t for lst in picked for t in (lst if lst is not None else [None] * len(index))]
            table, meta = _ops()._table(flat, len(picked), [v for column in values for v in pick(column, index)])
            self.parts.append((table, meta))
            for i, lst in enumerate(picked):  # a step plan's gradients: their new addresses into the table
                if isinstance(lst, Live):
                    on_refresh(lambda table=table, at=i * len(index), lst=lst: _patch(table, at, lst))
        self.n_chunks = sum(meta[3] for _, meta in self.parts)

    def __call__(self, **kw):
        for name in self.absent_checked:
            if self.prim.is_present(name, kw):
                raise ValueError(f"{self.prim.name}: the values of this call need {name!r}, which was bound absent")
        scalars, device_scalars = _device_scalars([kw[n] for n in self.scalar_names])
        options = [t(kw[n]) for t, n in zip(self.option_types, self.option_names)]
        tensors = [kw.get(n) for n in self.tensor_names]
        launch, kernel = _ops()._launch, self.prim.name
        for table, meta in self.parts:
            launch(kernel, table, meta, scalars, options, tensors, device_scalars)


def _value_column(rule: str, first) -> list:
    """A per-tensor integer column of a table (primitives.py `values`), from the first list."""
    if rule == "index":
        return list(range(len(first)))
    return [t.shape[0 if rule == "nrows" else 1] if t.dim() == 2 else 0 for t in first]


def _device_scalars(values):
    """(floats, device scalars): a value given as a tensor (a capturable step's lr or rho, an fp32
    device scalar) is read by the kernel when it runs; its float slot is a placeholder."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        return [float(v) for v in values], []
    return ([0.0 if isinstance(v, torch.Tensor) else float(v) for v in values],
            [v if isinstance(v, torch.Tensor) else None for v in values])


def _patch(table: torch.Tensor, at: int, tensors) -> None:
    """Write the addresses of the live list `tensors` into table[at:] (without waiting for the device)."""
    ptrs = tensors.addresses()
    if table.device.type != "cpu":
        ptrs = ptrs.pin_memory()
    table[at:at + len(tensors)].copy_(ptrs, non_blocking=True)


def prepare(name: str, **arguments):
    """Primitive `name` bound to the lists among `arguments` (the others are static values: see
    Bound); a primitive with no list (rank1_scales_) is its list op."""
    prim = REGISTRY[name]
    if name == "sumsq":
        return _prepare_sumsq(**arguments)
    if not prim.lists:
        return __getattr__(name)
    lists = {p.name: arguments.pop(p.name, None) for p in prim.lists}
    return Bound(prim, lists, arguments)


def _prepare_sumsq(tensors, second=None):
    """run(partials, mode, scalar, at): one partial per chunk of every dtype group into partials[at:]
    (each group's launch writes from its own offset: the option `first`)."""
    bound = Bound(REGISTRY["sumsq"], {"tensors": tensors, "second": second}, {"mode": second is not None})

    def run(partials, mode, scalar, at=0):
        for table, meta in bound.parts:
            _ops()._launch("sumsq", table, meta, [float(scalar)], [int(mode), at], [partials], [])
            at += meta[3]

    run.n_partials = bound.n_chunks
    return run


def norm_finalize(partials, out):
    """out <- sqrt(sum(partials)) (every element of partials is a sum of squares)."""
    _ops()._launch("norm_finalize", None, [], [], [], [partials, out], [])


def guard_finalize(partials, flags, first_norm=None, scale=None, found_inf=None, max_norm=float("inf"), steps=None,
                   steps_mask=None):
    """The guard of check_grads_ from the sums of squares in partials."""
    _ops()._launch("guard_finalize", None, [], [float(max_norm)], [],
                   [partials, flags, first_norm, scale, found_inf, steps, steps_mask], [])
