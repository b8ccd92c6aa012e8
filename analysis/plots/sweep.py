"""Figures of a sweep and of a sensitivity analysis (plotly, no Streamlit), drawn from their JSON (plain lists
and dicts, so a result read back from disk draws the same):

pareto_figure          quality vs cost (BOPs or weight bytes) of every point, intervals as error bars, the
                       Pareto front as a line, the recommendation ringed
sweep_timestep_figure  each point's noise-prediction error vs FP per timestep
sensitivity_bars       units ranked by the error each causes alone (median over timesteps, or at one timestep)
sensitivity_heatmap    unit x timestep error with only that unit quantized
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from analysis.evaluation.sweep import COSTS, QUALITY
from analysis.plots.axes import log_axis
from analysis.plots.axes import readable_layer as _short
from quant.config import quantizes

_MARGIN = dict(l=10, r=10, t=70, b=10)
_FRONT_COLOR = "#d62728"


def _cost_value(point: dict, cost: str) -> float:
    return point[cost] / 1e9 if cost == "bops" else point[cost] / 2 ** 20


COST_AXIS = {"bops": "GBOPs per image per forward (log)", "weight_bytes": "stored weights, MiB (log)"}


def pareto_figure(points: list[dict], front: list[str], cost: str = "bops", quality: str = "fid_vs_fp",
                  recommended: str | None = None) -> go.Figure:
    """One marker per point (hover: config, N, time), grouped by method; the front joined cheapest first."""
    fig = go.Figure()
    pts = [p for p in points if p.get(quality) is not None]
    log_y = quality == "fid_vs_fp" and any(p[quality] > 0 for p in pts)
    zero = [p for p in pts if p[quality] <= 0] if log_y else []
    pts = [p for p in pts if p not in zero]  # FP itself (0) has no place on a log axis: a line marks its cost
    for method in dict.fromkeys(p["method"] for p in pts):
        group = [p for p in pts if p["method"] == method]
        err = None
        key = f"{quality}_interval"  # FID vs FP and the per-seed measures carry one
        if any(p.get(key) and None not in p[key] for p in group):
            ok = lambda p: p.get(key) and None not in p[key]  # noqa: E731
            lo = [p[quality] - p[key][0] if ok(p) else 0 for p in group]
            hi = [p[key][1] - p[quality] if ok(p) else 0 for p in group]
            err = dict(type="data", symmetric=False, array=hi, arrayminus=lo, thickness=1)
        fig.add_trace(go.Scatter(
            x=[_cost_value(p, cost) for p in group], y=[p[quality] for p in group], mode="markers", name=method,
            error_y=err, marker=dict(size=11, line=dict(width=1, color="white")),
            customdata=[[p["label"], p["num_samples"], p["seconds"], "from the store" if p["reused"] else "measured"]
                        for p in group],
            hovertemplate="%{customdata[0]}<br>" + QUALITY[quality] + " %{y:.3g} (N=%{customdata[1]})<br>"
                          + COSTS[cost] + " %{x:.3g}<br>%{customdata[2]:.0f} s, %{customdata[3]}<extra></extra>"))
    on_front = sorted((p for p in pts if p["label"] in front), key=lambda p: p[cost])
    fig.add_trace(go.Scatter(x=[_cost_value(p, cost) for p in on_front], y=[p[quality] for p in on_front],
                             mode="lines+markers", name="Pareto front", line=dict(color=_FRONT_COLOR, width=2),
                             marker=dict(size=15, symbol="circle-open", color=_FRONT_COLOR, line=dict(width=2)),
                             hoverinfo="skip"))
    rec = next((p for p in pts if p["label"] == recommended), None)
    if rec is not None:
        fig.add_trace(go.Scatter(x=[_cost_value(rec, cost)], y=[rec[quality]], mode="markers+text",
                                 name="recommended", text=["recommended"], textposition="top center",
                                 marker=dict(size=24, symbol="star", color="gold", line=dict(width=1, color="black")),
                                 hovertemplate=rec["label"] + "<extra>recommended</extra>"))
    ys = [p[quality] for p in pts]
    for p in zero:  # a dashed vertical trace (traces, unlike shapes, take data coordinates on log axes)
        x = _cost_value(p, cost)
        fig.add_trace(go.Scatter(x=[x, x], y=[min(ys), max(ys)] if ys else [1, 1], mode="lines+text",
                                 name=f"{p['label']} ({QUALITY[quality]} 0)", text=["", p["label"]],
                                 textposition="top left", line=dict(color="gray", dash="dash"),
                                 hovertemplate=p["label"] + f": {QUALITY[quality]} 0, " + COSTS[cost]
                                               + " %{x:.3g}<extra></extra>"))
    fig.update_layout(
        title=f"{QUALITY[quality]} vs {COSTS[cost]}<br><sup>lower-left is better; the red line joins the points no "
              "other point beats on both</sup>",
        xaxis=log_axis([_cost_value(p, cost) for p in pts + zero], COST_AXIS[cost], pad=0.08),
        yaxis=(log_axis([p[quality] for p in pts], QUALITY[quality] + " (log)", pad=0.08) if log_y else
               dict(title=QUALITY[quality], type="linear", rangemode="tozero")),
        height=480, margin=_MARGIN, legend_title="method")
    return fig


def sweep_timestep_figure(points: list[dict]) -> go.Figure:
    """Relative RMS error of the noise prediction vs FP per timestep, one line per quantized point."""
    fig = go.Figure()
    values = []
    for p in points:
        rows = p.get("rel_rms_per_timestep")
        if not quantizes(p["method"]) or not rows:
            continue
        rows = sorted(rows, key=lambda r: -r[0])  # noisiest first
        values += [e for _, e in rows]
        fig.add_trace(go.Scatter(x=[str(t) for t, _ in rows], y=[max(e, 1e-12) for _, e in rows], name=p["label"],
                                 mode="lines", hovertemplate="t=%{x}<br>%{y:.3g}<extra>" + p["label"] + "</extra>"))
    fig.update_layout(title="Noise-prediction error vs FP per timestep (calibration inputs)",
                      xaxis=dict(title="timestep t (sampling order, noisiest left)", type="category"),
                      yaxis=log_axis(values, "||eps_q - eps|| / ||eps|| (log)"),
                      height=420, margin=_MARGIN,
                      legend_title="point")
    return fig


def sensitivity_bars(sens: dict, timestep: int | None = None, top: int = 20) -> go.Figure:
    """Horizontal bars, hardest on top: error with only this unit quantized (median over timesteps, or at one)
    and, as a second bar, with all but this unit quantized."""
    rows = sens["ranking"]
    if timestep is None:
        only = [r["error_only_this_quantized"] for r in rows]
        but = [r["error_all_but_this_quantized"] for r in rows]
        where = "median over timesteps"
        full = sens.get("all_quantized_median", sens["all_quantized_mean"])
    else:
        i = sens["timesteps"].index(timestep)
        only = [r["only_per_timestep"][i] for r in rows]
        but = [r["all_but_per_timestep"][i] for r in rows]
        where = f"at t = {timestep}"
        full = sens["all_quantized"][i]
    order = np.argsort(only)[::-1][:top]
    names = [_short(rows[k]["unit"]) for k in order][::-1]
    fig = go.Figure()
    fig.add_trace(go.Bar(y=names, x=[only[k] for k in order][::-1], orientation="h", name="only this unit quantized",
                         customdata=[rows[k]["unit"] for k in order][::-1],
                         hovertemplate="%{customdata}<br>%{x:.4g}<extra>only this quantized</extra>"))
    fig.add_trace(go.Bar(y=names, x=[but[k] for k in order][::-1], orientation="h", name="all but this unit quantized",
                         customdata=[rows[k]["unit"] for k in order][::-1],
                         hovertemplate="%{customdata}<br>%{x:.4g}<extra>all but this quantized</extra>"))
    fig.add_vline(x=full, line_dash="dash", line_color="gray", annotation_text="all quantized",
                  annotation_position="top")
    bits = f"W{sens['w_bits'] or 16}A{sens['a_bits'] or 16}"
    fig.update_layout(title=f"Per-{sens['granularity']} sensitivity at {bits} ({sens['method']}), {where}"
                            f"<br><sup>top {len(order)} of {len(rows)}; error = ||eps_q - eps|| / ||eps|| vs FP</sup>",
                      barmode="group",
                      height=max(360, 26 * len(order) + 140), margin=dict(l=10, r=10, t=80, b=10),
                      yaxis=dict(automargin=True, tickmode="array", tickvals=names, ticktext=names),
                      xaxis=dict(title="relative error of the noise prediction", rangemode="tozero"),
                      legend=dict(orientation="h", y=-0.12))
    return fig


def sensitivity_heatmap(sens: dict, top: int = 30) -> go.Figure:
    """Unit (hardest on top) x timestep (noisiest left): the error with only that unit quantized."""
    rows = sens["ranking"][:top]
    z = np.array([r["only_per_timestep"] for r in rows])
    fig = go.Figure(go.Heatmap(z=z, x=[str(t) for t in sens["timesteps"]], y=[_short(r["unit"]) for r in rows],
                               colorscale="Viridis", colorbar=dict(title="rel. error"),
                               customdata=[[r["unit"]] * len(sens["timesteps"]) for r in rows],
                               hovertemplate="%{customdata}<br>t=%{x}<br>%{z:.4g}<extra></extra>"))
    fig.update_layout(title="Only this unit quantized: error per timestep<br><sup>hardest units on top</sup>",
                      xaxis=dict(title="timestep t (noisiest left)", type="category"),
                      yaxis=dict(autorange="reversed", automargin=True, tickmode="array",
                                 tickvals=[_short(r["unit"]) for r in rows], ticktext=[_short(r["unit"]) for r in rows]),
                      height=max(360, 22 * len(rows) + 140),
                      margin=dict(l=10, r=10, t=80, b=10))
    return fig
