"""Which quantized layers take a folded per-channel scale, which do not and why: the balance plan a method
reports, read from the family table (quant.families).
"""
from __future__ import annotations

import torch.nn as nn

from quant.families import balance_groups, family_for, recon_units  # noqa: F401 (asked here by callers)
from quant.wrap import covered_layers


def unbalanced_layers(model: nn.Module) -> dict[str, str]:
    """Quantized layers outside every balance group, each with why its input scale cannot fold."""
    family = family_for(model)
    balanced = {name for g in family.balance_groups(model) for name in g.layers}
    return {name: family.why_unbalanced(name) for name in covered_layers(model) if name not in balanced}


def balance_plan(model: nn.Module, applied: set[str] | None = None, method: str | None = None) -> dict:
    """Which quantized layers take a folded per-channel scale and which do not, and why.

    applied: the balance groups a method actually scaled (None: report every foldable group as balanced).
    Returns {"family", "balanced": [{"group", "layers", "producer"}], "unbalanced": {layer: reason},
    "foldable_layers", "layers", "foldable_share"} where the share counts the quantized layers whose input
    scale folds exactly into an affine producer (whether or not this method used it).
    """
    family = family_for(model)
    groups = family.balance_groups(model)
    balanced, unbalanced = [], dict(unbalanced_layers(model))
    for g in groups:
        if applied is None or g.name in applied:
            balanced.append({"group": g.name, "layers": list(g.layers), "producer": g.producer})
        else:
            for name in g.layers:
                unbalanced[name] = f"foldable into {g.producer}, but {method or 'this method'} sets no scale for it"
    n_layers = len(covered_layers(model))
    n_foldable = sum(len(g.layers) for g in groups)
    return {"family": family.name, "balanced": balanced, "unbalanced": unbalanced,
            "foldable_layers": n_foldable, "layers": n_layers,
            "foldable_share": n_foldable / n_layers if n_layers else 0.0}
