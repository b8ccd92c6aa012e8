"""Offline re-parameterization: fold per-input-channel scales into the model so inference runs no extra op.

Balancing (CSB, SmoothQuant) and dilation (WD) both rewrite a linear layer Y = X W^T as
    Y = (X diag(1/b)) (W diag(b))^T,
i.e. scale the weight's input columns by b and divide the input channels by b (docs/ARCHITECTURE.md).
The division is folded into whatever produces X:
- attention / MLP input of a DiT block, X = LN(h) * (1 + scale) + shift with (shift, scale) rows of the
  adaLN linear (AdaLayerNormZero.linear, chunks shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
  gate_mlp in that order, as diffusers' AdaLayerNormZero.forward chunks them). Dividing X by b is
  (1 + scale)/b and shift/b; both are affine in the adaLN input, so: shift rows /= b, shift bias /= b,
  scale rows /= b, scale bias -> (bias + 1)/b - 1;
- input of to_out.0 = softmax(QK^T) V with V's channels (heads concatenated in order): dividing V's output
  channels by b divides to_out.0's input channels by b, so to_v's rows and bias /= b;
- input of q/k/v after an affine norm (a UNet attention's GroupNorm, X = gamma * norm(h) + beta): gamma /= b
  and beta /= b (quant.families.unet declares these sites).
The folds are exact in real arithmetic; tests check the folded model against the original to 1e-4.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.families.base import BalanceGroup

ADALN_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
KINDS = ("attn_in", "attn_out", "mlp_in", "norm_in")


def group_weight(model: nn.Module, group: BalanceGroup) -> torch.Tensor:
    """The group's weights stacked by rows, [sum of out, in]: q, k, v concatenated for attn_in."""
    mods = dict(model.named_modules())
    return torch.cat([mods[name].weight.detach() for name in group.layers], dim=0)


@torch.no_grad()
def fold_adaln(linear: nn.Linear, chunk_shift: int, chunk_scale: int, b: torch.Tensor) -> None:
    """Divide the modulated input X = LN(h)(1 + scale) + shift by b, per channel, inside the adaLN linear."""
    if linear.bias is None:  # without a bias the "+1" of (1 + scale) cannot be folded
        raise ValueError(f"cannot fold into an adaLN linear without bias ({linear})")
    d = linear.out_features // len(ADALN_CHUNKS)
    b = b.to(linear.weight)
    sh, sc = slice(chunk_shift * d, (chunk_shift + 1) * d), slice(chunk_scale * d, (chunk_scale + 1) * d)
    linear.weight[sh] /= b[:, None]
    linear.weight[sc] /= b[:, None]
    linear.bias[sh] /= b
    linear.bias[sc] = (linear.bias[sc] + 1) / b - 1


@torch.no_grad()
def fold_rows(linear: nn.Linear, b: torch.Tensor) -> None:
    """Divide a linear's output channels by b (rows and bias): the producer side of to_out.0's input."""
    b = b.to(linear.weight)
    linear.weight /= b[:, None]
    if linear.bias is not None:
        linear.bias /= b


@torch.no_grad()
def fold_norm(norm: nn.Module, b: torch.Tensor) -> None:
    """Divide an affine norm's output channels by b: gamma /= b, beta /= b (GroupNorm / LayerNorm affine)."""
    if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
        raise ValueError(f"cannot fold into a norm without affine parameters ({norm})")
    b = b.to(norm.weight)
    norm.weight /= b
    norm.bias /= b


@torch.no_grad()
def scale_columns(linear: nn.Module, b: torch.Tensor) -> None:
    """W' = W diag(b): scale a linear's input columns by b."""
    linear.weight *= b.to(linear.weight)[None, :]


@torch.no_grad()
def apply_scaling(model: nn.Module, group: BalanceGroup, b: torch.Tensor) -> None:
    """Fold X' = X diag(1/b) into X's producer and W' = W diag(b) into the group's linears, in place."""
    mods = dict(model.named_modules())
    producer = mods[group.producer]
    if b.shape != (mods[group.layers[0]].in_features,):
        raise ValueError(f"vector for {group.name} has shape {tuple(b.shape)}, expected "
                         f"({mods[group.layers[0]].in_features},)")
    if not torch.isfinite(b).all() or (b <= 0).any():
        raise ValueError(f"vector for {group.name} must be finite and positive")
    if group.kind == "attn_in":
        fold_adaln(producer, ADALN_CHUNKS.index("shift_msa"), ADALN_CHUNKS.index("scale_msa"), b)
    elif group.kind == "mlp_in":
        fold_adaln(producer, ADALN_CHUNKS.index("shift_mlp"), ADALN_CHUNKS.index("scale_mlp"), b)
    elif group.kind == "attn_out":
        fold_rows(producer, b)
    elif group.kind == "norm_in":
        fold_norm(producer, b)
    else:
        raise ValueError(f"unknown group kind {group.kind!r}")
    for name in group.layers:
        scale_columns(mods[name], b)
