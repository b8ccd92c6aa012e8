"""The per-token view of cross-attention's k / v input (analysis.salience.tokens): a prompt x token-position
heatmap of max over channels |X| (hover: the token), and the largest value at each position over all prompts.
Two traces whatever the number of prompts; positions past the longest prompt's last real token (+ a margin) are
cut when the denoiser masks padding, since it never reads them."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.salience.tokens import TokenSalience

PAD_SHOWN = 4  # padded positions shown after the longest prompt when padding is masked


def token_salience_figure(ts: TokenSalience, max_prompts: int = 32) -> go.Figure:
    p = min(len(ts.prompts), max_prompts)
    last = int(ts.mask[:p].sum(axis=1).max()) if ts.mask.any() else ts.absmax.shape[1]
    width = ts.absmax.shape[1] if ts.attended else min(ts.absmax.shape[1], last + PAD_SHOWN)
    z = ts.absmax[:p, :width]
    text = [[ts.tokens[i][j] + ("" if ts.mask[i, j] else " (pad)") for j in range(width)] for i in range(p)]
    names = [f"{i}: {s[:40]}" for i, s in enumerate(ts.prompts[:p])]
    fig = make_subplots(rows=2, cols=1, row_heights=[0.72, 0.28], vertical_spacing=0.08, shared_xaxes=True)
    fig.add_trace(go.Heatmap(z=z, x=list(range(width)), y=names, text=text, colorscale="Viridis",
                             colorbar=dict(title="max |X|", len=0.7, y=0.64),
                             hovertemplate="prompt %{y}<br>position %{x}: %{text}<br>max |X| %{z:.3g}<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=list(range(width)), y=z.max(axis=0), name="max over prompts",
                         marker_color="#d62728", hovertemplate="position %{x}: %{y:.3g}<extra></extra>"),
                  row=2, col=1)
    s = ts.summary()
    ratio = "" if s["max_over_median"] is None else f"; largest / median {s['max_over_median']:.1f}x"
    fig.update_layout(title=dict(text=f"Token salience of cross-attention k/v input ({ts.source})<br><sup>"
                                      f"max over channels per token position, {p} prompts{ratio}</sup>",
                                 x=0.01, xanchor="left"),
                      height=240 + 18 * p, margin=dict(l=10, r=10, t=90, b=10), showlegend=False)
    fig.update_xaxes(title_text="token position", row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_yaxes(title_text="max |X|", row=2, col=1)
    return fig
