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

On a floating-point element grid (FP8 / FP6 / FP4, per channel or in blocks) the step is not uniform, so
"floor" and "floor + 1" become the grid points just below and above W / d (quant.formats.grid_neighbours):

    W_soft = d * (lo + h(V) (hi - lo))

and hardening picks lo or hi. Block scales (MX, NVFP4, int groups) enter as the layer's per-element scale.
"""
from __future__ import annotations

import torch

from quant.formats import grid_neighbours, round_to_element
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
        self.element = layer.w_fmt.element if layer.w_fmt.is_float else None
        self.d, self.z = (p.detach().float() for p in layer.weight_qparams())
        w = layer.weight.detach().float()
        scaled = w / self.d
        if self.element is None:
            self.floor = torch.floor(scaled)
            frac = scaled - self.floor
        else:
            self.floor, self.ceil = grid_neighbours(scaled, self.element)
            gap = self.ceil - self.floor
            frac = torch.where(gap > 0, (scaled.clamp(self.floor, self.ceil) - self.floor) / gap.clamp_min(1e-30),
                               torch.zeros_like(gap))
        self.v = inverse_rectified_sigmoid(frac).requires_grad_(True)

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def _on_grid(self, h: torch.Tensor) -> torch.Tensor:
        """The weight at rounding h (soft or hard), in the layer's units."""
        if self.element is not None:
            return (self.floor + h * (self.ceil - self.floor)) * self.d
        q = torch.clamp(self.floor + h + self.z, self.qmin, self.qmax)
        return (q - self.z) * self.d

    def soft_weight(self) -> torch.Tensor:
        """W_soft, the layer's weight while its rounding is learned (installed as layer.weight_override)."""
        return self._on_grid(self.h()).to(self.layer.weight.dtype)

    def regulariser(self, beta: float) -> torch.Tensor:
        """f_reg = sum (1 - |2 h(V) - 1|^beta)."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def stats(self) -> tuple[int, int, int]:
        """(weights, h(V) exactly 0 or 1, hard rounding differs from round-to-nearest) before hardening."""
        h = self.h()
        scaled = self.layer.weight.detach().float() / self.d
        if self.element is not None:
            nearest = (round_to_element(scaled, self.element) != self.floor).float()
        else:
            nearest = torch.round(scaled) - self.floor
        return h.numel(), int(((h == 0) | (h == 1)).sum()), int(((self.v >= 0).float() != nearest).sum())

    @torch.no_grad()
    def harden(self) -> None:
        """Fold the hard rounding [V >= 0] into the layer's weight, exactly on its grid, and stop learning."""
        weight = self._on_grid((self.v >= 0).float())
        if self.element is None:
            # The stored codes (quant.io) are recomputed from the weight: they must be exactly these.
            d, z = self.d, self.z
            codes = torch.clamp(self.floor + (self.v >= 0).float() + z, self.qmin, self.qmax)
            assert torch.equal(quantize_codes(weight, d, z, self.layer.w_bits, self.layer.w_symmetric).float(), codes)
        else:  # and a grid value times the scale rounds back to itself
            assert torch.equal(self.layer.fake_quant_weight(weight), weight)
        self.layer.weight.data = weight.to(self.layer.weight.dtype)
        self.layer.weight_override = None
        self.layer._cache = None
