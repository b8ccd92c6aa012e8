"""Hadamard rotation of layer inputs (QuaRot, Ashkboos et al. 2024; HQ-DiT, Liu et al. 2024).

    y = W x = (W Q^T)(Q x),   Q an orthonormal Hadamard matrix (quant.rotation for the sizes)

Q x spreads an outlier channel over all channels, so a per-tensor activation quantizer's range follows the
typical channel; W Q^T is folded into the weight offline. Where Q x is computed:

- folded (exact, free): the attention output projection to_out.0 reads softmax(q k^T) V per head; rotating
  each head's V channels by one block of Q (block-diagonal, one Hadamard per head) commutes with the
  attention weights, so Q folds into to_v's rows and bias.
- online (a fast Walsh-Hadamard transform, n log2 n additions per token): every other linear. q/k/v and
  fc1 read LN(h) (1 + scale(c)) + shift(c), whose scale is per sample and per channel; fc2 reads GELU(fc1);
  the adaLN and final linears read SiLU(c). None of these producers can absorb Q.

Why the lab does not rotate the residual stream as QuaRot does: QuaRot rotates the residual stream h once
(h' = Q h, folded into every matrix that writes to or reads from it), which needs every norm to commute with
Q; RMSNorm does (after folding its scale into the next linear). DiT's adaLN-Zero applies
LN(h) (1 + scale(c)) + shift(c) with a per-sample, per-channel scale and shift computed from the
conditioning: diag(1 + scale) Q != Q diag(1 + scale), and the shift is added in the unrotated basis, so a
rotated residual stream would need the modulation itself rotated online (a dense matmul per sample) - no
saving over rotating each layer's input. So the lab rotates per layer input, after the modulation.
Convolutions (a DiT's patch embedding, a UNet's convs) are not rotated.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from quant.methods import LayerTransform, Method, checked
from quant.options import option
from quant.rotation import block_diagonal, rotation_kind, rotation_matrix


@dataclasses.dataclass
class Options:
    hadamard_online: bool = option(True, "Rotate online", "also rotate inputs no linear producer can absorb "
                                   "(q/k/v, fc1, fc2, adaLN) with a fast Walsh-Hadamard transform at run time; "
                                   "off = only the free rotations folded into to_v")

    def __post_init__(self):
        checked(self)


def _attention_folds(model: nn.Module) -> dict[str, dict]:
    """to_out.0 of every attention -> its producer to_v and the head size (one Hadamard block per head)."""
    from diffusers.models.attention_processor import Attention

    folds = {}
    for name, attn in model.named_modules():
        if isinstance(attn, Attention) and getattr(attn, "to_v", None) is not None:
            inner = attn.to_v.out_features if hasattr(attn.to_v, "out_features") else attn.to_v.weight.shape[0]
            folds[f"{name}.to_out.0"] = {"where": "folded", "producer": f"{name}.to_v",
                                        "block": inner // attn.heads, "kind": rotation_kind(inner // attn.heads)}
    return folds


def plan(model: nn.Module, layers, options: Options) -> dict[str, dict]:
    mods = dict(model.named_modules())
    folds = _attention_folds(model)
    out = {}
    for name in layers:
        layer = mods.get(name)
        if not isinstance(layer, nn.Linear) or layer.in_features < 2:
            continue
        if name in folds:
            out[name] = folds[name]
        elif options.hadamard_online:
            out[name] = {"where": "online", "kind": rotation_kind(layer.in_features)}
    return out


@torch.no_grad()
def apply(model: nn.Module, layer_plan: dict[str, dict], options: Options) -> dict:
    """W <- W Q^T for every planned layer; for folded ones also producer rows <- Q rows, bias <- Q bias."""
    mods = dict(model.named_modules())
    for name, p in layer_plan.items():
        layer = mods[name]
        n = layer.in_features
        if p["where"] == "folded":
            q = block_diagonal(n, p["block"])
            producer = mods[p["producer"]]
            producer.weight.copy_((q @ producer.weight.double()).to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.copy_((q @ producer.bias.double()).to(producer.bias.dtype))
        else:
            q = rotation_matrix(n)
        layer.weight.copy_((layer.weight.double() @ q.T).to(layer.weight.dtype))
    online = {k: v for k, v in layer_plan.items() if v["where"] == "online"}
    # an online Walsh-Hadamard transform: n log2 n additions per token (Paley blocks add a k x k matmul)
    adds = {k: mods[k].in_features * max(1, math.ceil(math.log2(mods[k].in_features))) for k in online}
    return {"folded": sorted(k for k, v in layer_plan.items() if v["where"] == "folded"),
            "online": sorted(online), "kinds": {k: v["kind"] for k, v in layer_plan.items()},
            "online_adds_per_token": adds}


METHOD = Method(name="hadamard", rotation=LayerTransform(plan, apply), options=Options, order=5,
                help="Hadamard rotation of layer inputs: y = (W H^T)(H x) spreads outlier channels; folded into "
                     "to_v for the attention output, online (fast Walsh-Hadamard) elsewhere")
