"""PTQ4DiT (Wu et al. 2024): Channel-wise Salience Balancing (CSB) with Spearman's-rho-guided Salience
Calibration (SSC). Read against DESIGN.md section 4:

SSC  rho_t   = Spearman rank correlation between s(X^t) and s(W) across channels       (paper eq. 9)
     eta     = softmax(-rho) over timesteps                                               (eq. 10)
     s~(X_j) = sum_t eta_t s(X_j^t)                                                       (eq. 11)
CSB  b_j     = sqrt( s~(X_j) / s(W_j) );  W' = W diag(b),  X' = X diag(1/b)              (eqs. 6-8)

With ssc_rho="per_sample" each calibration row gets its own rho and eta (the official code's choice);
with ssc=False, s~(X) is the plain max over all calibration data. Groups: to_q/to_k/to_v share one b whose
weight salience is over the concatenated q, k, v weights; to_out.0; fc1 (ff.net.0.proj).
"""
from __future__ import annotations

import torch

from quant.methods.common import safe_ratio_vector, salience_over_all, salience_per_timestep
from quant.reparam import group_weight

NAME = "ptq4dit"
QUANTIZES = True
NEEDS_ACTIVATIONS = True  # needs s(X) from an FP pass before folding


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim (0 = smallest), ties broken by position."""
    return x.argsort(dim=-1).argsort(dim=-1).to(torch.float64)


def spearman(x_sal: torch.Tensor, w_sal: torch.Tensor) -> torch.Tensor:
    """Spearman rho between each row of x_sal [R, C] and w_sal [C]: Pearson correlation of the ranks."""
    rx, rw = ranks(x_sal), ranks(w_sal)[None, :]
    rx, rw = rx - rx.mean(-1, keepdim=True), rw - rw.mean(-1, keepdim=True)
    den = rx.norm(dim=-1) * rw.norm(dim=-1)
    return ((rx * rw).sum(-1) / den.clamp_min(1e-12)).float()


def ssc_weights(x_sal: torch.Tensor, w_sal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eta, rho): eta = softmax(-rho) over the rows of x_sal [R, C] (timesteps or samples); sums to 1."""
    rho = spearman(x_sal, w_sal)
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


def compute(model, groups, stats, config) -> dict:
    out = {}
    for g in groups:
        w_sal = group_weight(model, g).abs().amax(dim=0).float().cpu()
        x_tilde, extras = calibrated_salience(stats.absmax[g.name], stats.t, w_sal, config.ssc, config.ssc_rho)
        out[g.name] = {"b": csb_vector(x_tilde, w_sal), "x_tilde": x_tilde, **extras}
    return out
