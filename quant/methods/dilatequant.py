"""DilateQuant (Liu et al. 2024): Weight Dilation (WD); its time-step-aware quantizers (TPQ) are switched on
by the config default and live in quant.modules.ActQuantizer. Read against docs/ARCHITECTURE.md, "The formulas":

Per output row i the range [Wmin_i, Wmax_i]. A = input channels holding some row's max or min ("saturated");
s_k = 1 for k in A, else
    s_k = min( min_{i: W_ik > 0} Wmax_i / W_ik ,  min_{i: W_ik < 0} Wmin_i / W_ik )  >= 1,
the largest stretch of column k that keeps every row's range (hence its weight step size) unchanged.
Then W[:, k] *= s_k and X_k /= s_k, folded like CSB. Uses weights only; same groups as PTQ4DiT
(q/k/v share one s computed on the concatenated rows, to_out.0, fc1).
"""
from __future__ import annotations

import torch

from quant.methods import GroupVector, Method
from quant.reparam import group_weight


def dilation_vector(w: torch.Tensor) -> torch.Tensor:
    """s [in] for a weight w [out, in]; every ratio is computed for all (i, k) at once."""
    w = w.detach().double()
    w_max = w.amax(dim=1, keepdim=True)  # [out, 1]
    w_min = w.amin(dim=1, keepdim=True)
    inf = torch.full_like(w, float("inf"))
    # Entries equal to 0 constrain nothing (0/0 guarded by never dividing by them).
    up = torch.where(w > 0, w_max / torch.where(w > 0, w, torch.ones_like(w)), inf)
    down = torch.where(w < 0, w_min / torch.where(w < 0, w, -torch.ones_like(w)), inf)
    s = torch.minimum(up, down).amin(dim=0)  # [in]
    # zeros never bind a range (a zero column entry stays zero under any stretch)
    saturated = (((w == w_max) | (w == w_min)) & (w != 0)).any(dim=0)
    s = torch.where(saturated | ~torch.isfinite(s), torch.ones_like(s), s)
    return s.clamp_min(1.0).float()


def compute(model, groups, stats, options) -> dict[str, GroupVector]:
    return {g.name: GroupVector(dilation_vector(group_weight(model, g).float().cpu())) for g in groups}


METHOD = Method(name="dilatequant", compute=compute, tpq_default=True, order=4,
                help="DilateQuant: weight dilation (WD) from the weights alone, with per-timestep activation "
                     "ranges (TPQ) on by default",
                vector="weight dilation s_j (>= 1; 1 on saturated channels)")
