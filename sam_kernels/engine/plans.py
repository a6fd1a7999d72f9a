"""The plan cache: what does not change between steps is decided once, in a plan, and a step only
launches kernels.

A plan holds, for one pass of a step: the resolved backend, the prepared launches per (param
group, dtype) with their tables, the state lists, and the device buffers its kernels write. A
plan is a promise about what it baked in, so its key is derived from exactly that (the engine's
key(): the configuration, the groups' options that decide launches, the parameters' storage and
which of them have a gradient, the base optimizer's pass_name and the state entries it binds), and a
warm optimizer's next step equals a fresh one's built from state_dict() (python_tests/
test_plan_cache.py). A key is (structure, addresses): when only the addresses of the live lists a
plan binds moved (autograd gave the gradients new memory), the refreshers its prepared launches
registered while it was built write them into its tables instead of a rebuild.
"""
from __future__ import annotations

from typing import Callable

from ..ops.lists import collecting

Key = Callable[[], tuple]  # () -> (structure, addresses), taken when the plan is needed


class PlanCache:
    """One plan per pass ("first", "second", "base", SAMPa's "preview", ...)."""

    def __init__(self):
        self._plans: dict[str, list] = {}
        self.builds = self.refreshes = 0  # counted for the tests and the benchmarks

    def get(self, pass_name: str, key: Key, build: Callable):
        """The plan of `pass_name` for key(); key is taken again after a build, which may create what
        the plan binds (state, device scalars), so that the next step finds the plan it built."""
        structure, addresses = key()
        cached = self._plans.get(pass_name)
        if cached is not None and cached[0] == structure:
            if cached[1] != addresses:
                for refresh in cached[3]:
                    refresh()
                cached[1] = addresses
                self.refreshes += 1
            return cached[2]
        with collecting() as refreshers:
            plan = build()
        structure, addresses = key()
        self._plans[pass_name] = [structure, addresses, plan, refreshers]
        self.builds += 1
        return plan

    def holds(self, pass_name: str, key: tuple) -> bool:
        """Whether get(pass_name, lambda: key, ...) would neither build nor refresh."""
        cached = self._plans.get(pass_name)
        return cached is not None and cached[0] == key[0] and cached[1] == key[1]

    def plan(self, pass_name: str):
        """The plan of `pass_name` now cached, or None."""
        cached = self._plans.get(pass_name)
        return cached[2] if cached is not None else None

    def clear(self) -> None:
        self._plans.clear()
