"""What the two CLIs (python -m sam_kernels.bench / .memory) share for their output: a progress
bar on stderr, files written into directories that may not exist yet, matplotlib without a
display."""
from __future__ import annotations

import os
import sys


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress(total: int, desc: str):
    """A tqdm bar on stderr, or a silent stand-in where tqdm is missing."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def _parent(path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def write_text(path: str, payload: str) -> None:
    with open(_parent(path), "w") as f:
        f.write(payload)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a clear error saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib); the JSON / markdown were written") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: str, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(_parent(path), dpi=dpi)
    plt.close(fig)
