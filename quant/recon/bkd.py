"""DilateQuant's block-wise knowledge distillation (BKD): quantization-aware training one block at a time.

For each block, the FP block is the teacher and its quantized copy the student; the student's weights, its
weight step sizes and every activation quantizer's (scale, zero point) per timestep (TPQ) are trained to
minimise || block_q(x) - block_fp(x) ||^2. The weight quantizer rounds with a straight-through estimator,

    W_hat = d (clamp(round_ste(W / d) + z, qmin, qmax) - z),   dW_hat/dW = 1 inside the range,

so the latent FP weight moves freely and W_hat follows it code by code. At the end the weight is replaced by
W_hat itself: it lies exactly on its grid (the stored integer codes are W / d + z with nothing dropped).
The activation side is quant.recon.act_range with zero points trained too.

On an FP element grid the same straight-through rounding runs onto that grid (quant.formats.round_element_ste).
Only per-channel / per-tensor int steps are trained: block scales (E8M0 powers of two, E4M3 values, fp16
groups) and FP formats' scales keep the values their own rule gave them.
"""
from __future__ import annotations

import torch

from quant.quantizers import quantize_codes
from quant.recon.act_range import MIN_SCALE


class DistilledWeight:
    """One quantized layer's latent weight and weight step size, trained with straight-through rounding."""

    def __init__(self, layer) -> None:
        self.layer = layer
        self.dtype = layer.w_scale.dtype
        self.codes_before = self._codes()
        layer.weight.requires_grad_(True)
        self.step = None
        if not layer.w_fmt.is_float and not layer.w_fmt.blocked:
            self.step = layer.w_scale.detach().clone().float().requires_grad_(True)
            layer.w_scale = self.step

    @torch.no_grad()
    def _codes(self) -> torch.Tensor:
        return self.layer.weight_codes()

    def weight_parameters(self) -> list[torch.Tensor]:
        return [self.layer.weight]

    def step_parameters(self) -> list[torch.Tensor]:
        return [] if self.step is None else [self.step]

    @torch.no_grad()
    def project(self) -> None:
        if self.step is not None:
            self.step.clamp_(min=MIN_SCALE)

    @torch.no_grad()
    def finish(self) -> None:
        """Snap the weight onto its grid with the learned step size and freeze the layer again."""
        layer = self.layer
        layer.weight.requires_grad_(False)
        if self.step is None:
            layer.weight.data = layer.fake_quant_weight(layer.weight.detach()).to(layer.weight.dtype)
            layer._cache = None
            return
        layer.w_scale = self.step.detach().clamp(min=MIN_SCALE).to(self.dtype).clone()
        d, z = layer.w_scale, layer.w_zero
        codes = quantize_codes(layer.weight.detach(), d, z, layer.w_bits, layer.w_symmetric).float()
        # (codes - z) * d is the exact expression quant.io rebuilds a saved weight with: bit-identical reload
        layer.weight.data = ((codes - z) * d).to(layer.weight.dtype)
        layer._cache = None


def on_grid(layer) -> bool:
    """True when the layer's weight equals its own quantization (no rounding left to do)."""
    w = layer.weight.detach()
    return torch.equal(layer.fake_quant_weight(w), w)
