"""Bit-operations (BOPs) of one forward: MACs x weight bits x activation bits, layer by layer.

The cost measure of the quantization literature (e.g. Baskin et al., "UNIQ", 2021; van Baalen et al.,
"Bayesian Bits", NeurIPS 2020): a multiply-accumulate of a b_w-bit weight with a b_a-bit activation costs
b_w * b_a bit-operations. MACs come from each layer's shape and the number of rows it processes, counted
by hooks on one forward of one image (tokens for the block layers, one row for the adaLN and timestep
layers); attention adds its two matmuls (q k^T and softmax(.) v), at attn_bits when those are quantized.
A layer left in floating point counts the model's float width (32 for float32) for that operand.
A block-scaled format counts its scale bits per element on both sides (MXFP4 4.25, NVFP4 4.5, int4-g32 with
an fp16 scale and a zero point 4.75): the scales are read and applied with the elements they scale.
Work beside the quantized GEMMs counts as well (`side_bops`): SVDQuant's 16-bit low-rank branch and an
online Hadamard rotation, from the config's layer plans (quant.wrap.planned_branches).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from quant.config import QuantConfig, is_excluded, quantizes
from quant.quantizers import is_off


@torch.no_grad()
def mac_table(transformer: nn.Module) -> dict[str, dict]:
    """name -> {"kind": "linear" | "conv" | "attention", "macs": MACs per image per forward, and for a linear
    or conv its GEMM's "inner" (reduction) and "out" sizes}, measured by forward hooks on one forward of a
    single image (the FP transformer; it is not modified)."""
    from diffusers.models.attention_processor import Attention

    table: dict[str, dict] = {}
    hooks = []

    def _add(name, kind, macs, inner=None, out=None):
        # accumulate: a DiT's final layer calls block 0's embedding module a second time in the same forward
        entry = table.setdefault(name, {"kind": kind, "macs": 0})
        entry["macs"] += int(macs)
        if inner is not None:  # a GEMM's reduction and output sizes: rows = macs / (inner x out)
            entry.update(inner=int(inner), out=int(out))

    def linear_hook(name):
        def hook(mod, args, out):
            rows = out.numel() // out.shape[-1]
            _add(name, "linear", rows * mod.in_features * mod.out_features, mod.in_features, mod.out_features)
        return hook

    def conv_hook(name):
        def hook(mod, args, out):
            per_output = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            _add(name, "conv", out.numel() * per_output, per_output, mod.out_channels)
        return hook

    def attn_hook(name):
        def hook(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            tokens = x.shape[-2] if x.dim() == 3 else x.shape[-1] * x.shape[-2]
            inner = mod.to_q.out_features
            _add(name + ".qkv_softmax", "attention", 2 * tokens * tokens * inner)
        return hook

    for name, mod in transformer.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear_hook(name)))
        elif isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook(name)))
        elif isinstance(mod, Attention):
            hooks.append(mod.register_forward_hook(attn_hook(name), with_kwargs=True))
    try:
        p = next(transformer.parameters())
        cfg = transformer.config
        x = torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=p.device, dtype=p.dtype)
        transformer(x, timestep=torch.zeros(1, dtype=torch.long, device=p.device),
                    class_labels=torch.zeros(1, dtype=torch.long, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return table


def _bits(value, float_bits: int) -> int:
    return float_bits if is_off(value) else int(value)


def _format_bits(spec, symmetric: bool, float_bits: int) -> float:
    from quant.formats import bits_per_element

    return float_bits if spec is None else bits_per_element(spec, symmetric)


def layer_bits(table: dict[str, dict], config: QuantConfig | None, float_bits: int = 32) -> dict[str, tuple[float, float]]:
    """(weight bits, activation bits) each entry of the table runs at under `config` (None: FP)."""
    out = {}
    for name, entry in table.items():
        if not quantizes(config):
            out[name] = (float_bits, float_bits)
        elif entry["kind"] == "attention":
            base = name.removesuffix(".qkv_softmax")
            b = float_bits if is_excluded(base, config.exclude) else _bits(config.attn_bits, float_bits)
            out[name] = (b, b)
        elif is_excluded(name, config.exclude):
            out[name] = (float_bits, float_bits)
        else:
            w_spec, a_spec = config.formats_for(name)
            out[name] = (_format_bits(w_spec, config.w_symmetric or (w_spec is not None and w_spec.is_float), float_bits),
                         _format_bits(a_spec, True, float_bits))
    return out


def bops(table: dict[str, dict], config: QuantConfig | None, float_bits: int = 32,
         plans: dict[str, dict] | None = None) -> int:
    """Bit-operations of one forward of one image: sum over layers of MACs x w_bits x a_bits, plus the work
    beside the quantized GEMMs that `plans` (quant.wrap.layer_plans of the config) gives the layers."""
    bits = layer_bits(table, config, float_bits)
    gemms = sum(entry["macs"] * bits[name][0] * bits[name][1] for name, entry in table.items())
    return int(gemms + (side_bops(table, plans, float_bits) if plans else 0))


def side_bops(table: dict[str, dict], plans: dict[str, dict], float_bits: int = 32) -> int:
    """Bit-operations of what runs beside the quantized GEMMs (quant.branches), per forward of one image:
    - a low-rank branch of rank r: r (inner + out) MACs per row, at its 16-bit storage (16 x 16 per MAC); at
      rank 32 on a width-128 layer that is half the layer's MACs, at 64x the bit-operations of a 4x4-bit one;
    - an online rotation: a fast Walsh-Hadamard transform, inner log2(inner) additions per row in float
      (an addition of b bits counted as b bit-operations). Folded rotations cost nothing at run time."""
    branch_bits = 16 * 16
    total = 0
    for name, rank in plans.get("lowrank", {}).items():
        e = table.get(name)
        if e and "inner" in e:
            rows = e["macs"] // (e["inner"] * e["out"])
            total += rows * rank * (e["inner"] + e["out"]) * branch_bits
    for name, plan in plans.get("rotation", {}).items():
        e = table.get(name)
        if e and "inner" in e and plan.get("where") == "online":
            rows = e["macs"] // (e["inner"] * e["out"])
            total += int(rows * e["inner"] * math.log2(max(e["inner"], 2)) * float_bits)
    return total


def float_bits_of(transformer: nn.Module) -> int:
    """Bits of the model's float type (32 for float32, 16 for float16 / bfloat16)."""
    return next(transformer.parameters()).element_size() * 8
