"""SmoothQuant (Xiao et al. 2023, eq. 4): b_j = s(X_j)^alpha / s(W_j)^(1 - alpha).

s(X_j) is the max of |X_j| over all calibration data (no timestep weighting) and s(W_j) the max over output
rows of |W_oj|. Applied to the same foldable groups as PTQ4DiT so the comparison isolates the formula.
"""
from __future__ import annotations

from quant.methods.common import safe_ratio_vector, salience_over_all
from quant.reparam import group_weight

NAME = "smoothquant"
QUANTIZES = True
NEEDS_ACTIVATIONS = True  # needs s(X) from an FP pass before folding


def smoothing_vector(x_sal, w_sal, alpha: float):
    return safe_ratio_vector(x_sal.pow(alpha) / w_sal.pow(1 - alpha))


def compute(model, groups, stats, config) -> dict:
    out = {}
    for g in groups:
        x_sal = salience_over_all(stats.absmax[g.name])
        w_sal = group_weight(model, g).abs().amax(dim=0).float().cpu()
        out[g.name] = {"b": smoothing_vector(x_sal, w_sal, config.alpha)}
    return out
