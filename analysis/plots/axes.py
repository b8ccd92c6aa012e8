"""Axis helpers shared by the figures: readable layer names and log axes with labelled 1-2-5 ticks."""
from __future__ import annotations

import math
import re

import numpy as np

# The role of each layer of a diffusers DiT block, in words a reader knows from the paper's figure.
_ROLES = [(r"attn\d*\.to_q$", "attn q"), (r"attn\d*\.to_k$", "attn k"), (r"attn\d*\.to_v$", "attn v"),
          (r"attn\d*\.to_out\.0$", "attn out"), (r"ff\.net\.0\.proj$", "MLP fc1"), (r"ff\.net\.2$", "MLP fc2"),
          (r"norm1\.linear$", "adaLN"), (r"timestep_embedder\.linear_1$", "t-embed 1"),
          (r"timestep_embedder\.linear_2$", "t-embed 2"), (r"^proj_out_1$", "final adaLN"),
          (r"^proj_out_2$", "final out"), (r"^pos_embed\.proj$", "patch embed"), (r"attn\d*\.q$", "q"),
          (r"attn\d*\.k$", "k"), (r"attn\d*\.v$", "v"), (r"attn\d*\.softmax$", "softmax"),
          (r"attn\d*\.qkv_softmax$", "attn q k v softmax")]


# A diffusers UNet2DModel's layers: the role within its stage (analysis.salience.collect.layer_stage names the stage).
_UNET_ROLES = [(r"resnets\.(\d+)\.conv1$", "resnet {} conv1"), (r"resnets\.(\d+)\.conv2$", "resnet {} conv2"),
               (r"resnets\.(\d+)\.time_emb_proj$", "resnet {} t-proj"),
               (r"resnets\.(\d+)\.conv_shortcut$", "resnet {} shortcut"), (r"attentions\.(\d+)\.to_q$", "attn {} q"),
               (r"attentions\.(\d+)\.to_k$", "attn {} k"), (r"attentions\.(\d+)\.to_v$", "attn {} v"),
               (r"attentions\.(\d+)\.to_out\.0$", "attn {} out"), (r"downsamplers\.(\d+)\.conv$", "downsample {}"),
               (r"upsamplers\.(\d+)\.conv$", "upsample {}"), (r"^time_embedding\.linear_(\d)$", "t-embed {}"),
               (r"^conv_(in)$", "conv {}"), (r"^conv_(out)$", "conv {}")]


def readable_layer(key: str) -> str:
    """'transformer_blocks.3.ff.net.0.proj' -> 'block 3 · MLP fc1', 'down_blocks.1.resnets.0.conv1' ->
    'down 1 · resnet 0 conv1'; top-level DiT layers keep their role alone. A second call in one forward
    ('name@2') is marked as such; unknown names come back unchanged."""
    name, _, call = key.partition("@")
    role = next((r for pattern, r in _ROLES if re.search(pattern, name)), None)
    m = re.match(r"transformer_blocks\.(\d+)\.", name)
    if role is None:
        return _unet_layer(name) or key
    text = f"block {m.group(1)} · {role}" if m else role
    return text + (f" (call {call})" if call else "")


def _unet_layer(name: str) -> str | None:
    from analysis.salience.collect import layer_stage

    for pattern, role in _UNET_ROLES:
        if (hit := re.search(pattern, name)) is not None:
            return f"{layer_stage(name)[1]} · {role.format(hit.group(1))}"
    return None


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
