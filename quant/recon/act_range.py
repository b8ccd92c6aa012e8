"""Learned activation quantizer parameters: step sizes (LSQ, Esser et al. 2020) and, for BKD, zero points.

An ActQuantizer keeps (scale, zero) per timestep with TPQ, or one pair. Training makes those buffers leaf
tensors that require gradients; the quantizer's straight-through rounding then gives the LSQ gradient

    d x_hat / d s = round(x / s) - x / s      inside the clip range,   q_min - z or q_max - z   outside

and each sample's gradient lands on its own timestep's entry (TPQ gathers the pair by timestep), so every
timestep's parameters learn from the rows of that timestep. A zero point is trained through the lower end
of the clip range, low = -z s, a value in the activation's own units like the step size (so one learning
rate suits both), and z = round_ste(-low / s) is an integer in every forward and at the end. It only gets
gradient from clipped values: shifting the window is all a zero point does.
"""
from __future__ import annotations

import torch

from quant.quantizers import qrange, round_ste

MIN_SCALE = 1e-8


class LearnedActRange:
    """Make one ActQuantizer's scale (and optionally zero point) trainable; `finish` writes them back."""

    def __init__(self, quantizer, train_zero: bool) -> None:
        self.q = quantizer
        self.dtype = quantizer.scale.dtype
        self.qmin, self.qmax = qrange(quantizer.bits, quantizer.symmetric)
        self.scale = quantizer.scale.detach().clone().float().requires_grad_(True)
        self.low = None
        if train_zero and not quantizer.symmetric:
            self.low = (-quantizer.zero.detach().float() * self.scale.detach()).requires_grad_(True)
        self.install()

    def parameters(self) -> list[torch.Tensor]:
        return [self.scale] + ([self.low] if self.low is not None else [])

    def _zero(self) -> torch.Tensor:
        return round_ste(-self.low / self.scale).clamp(self.qmin, self.qmax)

    def install(self) -> None:
        """Put the trainable values into the quantizer; call before every forward (the rounded zero point
        is a new graph node each time)."""
        self.q.scale = self.scale
        if self.low is not None:
            self.q.zero = self._zero()

    @torch.no_grad()
    def project(self) -> None:
        """After an optimizer step: a step size stays positive."""
        self.scale.clamp_(min=MIN_SCALE)

    @torch.no_grad()
    def finish(self) -> None:
        """Plain buffers again: the learned step sizes, the zero points rounded to integers."""
        self.scale.clamp_(min=MIN_SCALE)
        if self.low is not None:
            self.q.zero = self._zero().detach().to(self.dtype).clone()
        self.q.scale = self.scale.detach().to(self.dtype).clone()
