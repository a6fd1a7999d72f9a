"""Adam's step counters on the device (torch.optim.Adam keeps each as a 0-dim tensor in its state):
views of one vector, so that the guard advances all of them in one launch when a step is taken,
and no counter is ever read on the host."""
from __future__ import annotations

import torch


class StepCounters:
    """Adam's per-parameter step counters as views of one fp32 vector on the device.

    state[p]["step"] stays what torch.optim.Adam keeps (a 0-dim fp32 tensor), so state_dict and
    torch's own Adam read it as usual; being views of one vector, the guard (check_grads_)
    advances them all in its one-program epilogue, only when the step is taken, and the kernels
    read each tensor's count on the device: no counter is ever read on the host."""

    def __init__(self):
        self.vec: torch.Tensor | None = None
        self.slots: dict[int, int] = {}  # id(param) -> index in vec
        self._order: list = []  # the parameters of the slots
        self.version = 0  # bumped when the vector is rebuilt: plans holding the old views rebuild too

    def _is_view(self, p, st) -> bool:
        i = self.slots.get(id(p))
        step = st.get("step")
        return (i is not None and self.vec is not None and isinstance(step, torch.Tensor)
                and step.device == self.vec.device and step.data_ptr() == self.vec.data_ptr() + 4 * i)

    def bind(self, state, params, device) -> None:
        """Make state[p]["step"] of every p in params (whose state exists) a view of the vector,
        rebuilding it, from the current counts of every parameter it covers, when one is not: a
        new parameter, a loaded state dict, a counter torch's own Adam created."""
        if all(self._is_view(p, state[p]) for p in params):
            return
        order = list({id(p): p for p in [*self._order, *params] if p in state and "step" in state[p]}.values())
        values = []
        for p in order:
            step = state[p]["step"]
            step = step if isinstance(step, torch.Tensor) else torch.tensor(float(step))
            values.append(step.detach().reshape(()).to(device=device, dtype=torch.float32, non_blocking=True))
        self.vec = torch.stack(values) if values else torch.zeros(0, device=device)
        self.slots = {id(p): i for i, p in enumerate(order)}
        self._order = order
        self.version += 1
        for i, p in enumerate(order):
            state[p]["step"] = self.vec[i]

    def mask(self, params) -> torch.Tensor:
        """1 at the slots of params, 0 elsewhere (which counters a step advances)."""
        m = [0.0] * self.vec.numel()
        for p in params:
            m[self.slots[id(p)]] = 1.0
        t = torch.tensor(m, dtype=torch.float32)
        return t if self.vec.device.type == "cpu" else t.pin_memory().to(self.vec.device, non_blocking=True)
