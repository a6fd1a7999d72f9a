"""Lists of tensors shared by the backends: one launch per dtype group, and live lists (the
gradients of a step, which autograd reallocates) whose addresses a step plan refreshes in its
launch tables instead of rebuilding them."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ..integrations import distributed
from ..integrations.distributed import is_dtensor, local


def dtype_groups(tensors) -> list[tuple[torch.dtype, list[int]]]:
    """Indices of `tensors` grouped by dtype, in first-seen order, skipping empty tensors (no work)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel():
            groups.setdefault(t.dtype, []).append(i)
    return list(groups.items())


def pick(lst, index):
    """lst[i] for i in index; a Live list stays live."""
    return lst.pick(index) if isinstance(lst, Live) else [lst[i] for i in index]


class Live(Sequence):
    """A list of tensors read when used: a step plan binds gradients through it. Its prepared
    launches take their addresses once and register a refresher (on_refresh) that writes the new
    addresses into their tables when autograd moved the gradients (the plan's key says when);
    where it calls the list ops instead (tensors that need staging) they are read on every call.
    Either way a plan never keeps a step's gradients alive."""

    def item(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.item(j) for j in range(len(self))[i]]
        return self.item(i)

    def __iter__(self):
        return (self.item(i) for i in range(len(self)))

    def pick(self, index) -> "Live":
        return _Picked(self, list(index))

    def addresses(self) -> torch.Tensor:
        """The tensors' data pointers now, an int64 CPU tensor (what a refresher writes)."""
        return torch.tensor([t.data_ptr() for t in self], dtype=torch.int64)


class _Picked(Live):
    def __init__(self, base: Live, index: list):
        self.base, self.index = base, index
        self._index = torch.tensor(index, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.index)

    def item(self, i: int) -> torch.Tensor:
        return self.base.item(self.index[i])

    def addresses(self) -> torch.Tensor:
        return self.base.addresses()[self._index]


class GradsOf(Live):
    """The gradients of `params` (reshaped to `shapes`, if given: a view of a contiguous gradient)."""

    def __init__(self, params, shapes=None):
        self.params = list(params)
        self.shapes = list(shapes) if shapes is not None else None
        self._sharded = any(map(is_dtensor, self.params))  # DTensor gradients: their local shards

    def __len__(self) -> int:
        return len(self.params)

    def item(self, i: int) -> torch.Tensor:
        g = self.params[i].grad
        if self._sharded:
            g = local(g)
        return g if self.shapes is None else g.reshape(self.shapes[i])

    def addresses(self) -> torch.Tensor:
        if self._sharded:
            return torch.tensor(distributed.fingerprint(self.params)[1], dtype=torch.int64)
        from . import extension as _ext  # one C loop (a reshaped contiguous gradient has the gradient's address)

        return _ext.grad_addresses(self.params)


class Current(Live):
    """A list of tensors a step sets and clears (SAMPa's gradient sets, its scratch parameter sets):
    step plans bind it, or parts of it (part()), and read what it holds when they run; between
    steps it holds nothing, so a plan never keeps a step's tensors alive."""

    def __init__(self, name: str):
        self.name = name
        self.tensors: list | None = None

    def set(self, tensors) -> "Current":
        self.tensors = list(tensors)
        return self

    def clear(self) -> None:
        self.tensors = None

    @property
    def held(self) -> bool:
        return self.tensors is not None

    def __len__(self) -> int:
        return len(self.tensors) if self.tensors is not None else 0

    def item(self, i: int) -> torch.Tensor:
        if self.tensors is None:
            raise RuntimeError(f"sam_kernels: the {self.name} of this step are not set")
        return self.tensors[i]

    def part(self, start: int, n: int) -> "Live":
        """tensors[start:start + n], read when used (a param group's part)."""
        return _Part(self, start, n)

    def addresses_now(self) -> tuple:
        """The data pointers it holds (a plan's key)."""
        return tuple(map(torch.Tensor.data_ptr, self.tensors))


class _Part(Live):
    def __init__(self, whole: Current, start: int, n: int):
        self.whole, self.start, self.n = whole, start, n

    def __len__(self) -> int:
        return self.n

    def item(self, i: int) -> torch.Tensor:
        return self.whole.item(self.start + i)


# --- refreshers: what a plan's prepared launches register while the plan is built -------------

_collectors: list[list] = []


@contextlib.contextmanager
def collecting():
    """Collect the refreshers registered (on_refresh) while a plan is built."""
    refreshers: list = []
    _collectors.append(refreshers)
    try:
        yield refreshers
    finally:
        _collectors.pop()


def on_refresh(fn) -> None:
    """Register fn() to run when the live lists of the plan being built have moved."""
    if _collectors:
        _collectors[-1].append(fn)


def any_live(lists) -> bool:
    return any(isinstance(lst, Live) for lst in lists)
