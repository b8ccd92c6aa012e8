"""The model boundary: which family a denoiser belongs to, how to call it, and where its graph knowledge lives.

The engine quantizes two families of diffusers denoisers:
    dit    DiTTransformer2DModel (adaLN-Zero blocks)      graph knowledge: quant.reparam, quant.recon.units
    unet   UNet2DModel (DDPM / ADM-style ResNet + attention)  graph knowledge: quant.unet_graph

Everything that differs between them is decided here, once, from the model's class: which layers can take
a folded per-channel scale (balance groups and their producers), which cannot and why, and which modules
are the units of block-wise reconstruction. The quantized layers, quantizers, methods and the
reconstruction engine are the same code for both.
"""
from __future__ import annotations

import torch
import torch.nn as nn

FAMILIES = ("dit", "unet")
CLASS_FAMILIES = {"DiTTransformer2DModel": "dit", "UNet2DModel": "unet"}


def family_of(model: nn.Module) -> str:
    """'dit' or 'unet' from the diffusers class; ValueError naming the class otherwise."""
    name = type(model).__name__
    if name not in CLASS_FAMILIES:
        raise ValueError(f"unsupported denoiser class {name}; the lab quantizes diffusers "
                         f"{' and '.join(CLASS_FAMILIES)} models")
    return CLASS_FAMILIES[name]


def takes_labels(model: nn.Module) -> bool:
    """Whether the model is class-conditional (a DiT always is; a UNet when it has a class embedding). Any other
    module is called with its labels, as the engine always did."""
    if CLASS_FAMILIES.get(type(model).__name__) != "unet":
        return True
    return getattr(model, "class_embedding", None) is not None


def denoise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The model's output for noisy input x at timesteps t with labels y (ignored by unconditional models:
    diffusers' UNet2DModel refuses labels it has no embedding for)."""
    labels = y if takes_labels(model) else None
    return model(x, timestep=t, class_labels=labels).sample


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
        from quant.unet_graph import unbalanced_reason
    else:
        from quant.reparam import unbalanced_reason
    from quant.wrap import covered_layers

    balanced = {name for g in balance_groups(model) for name in g.layers}
    return {name: unbalanced_reason(name) for name in covered_layers(model) if name not in balanced}


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
    from quant.wrap import covered_layers

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
