"""PTQ4DiT (Wu et al. 2024): Channel-wise Salience Balancing (CSB) with Spearman's-rho-guided Salience
Calibration (SSC). Read against docs/ARCHITECTURE.md, "The formulas":

SSC  rho_t   = Spearman rank correlation between s(X^t) and s(W) across channels       (paper eq. 9)
     eta     = softmax(-rho) over timesteps                                               (eq. 10)
     s~(X_j) = sum_t eta_t s(X_j^t)                                                       (eq. 11)
CSB  b_j     = sqrt( s~(X_j) / s(W_j) );  W' = W diag(b),  X' = X diag(1/b)              (eqs. 6-8)

With ssc_rho="per_sample" each calibration row gets its own rho and eta (the official code's choice);
with ssc=False, s~(X) is the plain max over all calibration data. Groups: to_q/to_k/to_v share one b whose
weight salience is over the concatenated q, k, v weights; to_out.0; fc1 (ff.net.0.proj).
"""
from __future__ import annotations

import dataclasses

import torch

from quant.measures import spearman, weight_salience
from quant.methods import GroupVector, Method, checked
from quant.methods.common import safe_ratio_vector, salience_over_all, salience_per_timestep
from quant.options import option
from quant.reparam import group_weight

RHO_MODES = ("per_timestep", "per_sample")


@dataclasses.dataclass
class Options:
    ssc: bool = option(True, "Salience calibration (SSC)", "weight timesteps by softmax(-Spearman rho) of "
                       "activation vs weight salience; off = plain max over the calibration data")
    ssc_rho: str = option("per_timestep", "SSC rho", "per_timestep (the paper's equations: one rho per timestep) "
                          "or per_sample (the official code: one rho per calibration row)", choices=RHO_MODES)

    def __post_init__(self):
        checked(self)


def ssc_weights(x_sal: torch.Tensor, w_sal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eta, rho): eta = softmax(-rho) over the rows of x_sal [R, C] (timesteps or samples); sums to 1.
    A row whose salience is constant has no ranking (rho NaN) and counts as uncorrelated (rho 0)."""
    rho = torch.nan_to_num(spearman(x_sal, w_sal), nan=0.0).float()
    return torch.softmax(-rho, dim=0), rho


def calibrated_salience(absmax: torch.Tensor, t: torch.Tensor, w_sal: torch.Tensor, ssc: bool = True,
                        rho_mode: str = "per_timestep") -> tuple[torch.Tensor, dict]:
    """s~(X) [C] from per-row maxima absmax [M, C] with timesteps t [M]; extras hold rho / eta for plots."""
    if not ssc:
        return salience_over_all(absmax), {}
    if rho_mode == "per_timestep":
        steps, x_sal = salience_per_timestep(absmax, t)
    elif rho_mode == "per_sample":
        steps, x_sal = t, absmax
    else:
        raise ValueError(f"unknown rho mode {rho_mode!r}; choose per_timestep or per_sample")
    eta, rho = ssc_weights(x_sal, w_sal)
    return eta @ x_sal, {"timesteps": steps, "rho": rho, "eta": eta}


def csb_vector(x_tilde: torch.Tensor, w_sal: torch.Tensor) -> torch.Tensor:
    """b_j = sqrt(s~(X_j) / s(W_j)); channels with zero salience on either side keep b_j = 1."""
    return safe_ratio_vector(torch.sqrt(x_tilde / w_sal))


def compute(model, groups, stats, options: Options) -> dict[str, GroupVector]:
    out = {}
    for g in groups:
        w_sal = weight_salience(group_weight(model, g)).float().cpu()
        x_tilde, extras = calibrated_salience(stats.absmax[g.name], stats.t, w_sal, options.ssc, options.ssc_rho)
        out[g.name] = GroupVector(csb_vector(x_tilde, w_sal), {"x_tilde": x_tilde, **extras})
    return out


METHOD = Method(name="ptq4dit", compute=compute, options=Options, needs_activations=True, order=3,
                help="PTQ4DiT: channel salience balancing (CSB) with Spearman-weighted salience over timesteps (SSC)",
                vector="CSB balancing b_j = sqrt(s~(X_j) / s(W_j))")
