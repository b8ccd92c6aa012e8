"""What each mode trains in one unit, its optimizer groups, its loss, and how it freezes the result.

    adaround (PTQ4DiT / BRECQ): rounding variables V of every quantized weight (Adam, constant lr) and the
        activation step sizes (LSQ, cosine-annealed lr); loss = Lp reconstruction + lambda f_reg(V), the Lp
        loss as the official PTQ4DiT run computes it by default (p = 2.0, summed over dimension 1).
    bkd (DilateQuant): latent weights and weight step sizes (one lr), activation step sizes and zero points
        per timestep (another lr), Adam with cosine-annealed lr; loss = MSE to the FP block (distillation).

With config.recon_loss == "guided" both losses are taken on (unconditional, guided) outputs instead of on the
rows as they come (guided_view).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.modules import ActQuantizer, QuantConv2d, QuantLinear
from quant.quantizers import is_off
from quant.recon.act_range import LearnedActRange
from quant.recon.adaround import REG_WEIGHT, AdaRoundWeight, beta_at
from quant.recon.bkd import DistilledWeight
from quant.families.base import Unit, unit_modules


def lp_loss(out: torch.Tensor, target: torch.Tensor, p: float, sum_over: str = "dim1") -> torch.Tensor:
    """BRECQ's Lp loss: |out - target|^p summed over dimension 1 ("dim1": the tokens of a DiT block's
    [B, N, C] output) and averaged over the rest; "last" sums over the last dimension instead."""
    return (out - target).abs().pow(p).sum(dim=1 if sum_over == "dim1" else -1).mean()


def guided_view(out: torch.Tensor, guidance: float) -> torch.Tensor:
    """For a batch of k conditional rows followed by their k unconditional twins (same image and step):
    [unconditional; u + s (c - u)], the two outputs the sampler combines into its guided prediction. A loss on
    this view weighs the class signal c - u by s, where a per-row loss leaves it to chance."""
    cond, uncond = out.chunk(2)
    return torch.cat([uncond, uncond + guidance * (cond - uncond)])

def _weight_layers(model: nn.Module, unit: Unit) -> list[nn.Module]:
    return [m for m in unit_modules(model, unit, (QuantLinear, QuantConv2d)).values() if not is_off(m.w_bits)]


def _act_quantizers(model: nn.Module, unit: Unit) -> list[ActQuantizer]:
    return [q for q in unit_modules(model, unit, (ActQuantizer,)).values() if q.enabled]


class AdaRoundTrainer:
    """PTQ4DiT's reconstruction of one unit."""

    def __init__(self, model: nn.Module, unit: Unit, lr: float, act_lr: float, p: float = 2.0,
                 sum_over: str = "dim1") -> None:
        self.p, self.sum_over = p, sum_over
        self.roundings = [AdaRoundWeight(layer) for layer in _weight_layers(model, unit)]
        for r in self.roundings:
            r.layer.weight_override = r.soft_weight
        self.ranges = [LearnedActRange(q, train_zero=False) for q in _act_quantizers(model, unit)]
        self.groups = [g for g in (
            {"params": [r.v for r in self.roundings], "lr": lr, "cosine": False},
            {"params": [p for a in self.ranges for p in a.parameters()], "lr": act_lr, "cosine": True},
        ) if g["params"]]

    def loss(self, out: torch.Tensor, target: torch.Tensor, iteration: int, iterations: int):
        """(total, reconstruction part)."""
        rec = lp_loss(out, target, self.p, self.sum_over)
        beta = beta_at(iteration, iterations)
        if beta is None or not self.roundings:
            return rec, rec
        return rec + REG_WEIGHT * sum(r.regulariser(beta) for r in self.roundings), rec

    def install(self) -> None:
        for a in self.ranges:
            a.install()

    def project(self) -> None:
        for a in self.ranges:
            a.project()

    def finish(self) -> dict:
        """Harden and freeze; returns how converged the rounding was (fractions of the unit's weights):
        rounding_binary (h(V) exactly 0 or 1 before hardening: 1.0 once annealing has finished its job) and
        rounding_flipped (rounded the other way than to nearest)."""
        counts = [r.stats() for r in self.roundings]
        n = sum(c[0] for c in counts)
        summary = {"rounding_binary": sum(c[1] for c in counts) / n if n else None,
                   "rounding_flipped": sum(c[2] for c in counts) / n if n else None}
        for r in self.roundings:
            r.harden()
        for a in self.ranges:
            a.finish()
        return summary


class BKDTrainer:
    """DilateQuant's block-wise distillation of one unit."""

    def __init__(self, model: nn.Module, unit: Unit, lr: float, act_lr: float, p: float = 2.0,
                 sum_over: str = "dim1") -> None:
        self.weights = [DistilledWeight(layer) for layer in _weight_layers(model, unit)]
        self.ranges = [LearnedActRange(q, train_zero=True) for q in _act_quantizers(model, unit)]
        self.groups = [g for g in (
            # weight step sizes are as small as the weights' own moves: they share the weights' lr
            {"params": [p for w in self.weights for p in w.weight_parameters() + w.step_parameters()], "lr": lr,
             "cosine": True},
            {"params": [p for a in self.ranges for p in a.parameters()], "lr": act_lr, "cosine": True},
        ) if g["params"]]

    def loss(self, out: torch.Tensor, target: torch.Tensor, iteration: int, iterations: int):
        mse = (out - target).pow(2).mean()
        return mse, mse

    def install(self) -> None:
        for a in self.ranges:
            a.install()

    def project(self) -> None:
        for w in self.weights:
            w.project()
        for a in self.ranges:
            a.project()

    def finish(self) -> dict:
        """Snap and freeze; returns codes_changed, the fraction of the unit's weight codes that training moved
        (counted against the codes of the calibrated model, with the step sizes each was quantized with)."""
        for w in self.weights:
            w.finish()
        for a in self.ranges:
            a.finish()
        n = sum(w.codes_before.numel() for w in self.weights)
        changed = sum(int((w._codes() != w.codes_before).sum()) for w in self.weights)
        return {"codes_changed": changed / n if n else None}


TRAINERS = {"adaround": AdaRoundTrainer, "bkd": BKDTrainer}
