"""Figures for comparing variants: per-timestep error lines, x_t drift lines, metric bars."""
from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.evaluation.metrics import MIN_RELIABLE_FID_SAMPLES
from analysis.plots.axes import log_axis, wrap

# Neutral colours per panel: none of these numbers is an alarm by itself (red reads as one on a projector).
PANEL_COLORS = {"fid": "#4c78a8", "fid_vs_fp": "#72b7b2", "label_agreement": "#9d755d"}


def _lines(rows: list[dict], value: str, title: str, ytitle: str, log: bool = True) -> go.Figure:
    """One line per variant over sampling steps (noisiest first), timestep in the hover."""
    fig = go.Figure()
    values = [max(r[value], 1e-12) for r in rows]
    for name in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["step"])
        fig.add_trace(go.Scatter(x=[r["step"] for r in pts], y=[max(r[value], 1e-12) for r in pts], name=name,
                                 mode="lines+markers", customdata=[r["t"] for r in pts],
                                 hovertemplate="step %{x} (t=%{customdata})<br>%{y:.3g}<extra>" + name + "</extra>"))
    fig.update_layout(title=wrap(title, 48), xaxis_title="sampling step (0 = noisiest)",
                      yaxis=log_axis(values, ytitle + " (log)") if log else dict(title=ytitle, rangemode="tozero"),
                      legend_title="variant", height=400, margin=dict(l=10, r=10, t=70, b=10))
    return fig


def step_error_figure(step_error: list[dict]) -> go.Figure:
    """Relative RMS error of each variant's noise prediction vs FP, on the FP trajectory's inputs."""
    return _lines(step_error, "rel_rms", "Noise-prediction error vs FP at each step (same inputs)",
                  "||eps_q - eps|| / ||eps||")


def drift_figure(drift: list[dict]) -> go.Figure:
    """Relative distance of each variant's x_t from FP's x_t, along the variant's own trajectory."""
    return _lines(drift, "rel_rms_drift", "Drift of x_t from FP along each variant's own trajectory",
                  "||x_t - x_t(FP)|| / ||x_t(FP)||")


def metrics_figure(rows: list[dict]) -> go.Figure:
    """Bars per variant: FID vs real, FID vs FP (both with N in the hover and axis, and their bootstrap
    intervals as error bars), label agreement; the real-vs-real floor at the same N as a dashed line.
    rows: {"variant", "fid", "fid_interval", "fid_floor", "fid_vs_fp", "fid_vs_fp_interval",
    "label_agreement", "num_samples"}; missing values are skipped."""
    have_agree = any(r.get("label_agreement") is not None for r in rows)
    cols = 3 if have_agree else 2
    n = sorted({r.get("num_samples") for r in rows if r.get("num_samples")})
    n_text = "N=" + "/".join(str(v) for v in n) if n else "N=?"
    titles = [f"FID vs real ({n_text})", f"FID vs FP ({n_text})", "label agreement"][:cols]
    fig = make_subplots(rows=1, cols=cols, subplot_titles=titles)
    names = [r["variant"] for r in rows]
    for col, key in enumerate(["fid", "fid_vs_fp", "label_agreement"][:cols], start=1):
        vals = [r.get(key) for r in rows]
        intervals = [r.get(f"{key}_interval") for r in rows]
        error_y = None
        if any(intervals):
            error_y = dict(type="data", symmetric=False, thickness=1.5, width=6,
                           array=[(iv[1] - v) if iv and v is not None else 0 for v, iv in zip(vals, intervals)],
                           arrayminus=[(v - iv[0]) if iv and v is not None else 0 for v, iv in zip(vals, intervals)])
        # values written inside the bar at its base: above the bar they collide with the error bar's cap
        fig.add_trace(go.Bar(x=names, y=[v if v is not None else 0 for v in vals], name=key, showlegend=False,
                             error_y=error_y, marker_color=PANEL_COLORS[key],
                             text=["n/a" if v is None else (f"{v:.1%}" if key == "label_agreement" else f"{v:.3g}")
                                   for v in vals], textposition="inside", insidetextanchor="start",
                             textfont=dict(color="white"), cliponaxis=False,
                             customdata=[r.get("num_samples") for r in rows],
                             hovertemplate="%{x}: %{text} (N=%{customdata})<extra></extra>"), row=1, col=col)
    floors = [r.get("fid_floor") for r in rows if r.get("fid_floor") is not None]
    if floors:
        # the floor's label sits at the panel's right edge, clear of the bars' values and error bars
        fig.add_hline(y=max(floors), line_dash="dash", line_color="gray", row=1, col=1,
                      annotation_text=f"real vs real {max(floors):.3g}", annotation_position="top right",
                      annotation_font_size=11)
    if have_agree:
        fig.update_yaxes(range=[0, 1.05], tickformat=".0%", row=1, col=3)
    warn = n and min(n) < MIN_RELIABLE_FID_SAMPLES
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=70, b=10),
                      title=("FID on fewer than 2048 samples is biased: compare only equal N" if warn else None))
    return fig


def psnr_figure(image_errors: list[dict]) -> go.Figure:
    """Distribution of per-image PSNR vs FP for each variant (box per variant)."""
    fig = go.Figure()
    identical = 0
    for name in dict.fromkeys(r["variant"] for r in image_errors):
        values = [r["psnr"] for r in image_errors if r["variant"] == name]
        identical += sum(math.isinf(v) for v in values)  # PSNR is infinite there: no point to draw
        fig.add_trace(go.Box(y=[v for v in values if not math.isinf(v)], name=name, boxpoints="all"))
    title = "Per-image PSNR vs FP (same label and seed)"
    if identical:
        title += f"; {identical} image{'s' if identical > 1 else ''} identical to FP not drawn"
    fig.update_layout(title=title, yaxis_title="PSNR (dB)", height=340,
                      margin=dict(l=10, r=10, t=50, b=10), showlegend=False)
    return fig
