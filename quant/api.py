"""Public entry points of the quantization engine.

    cfg = QuantConfig(method="ptq4dit", w_bits=4, a_bits=8)
    qmodel = quantize(fp_model, cfg, calibration)          # a NEW model; fp_model is never modified
    write_quantized(qmodel, cfg, "out/")                   # quant.io; analysis.models.saved saves whole bundles
    qmodel, cfg, meta = read_quantized("out/")

One quantization run: copy the model -> observe the FP inputs of the foldable layers -> the balancing method
computes its per-channel vectors -> fold them (quant.reparam) -> replace layers by quantized ones -> a
rotation (Hadamard) and a low-rank split (SVDQuant) rewrite the wrapped layers -> calibrate the activation
ranges (per timestep with TPQ) on the folded FP model -> a rounding method (GPTQ) rounds the weights ->
optionally optimize block by block against the FP model (config.recon: PTQ4DiT's AdaRound reconstruction or
DilateQuant's BKD, quant.recon). Each step is the config's method that declares that role (quant.methods).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Iterable

import torch
import torch.nn as nn

from quant.config import METHODS, QuantConfig
from quant.families import balance_groups
from quant.forward import calibration_batches, forward_batches
from quant.io import read_quantized, stored_tensors, weight_bytes, write_quantized
from quant.measures import weight_salience
from quant.methods import owner_of
from quant.modules import quant_layers
from quant.quantizers import is_off
from quant.observers import InputObserver, observe_inputs
from quant.reparam import BalanceGroup, apply_scaling, group_weight
from quant.wrap import calibrate, is_excluded, layer_plans, wrap_model

__all__ = ["QuantConfig", "METHODS", "QuantResult", "quantize", "quantize_with_details", "write_quantized",
           "read_quantized", "weight_bytes", "stored_tensors", "calibration_batches"]


@dataclasses.dataclass
class QuantResult:
    """A quantized model and what the method did, for reports and plots.

    vectors: group name -> the folded per-channel vector b (CSB / SmoothQuant balancing, WD dilation).
    salience: group name -> {"x_before", "x_after", "w_before", "w_after"} per-channel maxima [C], and
        "x_per_timestep" [T, C] with "timesteps" [T] (before folding; after = divided by b); x_after is
        measured by hooks on the folded model.
    extras: group name -> method extras (SSC: timesteps, rho, eta).
    methods: role -> that method's report: "rotation" (folded / online layers, kinds, online cost),
        "lowrank" (spectra, rank, extra bytes and FLOPs), "rounding" (GPTQ's output error vs round-to-nearest),
        each with its "method" and "seconds".
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
    reference: torch.Tensor | None = None  # FP outputs on the calibration batches (keep_reference=True)
    recon: dict | None = None  # quant.recon.ReconReport.to_dict() when config.recon is not "none"
    methods: dict = dataclasses.field(default_factory=dict)


def quantize(model: nn.Module, config: QuantConfig, calibration: Iterable, batch_size: int = 64) -> nn.Module:
    """A NEW quantized copy of `model` (never modified), calibrated on (x, t, y) batches."""
    return quantize_with_details(model, config, calibration, batch_size).model


@torch.no_grad()
def quantize_with_details(model: nn.Module, config: QuantConfig, calibration: Iterable, batch_size: int = 64,
                          keep_reference: bool = False, on_recon=None) -> QuantResult:
    """quantize(), also returning the method's vectors and the per-channel salience before and after.

    Passes over the calibration data: one to calibrate the activation ranges (it also records the balanced
    layers' inputs, and with keep_reference the FP outputs), plus one before folding for methods whose
    vectors need activation statistics (SmoothQuant, PTQ4DiT); then, with config.recon, the block-wise
    optimization (quant.recon.reconstruct; on_recon(unit index, units, iteration, loss) reports its progress).
    """
    qmodel = copy.deepcopy(model).eval().requires_grad_(False)
    if not all(m.quantizes for m in config.methods):
        reference = None
        if keep_reference:
            reference = forward_batches(qmodel, calibration_batches(calibration, batch_size), keep_outputs=True)
        return QuantResult(qmodel, config, {}, {}, {}, [], [], reference)
    batches = calibration_batches(calibration, batch_size)
    groups = [g for g in balance_groups(qmodel) if not all(is_excluded(n, config.exclude) for n in g.layers)]
    modules = dict(qmodel.named_modules())
    stats, computed = None, {}
    balance = owner_of(config.method, "balance")
    if balance is not None:
        if balance.needs_activations:
            stats = observe_inputs(qmodel, batches, layers={g.name: modules[g.layers[0]] for g in groups})
        computed = balance.compute(qmodel, groups, stats, config.options_for(balance.name))
    vectors, extras, w_before = {}, {}, {}
    for g in groups:
        w_before[g.name] = weight_salience(group_weight(qmodel, g)).float().cpu()
        entry = computed.get(g.name)
        if entry is not None:
            apply_scaling(qmodel, g, entry.b)
            vectors[g.name] = entry.b.float().cpu()
            extras[g.name] = dict(entry.extras)
    names = wrap_model(qmodel, config)
    reports = _transform(qmodel, config, names)
    modules = dict(qmodel.named_modules())
    with InputObserver(qmodel, {g.name: modules[g.layers[0]] for g in groups}) as obs:
        reference = calibrate(qmodel, batches, keep_outputs=keep_reference)
    after = obs.stats()
    salience = {g.name: _salience(qmodel, g, stats, after, w_before[g.name], vectors.get(g.name)) for g in groups}
    timesteps = sorted({int(t) for _, ts, _ in batches for t in ts.reshape(-1).tolist()})
    rounder = owner_of(config.method, "rounding")
    if rounder is not None:
        start = time.perf_counter()
        reports["rounding"] = {"method": rounder.name,
                               **rounder.rounding(qmodel, batches, config.options_for(rounder.name)),
                               "seconds": time.perf_counter() - start}
    recon = None
    if config.recon != "none":
        from quant.recon import reconstruct

        # qmodel is already this call's own copy: optimize it in place
        spec = getattr(calibration, "spec", None)  # a calibration run records its guidance (the guided loss's s)
        qmodel, report = reconstruct(qmodel, model, batches, config, on_progress=on_recon, copy_model=False,
                                     guidance=getattr(spec, "guidance", None))
        recon = report.to_dict()
    return QuantResult(qmodel, config, vectors, salience, extras, names, timesteps, reference, recon, reports)


def _transform(model: nn.Module, config: QuantConfig, names: list[str]) -> dict:
    """Run the rotation and low-rank methods' apply on the wrapped model (their plans are wrap_model's), then
    set every changed layer's weight steps from its new weight."""
    reports = {}
    for method in config.methods:
        for role in ("rotation", "lowrank"):
            transform = getattr(method, role)
            if transform is None:
                continue
            start = time.perf_counter()
            options = config.options_for(method.name)
            plan = layer_plans(model, config, names)[role]
            reports[role] = {"method": method.name, **transform.apply(model, plan, options),
                             "seconds": time.perf_counter() - start}
    if reports:
        for layer in quant_layers(model).values():
            if not is_off(layer.w_bits):
                layer.calibrate_weight()
    return reports


def _salience(model: nn.Module, group: BalanceGroup, before, after, w_before: torch.Tensor,
              b: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-channel maxima before / after folding. `after` is measured on the folded model; without an FP
    pass (`before` None) the maxima before are after * b, exact because the fold is."""
    from quant.methods.common import salience_per_timestep

    b = torch.ones(after.absmax[group.name].shape[1]) if b is None else b.float().cpu()
    absmax = before.absmax[group.name] if before is not None else after.absmax[group.name] * b
    t = before.t if before is not None else after.t
    x_before = absmax.amax(dim=0)
    steps, per_t = salience_per_timestep(absmax, t)
    return {"x_before": x_before, "x_after": after.absmax[group.name].amax(dim=0), "w_before": w_before,
            "w_after": weight_salience(group_weight(model, group)).float().cpu(),
            "x_per_timestep": per_t, "timesteps": steps, "b": b}
