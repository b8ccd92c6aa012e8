"""Salience helpers shared by the methods (PTQ4DiT eq. 3: s(X_j) = max over tokens of |X_j|)."""
from __future__ import annotations

import torch


def safe_ratio_vector(b: torch.Tensor) -> torch.Tensor:
    """Replace non-finite or non-positive entries (zero salience on either side) by 1: leave that channel alone."""
    return torch.where(torch.isfinite(b) & (b > 0), b, torch.ones_like(b))


def salience_over_all(absmax: torch.Tensor) -> torch.Tensor:
    """s(X_j) over the whole calibration set: max over every row of the per-row maxima [M, C] -> [C]."""
    return absmax.amax(dim=0)


def salience_per_timestep(absmax: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s(X_j^t) for each distinct timestep: (timesteps [T], salience [T, C]), max over that timestep's rows."""
    steps, inv = torch.unique(t, return_inverse=True)
    out = torch.full((steps.numel(), absmax.shape[1]), float("-inf"), dtype=absmax.dtype)
    out = out.scatter_reduce(0, inv[:, None].expand_as(absmax), absmax, "amax")
    return steps, out
