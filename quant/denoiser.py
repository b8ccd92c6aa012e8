"""The model boundary: which family a denoiser belongs to, and how to call it.

The families and what each must know about its layers are declared in the family table (quant.families, one
file a family; docs/ARCHITECTURE.md). This module is the one place that calls a denoiser.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.families import CLASS_FAMILIES, FAMILIES, find_family, family_of  # noqa: F401 (the model boundary)


def takes_labels(model: nn.Module) -> bool:
    """Whether the model is class-conditional, as its family declares. Any other module is called with its
    labels, as the engine always did."""
    family = find_family(model)
    return True if family is None else family.takes_labels(model)


def denoise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The model's output for noisy input x at timesteps t with labels y (ignored by unconditional models:
    diffusers' UNet2DModel refuses labels it has no embedding for)."""
    family = find_family(model)
    if family is None:
        return model(x, timestep=t, class_labels=y).sample
    return family.call(model, x, t, y)
