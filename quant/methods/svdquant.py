"""SVDQuant (Li et al., arXiv 2411.05007): smoothing, then a 16-bit low-rank branch beside a quantized residual.

1. Smoothing as SmoothQuant (Xiao et al. 2023, eq. 4), with its own alpha:
       b_j = s(X_j)^alpha / s(W_j)^(1 - alpha),   X diag(1/b), W diag(b)   (folded where exact, quant.reparam)
   It moves activation outliers into the weights.
2. Per quantized layer, the smoothed weight W = L1 L2 + R with the rank-r truncated SVD in 16 bits
   (quant.lowrank); R is quantized, the branch x (L1 L2)^T runs in float beside the quantized GEMM on the
   unquantized input. Layers whose smaller dimension is <= r keep no branch (it would hold the whole weight).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from quant.lowrank import branch_cost, lowrank_split
from quant.methods import GroupVector, LayerTransform, Method, checked
from quant.methods.smoothquant import smoothing_vectors
from quant.options import option


@dataclasses.dataclass
class Options:
    rank: int = option(32, "Low-rank branch rank", "rank r of the 16-bit branch L1 L2 (the paper: 32)", low=1)
    smooth_alpha: float = option(0.5, "Smoothing alpha", "SmoothQuant migration strength before the SVD (how "
                                 "much of the activation range moves to the weights)", low=0.0, high=1.0)

    def __post_init__(self):
        checked(self)


def compute(model, groups, stats, options: Options) -> dict[str, GroupVector]:
    return smoothing_vectors(model, groups, stats, options.smooth_alpha)  # SmoothQuant's migration first


def plan(model: nn.Module, layers, options: Options) -> dict[str, int]:
    mods = dict(model.named_modules())
    out = {}
    for name in layers:
        layer = mods.get(name)
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or getattr(layer, "groups", 1) != 1:
            continue
        if options.rank < min(layer.weight.shape[0], layer.weight[0].numel()):
            out[name] = options.rank
    return out


@torch.no_grad()
def apply(model: nn.Module, layer_plan: dict[str, int], options: Options) -> dict:
    """Split each planned layer's (smoothed) weight: weight <- R, branch <- (L1, L2). Reports the spectra."""
    mods = dict(model.named_modules())
    spectra, costs = {}, {}
    for name, rank in layer_plan.items():
        layer = mods[name]
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        l1, l2, residual, s = lowrank_split(w, rank)
        layer.weight.copy_(residual.reshape(layer.weight.shape))
        layer.lowrank.set(l1, l2)
        spectra[name] = s
        costs[name] = branch_cost(layer, rank)
    return {"rank": options.rank, "spectra": spectra, "costs": costs,
            "extra_bytes": sum(c["extra_bytes"] for c in costs.values()),
            "extra_flops_per_position": sum(c["extra_flops"] for c in costs.values()),
            "layer_flops_per_position": sum(c["layer_flops"] for c in costs.values())}


METHOD = Method(name="svdquant", compute=compute, lowrank=LayerTransform(plan, apply), options=Options,
                needs_activations=True, order=6,
                refuses=(("hadamard", "the rotation spreads again the outliers smoothing moved into the weights "
                                      "for the low-rank branch to absorb"),),
                help="SVDQuant: SmoothQuant-style smoothing, then a rank-r 16-bit SVD branch beside the quantized "
                     "residual weight",
                vector="smoothing b_j = s(X_j)^alpha / s(W_j)^(1-alpha)")
