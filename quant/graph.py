"""What differs between the denoiser families, asked of the family once (quant.denoiser.family_of): the layer
groups whose per-channel scales fold exactly, why every other quantized layer's does not, and the units of
block-wise reconstruction. DiT knowledge lives in quant.reparam and quant.recon.units, UNet knowledge in
quant.unet_graph.
"""
from __future__ import annotations

import torch.nn as nn

from quant.denoiser import family_of
from quant.wrap import covered_layers


def balance_groups(model: nn.Module):
    """The layer groups whose per-channel scales fold exactly into an affine producer (quant.reparam.BalanceGroup)."""
    if family_of(model) == "unet":
        from quant.unet_graph import balance_groups as groups
    else:
        from quant.reparam import balance_groups as groups
    return groups(model)


def unbalanced_layers(model: nn.Module) -> dict[str, str]:
    """Quantized layers outside every balance group, each with why its input scale cannot fold."""
    if family_of(model) == "unet":
        from quant.unet_graph import UNBALANCED as reasons
    else:
        from quant.reparam import UNBALANCED as reasons
    balanced = {name for g in balance_groups(model) for name in g.layers}
    # each family's table: (name pattern, why); the first pattern found in the layer's name wins
    return {name: next((why for key, why in reasons if key in name), "no affine producer of its input")
            for name in covered_layers(model) if name not in balanced}


def recon_units(model: nn.Module):
    """The units of block-wise reconstruction, in forward order (quant.recon.units.Unit)."""
    if family_of(model) == "unet":
        from quant.unet_graph import unet_units as units
    else:
        from quant.recon.units import dit_units as units
    return units(model)


def balance_plan(model: nn.Module, applied: set[str] | None = None, method: str | None = None) -> dict:
    """Which quantized layers take a folded per-channel scale and which do not, and why.

    applied: the balance groups a method actually scaled (None: report every foldable group as balanced).
    Returns {"family", "balanced": [{"group", "layers", "producer"}], "unbalanced": {layer: reason},
    "foldable_layers", "layers", "foldable_share"} where the share counts the quantized layers whose input
    scale folds exactly into an affine producer (whether or not this method used it).
    """
    groups = balance_groups(model)
    balanced, unbalanced = [], dict(unbalanced_layers(model))
    for g in groups:
        if applied is None or g.name in applied:
            balanced.append({"group": g.name, "layers": list(g.layers), "producer": g.producer})
        else:
            for name in g.layers:
                unbalanced[name] = f"foldable into {g.producer}, but {method or 'this method'} sets no scale for it"
    n_layers = len(covered_layers(model))
    n_foldable = sum(len(g.layers) for g in groups)
    return {"family": family_of(model), "balanced": balanced, "unbalanced": unbalanced,
            "foldable_layers": n_foldable, "layers": n_layers,
            "foldable_share": n_foldable / n_layers if n_layers else 0.0}
