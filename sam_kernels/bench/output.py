"""What the CLIs (python -m sam_kernels.bench / .memory / .demo) share for their output: a progress
bar on stderr, files written into directories that may not exist yet (each announced with its
path), matplotlib without a display."""
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


def write_text(path: str, payload: str, announce: bool = True) -> None:
    with open(_parent(path), "w") as f:
        f.write(payload)
    if announce:
        print(f"wrote {os.path.abspath(path)}")


def sibling(path: str, suffix: str) -> str:
    """path with -suffix before its extension: the other figures of one --plot PATH."""
    stem, ext = os.path.splitext(path)
    return f"{stem}-{suffix}{ext or '.png'}"


# one colour per implementation, the same in every figure
IMPLEMENTATIONS = ("cpu", "cuda", "triton", "torch", "foreach", "loop", "peer_sam", "compiled", "torch_foreach",
                   "torch_fused")


def colour(name: str) -> str:
    palette = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
               "tab:olive", "tab:cyan")
    return palette[IMPLEMENTATIONS.index(name) % len(palette)] if name in IMPLEMENTATIONS else "black"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a clear error saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib); the JSON / markdown were written") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: str, dpi: int, bottom: float = 0.0) -> None:
    """bottom: the fraction of the figure kept free below the panels (for a footnote)."""
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(_parent(path), dpi=dpi)
    plt.close(fig)
    print(f"wrote {os.path.abspath(path)}")
