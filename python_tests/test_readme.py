"""Every Python code block of README.md runs as written, in order, in one namespace (the closure
block builds on the first block's model, loader and loss), on the CPU. docs/: test_docs.py."""
from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_python_blocks_run():
    blocks = python_blocks()
    assert len(blocks) >= 2  # the 30-second loop, the closure
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        before = [p.detach().clone() for p in namespace["model"].parameters()] if "model" in namespace else None
        exec(compile(block, f"README.md block {i}", "exec"), namespace)
        if before is not None:  # every block after the first trains the model
            assert any(not torch.equal(a, p) for a, p in zip(before, namespace["model"].parameters())), i
        if i == 1:  # the closure block: step(closure) returns the closure's loss
            loss = namespace["loss"]
            assert torch.is_tensor(loss) and loss.dim() == 0 and torch.isfinite(loss)
