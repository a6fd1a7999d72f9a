"""Parameter sets built in code (no download): the tensors of a ViT, by shape."""
from __future__ import annotations


def vit_shapes(dim: int, depth: int = 12, mlp: int | None = None, classes: int = 1000, patch: int = 16,
               tokens: int = 197) -> list[tuple[int, ...]]:
    """The parameter shapes of a ViT (timm layout): 4 + 12 * depth + 4 tensors."""
    mlp = mlp or 4 * dim
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    shapes += [(dim,), (dim,), (classes, dim), (classes,)]
    return shapes


PARAM_SETS = {
    # ~22M parameters in 152 tensors (ViT-S/16): the CPU-sized many-tensor case
    "vit_s": lambda: vit_shapes(384),
    # ~86M parameters in 152 tensors (ViT-B/16): the GPU many-tensor case
    "vit_b": lambda: vit_shapes(768),
    # one large flat tensor
    "flat_16m": lambda: [(16 * 2**20,)],
    "flat_128m": lambda: [(128 * 2**20,)],
    # ViT-B's 152 tensors shrunk to 256 elements each (matrices 16 x 16, so that nuSAM has its
    # 49 matrices): the GPU work is negligible, the time is the host's per call (Python, launches)
    "host_152": lambda: [(16, 16) if len(s) == 2 else (256,) for s in vit_shapes(768)],
    # a few odd-sized tensors: for smoke tests of the benchmark itself
    "tiny": lambda: [(33, 7), (1000,), (5, 3, 3, 3), (1,)],
}


def numel(shapes) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total
