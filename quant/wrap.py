"""Put quantized modules into a model and calibrate their activation ranges.

Covered layers follow the official PTQ4DiT setting: every nn.Linear and the patch-embedding conv; with
attn_bits set, each diffusers Attention also quantizes q, k, v and its softmax output. A layer whose name
matches an `exclude` pattern stays in floating point.
"""
from __future__ import annotations


import torch
import torch.nn as nn

from quant.config import QuantConfig, is_excluded  # noqa: F401 (is_excluded is imported from here too)
from quant.families import attention_modules
from quant.forward import forward_batches
from quant.branches import LowRankBranch, OnlineRotation
from quant.modules import (ActQuantizer, QuantAttnProcessor, QuantConv2d, QuantLinear, TimestepContext, calibrating,
                           timestep_context)
from quant.quantizers import is_off


def covered_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers the engine quantizes: every nn.Linear and nn.Conv2d (in a DiT, the patch embedding)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, (QuantLinear, QuantConv2d))}


def _act(config: QuantConfig, ctx: TimestepContext, num_timesteps: int, bits=None, symmetric=None, fmt=None,
         per_token: bool = False, channel_axis: int = -1) -> ActQuantizer:
    return ActQuantizer(config.a_bits if bits is None else bits,
                        config.a_symmetric if symmetric is None else symmetric,
                        config.scale_search, config.percentile, config.use_tpq, ctx, num_timesteps,
                        fmt=fmt, per_token=per_token, channel_axis=channel_axis)


def wrap_model(model: nn.Module, config: QuantConfig, ctx: TimestepContext | None = None,
               num_timesteps: int = 1) -> list[str]:
    """Replace covered layers by quantized ones in place (call it on a copy); returns their names.

    Weights are quantized from their current values (after any folding). Activation quantizers start
    uncalibrated: run `calibrate` next (or load a state dict that holds their parameters). The quantizers read
    the timestep from the model's one TimestepContext (attached once; `ctx`, when given, is attached instead).
    """
    ctx = timestep_context(model) if ctx is None else ctx.attach(model)
    names = []
    for name, mod in covered_layers(model).items():
        if is_excluded(name, config.exclude):
            continue
        kw = dict(per_channel=config.w_per_channel, w_symmetric=config.w_symmetric, search=config.scale_search,
                  percentile=config.percentile)
        w_bits, a_bits = config.bits_for(name)  # mixed precision: a layer_bits pattern may override
        w_fmt, a_fmt = config.formats_for(name)
        linear = isinstance(mod, nn.Linear)
        act = _act(config, ctx, num_timesteps, bits=a_bits, fmt=a_fmt, per_token=config.a_per_token,
                   channel_axis=-1 if linear else 1)
        kw["w_fmt"] = w_fmt
        new = QuantLinear(mod, w_bits, act, **kw) if linear else QuantConv2d(mod, w_bits, act, **kw)
        model.set_submodule(name, new)
        names.append(name)
    if not is_off(config.attn_bits):
        for name, attn in attention_modules(model).items():
            if is_excluded(name, config.exclude):
                continue
            for operand in ("q", "k", "v"):
                setattr(attn, f"{operand}_quant", _act(config, ctx, num_timesteps, bits=config.attn_bits))
            # softmax output lies in [0, 1]: an unsigned (asymmetric) quantizer uses every code
            attn.softmax_quant = _act(config, ctx, num_timesteps, bits=config.attn_bits, symmetric=False)
            attn.set_processor(QuantAttnProcessor())
            names.append(f"{name}.qkv_softmax")
    attach_branches(model, layer_plans(model, config, names))
    return names


def layer_plans(model: nn.Module, config: QuantConfig, layers) -> dict[str, dict]:
    """{"rotation": {layer: plan}, "lowrank": {layer: rank}} from the config's methods' LayerTransform plans:
    the structure a quantized layer gets beside its GEMM (quant.branches). Depends on structure and options
    only, so a saved model rebuilds it before loading."""
    plans = {}
    for method in config.methods:
        for role in ("rotation", "lowrank"):
            transform = getattr(method, role)
            if transform is not None:
                plans[role] = transform.plan(model, list(layers), config.options_for(method.name))
    return plans


def planned_branches(model: nn.Module, config: QuantConfig) -> dict[str, dict]:
    """layer_plans for the layers wrap_model would quantize in `model` (read only: the FP model will do), for
    counting the work beside the quantized GEMMs before any model is quantized."""
    return layer_plans(model, config, [n for n in covered_layers(model) if not is_excluded(n, config.exclude)])


def attach_branches(model: nn.Module, plans: dict[str, dict]) -> None:
    """Give the planned layers an online rotation or an (empty) low-rank branch, filled by the method later."""
    mods = dict(model.named_modules())
    for name, p in plans.get("rotation", {}).items():
        if p["where"] == "online":
            mods[name].rotation = OnlineRotation(mods[name].in_features).to(mods[name].weight.device)
    for name, rank in plans.get("lowrank", {}).items():
        w = mods[name].weight
        mods[name].lowrank = LowRankBranch(w.shape[0], tuple(w.shape[1:]), rank).to(w.device)


def calibrate(model: nn.Module, batches: list, keep_outputs: bool = False) -> torch.Tensor | None:
    """Static activation ranges (per timestep with TPQ) from the FP (folded) model's activations.

    The pass runs the folded model in floating point, so with keep_outputs its outputs are the FP
    reference (equal to the original model's up to float rounding) at no extra cost."""
    with calibrating(model):
        return forward_batches(model, batches, keep_outputs=keep_outputs)
