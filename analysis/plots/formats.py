"""Figures of the number-format teaching view (analysis.quantization.format_view.FormatView), plotly, no Streamlit:

format_histogram       channel j's values as a histogram, and under it one row per format with the values
                       that channel can take: FP grids crowd their codes near zero, an int grid spaces them evenly
format_channel_error   the relative quantization error of every input channel, one line per format: a
                       per-tensor scale spreads an outlier's damage over every channel, a block scale keeps
                       it inside the outlier's block
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.plots.axes import readable_layer

_MARGIN = dict(l=10, r=10, t=60, b=10)
_FLOOR = 1e-6


def _where(view) -> str:
    what = "input activation" if view.operand == "activation" else "weight column"
    when = f", timestep {view.timestep}" if view.timestep >= 0 else ""
    return f"{readable_layer(view.layer)}{when}: {what} of channel {view.channel}"


def format_histogram(view) -> go.Figure:
    """Histogram of the channel's values over the grid points of each format (one rug row per format)."""
    labels = list(view.grids)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.65, 0.35], vertical_spacing=0.04)
    fig.add_trace(go.Histogram(x=view.values, nbinsx=80, name="values", marker_color="#7f7f7f",
                               showlegend=False), row=1, col=1)
    lo, hi = float(np.min(view.values)), float(np.max(view.values))
    pad = 0.1 * max(hi - lo, 1e-12)
    for i, label in enumerate(labels):
        pts = view.grids[label]
        shown = pts[(pts >= lo - pad) & (pts <= hi + pad)]
        fig.add_trace(go.Scatter(x=shown, y=[label] * len(shown), mode="markers", name=label,
                                 marker=dict(symbol="line-ns-open", size=14, line=dict(width=2)),
                                 hovertemplate=f"{label}: %{{x:.4g}}<extra></extra>"), row=2, col=1)
    fig.update_yaxes(title_text="count", row=1, col=1)
    fig.update_yaxes(title_text="grid points", categoryorder="array", categoryarray=labels[::-1], row=2, col=1)
    fig.update_xaxes(title_text="value", row=2, col=1)
    fig.update_layout(title=f"{_where(view)}, with the values each format can give it", margin=_MARGIN,
                      height=460, legend=dict(orientation="h", y=-0.2))
    return fig


def format_channel_error(view) -> go.Figure:
    """Relative RMS quantization error per input channel, one line per format; the chosen channel marked."""
    fig = go.Figure()
    channels = np.arange(len(view.channel_absmax))
    for label, err in view.channel_error.items():
        group = view.groups.get(label)
        name = label + (f" (blocks of {group})" if group else "")
        fig.add_trace(go.Scatter(x=channels, y=np.maximum(err, _FLOOR), mode="lines", name=name,
                                 hovertemplate="channel %{x}: %{y:.3g}<extra>" + label + "</extra>"))
    fig.add_vline(x=view.channel, line_dash="dot", line_color="#555",
                  annotation_text=f"channel {view.channel} (max |x| {view.channel_absmax[view.channel]:.3g})")
    fig.update_yaxes(type="log", title_text="||Q(x_j) - x_j|| / ||x_j||")
    fig.update_xaxes(title_text="input channel j")
    scope = "each token's blocks / the whole tensor" if view.operand == "activation" else "blocks / output channels"
    fig.update_layout(title=f"Quantization error per channel, {readable_layer(view.layer)} ({scope})",
                      margin=_MARGIN, height=420, legend=dict(orientation="h", y=-0.2))
    return fig
