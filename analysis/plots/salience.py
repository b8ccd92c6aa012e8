"""Salience figures (plotly, no Streamlit): what a user looks at to see outlier channels and timesteps.

(a) channel_profile           per-channel max|X| and max|W| for one layer and timestep, quantization MSE
                              overlaid (PTQ4DiT, Wu et al. 2024, Fig. 3)
(b) timestep_boxplot          distribution over channels of max|X_j| at each timestep (PTQ4DiT Fig. 4)
(c) channel_timestep_heatmap  channel x timestep salience
(d) spearman_over_timesteps   rank correlation of activation and weight salience over timesteps
(e) complementarity_scatter   activation vs weight salience, one point per channel
(f) layer_overview            every layer ranked by how hard it is to quantize

Sizes stay bounded at DiT-XL/2 scale (1152-4608 channels, 50-250 steps): every figure has a fixed, small
number of traces; channel profiles are single line traces (one SVG path, no WebGL); box plots are drawn
from precomputed quartiles, never from raw points; heatmaps show at most `max_channels` channels (the most
salient, named in the title when some are left out); many layers become a heatmap rather than many lines.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.plots.axes import log_axis, readable_layer, wrap
from analysis.salience.collect import SalienceStats
from analysis.salience.measures import layer_difficulty, quant_error, spearman, spearman_by_timestep

_MARGIN = dict(l=10, r=10, t=90, b=10)  # room for a title and its subtitle line
_T_AXIS = "timestep t (sampling order, noisiest left)"
ACT_UNITS = "activation units"


def _short(layer: str) -> str:
    """'transformer_blocks.3.attn1.to_q' -> 'block 3 · attn q' (axis labels; hovers keep the full name)."""
    return readable_layer(layer)


def _title(main: str, detail: str) -> dict:
    """A title in two lines, so a long layer name and its settings are never cut at the figure's edge."""
    return dict(text=f"{wrap(main, 70)}<br><sup>{detail}</sup>", x=0.01, xanchor="left")


def _t_labels(stats: SalienceStats) -> list[str]:
    """Timesteps as category labels so axes keep sampling order (t decreasing) without numeric gaps."""
    return [str(t) for t in stats.timesteps]


# ---- (a) -----------------------------------------------------------------------------------------------
def channel_profile(stats: SalienceStats, layer: str, step: int, bits: int | None = None,
                    rows: str = "all") -> go.Figure:
    """Per input channel j at timestep index `step`: max|X_j| (top) and max|W_j| (bottom), with the
    per-channel quantization MSE at `bits` on a second axis when those errors were collected."""
    sal = stats.channel_salience(layer, rows=rows)[step]
    t = int(stats.timesteps[step])
    chan = np.arange(sal.shape[0])
    w = stats.weight_absmax.get(layer)
    act_mse = w_mse = None
    if bits is not None and int(bits) in stats.mse_bits:
        act_mse, w_mse = quant_error(stats, layer, step, bits)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        specs=[[{"secondary_y": True}], [{"secondary_y": True}]],
                        subplot_titles=(f"activation salience max|X_j| at t={t}", "weight salience max|W_j|"))
    hover = f"layer {layer}<br>channel %{{x}}<br>timestep {t}<br>"
    fig.add_trace(go.Scatter(x=chan, y=sal, mode="lines", fill="tozeroy", name="max|X_j|", line=dict(width=1),
                             hovertemplate=hover + "max|X_j| = %{y:.4g}<extra></extra>"), row=1, col=1)
    if act_mse is not None:
        fig.add_trace(go.Scatter(x=chan, y=act_mse, mode="lines", name=f"activation MSE (A{bits})",
                                 line=dict(width=1, color="crimson"),
                                 hovertemplate=hover + f"A{bits} MSE = %{{y:.3g}}<extra></extra>"),
                      row=1, col=1, secondary_y=True)
    if w is not None:
        fig.add_trace(go.Scatter(x=chan, y=w, mode="lines", fill="tozeroy", name="max|W_j|", line=dict(width=1),
                                 hovertemplate=f"layer {layer}<br>channel %{{x}}<br>max|W_j| = %{{y:.4g}}"
                                               "<extra></extra>"), row=2, col=1)
        if w_mse is not None:
            fig.add_trace(go.Scatter(x=chan, y=w_mse, mode="lines", name=f"weight MSE (W{bits})",
                                     line=dict(width=1, color="darkorange"),
                                     hovertemplate=f"layer {layer}<br>channel %{{x}}<br>W{bits} MSE = %{{y:.3g}}"
                                                   "<extra></extra>"), row=2, col=1, secondary_y=True)
    else:
        fig.add_annotation(text="no weight: this operand is not a linear layer's input", showarrow=False,
                           xref="x2 domain", yref="y3 domain", x=0.5, y=0.5)
    err = f", quantization MSE at {bits} bits" if act_mse is not None else (
        f" (no {bits}-bit error collected)" if bits is not None else "")
    fig.update_layout(title=_title(f"{_short(layer)}: per-channel salience at t={t}", f"{layer}{err}"), height=540,
                      margin=_MARGIN, legend=dict(orientation="h", y=-0.12), hovermode="closest")
    fig.update_xaxes(title_text="input channel j", row=2, col=1)
    fig.update_yaxes(title_text=f"max|X_j| ({ACT_UNITS})", row=1, col=1, secondary_y=False)
    # MSE values are tiny: one exponent format (2.6e-3), never SI suffixes (17.89u) or long decimals; from zero
    mse_axis = dict(rangemode="tozero", showgrid=False, tickformat=".1e", exponentformat="e")
    fig.update_yaxes(title_text="MSE (act. units²)", row=1, col=1, secondary_y=True, **mse_axis)
    fig.update_yaxes(title_text="max|W_j| (weight units)", row=2, col=1, secondary_y=False)
    fig.update_yaxes(title_text="MSE (weight units²)", row=2, col=1, secondary_y=True, **mse_axis)
    fig.update_yaxes(rangemode="tozero", secondary_y=False)  # salience is a maximum of |x|: never below 0
    return fig


# ---- (b) -----------------------------------------------------------------------------------------------
def timestep_boxplot(stats: SalienceStats, layer: str, split_halves: bool = False) -> go.Figure:
    """At each timestep, the spread over channels of max|X_j|: box = quartiles, whiskers = min / max channel.
    The most salient channel per timestep is marked and named in its hover. Drawn from precomputed
    quartiles, so the figure holds O(timesteps) numbers whatever the channel count."""
    x = _t_labels(stats)
    fig = go.Figure()
    values = []
    groups = [("all rows", "all")] if not split_halves or len(stats.halves) < 2 else [
        ("conditional", "cond"), ("unconditional", "uncond")]
    for name, rows in groups:
        s = stats.channel_salience(layer, rows=rows)  # [T, C]
        q1, med, q3 = np.percentile(s, [25, 50, 75], axis=1)
        values += [s.min(axis=1), s.max(axis=1), q1]
        fig.add_trace(go.Box(x=x, q1=q1, median=med, q3=q3, lowerfence=s.min(axis=1), upperfence=s.max(axis=1),
                             name=name, boxpoints=False, hoverinfo="x+y"))
        top = s.argmax(axis=1)
        fig.add_trace(go.Scatter(x=x, y=s.max(axis=1), mode="markers", name=f"top channel ({name})",
                                 marker=dict(symbol="triangle-up", size=6), customdata=top,
                                 hovertemplate=f"layer {layer}<br>timestep %{{x}}<br>channel %{{customdata}}"
                                               "<br>max|X_j| = %{y:.4g}<extra></extra>"))
    fig.update_layout(title=_title(f"{_short(layer)}: channel maxima across timesteps",
                                   f"{layer}; box = quartiles over channels, whiskers = min / max channel"),
                      xaxis_title=_T_AXIS,
                      # log: one outlier channel 20x the rest would squash every box into a line on a linear axis
                      yaxis=log_axis(np.concatenate(values) if values else [], f"max|X_j| ({ACT_UNITS}, log)"),
                      boxmode="group", height=440,
                      margin=_MARGIN, xaxis=dict(type="category", nticks=20))
    return fig


# ---- (c) -----------------------------------------------------------------------------------------------
def channel_timestep_heatmap(stats: SalienceStats, layer: str, max_channels: int = 512, log: bool = True,
                             rows: str = "all") -> go.Figure:
    """max|X_j| for every (channel, timestep), log10 colour by default. Above `max_channels` channels only
    the most salient ones (by peak over timesteps) are shown, in channel order, and the title says so."""
    s = stats.channel_salience(layer, rows=rows)  # [T, C]
    C = s.shape[1]
    keep = np.arange(C)
    if C > max_channels:
        keep = np.sort(np.argsort(s.max(axis=0))[::-1][:max_channels])
    z = s[:, keep].T  # [channels, T]
    zc = np.log10(np.maximum(z, 1e-12)) if log else z
    # colour range from the channels that carry signal: an all-zero channel (log10 -> -12) would stretch the
    # scale so far that every live channel shows one colour
    live = z[z > 0]
    zmin = (float(np.log10(np.percentile(live, 1))) if log else float(np.percentile(live, 1))) if live.size else None
    zmax = (float(np.log10(live.max())) if log else float(live.max())) if live.size else None
    ylab = [f"ch {j}" for j in keep]
    custom = np.broadcast_to(z[..., None], z.shape + (1,))
    fig = go.Figure(go.Heatmap(z=zc, x=_t_labels(stats), y=ylab, customdata=custom, colorscale="Viridis",
                               zmin=zmin, zmax=zmax,
                               colorbar=dict(title="log10 max|X_j|" if log else "max|X_j|"),
                               hovertemplate=f"layer {layer}<br>%{{y}}<br>timestep %{{x}}<br>max|X_j| = "
                                             "%{customdata[0]:.4g}<extra></extra>"))
    shown = f" (top {len(keep)} of {C} channels by peak)" if len(keep) < C else ""
    fig.update_layout(title=_title(f"{_short(layer)}: salience per channel and timestep", f"{layer}{shown}"),
                      xaxis_title=_T_AXIS,
                      yaxis_title="input channel j", height=520, margin=_MARGIN,
                      xaxis=dict(type="category", nticks=20), yaxis=dict(type="category", nticks=30))
    return fig


# ---- (d) -----------------------------------------------------------------------------------------------
def spearman_over_timesteps(stats: SalienceStats, layers: list[str] | None = None,
                            max_lines: int = 12) -> go.Figure:
    """rho(s(X^t), s(W)) across channels, over timesteps: one line per layer for a few layers, a
    layer x timestep heatmap for more (every linear layer by default)."""
    rho = spearman_by_timestep(stats, layers)
    if not rho:
        raise ValueError("no layer with a weight among those asked; rho needs a linear layer")
    x = _t_labels(stats)
    title = _title("Spearman rho between activation and weight salience", "low or negative = complementary: "
                   "extreme activations sit on channels with ordinary weights")
    if len(rho) <= max_lines:
        fig = go.Figure()
        for key, r in rho.items():
            fig.add_trace(go.Scatter(x=x, y=r, mode="lines+markers", name=_short(key), marker=dict(size=4),
                                     hovertemplate=f"layer {key}<br>timestep %{{x}}<br>rho = %{{y:.3f}}"
                                                   "<extra></extra>"))
        fig.update_layout(yaxis_title="Spearman rho (unitless, -1 to 1)", legend_title="layer")
    else:
        names = list(rho)
        fig = go.Figure(go.Heatmap(z=np.stack([rho[k] for k in names]), x=x, y=[_short(k) for k in names],
                                   customdata=np.array(names)[:, None].repeat(len(x), axis=1),
                                   zmin=-1, zmax=1, colorscale="RdBu", colorbar=dict(title="rho"),
                                   hovertemplate="layer %{customdata}<br>timestep %{x}<br>rho = %{z:.3f}"
                                                 "<extra></extra>"))
        labels = [_short(k) for k in names]
        fig.update_layout(yaxis_title="layer", yaxis=dict(type="category", autorange="reversed", tickmode="array",
                                                          tickvals=labels, ticktext=labels,
                                                          tickfont=dict(size=9 if len(labels) > 40 else 11)))
    fig.update_layout(title=title, xaxis_title=_T_AXIS, height=max(380, min(900, 14 * len(rho))), margin=_MARGIN)
    fig.update_xaxes(type="category", nticks=20)
    return fig


# ---- (e) -----------------------------------------------------------------------------------------------
def complementarity_scatter(stats: SalienceStats, layer: str, step: int, label_top: int = 5) -> go.Figure:
    """One point per input channel: activation salience (x) against weight salience (y), log axes.
    Complementary layers put their extreme activations on channels with ordinary weights and vice versa."""
    if layer not in stats.weight_absmax:
        raise ValueError(f"{layer} has no weight (attention operand): complementarity needs a linear layer")
    sal = stats.channel_salience(layer)[step]
    w = stats.weight_absmax[layer]
    t = int(stats.timesteps[step])
    rho = float(spearman(sal, w))
    chan = np.arange(sal.shape[0])
    fig = go.Figure(go.Scatter(x=sal, y=w, mode="markers", name="channels", customdata=chan,
                               marker=dict(size=5, opacity=0.6, color=np.log10(np.maximum(sal / np.maximum(w, 1e-12),
                                                                                          1e-12)),
                                           colorscale="RdBu_r", colorbar=dict(title="log10 s(X)/s(W)")),
                               hovertemplate=f"layer {layer}<br>channel %{{customdata}}<br>timestep {t}<br>"
                                             "max|X_j| = %{x:.4g}<br>max|W_j| = %{y:.4g}<extra></extra>"))
    top = np.argsort(sal)[::-1][:label_top]
    fig.add_trace(go.Scatter(x=sal[top], y=w[top], mode="markers+text", text=[f"ch {j}" for j in top],
                             textposition="top center", name=f"top {len(top)} activation channels",
                             marker=dict(size=9, symbol="circle-open", color="black"), customdata=top,
                             hovertemplate=f"layer {layer}<br>channel %{{customdata}}<br>timestep {t}<br>"
                                           "max|X_j| = %{x:.4g}<br>max|W_j| = %{y:.4g}<extra></extra>"))
    fig.update_layout(title=_title(f"{_short(layer)}: activation vs weight salience at t={t}",
                                   f"{layer}; Spearman rho = {rho:.3f}"),
                      xaxis=log_axis(sal, f"max|X_j| ({ACT_UNITS}, log)"),
                      yaxis=log_axis(w, "max|W_j| (weight units, log)"),
                      height=500, margin=_MARGIN, legend=dict(orientation="h", y=-0.15))
    return fig


# ---- (f) -----------------------------------------------------------------------------------------------
def layer_overview(stats: SalienceStats, sort_by: str = "act_outlier_ratio", top: int | None = None) -> go.Figure:
    """Every layer ranked by `sort_by` (default: activation outlier ratio max/median): bars coloured by kind
    for the activation ratio, diamonds for the weight ratio. One trace per kind, so at most ~13 traces."""
    d = layer_difficulty(stats, sort_by=sort_by)
    if top is not None:
        d = d.head(top)
    d = d.assign(label=[f"{r}. {_short(k)}" for r, k in zip(d["rank"], d["layer"])])
    fig = go.Figure()
    custom_cols = ["layer", "kind", "block", "act_outlier_ratio", "weight_outlier_ratio", "act_temporal_ratio",
                   "rho_mean"]
    hover = ("layer %{customdata[0]}<br>kind %{customdata[1]}, block %{customdata[2]}<br>activation max/median "
             "%{customdata[3]:.2f}<br>weight max/median %{customdata[4]:.2f}<br>activation max over t / min over t "
             "%{customdata[5]:.2f}<br>mean rho %{customdata[6]:.3f}<extra></extra>")
    for kind, part in d.groupby("kind", sort=False):
        fig.add_trace(go.Bar(x=part["label"], y=part["act_outlier_ratio"], name=f"{kind}: activation",
                             customdata=part[custom_cols].to_numpy(), hovertemplate=hover))
    wd = d[d["weight_outlier_ratio"].notna()]
    fig.add_trace(go.Scatter(x=wd["label"], y=wd["weight_outlier_ratio"], mode="markers", name="weight (all kinds)",
                             marker=dict(symbol="diamond", size=7, color="black"),
                             customdata=wd[custom_cols].to_numpy(), hovertemplate=hover))
    ratios = list(d["act_outlier_ratio"]) + list(wd["weight_outlier_ratio"])
    fig.update_layout(title=_title("Layers ranked by how hard they are to quantize",
                                   f"by {sort_by.replace('_', ' ')}, hardest first; {len(d)} layers"),
                      xaxis_title="layer (rank. block · role)",
                      yaxis=log_axis(ratios, "channel max / median (ratio, log)"),
                      height=600, margin=dict(l=10, r=10, t=90, b=10), barmode="overlay",
                      # every layer labelled: plotly would skip every other category when they crowd
                      xaxis=dict(type="category", categoryorder="array", categoryarray=list(d["label"]),
                                 tickmode="array", tickvals=list(d["label"]), ticktext=list(d["label"]),
                                 tickfont=dict(size=9 if len(d) > 40 else 11), tickangle=-60, automargin=True))
    return fig


def figure_size(fig: go.Figure) -> tuple[int, int]:
    """(traces, plotted numbers): what a browser must draw, for keeping figures responsive."""
    points = 0
    for tr in fig.data:
        z = getattr(tr, "z", None)
        if z is not None:
            points += int(np.asarray(z).size)
            continue
        for attr in ("x", "y", "q1"):
            v = getattr(tr, attr, None)
            if v is not None:
                points += len(v)
                break
    return len(fig.data), points

