"""The number-format teaching view: one layer's values at one timestep under several formats side by side.

For a layer, a timestep and an input channel j, `format_view` returns
    values          channel j's values (its activation over tokens and images, or its weight column)
    grids           per format, the values channel j can take: the element grid times the scale its elements
                    get (the median over the channel's elements where block scales differ element to element)
    channel_error   per format, the relative RMS quantization error of every input channel,
                    ||Q(X)_j - X_j|| / ||X_j||, with each format at its own granularity
Activations use the lab's granularities: int and plain FP grids one scale per tensor, MXFP4 / NVFP4 / int
groups one per block of G along the channels of each token. Weights: int and FP grids one scale per output
channel, block formats blocks along the input dimension. So the chart shows how far one outlier channel's
damage reaches: over the whole tensor for a per-tensor scale, only over its own block with block scales. The
int grid is symmetric here (codes -(2^(b-1) - 1) .. 2^(b-1) - 1), so its points are the same for every format.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn as nn

from analysis.models.bundle import ModelBundle
from quant.formats import element_grid, expand_blocks, fake_quantize_format, pad_blocks, parse_format, block_params, \
    effective_scale, tensor_scale_for

# The teaching comparison: INT4 vs FP4 vs MXFP4 vs NVFP4 (bits follow each format's elements).
TEACHING_FORMATS = ("int", "fp4_e2m1", "mxfp4", "nvfp4")
OPERANDS = ("activation", "weight")


@dataclasses.dataclass
class FormatView:
    layer: str
    timestep: int
    channel: int
    operand: str
    bits: int
    values: np.ndarray  # [n] channel j's values
    grids: dict[str, np.ndarray]  # format label -> grid points at channel j's (median) scale
    channel_error: dict[str, np.ndarray]  # format label -> [C] relative RMS error per input channel
    channel_absmax: np.ndarray  # [C] max |value| per input channel
    groups: dict[str, int | None]  # format label -> block size (None: per tensor / per channel)


def _spec(name: str, bits: int):
    from quant.formats import format_bits

    return parse_format(name, format_bits(name) or bits)


def _label(name: str, bits: int) -> str:
    return f"int{bits}" if name == "int" else name


def _scales(x2d: torch.Tensor, spec, operand: str) -> torch.Tensor:
    """The effective scale of every element of x2d [rows, C] under `spec` at the view's granularity."""
    rows, c = x2d.shape
    if spec.blocked:
        ts = tensor_scale_for(x2d.abs().amax(), spec) if spec.tensor_scale else None
        scale, _ = block_params(pad_blocks(x2d, spec.group), spec, ts, symmetric=True)
        return expand_blocks(effective_scale(scale, ts), spec.group, c)
    amax = x2d.abs().amax(dim=1, keepdim=True) if operand == "weight" else x2d.abs().amax().reshape(1, 1)
    return (amax / spec.qmax).clamp_min(1e-30).expand(rows, c)


def _quantize(x2d: torch.Tensor, spec, operand: str) -> torch.Tensor:
    if spec.blocked:
        return fake_quantize_format(x2d, spec, axis=-1)
    if operand == "weight":
        return fake_quantize_format(x2d, spec, axis=0, granularity="channel")
    return fake_quantize_format(x2d, spec, granularity="tensor")


def compare_formats(x2d: torch.Tensor, channel: int, formats=TEACHING_FORMATS, bits: int = 4,
                    operand: str = "activation", layer: str = "", timestep: int = -1,
                    channel_size: int = 1) -> FormatView:
    """The view of a matrix x2d [rows, C * channel_size] whose input channel j spans columns
    j * channel_size .. (j + 1) * channel_size (a conv weight's kernel positions; 1 for a linear)."""
    if operand not in OPERANDS:
        raise ValueError(f"operand must be one of {OPERANDS}, got {operand!r}")
    x2d = x2d.detach().float()
    c = x2d.shape[1] // channel_size
    if not 0 <= channel < c:
        raise ValueError(f"channel {channel} is outside this layer's {c} input channels")
    per_channel = lambda v: v.reshape(v.shape[0], c, channel_size).transpose(0, 1).reshape(c, -1)  # noqa: E731
    cols = per_channel(x2d)
    grids, errors, groups = {}, {}, {}
    for name in formats:
        spec = _spec(name, bits)
        label = _label(name, spec.bits)
        err = per_channel(_quantize(x2d, spec, operand) - x2d)
        errors[label] = (err.norm(dim=1) / cols.norm(dim=1).clamp_min(1e-12)).numpy()
        scale = per_channel(_scales(x2d, spec, operand))[channel].median()
        points = element_grid(spec.element) if spec.is_float else torch.arange(-spec.qmax, spec.qmax + 1).float()
        grids[label] = (points * scale).numpy()
        groups[label] = spec.group
    return FormatView(layer=layer, timestep=timestep, channel=channel, operand=operand, bits=bits,
                      values=cols[channel].numpy(), grids=grids, channel_error=errors,
                      channel_absmax=cols.abs().amax(dim=1).numpy(), groups=groups)


@torch.no_grad()
def format_view(bundle: ModelBundle, layer: str, timestep: int | None = None, channel: int | None = None,
                formats=TEACHING_FORMATS, bits: int = 4, operand: str = "activation", steps: int = 25,
                samples: int = 4, guidance: float | None = None) -> FormatView:
    """The teaching view of `layer` of the bundle's FP denoiser at the recorded timestep nearest `timestep` (None:
    the middle one): one FP sampling run of `samples` images records the inputs; channel None picks the
    channel with the largest |value| (the outlier)."""
    from analysis.quantization.calibration import calibration_for

    model = bundle.denoiser
    module = dict(model.named_modules()).get(layer)
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"{layer!r} is not a linear or conv layer of the model; pick one from the layer menu "
                         "(attention operands have no weight)")
    if operand == "weight":
        w = module.weight.detach().float()
        x2d, size, t_used = w.reshape(w.shape[0], -1), w[0, 0].numel(), -1
        if channel is None:
            channel = int(x2d.abs().reshape(w.shape[0], w.shape[1], -1).amax(dim=(0, 2)).argmax())
    else:
        cal = calibration_for(bundle, steps=steps, num_samples=samples, guidance=guidance)
        x, t, y = (torch.cat([b[i] for b in cal.batches(256)]) for i in range(3))
        recorded = torch.unique(t)
        t_used = int(recorded[len(recorded) // 2] if timestep is None else
                     recorded[(recorded - timestep).abs().argmin()])
        rows = t == t_used
        seen = []
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        try:
            from quant.denoiser import denoise

            dev = bundle.device
            denoise(model, x[rows].to(dev), t[rows].to(dev), y[rows].to(dev))
        finally:
            handle.remove()
        inp = seen[0].float().cpu()
        x2d = inp.movedim(1, -1).reshape(-1, inp.shape[1]) if isinstance(module, nn.Conv2d) else \
            inp.reshape(-1, inp.shape[-1])
        size = 1
        if channel is None:
            channel = int(x2d.abs().amax(dim=0).argmax())
    return compare_formats(x2d, channel, formats, bits, operand, layer, t_used, size)
