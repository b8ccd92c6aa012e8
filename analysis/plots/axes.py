"""Axis helpers shared by the figures: readable layer names (from the family table, quant.families) and log axes
with labelled 1-2-5 ticks."""
from __future__ import annotations

import math

import numpy as np

from quant.families import readable_layer  # noqa: F401 (the figures' layer names)

def log_ticks(values, per_decade=(1, 2, 5)) -> dict:
    """tickvals / ticktext for a log axis spanning `values`: 1-2-5 per decade, written plainly (0.02, 5, 200),
    so short ranges get several labelled ticks and long ones stay readable. Non-positive values are ignored."""
    v = np.asarray([x for x in np.ravel(np.asarray(values, dtype=float)) if np.isfinite(x) and x > 0])
    if v.size == 0:
        return {}
    lo, hi = math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))
    steps = per_decade if hi - lo <= 4 else (1,)
    ticks = [m * 10.0 ** e for e in range(lo, hi + 1) for m in steps]
    ticks = [t for t in ticks if v.min() / 1.5 <= t <= v.max() * 1.5] or [10.0 ** lo, 10.0 ** hi]
    return {"tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def _tick_text(t: float) -> str:
    """A tick label that reads as the number it is (0.2, 2, 0.0005, 1.05), never a bare mantissa digit."""
    return f"{t:.3g}" if t >= 1e-3 else f"{t:.1e}".replace("e-0", "e-")


def _nice_step(span: float, count: int) -> float:
    raw = span / max(1, count)
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi] (0.02, 0.04, ... rather than 0.0249, 0.0893)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    step = _nice_step(hi - lo, count)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_axis(values, title: str | None = None, pad: float = 0.04) -> dict:
    """A log axis for `values`: labelled 1-2-5 ticks written as numbers (plotly's own minor log ticks print
    bare digits, '2' for 0.2 and for 2), and a range fitted to the data. A narrow range (values 1-1.15) gets
    evenly spaced round ticks inside it instead of a decade of empty axis. Non-positive values are ignored."""
    v = np.asarray([x for x in np.ravel(np.asarray(values, dtype=float)) if np.isfinite(x) and x > 0])
    axis = {"type": "log"} if title is None else {"type": "log", "title": title}
    if v.size == 0:
        return axis
    lo, hi = float(v.min()), float(v.max())
    ticks = [t for t in log_ticks(v).get("tickvals", []) if lo <= t <= hi]
    if len(ticks) < 3:  # less than a decade: round linear steps read better than one lonely tick
        ticks = [t for t in nice_ticks(lo, hi, 4) if t > 0] or [lo]
        if hi > lo and len(ticks) < 2:
            ticks = [lo, hi]
    span = max(math.log10(hi) - math.log10(lo), 0.02)
    axis.update(tickmode="array", tickvals=ticks, ticktext=[_tick_text(t) for t in ticks],
                range=[math.log10(lo) - pad * span, math.log10(hi) + pad * span])
    return axis


def wrap(text: str, width: int = 48) -> str:
    """A title broken into lines of at most `width` characters at spaces (plotly cuts a long title at the
    figure's edge, and a chart in a half-width column is narrow). Existing <br> breaks are kept."""
    out = []
    for part in text.split("<br>"):
        line = ""
        for word in part.split(" "):
            if line and len(line) + 1 + len(word) > width:
                out.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        out.append(line)
    return "<br>".join(out)
