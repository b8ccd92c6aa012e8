"""Figures of one quantization run (plotly, no Streamlit), drawn from a Variant's report (plain lists and dicts,
so a report read back from JSON draws the same):

salience_before_after   per-channel max|X_j| and max|W_j| of a balanced group before and after the method's
                        vector was folded in: what CSB / SmoothQuant / WD did to the channel maxima
vector_figure           the balancing (CSB, SmoothQuant) or dilation (WD) vector b per channel
ssc_figure              PTQ4DiT's Spearman rho and softmax weight eta per timestep for a group
layer_error_figure      each quantized layer's relative output error on its own (FP) input
timestep_error_figure   relative RMS noise-prediction error vs FP per timestep, one line per variant

Channel profiles are single SVG line traces (fine at DiT-XL/2's 1152-4608 channels); layer bars are one trace.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analysis.plots.axes import log_axis, nice_ticks, wrap
from quant.families import layer_kind, readable_layer
from quant.measures import outlier_ratio, step_median

_MARGIN = dict(l=10, r=10, t=60, b=10)
_FLOOR = 1e-12  # log axes cannot show 0; a dead channel is drawn at this floor

def _pos(values) -> np.ndarray:
    return np.maximum(np.asarray(values, dtype=float), _FLOOR)


def _ratio(values) -> float:
    """max / median (quant.measures.outlier_ratio); NaN for an empty or all-zero profile."""
    v = np.asarray(values, dtype=float)
    if not v.size or not np.median(v) > 0:
        return float("nan")
    return float(outlier_ratio(torch.from_numpy(v)))


def salience_before_after(salience: dict, group: str, sort: bool = False) -> go.Figure:
    """Two panels over input channels j of `group`: max|X_j| (top) and max|W_j| (bottom), before and after
    folding, log y. Titles give max/median before -> after, the flatness a quantizer's range cares about.

    salience: report.salience[group] with x_before, x_after, w_before, w_after (lists of per-channel maxima).
    sort: order channels by activation salience before (largest first) instead of by index."""
    s = salience
    x_b, x_a, w_b, w_a = (np.asarray(s[k], dtype=float) for k in ("x_before", "x_after", "w_before", "w_after"))
    order = np.argsort(-x_b) if sort else np.arange(x_b.size)
    chan = np.arange(x_b.size) if sort else order
    xlabel = "input channels, sorted by activation salience before" if sort else "input channel j"
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12, subplot_titles=(
        f"activation max|X_j|: max/median {_ratio(x_b):.1f} before, {_ratio(x_a):.1f} after",
        f"weight max|W_j|: max/median {_ratio(w_b):.1f} before, {_ratio(w_a):.1f} after"))
    hover = "channel %{customdata}<br>%{y:.4g}<extra>%{fullData.name}</extra>"
    for row, (before, after, what) in enumerate([(x_b, x_a, "max|X_j|"), (w_b, w_a, "max|W_j|")], start=1):
        fig.add_trace(go.Scatter(x=chan, y=_pos(before[order]), mode="lines", name=f"{what} before",
                                 customdata=order, line=dict(width=1, color="#7f7f7f"), hovertemplate=hover,
                                 legendgroup=f"r{row}"), row=row, col=1)
        fig.add_trace(go.Scatter(x=chan, y=_pos(after[order]), mode="lines", name=f"{what} after",
                                 customdata=order, line=dict(width=1.2, color="#d62728" if row == 1 else "#1f77b4"),
                                 hovertemplate=hover, legendgroup=f"r{row}"), row=row, col=1)
    fig.update_yaxes(title_text="activation units", row=1, col=1, **log_axis(_pos(np.r_[x_b, x_a])))
    fig.update_yaxes(title_text="weight units", row=2, col=1, **log_axis(_pos(np.r_[w_b, w_a])))
    fig.update_xaxes(title_text=xlabel, row=2, col=1)
    fig.update_layout(title=f"{group}:<br>per-channel salience before and after folding", height=580,
                      margin=dict(l=10, r=10, t=80, b=10), hovermode="x unified",
                      legend=dict(orientation="h", y=-0.12))
    return fig


def vector_figure(vector, group: str, method: str | None = None) -> go.Figure:
    """The folded per-channel vector b of `group` (log y, b = 1 marked): channel j's input is divided by b_j
    and its weight column multiplied by b_j."""
    b = np.asarray(vector, dtype=float)
    chan = np.arange(b.size)
    from quant.methods import owner_of

    try:  # the component of a composition ("svdquant+gptq") that sets the vector
        owner = owner_of(method, "balance") if method else None
    except ValueError:
        owner = None
    name = owner.vector if owner is not None else "per-channel vector b_j"
    moved = int(np.sum(np.abs(b - 1.0) > 1e-6))
    fig = go.Figure(go.Scatter(x=chan, y=_pos(b), mode="lines+markers" if b.size <= 256 else "lines",
                               marker=dict(size=3), line=dict(width=1), name="b_j",
                               hovertemplate="channel %{x}<br>b = %{y:.4g}<extra></extra>"))
    # b = 1 as a trace, not a shape: a shape's y on a log axis is read as log10(y), so y=1 drew the line at 10
    # and stretched the axis to 1-10 around values of 1-1.15
    fig.add_trace(go.Scatter(x=[0, max(b.size - 1, 0)], y=[1.0, 1.0], mode="lines+text", name="b = 1",
                             text=["b = 1 (unchanged)", ""], textposition="top right",
                             line=dict(color="black", width=1, dash="dot"),
                             hovertemplate="b = 1: channel unchanged<extra></extra>"))
    span = f"min {b.min():.3g}, max {b.max():.3g}" if b.size else "empty"
    fig.update_layout(title=f"{group}:<br>{wrap(name, 48)}<br><sup>{moved} of {b.size} channels changed; {span}</sup>",
                      xaxis_title="input channel j",
                      yaxis=log_axis(np.r_[_pos(b), 1.0], "b_j (log): input / b_j, weight column x b_j"),
                      height=420, margin=dict(l=10, r=10, t=110, b=10), showlegend=False)
    return fig


def ssc_figure(ssc: dict, group: str) -> go.Figure:
    """PTQ4DiT's SSC for one group: Spearman rho between activation and weight salience per timestep (line)
    and the resulting weight eta = softmax(-rho) (bars, right axis); low rho = complementary = weighs most.

    ssc: report.ssc[group] with timesteps, rho, eta (per timestep, or per calibration row)."""
    steps = np.asarray(ssc["timesteps"], dtype=np.int64)
    rho, eta = np.asarray(ssc["rho"], dtype=float), np.asarray(ssc["eta"], dtype=float)
    per_sample = len(set(steps.tolist())) < len(steps)
    if not per_sample:  # one entry per timestep, stored in ascending t: draw them in sampling order instead
        order = np.argsort(-steps, kind="stable")
        steps, rho, eta = steps[order], rho[order], eta[order]
    t = [str(int(v)) for v in steps]
    x = list(range(len(t))) if per_sample else t
    # bars on the primary axis and the rho line on the secondary one: the secondary axis is drawn on top, so
    # the line stays visible over the bars
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=x, y=eta, name="eta (weight)", marker_color="#c6dbef", customdata=t,
                         hovertemplate="t=%{customdata}<br>eta = %{y:.4f}<extra></extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(x=x, y=rho, name="Spearman rho", mode="lines+markers", customdata=t,
                             line=dict(color="#08306b", width=2.5), marker=dict(size=6),
                             hovertemplate="t=%{customdata}<br>rho = %{y:.3f}<extra></extra>"), secondary_y=True)
    top = float(np.nanmax(eta)) if eta.size else 1.0
    eta_ticks = nice_ticks(0.0, top * 1.05, 4)
    fig.update_yaxes(title_text="eta = softmax(-rho)", secondary_y=False, range=[0, top * 1.1], tickmode="array",
                     tickvals=eta_ticks, ticktext=[f"{v:g}" for v in eta_ticks], showgrid=False)
    fig.update_yaxes(title_text="Spearman rho", secondary_y=True, range=[-1.05, 1.05], tickmode="array",
                     tickvals=[-1, -0.5, 0, 0.5, 1], ticktext=["-1", "-0.5", "0", "0.5", "1"])
    fig.update_xaxes(title_text="calibration row in recording order (timestep in hover)" if per_sample
                     else "timestep t, in sampling order: noisiest (largest t) left", type="category")
    fig.update_layout(title=f"{group}:<br>salience calibration (SSC) weights", height=420,
                      margin=dict(l=10, r=10, t=80, b=10),
                      legend=dict(orientation="h", y=-0.25))
    return fig


# Calm colours for the layer kinds, in order of appearance: a kind is not an alarm (plotly's default palette
# paints the second kind red).
KIND_PALETTE = ["#4c78a8", "#f58518", "#72b7b2", "#54a24b", "#b279a2", "#9d755d", "#bab0ac", "#eeca3b"]


def layer_error_figure(layer_error: dict, title: str = "Per-layer relative output error") -> go.Figure:
    """Bars in model order: ||Y_q - Y|| / ||Y|| of each quantized layer on its own input, coloured by kind."""
    names = list(layer_error)
    vals = [float(layer_error[n]) for n in names]
    kinds = [layer_kind(n) for n in names]
    fig = go.Figure()
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        fig.add_trace(go.Bar(x=[readable_layer(names[i]) for i in idx], y=[vals[i] for i in idx], name=kind,
                             marker_color=KIND_PALETTE[len(fig.data) % len(KIND_PALETTE)],
                             customdata=[names[i] for i in idx],
                             hovertemplate="%{customdata}<br>rel. error %{y:.4g}<extra></extra>"))
    worst = names[int(np.argmax(vals))] if vals else "-"
    labels = [readable_layer(n) for n in names]
    fig.update_layout(title=wrap(title, 70) + f"<br><sup>worst: {worst} ({max(vals, default=0):.3g})</sup>",
                      # every layer labelled (plotly skips every other category label when they crowd)
                      xaxis=dict(title="layer (model order)", type="category", categoryorder="array",
                                 categoryarray=labels, tickmode="array", tickvals=labels, ticktext=labels,
                                 tickangle=-60, tickfont=dict(size=10 if len(labels) > 40 else 12)),
                      yaxis=dict(title="||Y_q - Y|| / ||Y||", rangemode="tozero"),
                      height=480, margin=dict(l=10, r=10, t=70, b=10),
                      legend_title="layer kind", barmode="overlay")
    return fig


def timestep_error_figure(per_timestep: dict, log: bool = True) -> go.Figure:
    """Relative RMS error of the noise prediction vs FP at each calibrated timestep (report.rel_rms_per_timestep).

    per_timestep: {t: error} for one run, or {variant name: {t: error}} for several (one line each);
    timestep keys may be int or str (JSON)."""
    first = next(iter(per_timestep.values()), None)
    series = per_timestep if isinstance(first, dict) else {"rel_rms": per_timestep}
    fig = go.Figure()
    values = []
    for name, errs in series.items():
        pts = sorted(((int(t), float(e)) for t, e in errs.items()), reverse=True)  # noisiest first
        values += [max(e, _FLOOR) for _, e in pts]
        fig.add_trace(go.Scatter(x=[str(t) for t, _ in pts], y=[max(e, _FLOOR) for _, e in pts], name=name,
                                 mode="lines+markers",
                                 hovertemplate="t=%{x}<br>rel. RMS error %{y:.4g}<extra>" + name + "</extra>"))
        if len(series) == 1 and pts:  # the headline number, drawn on the curve it summarises
            med = max(step_median(dict(pts)), _FLOOR)
            fig.add_trace(go.Scatter(x=[str(pts[0][0]), str(pts[-1][0])], y=[med, med], mode="lines+text",
                                     text=["", f"median over steps {med:.3g}"], textposition="top left",
                                     line=dict(color="gray", dash="dash", width=1), name="median over steps",
                                     hovertemplate=f"median over steps {med:.4g}<extra></extra>"))
    fig.update_layout(title="Noise-prediction error vs FP per timestep (calibration inputs)<br><sup>the headline "
                            "error is the median over steps; the last steps' rise costs the image little</sup>",
                      xaxis=dict(title="timestep t (sampling order, noisiest left)", type="category"),
                      yaxis=log_axis(values, "||eps_q - eps|| / ||eps|| (log)") if log else
                      dict(title="||eps_q - eps|| / ||eps||", rangemode="tozero"),
                      height=400, margin=dict(l=10, r=10, t=80, b=10), showlegend=len(series) > 1,
                      legend_title="variant")
    return fig


def spectrum_figure(spectrum, rank: int, layer: str) -> go.Figure:
    """Singular values of a layer's (smoothed) weight, largest first, with SVDQuant's rank r marked: the
    values left of the line go to the 16-bit branch, the rest stay in the quantized residual."""
    s = np.asarray(spectrum, dtype=float)
    fig = go.Figure(go.Scatter(x=np.arange(1, len(s) + 1), y=s, mode="lines+markers", marker=dict(size=4),
                               name="singular value"))
    fig.add_vline(x=rank + 0.5, line_dash="dash", annotation_text=f"rank {rank}: branch | residual")
    kept = float((s[:rank] ** 2).sum() / max((s ** 2).sum(), 1e-30))
    fig.update_layout(title=f"{readable_layer(layer)}: singular values of the smoothed weight ({kept:.0%} of the energy "
                            f"in the branch)", xaxis_title="index", yaxis_title="singular value",
                      yaxis_type="log", height=340, margin=dict(t=50, b=40))
    return fig


def rotation_histogram_figure(hist: dict, layer: str) -> go.Figure:
    """The layer's input values before and after the Hadamard rotation (shared bins, log counts); the title
    gives the range each per-tensor quantizer would have to cover."""
    edges = np.asarray(hist["edges"])
    mid = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for key, name in (("before", "before rotation"), ("after", "after rotation")):
        fig.add_trace(go.Bar(x=mid, y=np.maximum(np.asarray(hist[key]), 0.5), name=name, opacity=0.6))
    before, after = max(hist["absmax_before"]), max(hist["absmax_after"])
    fig.update_layout(barmode="overlay", yaxis_type="log", height=340, margin=dict(t=50, b=40),
                      title=f"{readable_layer(layer)}: input values, max |x| {before:.3g} -> {after:.3g} after rotation",
                      xaxis_title="activation value", yaxis_title="count")
    return fig
