"""Public entry points of the quantization engine.

    cfg = QuantConfig(method="ptq4dit", w_bits=4, a_bits=8)
    qmodel = quantize(fp_model, cfg, calibration)          # a NEW model; fp_model is never modified
    save_quantized(bundle.with_transformer(qmodel), cfg, "out/", base_source="bundled:dit-mnist")
    bundle = load_quantized("out/")                        # also what analysis.models.load("out/") does

One quantization run: copy the model -> observe the FP inputs of the foldable layers -> the method computes
its per-channel vectors -> fold them (quant.reparam) -> replace layers by quantized ones -> calibrate the
activation ranges (per timestep with TPQ) on the folded FP model.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Iterable

import torch
import torch.nn as nn

from quant.config import METHODS, QuantConfig
from quant.io import load_quantized, save_quantized, stored_tensors, weight_bytes
from quant.methods import get_method
from quant.observers import observe_inputs
from quant.reparam import BalanceGroup, apply_scaling, balance_groups, group_weight
from quant.wrap import calibrate, is_excluded, wrap_model
from quant.modules import TimestepContext

__all__ = ["QuantConfig", "METHODS", "QuantResult", "quantize", "quantize_with_details", "save_quantized",
           "load_quantized", "weight_bytes", "stored_tensors", "calibration_batches"]


@dataclasses.dataclass
class QuantResult:
    """A quantized model and what the method did, for reports and plots.

    vectors: group name -> the folded per-channel vector b (CSB / SmoothQuant balancing, WD dilation).
    salience: group name -> {"x_before", "x_after", "w_before", "w_after"} per-channel maxima [C], and
        "x_per_timestep" [T, C] with "timesteps" [T] (before folding; after = divided by b).
    extras: group name -> method extras (SSC: timesteps, rho, eta).
    layers: names of the quantized layers (and attention modules with quantized operands).
    timesteps: calibrated timesteps (the TPQ table).
    """

    model: nn.Module
    config: QuantConfig
    vectors: dict[str, torch.Tensor]
    salience: dict[str, dict[str, torch.Tensor]]
    extras: dict[str, dict]
    layers: list[str]
    timesteps: list[int]


def calibration_batches(calibration, batch_size: int = 64) -> list:
    """A list of (x, t, y) batches from CalibrationData (anything with .batches) or an iterable of batches."""
    if hasattr(calibration, "batches"):
        batches = list(calibration.batches(batch_size))
    else:
        batches = [tuple(b) for b in calibration]
    if not batches:
        raise ValueError("calibration data is empty: sample with record='all' (or pass (x, t, y) batches)")
    for b in batches[:1]:
        if len(b) != 3:
            raise ValueError("calibration batches must be (x, t, y) triples")
    return batches


def quantize(model: nn.Module, config: QuantConfig, calibration: Iterable, batch_size: int = 64) -> nn.Module:
    """A NEW quantized copy of `model` (never modified), calibrated on (x, t, y) batches."""
    return quantize_with_details(model, config, calibration, batch_size).model


@torch.no_grad()
def quantize_with_details(model: nn.Module, config: QuantConfig, calibration: Iterable,
                          batch_size: int = 64) -> QuantResult:
    """quantize(), also returning the method's vectors and the per-channel salience before and after."""
    config.validate()
    method = get_method(config.method)
    qmodel = copy.deepcopy(model).eval().requires_grad_(False)
    if not method.QUANTIZES:
        return QuantResult(qmodel, config, {}, {}, {}, [], [])
    batches = calibration_batches(calibration, batch_size)
    groups = [g for g in balance_groups(qmodel) if not all(is_excluded(n, config.exclude) for n in g.layers)]
    modules = dict(qmodel.named_modules())
    stats = observe_inputs(qmodel, batches, layers={g.name: modules[g.layers[0]] for g in groups})
    computed = method.compute(qmodel, groups, stats, config)
    vectors, salience, extras = {}, {}, {}
    for g in groups:
        w_before = group_weight(qmodel, g).abs().amax(dim=0).float().cpu()
        entry = computed.get(g.name, {})
        b = entry.get("b")
        if b is not None:
            apply_scaling(qmodel, g, b)
            vectors[g.name] = b.float().cpu()
            extras[g.name] = {k: v for k, v in entry.items() if k != "b"}
        salience[g.name] = _salience(qmodel, g, stats, w_before, b)
    ctx = TimestepContext()
    names = wrap_model(qmodel, config, ctx)
    calibrate(qmodel, batches)
    timesteps = sorted({int(t) for _, ts, _ in batches for t in ts.reshape(-1).tolist()})
    return QuantResult(qmodel, config, vectors, salience, extras, names, timesteps)


def _salience(model: nn.Module, group: BalanceGroup, stats, w_before: torch.Tensor,
              b: torch.Tensor | None) -> dict[str, torch.Tensor]:
    from quant.methods.common import salience_per_timestep

    absmax = stats.absmax[group.name]
    x_before = absmax.amax(dim=0)
    steps, per_t = salience_per_timestep(absmax, stats.t)
    ones = torch.ones_like(x_before)
    b = ones if b is None else b.float().cpu()
    return {"x_before": x_before, "x_after": x_before / b, "w_before": w_before,
            "w_after": group_weight(model, group).abs().amax(dim=0).float().cpu(),
            "x_per_timestep": per_t, "timesteps": steps, "b": b}
