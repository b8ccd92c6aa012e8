"""SVDQuant's low-rank branch (Li et al., arXiv 2411.05007): W = L1 L2 + R, the rank-r part kept in 16 bits.

After smoothing moves activation outliers into the weights (X diag(1/b), W diag(b), SmoothQuant-style),
the weight holds a few large directions. Its best rank-r approximation (truncated SVD,
W ~ U_r S_r V_r^T) takes them into a float branch that runs beside the quantized GEMM, and only the residual
R = W - L1 L2, whose range is much smaller, is quantized:

    y = Q_a(x) Q_w(R)^T + x (L1 L2)^T,     L1 = U_r S_r^(1/2),  L2 = S_r^(1/2) V_r^T   (stored in 16 bits)

R is computed from the 16-bit factors, so in float the split is exact: L1 L2 + R = W to fp32 rounding.
The branch costs r (in + out) 16-bit values and 2 r (in + out) FLOPs per token (the layer: 2 in out).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.branches import LOWRANK_DTYPE


def lowrank_split(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(l1 [out, r], l2 [r, in], residual [out, in], singular values [min(out, in)]) of w [out, in].

    The factors are rounded to the branch's 16-bit type first and the residual taken against them."""
    w64 = w.detach().double()
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    root = s[:rank].sqrt()
    l1 = (u[:, :rank] * root[None, :]).to(LOWRANK_DTYPE)
    l2 = (root[:, None] * vh[:rank]).to(LOWRANK_DTYPE)
    residual = (w64 - l1.double() @ l2.double()).to(w.dtype)
    return l1, l2, residual, s.float()


def branch_cost(layer: nn.Module, rank: int) -> dict:
    """Extra 16-bit bytes and multiply-add FLOPs per output position of a rank-r branch on `layer`."""
    out = layer.weight.shape[0]
    inner = layer.weight[0].numel()
    return {"rank": rank, "extra_bytes": rank * (out + inner) * torch.finfo(LOWRANK_DTYPE).bits // 8,
            "extra_flops": 2 * rank * (out + inner), "layer_flops": 2 * out * inner}
