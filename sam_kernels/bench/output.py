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


# each implementation: its name in words (tables, legends) and one colour, the same in every figure
IMPLEMENTATIONS = {
    "cpu": "ours, C++ (CPU)",
    "cuda": "ours, CUDA C++",
    "triton": "ours, Triton",
    "torch": "ours, torch ops (the reference)",
    "foreach": "foreach SAM (20 lines of torch)",
    "loop": "per-parameter loop",
    "peer_sam": "pytorch-optimizer's SAM",
    "compiled": "torch.compile'd SAM",
    "torch_foreach": "torch SGD, foreach (no SAM)",
    "torch_fused": "torch SGD, fused (no SAM)",
}
PARAM_SET_NAMES = {
    "vit_s": "ViT-S/16 shapes (22M parameters, 152 tensors)",
    "vit_b": "ViT-B/16 shapes (86.6M parameters, 152 tensors)",
    "flat_16m": "one tensor of 16M elements",
    "flat_128m": "one tensor of 134M elements",
    "host_152": "ViT-B's 152 tensors at 256 elements each (host time)",
    "tiny": "four odd-sized tensors",
}


# the optimizers of the training-step tables (train.py, graphed.py), in words
OPTIMIZER_NAMES = {"sgd": "SGD", "sam": "SAM", "nusam": "nuSAM", "psam": "PSAM", "sampa": "SAMPa",
                   "peer_sam": "pytorch-optimizer's SAM", "msam": "MSAM", "gsam": "GSAM", "fsam": "F-SAM",
                   "looksam": "LookSAM", "asam": "ASAM", "gausssam": "GaussSAM",
                   "peer_sam_graphed": "torch-only SAM, graphed by hand",  # graphed.py's peer
                   "adamw": "AdamW", "sam_on": "SAM-ON", "sampa_streams": "SAMPa, two streams"}
MODEL_NAMES = {"vit_s": "ViT-S/16", "vit_b": "ViT-B/16", "mixer_b": "Mixer-B/16", "resnet20": "ResNet-20",
               "resnet56": "ResNet-56"}


def model_name(name: str) -> str:
    """A model of bench/models.py or memory.py, in words."""
    return MODEL_NAMES.get(name, name)


def optimizer_name(case: str) -> str:
    """A training-step case (sam, sampa_graphed, peer_sam_graphed, ...) in words."""
    if case in OPTIMIZER_NAMES:
        return OPTIMIZER_NAMES[case]
    graphed = case.endswith("_graphed")
    base = case[: -len("_graphed")] if graphed else case
    return OPTIMIZER_NAMES.get(base, base) + (", graphed" if graphed else "")


def implementation(name: str) -> str:
    """The implementation a record's `backend` names, in words."""
    return IMPLEMENTATIONS.get(name, name)


def param_set(name: str) -> str:
    """A parameter set (sam_kernels/bench/shapes.py) in words."""
    return PARAM_SET_NAMES.get(name, name)


def colour(name: str) -> str:
    palette = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
               "tab:olive", "tab:cyan")
    names = list(IMPLEMENTATIONS)
    return palette[names.index(name) % len(palette)] if name in names else "black"


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
