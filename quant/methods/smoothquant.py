"""SmoothQuant (Xiao et al. 2023, eq. 4): b_j = s(X_j)^alpha / s(W_j)^(1 - alpha).

s(X_j) is the max of |X_j| over all calibration data (no timestep weighting) and s(W_j) the max over output
rows of |W_oj|. Applied to the same foldable groups as PTQ4DiT so the comparison isolates the formula.
"""
from __future__ import annotations

import dataclasses

from quant.measures import weight_salience
from quant.methods import GroupVector, Method, checked
from quant.methods.common import safe_ratio_vector, salience_over_all
from quant.options import option
from quant.reparam import group_weight


@dataclasses.dataclass
class Options:
    alpha: float = option(0.5, "SmoothQuant alpha", "migration strength: how much of the activation range moves "
                          "to the weights", low=0.0, high=1.0)

    def __post_init__(self):
        checked(self)


def smoothing_vector(x_sal, w_sal, alpha: float):
    return safe_ratio_vector(x_sal.pow(alpha) / w_sal.pow(1 - alpha))


def smoothing_vectors(model, groups, stats, alpha: float) -> dict[str, GroupVector]:
    """b per balanced group from the activation salience over all calibration data and the weight salience."""
    out = {}
    for g in groups:
        x_sal = salience_over_all(stats.absmax[g.name])
        w_sal = weight_salience(group_weight(model, g)).float().cpu()
        out[g.name] = GroupVector(smoothing_vector(x_sal, w_sal, alpha))
    return out


def compute(model, groups, stats, options: Options) -> dict[str, GroupVector]:
    return smoothing_vectors(model, groups, stats, options.alpha)


METHOD = Method(name="smoothquant", compute=compute, options=Options, needs_activations=True, order=2,
                help="SmoothQuant: b_j = s(X_j)^alpha / s(W_j)^(1-alpha), folded into the producing layer",
                vector="SmoothQuant b_j = s(X_j)^alpha / s(W_j)^(1-alpha)")
