"""Per-channel quantization error of weights and activations: what a layer loses, channel by channel, at a
bit-width. Tensor functions only; analysis.salience.collect records them during collection and
analysis.salience.measures reads them back.
"""
from __future__ import annotations

import numpy as np
import torch

from quant.quantizers import fake_quant, fake_quantize, quant_params


def weight_quant_mse(weight: torch.Tensor, bits: int) -> np.ndarray:
    """[in] MSE per input channel of W quantized per output channel (axis 0) at `bits`, averaged over rows
    (and, for a convolution's [out, in, kh, kw], over kernel positions)."""
    w = weight.detach().float()
    err = (fake_quantize(w, bits, axis=0) - w).pow(2)
    return err.transpose(0, 1).flatten(1).mean(dim=1).cpu().numpy()


def activation_quant_mse(x: torch.Tensor, bits: int) -> torch.Tensor:
    """[C] MSE per channel of x [..., C] under one per-tensor min-max quantizer at `bits` (stays on x's device)."""
    return activation_quant_mse_bits(x, (bits,))[0]


def activation_quant_mse_bits(x: torch.Tensor, bits: tuple[int, ...]) -> torch.Tensor:
    """[len(bits), C]: activation_quant_mse at every bit-width, on x's device.

    The per-tensor min-max range does not depend on the bit-width, so it is reduced once for all of them;
    each bit-width then costs one quantize-dequantize pass (the same arithmetic as quant.quantizers'
    fake_quantize with axis=None, so the numbers match it exactly).
    """
    x2 = x.detach().float().reshape(-1, x.shape[-1])
    lo, hi = x2.min(), x2.max()
    errors = []
    for b in bits:
        scale, zero = quant_params(lo, hi, int(b))
        errors.append(fake_quant(x2, scale, zero, int(b)).sub_(x2).pow_(2).mean(dim=0))
    return torch.stack(errors)
