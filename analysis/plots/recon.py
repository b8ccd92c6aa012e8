"""Figures of the block-wise optimization (quant.recon), from its report (plain lists and dicts):

recon_loss_figure    the training loss per unit against iteration, one line per unit (live while running)
recon_error_figure   each unit's relative output error vs its FP unit before and after the optimization
"""
from __future__ import annotations

import plotly.graph_objects as go

from quant.families import readable_layer

_MARGIN = dict(l=10, r=10, t=60, b=10)
MODE_NAMES = {"adaround": "AdaRound reconstruction (PTQ4DiT)", "bkd": "block-wise distillation (DilateQuant BKD)"}


def short_unit(name: str) -> str:
    """A unit's readable name (quant.families.readable_layer): 'transformer_blocks.3' -> 'block 3'."""
    return readable_layer(name)


def recon_loss_figure(losses: dict, mode: str | None = None, log: bool = True) -> go.Figure:
    """losses: unit name -> [[iteration, loss], ...] (the report's "losses" per unit, or live points)."""
    fig = go.Figure()
    for name, points in losses.items():
        if points:
            fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines",
                                     name=short_unit(name)))
    what = MODE_NAMES.get(mode, "block-wise optimization")
    fig.update_layout(title=f"{what}: training loss per unit", xaxis_title="iteration", yaxis_title="loss",
                      margin=_MARGIN, height=360, legend=dict(font=dict(size=10)))
    if log:
        fig.update_yaxes(type="log")
    return fig


def recon_error_figure(units: list[dict], mode: str | None = None) -> go.Figure:
    """Grouped bars: each unit's relative output error ||unit_q - unit_fp|| / ||unit_fp|| before and after."""
    names = [short_unit(u["name"]) for u in units]
    fig = go.Figure([
        go.Bar(x=names, y=[u["error_before"] for u in units], name="before"),
        go.Bar(x=names, y=[u["error_after"] for u in units], name="after"),
    ])
    what = MODE_NAMES.get(mode, "block-wise optimization")
    fig.update_layout(barmode="group", title=f"{what}: per-block output error before vs after",
                      yaxis_title="relative error vs FP unit", margin=_MARGIN, height=360)
    return fig
