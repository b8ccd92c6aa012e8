"""Measures derived from salience statistics: complementarity, quantization error, variability, difficulty.

- Spearman rank correlation rho between activation salience s(X^t) and weight salience s(W) across the
  channels of a layer, per timestep (PTQ4DiT's SSC, docs/ARCHITECTURE.md "The formulas", uses rho_t to weight timesteps:
  eta = softmax(-rho)). A low or negative rho means the two saliences are complementary: the channels
  with extreme activations are not the ones with extreme weights, so a per-channel scale can balance them.
- Per-channel quantization MSE, as recorded by analysis.salience.collect (computed in analysis.salience.channel_error).
- Temporal variability of each channel's salience across timesteps (range, coefficient of variation).
- A per-layer difficulty table: outlier ratios max/median over channels, temporal ratio, mean rho.

All computations are vectorized over channels (and timesteps / rows); there is no Python loop over channels.
"""
from __future__ import annotations

import numpy as np
import torch

from analysis.salience.collect import SalienceStats, base_name, layer_block, layer_kind
from quant import measures

_TINY = 1e-12


# ---- rank correlation ---------------------------------------------------------------------------------
def rankdata(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Ranks 1..n along `axis`, ties averaged (scipy's 'average'): quant.measures.rankdata on numpy arrays."""
    a = np.moveaxis(np.asarray(a), axis, -1)
    return np.moveaxis(measures.rankdata(torch.from_numpy(np.ascontiguousarray(a))).numpy(), -1, axis)


def spearman(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho along `axis` for every slice at once (a and b broadcast); NaN where a side is constant.
    quant.measures.spearman (the one definition, also used by PTQ4DiT's SSC) on numpy arrays."""
    a, b = (torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(v), axis, -1))) for v in (a, b))
    return measures.spearman(a, b).numpy()


def spearman_by_timestep(stats: SalienceStats, layers: list[str] | None = None, per_sample: bool = False,
                         rows: str = "all") -> dict[str, np.ndarray]:
    """rho between s(X) and s(W) across channels, per layer: [T] (default) or [T, R] with per_sample.

    Default: per timestep, s(X^t) = max over the chosen rows (the salience a per-timestep quantizer sees).
    per_sample=True gives one rho per calibration row, as the official PTQ4DiT code computes it.
    Only layers with a weight (linear layers) have a rho.
    """
    layers = [k for k in (stats.layers if layers is None else layers) if k in stats.weight_absmax]
    out = {}
    for key in layers:
        memo = ("rho", key, per_sample, rows)
        if memo not in stats.derived:
            w = stats.weight_absmax[key]
            act = stats.act_absmax[key] if per_sample else stats.channel_salience(key, rows=rows)
            rho = spearman(act, w, axis=-1)
            rho.flags.writeable = False  # shared by every later call
            stats.derived[memo] = rho
        out[key] = stats.derived[memo]
    return out


def spearman_frame(stats: SalienceStats, layers: list[str] | None = None):
    """Tidy rho per (layer, timestep): layer, block, kind, step, timestep, rho."""
    import pandas as pd

    rho = spearman_by_timestep(stats, layers)
    T = len(stats.timesteps)
    return pd.DataFrame({"layer": np.repeat(list(rho), T), "block": np.repeat([layer_block(k) for k in rho], T),
                         "kind": np.repeat([layer_kind(k) for k in rho], T), "step": np.tile(np.arange(T), len(rho)),
                         "timestep": np.tile(stats.timesteps, len(rho)),
                         "rho": np.concatenate(list(rho.values())) if rho else np.array([])})


# ---- quantization error -------------------------------------------------------------------------------
def quant_error(stats: SalienceStats, layer: str, step: int, bits: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(activation MSE [C] at timestep index `step`, weight MSE [C]) at `bits`, from the collected errors."""
    stats.check_layer(layer)
    if int(bits) not in stats.mse_bits:
        raise ValueError(f"no quantization error at {bits} bits in these statistics (collected: "
                         f"{list(stats.mse_bits) or 'none'}); collect with mse_bits including {bits}")
    i = stats.mse_bits.index(int(bits))
    act = stats.act_mse[layer][step, i] if layer in stats.act_mse else None
    w = stats.weight_mse[layer][i] if layer in stats.weight_mse else None
    return act, w


# ---- temporal variability -----------------------------------------------------------------------------
def temporal_variability(stats: SalienceStats, layer: str, rows: str = "all"):
    """Per channel, how its salience moves across timesteps: mean, min, max, range, cv (std / mean), peak.

    A channel with a large range needs a wide static range; per-timestep quantizers (TPQ) remove that cost.
    """
    import pandas as pd

    s = stats.channel_salience(layer, rows=rows)  # [T, C]
    mean = s.mean(axis=0)
    peak = s.argmax(axis=0)
    return pd.DataFrame({"layer": layer, "channel": np.arange(s.shape[1]), "mean": mean, "min": s.min(axis=0),
                         "max": s.max(axis=0), "range": s.max(axis=0) - s.min(axis=0),
                         "cv": s.std(axis=0) / np.maximum(mean, _TINY), "peak_step": peak,
                         "peak_timestep": stats.timesteps[peak]})


# ---- per-layer difficulty -----------------------------------------------------------------------------
def outlier_ratio(s: np.ndarray, axis: int = -1) -> np.ndarray:
    """max / median along `axis` (quant.measures.outlier_ratio): how far the top channel stands above a typical one."""
    return measures.outlier_ratio(torch.from_numpy(np.asarray(s)), dim=axis).numpy()


def layer_difficulty(stats: SalienceStats, sort_by: str = "act_outlier_ratio"):
    """One row per layer, hardest first (by `sort_by`, default the activation outlier ratio).

    act_outlier_ratio: max/median over channels of s(X) taken over all timesteps and rows, i.e. what one
        static per-tensor quantizer must span relative to a typical channel;
    act_outlier_ratio_worst_t: the same ratio at the worst single timestep (a per-timestep quantizer's view);
    act_temporal_ratio: largest over smallest per-timestep layer maximum (how much the range moves);
    weight_outlier_ratio: max/median of s(W); rho_mean / rho_min: Spearman rho over timesteps;
    act_max, weight_max: the largest salience; act_mse_a{b}: mean activation MSE at b bits if collected.
    """
    frame = stats.derived.get("difficulty")
    if frame is None:
        frame = stats.derived["difficulty"] = _difficulty_rows(stats)
    if sort_by not in frame.columns:
        raise ValueError(f"cannot sort by {sort_by!r}; columns: {list(frame.columns)}")
    frame = frame.sort_values(sort_by, ascending=False, kind="stable").reset_index(drop=True)  # a new frame
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame


def _difficulty_rows(stats: SalienceStats):
    import pandas as pd

    rho = spearman_by_timestep(stats)
    rows = []
    for key in stats.layers:
        s_t = stats.channel_salience(key)  # [T, C]
        s_all = s_t.max(axis=0)
        layer_max_t = s_t.max(axis=1)
        w = stats.weight_absmax.get(key)
        row = {"layer": key, "block": layer_block(key), "kind": layer_kind(key), "channels": s_t.shape[1],
               "act_outlier_ratio": float(outlier_ratio(s_all)),
               "act_outlier_ratio_worst_t": float(outlier_ratio(s_t).max()),
               "act_temporal_ratio": float(layer_max_t.max() / max(layer_max_t.min(), _TINY)),
               "act_max": float(s_all.max()),
               "weight_outlier_ratio": float(outlier_ratio(w)) if w is not None else np.nan,
               "weight_max": float(w.max()) if w is not None else np.nan,
               "rho_mean": float(np.nanmean(rho[key])) if key in rho and np.isfinite(rho[key]).any() else np.nan,
               "rho_min": float(np.nanmin(rho[key])) if key in rho and np.isfinite(rho[key]).any() else np.nan}
        for i, b in enumerate(stats.mse_bits):
            if key in stats.act_mse:
                row[f"act_mse_a{b}"] = float(stats.act_mse[key][:, i].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def profile_by_kind(stats: SalienceStats):
    """Salience profile per layer kind: median and max over layers of the activation and weight
    max/median ratios, and of the temporal ratio (the summary a model card records)."""
    d = layer_difficulty(stats)
    agg = d.groupby("kind").agg(layers=("layer", "size"),
                                act_ratio_median=("act_outlier_ratio", "median"),
                                act_ratio_max=("act_outlier_ratio", "max"),
                                weight_ratio_median=("weight_outlier_ratio", "median"),
                                weight_ratio_max=("weight_outlier_ratio", "max"),
                                temporal_ratio_max=("act_temporal_ratio", "max"),
                                rho_mean=("rho_mean", "mean"))
    return agg.reset_index()


def hardest_layers(stats: SalienceStats, n: int = 5) -> list[dict]:
    """The n layers with the largest activation max/median, as {layer, kind, act_outlier_ratio,
    weight_outlier_ratio (None without weights)}. A module's second call in a forward ("name@2", block 0's
    embedding in diffusers' DiT) repeats its first call's statistics; it is left out when identical, so two
    places are not spent on one layer."""
    difficulty = layer_difficulty(stats)
    repeats_first = [k for k in difficulty["layer"] if base_name(k) != k and base_name(k) in stats.act_absmax
                     and np.array_equal(stats.act_absmax[k], stats.act_absmax[base_name(k)])]
    return [{"layer": r.layer, "kind": r.kind, "act_outlier_ratio": round(r.act_outlier_ratio, 3),
             "weight_outlier_ratio": None if r.weight_outlier_ratio != r.weight_outlier_ratio
             else round(r.weight_outlier_ratio, 3)}
            for r in difficulty[~difficulty["layer"].isin(repeats_first)].head(n).itertuples()]
