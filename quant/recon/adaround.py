"""AdaRound (Nagel et al. 2020), as PTQ4DiT and BRECQ use it: learn whether each weight rounds up or down.

A weight W with step d and zero point z is written floor(W / d) + h(V), h in [0, 1] one learned variable per
weight, and the soft-quantized weight is

    W_soft = d * (clamp(floor(W / d) + h(V) + z, qmin, qmax) - z)
    h(V)   = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1   (rectified sigmoid)

The stretch beyond [0, 1] lets h reach exactly 0 and 1 with a finite V. The regulariser

    f_reg(V) = sum_i (1 - |2 h(V_i) - 1|^beta)

is 0 only when every h is 0 or 1; beta is annealed from 20 (a flat penalty that leaves h free) down to 2 (a
parabola that pushes each h to its nearer end) after a warm-up without the penalty. At the end the rounding
is hardened, h -> [V >= 0] (h(V) >= 1/2), and folded into the integer weights: the layer keeps an ordinary
weight that lies exactly on its quantization grid, so nothing about AdaRound is needed at inference.
"""
from __future__ import annotations

import torch

from quant.quantizers import qrange, quantize_codes

ZETA, GAMMA = 1.1, -0.1
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2  # fraction of iterations without the rounding penalty (beta held at its start value)
REG_WEIGHT = 0.01  # lambda: weight of f_reg against the reconstruction loss (BRECQ's default)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with h(V) = h for h in (0, 1): start from the FP weight itself (the fractional part of W / d)."""
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def beta_at(iteration: int, iterations: int) -> float | None:
    """The annealed exponent beta, or None during the warm-up (no penalty yet)."""
    start = WARMUP * iterations
    if iteration < start:
        return None
    progress = (iteration - start) / max(iterations - start, 1)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - progress)


class AdaRoundWeight:
    """The learned rounding of one quantized layer (QuantLinear / QuantConv2d with weight bits on)."""

    def __init__(self, layer) -> None:
        self.layer = layer
        self.qmin, self.qmax = qrange(layer.w_bits, layer.w_symmetric)
        w = layer.weight.detach().float()
        scaled = w / layer.w_scale
        self.floor = torch.floor(scaled)
        self.v = inverse_rectified_sigmoid(scaled - self.floor).requires_grad_(True)

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def soft_weight(self) -> torch.Tensor:
        """W_soft, the layer's weight while its rounding is learned (installed as layer.weight_override)."""
        d, z = self.layer.w_scale, self.layer.w_zero
        q = torch.clamp(self.floor + self.h() + z, self.qmin, self.qmax)
        return ((q - z) * d).to(self.layer.weight.dtype)

    def regulariser(self, beta: float) -> torch.Tensor:
        """f_reg = sum (1 - |2 h(V) - 1|^beta)."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def stats(self) -> tuple[int, int, int]:
        """(weights, h(V) exactly 0 or 1, hard rounding differs from round-to-nearest) before hardening."""
        h = self.h()
        nearest = torch.round(self.layer.weight.detach().float() / self.layer.w_scale) - self.floor
        return h.numel(), int(((h == 0) | (h == 1)).sum()), int(((self.v >= 0).float() != nearest).sum())

    @torch.no_grad()
    def harden(self) -> None:
        """Fold the hard rounding [V >= 0] into the layer's weight, exactly on its grid, and stop learning."""
        d, z = self.layer.w_scale, self.layer.w_zero
        codes = torch.clamp(self.floor + (self.v >= 0).float() + z, self.qmin, self.qmax)
        weight = (codes - z) * d
        # The stored codes (quant.io) are recomputed from the weight: they must be exactly these.
        assert torch.equal(quantize_codes(weight, d, z, self.layer.w_bits, self.layer.w_symmetric).float(), codes)
        self.layer.weight.data = weight.to(self.layer.weight.dtype)
        self.layer.weight_override = None
        self.layer._cache = None
