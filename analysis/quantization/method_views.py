"""What the rotation, low-rank and rounding methods did, in plain lists for reports, JSON and figures.

    method_summary(result.methods)            # per role: layers, kinds, cost, spectra; JSON-able
    rotation_histograms(qmodel, batches)      # per rotated layer: histogram of its input before / after rotation

The Quantize page draws these with analysis.plots.quant (spectrum_figure, rotation_histogram_figure).
"""
from __future__ import annotations

import torch

from quant.forward import forward_batches
from quant.modules import quant_layers

BINS = 60


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def method_summary(methods: dict) -> dict:
    """quant.api.QuantResult.methods as lists and numbers (spectra included), for the report."""
    return {role: _plain(report) for role, report in methods.items()}


def method_headline(summary: dict) -> dict:
    """The few numbers of each role's report worth a line (for the CLI's JSON): no per-layer tables."""
    out = {}
    rot = summary.get("rotation")
    if rot:
        out["rotation"] = {"method": rot["method"], "folded_layers": len(rot["folded"]),
                           "online_layers": len(rot["online"]), "kinds": sorted(set(rot["kinds"].values())),
                           "online_adds_per_token": sum(rot["online_adds_per_token"].values()),
                           "seconds": rot["seconds"]}
    low = summary.get("lowrank")
    if low:
        out["lowrank"] = {"method": low["method"], "rank": low["rank"], "layers": len(low["costs"]),
                          "extra_bytes": low["extra_bytes"],
                          "extra_flops_per_position": low["extra_flops_per_position"],
                          "layer_flops_per_position": low["layer_flops_per_position"], "seconds": low["seconds"]}
    rnd = summary.get("rounding")
    if rnd:
        out["rounding"] = {k: rnd[k] for k in ("method", "rtn_error", "gptq_error", "error_ratio", "rows",
                                               "hessian_seconds", "seconds") if k in rnd}
    return out


@torch.no_grad()
def rotation_histograms(model: torch.nn.Module, batches: list, layers=None, bins: int = BINS) -> dict:
    """{layer: {"edges", "before", "after", "absmax_before", "absmax_after"}} for layers with an online
    rotation: the histogram of the layer's input values (shared bin edges) before and after the rotation, and
    the largest |x| per channel (max over tokens and rows) on each side."""
    rotated = {n: m for n, m in quant_layers(model).items() if m.rotation is not None
               and (layers is None or n in layers)}
    seen: dict[str, list] = {n: [] for n in rotated}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(args[0].detach().float().cpu()))
               for n, m in rotated.items()]
    try:
        forward_batches(model, batches)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, layer in rotated.items():
        x = torch.cat([v.reshape(-1, v.shape[-1]) for v in seen[name]])
        r = layer.rotation(x)
        hi = float(torch.maximum(x.abs().max(), r.abs().max()))
        edges = torch.linspace(-hi, hi, bins + 1)
        out[name] = {"edges": edges.tolist(), "before": torch.histc(x, bins, -hi, hi).tolist(),
                     "after": torch.histc(r, bins, -hi, hi).tolist(),
                     "absmax_before": x.abs().amax(0).tolist(), "absmax_after": r.abs().amax(0).tolist()}
    return out
