"""The model boundary: which family a denoiser belongs to, and how to call it.

The engine quantizes four families of diffusers denoisers:
    dit     DiTTransformer2DModel (adaLN-Zero blocks)          graph knowledge: quant.reparam, quant.recon.units
    unet    UNet2DModel (DDPM / ADM-style ResNet + attention)  graph knowledge: quant.unet_graph
    pixart  PixArtTransformer2DModel (PixArt-alpha / sigma: adaLN-single, cross-attention to T5 embeddings)
    sd      UNet2DConditionModel (Stable Diffusion: cross-attention to CLIP embeddings)
            graph knowledge of both text-to-image families: quant.t2i_graph
The text-to-image families read their prompts as integer ids into a table of text embeddings
(quant.conditioning), so every batch is (x, t, y) with one integer per row whatever the family.

The family is decided here, once, from the model's class; quant.graph asks it which layers can take a folded
per-channel scale, which cannot and why, and which modules are the units of block-wise reconstruction. The
quantized layers, quantizers, methods and the reconstruction engine are the same code for both.
"""
from __future__ import annotations

import torch
import torch.nn as nn

FAMILIES = ("dit", "unet", "pixart", "sd")
CLASS_FAMILIES = {"DiTTransformer2DModel": "dit", "UNet2DModel": "unet", "PixArtTransformer2DModel": "pixart",
                  "UNet2DConditionModel": "sd"}
TEXT_FAMILIES = ("pixart", "sd")  # y is a prompt id (quant.conditioning), not a class label


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
    family = CLASS_FAMILIES.get(type(model).__name__)
    if family in TEXT_FAMILIES:
        return False
    if family != "unet":
        return True
    return getattr(model, "class_embedding", None) is not None


def denoise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The model's output for noisy input x at timesteps t with labels y (ignored by unconditional models:
    diffusers' UNet2DModel refuses labels it has no embedding for; prompt ids for the text-to-image families)."""
    family = CLASS_FAMILIES.get(type(model).__name__)
    if family in TEXT_FAMILIES:
        from quant.t2i_graph import pixart_forward, sd_forward

        return (pixart_forward if family == "pixart" else sd_forward)(model, x, t, y)
    labels = y if takes_labels(model) else None
    return model(x, timestep=t, class_labels=labels).sample
