"""The Stable Diffusion family ("sd"; this file sorts after unet.py, so the table asks the UNet2DModel family
first about names the two share): diffusers UNet2DConditionModel (Rombach et al. 2022), cross-attention to CLIP text
embeddings. What it shares with UNet2DModel (resnets, samplers, the packed stream of reconstruction units) is
quant.families.unet's; this file adds the attention blocks (Transformer2DModel with BasicTransformerBlocks).

Fold sites: the UNet2DModel table of quant.families.unet, plus each attention block's Transformer2DModel:
    proj_in         X = GroupNorm(h) with affine: gamma, beta /= b (a 1x1 conv or a linear)
    attn1 q/k/v     X = norm1(h), LayerNorm with affine: gamma, beta /= b;  attn1 to_out.0 into to_v
    attn2 to_q      X = norm2(h): into norm2;  attn2 to_out.0 into attn2.to_v
    attn2 to_k/to_v X = the CLIP text embedding, produced outside the denoiser (the text encoder stays FP and
                    unchanged): no producer
    ff.net.0.proj   X = norm3(h): into norm3;  ff.net.2: X = GEGLU output (h * GELU(gate)): no
    proj_out        X = the block's residual stream: no
Units: the time embedding, conv_in, each down block, the middle block, each up block, the output head
(quant.families.unet), cross-attention blocks reading the prompt's embedding by row id.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.conditioning import prompt_table, text_inputs
from quant.families import unet
from quant.families.base import BalanceGroup, Family, LayerKind

KINDS = (  # in data-flow order within a stage
    *unet.KINDS[:6],  # conv_in, t_embed, t_proj, conv1, conv2, shortcut
    LayerKind(r"attentions\.(\d+)\.proj_in$", "proj_in", "attn {0} proj in"),
    LayerKind(r"attentions\.(\d+)\.transformer_blocks\.\d+\.attn1\.to_([qkv])$", "qkv", "attn {0} self {1}"),
    LayerKind(r"attn1\.q$", "q", "self-attn q operand"),
    LayerKind(r"attn1\.k$", "k", "self-attn k operand"),
    LayerKind(r"attn1\.v$", "v", "self-attn v operand"),
    LayerKind(r"attn1\.softmax$", "softmax", "self-attn softmax"),
    LayerKind(r"attentions\.(\d+)\.transformer_blocks\.\d+\.attn1\.to_out\.0$", "to_out", "attn {0} self out"),
    LayerKind(r"attentions\.(\d+)\.transformer_blocks\.\d+\.attn2\.to_q$", "cross_q", "attn {0} cross q"),
    LayerKind(r"attentions\.(\d+)\.transformer_blocks\.\d+\.attn2\.to_([kv])$", "cross_kv", "attn {0} cross {1}"),
    LayerKind(r"attn2\.q$", "cross_q_operand", "cross-attn q operand"),
    LayerKind(r"attn2\.([kv])$", "cross_kv_operand", "cross-attn {0} operand (text tokens)"),
    LayerKind(r"attn2\.softmax$", "cross_softmax", "cross-attn softmax"),
    LayerKind(r"attentions\.(\d+)\.transformer_blocks\.\d+\.attn2\.to_out\.0$", "cross_out", "attn {0} cross out"),
    LayerKind(r"attentions\.(\d+)\.transformer_blocks\.\d+\.ff\.net\.0\.proj$", "fc1", "attn {0} GEGLU fc1"),
    LayerKind(r"attentions\.(\d+)\.transformer_blocks\.\d+\.ff\.net\.2$", "fc2", "attn {0} fc2"),
    LayerKind(r"attentions\.(\d+)\.proj_out$", "proj_out", "attn {0} proj out"),
    *unet.KINDS[6:],  # a UNet2DModel-style attention's kinds, downsample, upsample, conv_out
)

def balance_groups(model: nn.Module) -> list[BalanceGroup]:
    """Per attention block: proj_in (into its GroupNorm), and per transformer block attn1 q/k/v (into norm1),
    attn2 to_q (into norm2), fc1 (into norm3), each attention's to_out.0 (into its to_v)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    groups = []
    affine = lambda norm: norm is not None and getattr(norm, "weight", None) is not None \
        and getattr(norm, "bias", None) is not None  # noqa: E731
    for name, mod in model.named_modules():
        if isinstance(mod, Transformer2DModel) and affine(getattr(mod, "norm", None)):
            groups.append(BalanceGroup(f"{name}.proj_in", "norm_in", -1, (f"{name}.proj_in",), f"{name}.norm"))
        if not isinstance(mod, BasicTransformerBlock) or mod.norm_type != "layer_norm":
            continue
        if affine(mod.norm1) and not mod.only_cross_attention:
            groups.append(BalanceGroup(f"{name}.attn1.qkv", "norm_in", -1,
                                       tuple(f"{name}.attn1.to_{c}" for c in "qkv"), f"{name}.norm1"))
        groups.append(BalanceGroup(f"{name}.attn1.to_out.0", "attn_out", -1, (f"{name}.attn1.to_out.0",),
                                   f"{name}.attn1.to_v"))
        if mod.attn2 is not None:
            if affine(mod.norm2):
                groups.append(BalanceGroup(f"{name}.attn2.to_q", "norm_in", -1, (f"{name}.attn2.to_q",),
                                           f"{name}.norm2"))
            groups.append(BalanceGroup(f"{name}.attn2.to_out.0", "attn_out", -1, (f"{name}.attn2.to_out.0",),
                                       f"{name}.attn2.to_v"))
        if affine(mod.norm3):
            groups.append(BalanceGroup(f"{name}.ff.net.0.proj", "norm_in", -1, (f"{name}.ff.net.0.proj",),
                                       f"{name}.norm3"))
    return groups


UNBALANCED = (
        ("attn2.to_k", "input is the CLIP text embedding, made outside the denoiser (the text encoder stays FP "
                       "and unchanged): no producer"),
        ("attn2.to_v", "input is the CLIP text embedding, made outside the denoiser (the text encoder stays FP "
                       "and unchanged): no producer"),
        ("ff.net.2", "input is GEGLU(fc1 output) = h * GELU(gate): a per-channel scale does not pass through it"),
        ("proj_out", "input is the transformer blocks' residual stream: no single affine producer"),
) + unet.UNBALANCED


def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    emb, _ = text_inputs(model, y, x.dtype)  # Stable Diffusion attends to all 77 CLIP tokens (no mask)
    with prompt_table(model).rows(y):
        return model(x, t, encoder_hidden_states=emb).sample


def describe(model: nn.Module) -> str:
    channels = ", ".join(map(str, model.config.block_out_channels))
    return f"Stable Diffusion UNet, {len(model.down_blocks)} resolutions ({channels} channels)"


FAMILY = Family(
    name="sd", title="Stable Diffusion UNet", classes=("UNet2DConditionModel",), subfolder="unet",
    kinds=KINDS, stages=unet.STAGES, balance_groups=balance_groups, unbalanced=UNBALANCED,
    recon_units=unet.recon_units, float_io=("conv_in", "conv_out"), describe=describe,
    takes_labels=lambda model: False, call=call, text_conditioned=True,
)
