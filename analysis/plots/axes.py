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
