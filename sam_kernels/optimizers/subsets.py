"""Subset perturbation (ALGORITHMS.md, "Subset perturbation"): param groups whose `perturb` option
says which parameters the first pass perturbs. SAM-ON (Mueller et al., NeurIPS 2023) perturbs only
the affine parameters of the normalization layers; sam_on_groups builds those groups from a model.
The classes of the SAM family read the option (engine/perturbations.py, engine/rank1.py)."""
from __future__ import annotations

from torch import nn

# The normalization layers of SAM-ON (their subclasses too: SyncBatchNorm, timm's LayerNorm2d, ...).
NORM_LAYERS: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                                 *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def sam_on_groups(model: nn.Module, norm_layers: tuple[type, ...] = NORM_LAYERS, **options) -> list[dict]:
    """Two param groups of `model`'s parameters that require a gradient: the affine weight and bias
    of every module of `norm_layers` (perturb=True), then all the others (perturb=False); options
    (lr, weight_decay, ...) go into both. Raises ValueError when the model has no such parameter
    (nothing would be perturbed: use the base optimizer).

        opt = SAM(sam_on_groups(model), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    """
    if "perturb" in options:
        raise TypeError("sam_on_groups sets 'perturb' itself (True for the normalization layers)")
    norm_ids = set()
    for module in model.modules():
        if isinstance(module, norm_layers):
            norm_ids.update(id(p) for p in module.parameters(recurse=False))
    params = [p for p in model.parameters() if p.requires_grad]
    chosen = [p for p in params if id(p) in norm_ids]
    if not chosen:
        names = ", ".join(t.__name__ for t in norm_layers)
        raise ValueError(f"sam_on_groups: the model has no affine parameter of a normalization layer ({names}) "
                         "that requires a gradient: nothing would be perturbed")
    others = [p for p in params if id(p) not in norm_ids]
    groups = [{"params": chosen, "perturb": True, **options}]
    if others:
        groups.append({"params": others, "perturb": False, **options})
    return groups

