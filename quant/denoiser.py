"""The model boundary: which family a denoiser belongs to, and how to call it.

The engine quantizes two families of diffusers denoisers:
    dit    DiTTransformer2DModel (adaLN-Zero blocks)          graph knowledge: quant.reparam, quant.recon.units
    unet   UNet2DModel (DDPM / ADM-style ResNet + attention)  graph knowledge: quant.unet_graph

The family is decided here, once, from the model's class; quant.graph asks it which layers can take a folded
per-channel scale, which cannot and why, and which modules are the units of block-wise reconstruction. The
quantized layers, quantizers, methods and the reconstruction engine are the same code for both.
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
