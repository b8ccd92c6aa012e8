"""The one forward loop over calibration batches: every pass of the engine and of the lab's measurements.

A batch is (x, t, y): noisy latents, per-sample timesteps and class labels, as the sampler fed them to the
transformer (analysis.models.sampling.CalibrationData.batches). Inputs move to the model's device and dtype here, so
no caller repeats that.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from quant.denoiser import denoise


def calibration_batches(calibration, batch_size: int = 64) -> list:
    """A list of (x, t, y) batches from CalibrationData (anything with .batches) or an iterable of batches."""
    if hasattr(calibration, "batches"):
        batches = list(calibration.batches(batch_size))
    else:
        batches = [tuple(b) for b in calibration]
    if not batches:
        raise ValueError("calibration data is empty: sample with record='all' (or pass (x, t, y) batches)")
    for b in batches[:1]:
        if len(b) != 3:
            raise ValueError("calibration batches must be (x, t, y) triples")
    return batches


def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One denoiser call on a batch (a DiT or a UNet, quant.denoiser.denoise), moved to the model's device and
    dtype; returns its `.sample`."""
    p = next(model.parameters())
    return denoise(model, x.to(p.device, p.dtype), t.to(p.device), y.to(p.device))


@torch.no_grad()
def forward_batches(model: nn.Module, batches: Iterable, keep_outputs: bool = False,
                    each: Callable[[torch.Tensor, tuple], None] | None = None) -> torch.Tensor | None:
    """Run `model` on every (x, t, y) batch. each(output, batch) sees every output; with keep_outputs the
    outputs are returned concatenated on the CPU in float32."""
    outs = []
    for batch in batches:
        out = forward(model, *batch)
        if each is not None:
            each(out, batch)
        if keep_outputs:
            outs.append(out.float().cpu())
    return torch.cat(outs) if keep_outputs else None
