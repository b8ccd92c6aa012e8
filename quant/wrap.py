"""Put quantized modules into a model and calibrate their activation ranges.

Covered layers follow the official PTQ4DiT setting: every nn.Linear and nn.Conv2d (in a DiT the patch
embedding; in a UNet every resnet, sampling, shortcut and in/out conv); with
attn_bits set, each diffusers Attention also quantizes q, k, v and its softmax output. A layer whose name
matches an `exclude` pattern stays in floating point.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
import torch.nn as nn

from quant.config import QuantConfig
from quant.denoiser import denoise
from quant.modules import (ActQuantizer, QuantAttnProcessor, QuantConv2d, QuantLinear, TimestepContext,
                           act_quantizers, quant_layers)
from quant.quantizers import is_off


def is_excluded(name: str, patterns: Iterable[str]) -> bool:
    """fnmatch pattern, or a plain module name that is the layer itself or one of its parents."""
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p + ".") for p in patterns)


def covered_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers the engine quantizes: every nn.Linear and nn.Conv2d (a DiT's patch embedding, a UNet's convs)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, (QuantLinear, QuantConv2d))}


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def _act(config: QuantConfig, ctx: TimestepContext, num_timesteps: int, bits=None, symmetric=None) -> ActQuantizer:
    return ActQuantizer(config.a_bits if bits is None else bits,
                        config.a_symmetric if symmetric is None else symmetric,
                        config.scale_search, config.percentile, config.use_tpq, ctx, num_timesteps)


def wrap_model(model: nn.Module, config: QuantConfig, ctx: TimestepContext, num_timesteps: int = 1) -> list[str]:
    """Replace covered layers by quantized ones in place (call it on a copy); returns their names.

    Weights are quantized from their current values (after any folding). Activation quantizers start
    uncalibrated: run `calibrate` next (or load a state dict that holds their parameters).
    """
    model.register_forward_pre_hook(ctx.hook, with_kwargs=True)
    model._dqlab_timestep_context = ctx
    names = []
    for name, mod in covered_layers(model).items():
        if is_excluded(name, config.exclude):
            continue
        kw = dict(per_channel=config.w_per_channel, w_symmetric=config.w_symmetric, search=config.scale_search,
                  percentile=config.percentile)
        act = _act(config, ctx, num_timesteps)
        new = QuantLinear(mod, config.w_bits, act, **kw) if isinstance(mod, nn.Linear) else \
            QuantConv2d(mod, config.w_bits, act, **kw)
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
    return names


def run_model(model: nn.Module, batches: Iterable, keep_outputs: bool = False) -> torch.Tensor | None:
    """Forward every (x, t, y) batch; optionally return the outputs concatenated on the CPU."""
    p = next(model.parameters())
    outs = []
    with torch.no_grad():
        for x, t, y in batches:
            out = denoise(model, x.to(p.device, p.dtype), t.to(p.device), y.to(p.device))
            if keep_outputs:
                outs.append(out.float().cpu())
    return torch.cat(outs) if keep_outputs else None


def calibrate(model: nn.Module, batches: list, keep_outputs: bool = False) -> torch.Tensor | None:
    """Static activation ranges (per timestep with TPQ) from the FP (folded) model's activations.

    The pass runs the folded model in floating point, so with keep_outputs its outputs are the FP
    reference (equal to the original model's up to float rounding) at no extra cost."""
    quantizers = [q for q in act_quantizers(model).values() if q.enabled]
    layers = list(quant_layers(model).values())
    for q in quantizers:
        q.mode = "observe"
    for layer in layers:
        layer.use_fp_weight = True
    try:
        outputs = run_model(model, batches, keep_outputs=keep_outputs)
        for q in quantizers:
            q.finalize()
    finally:
        for q in quantizers:
            q.mode = "quant"
            q._rows = []
        for layer in layers:
            layer.use_fp_weight = False
    return outputs
