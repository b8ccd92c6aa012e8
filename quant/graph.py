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
    family = family_of(model)
    if family == "unet":
        from quant.unet_graph import balance_groups as groups
    elif family == "pixart":
        from quant.t2i_graph import pixart_balance_groups as groups
    elif family == "sd":
        from quant.t2i_graph import sd_balance_groups as groups
    else:
        from quant.reparam import balance_groups as groups
    return groups(model)


def unbalanced_layers(model: nn.Module) -> dict[str, str]:
    """Quantized layers outside every balance group, each with why its input scale cannot fold."""
    family = family_of(model)
    if family == "unet":
        from quant.unet_graph import UNBALANCED as reasons
    elif family == "pixart":
        from quant.t2i_graph import PIXART_UNBALANCED as reasons
    elif family == "sd":
        from quant.t2i_graph import sd_unbalanced

        reasons = sd_unbalanced()
    else:
        from quant.reparam import UNBALANCED as reasons
    balanced = {name for g in balance_groups(model) for name in g.layers}
    # each family's table: (name pattern, why); the first pattern found in the layer's name wins
    return {name: next((why for key, why in reasons if key in name), "no affine producer of its input")
            for name in covered_layers(model) if name not in balanced}


def recon_units(model: nn.Module):
    """The units of block-wise reconstruction, in forward order (quant.recon.units.Unit)."""
    family = family_of(model)
    if family in ("unet", "sd"):
        from quant.unet_graph import unet_units as units
    elif family == "pixart":
        from quant.t2i_graph import pixart_units as units
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


def group_input_layers(model: nn.Module, groups) -> dict[str, nn.Module]:
    """The modules to observe for the groups' input statistics: key = group name, or "group|i" for the i-th of a
    group whose layers read different inputs (merge_group_stats folds those keys back into the group's)."""
    modules = dict(model.named_modules())
    out = {}
    for g in groups:
        names = g.observed
        for i, name in enumerate(names):
            out[g.name if len(names) == 1 else f"{g.name}|{i}"] = modules[name]
    return out


def merge_group_stats(stats, groups):
    """InputStats keyed by group: a group observed at several inputs gets their elementwise max |X| (min / max
    alike), row for row (every forward records each input once, in the same rows)."""
    import torch

    for g in groups:
        parts = [f"{g.name}|{i}" for i in range(len(g.observed))] if len(g.observed) > 1 else []
        if not parts or parts[0] not in stats.absmax:
            continue
        for field, op in (("absmax", torch.maximum), ("cmax", torch.maximum), ("cmin", torch.minimum)):
            table = getattr(stats, field)
            merged = table.pop(parts[0])
            for key in parts[1:]:
                merged = op(merged, table.pop(key))
            table[g.name] = merged
    return stats
