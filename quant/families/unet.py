"""The UNet family: diffusers UNet2DModel (the DDPM architecture, Ho et al. 2020; ADM-style ResNet + attention).

Layers (diffusers naming): conv_in; time_embedding.linear_1 / _2 (and class_embedding); per resolution
down_blocks.i / up_blocks.i with resnets.j (conv1, time_emb_proj, conv2, conv_shortcut), attentions.j (to_q,
to_k, to_v, to_out.0 after a GroupNorm) and down/upsamplers; mid_block; conv_norm_out, conv_out.

Fold sites. A per-input-channel scale X' = X diag(1/b) folds exactly only into an affine producer of X. In a
UNet most layers see SiLU(GroupNorm(.)), and SiLU(x / b) is not SiLU(x) / b, so:
    attention to_q / to_k / to_v   X = GroupNorm(h) with affine (gamma, beta): gamma /= b, beta /= b  -> folds
    attention to_out.0             X = softmax(q k^T) V: to_v's rows and bias /= b                      -> folds
    resnet conv1, conv2, conv_out  X = SiLU(GroupNorm(.))                                               -> no
    resnet time_emb_proj           X = SiLU(time embedding)                                             -> no
    resnet conv_shortcut, down/up-sampling convs   X = the residual stream (a sum of two branches)     -> no
    time_embedding.linear_1 / linear_2   sinusoidal projection (no parameters) / SiLU(linear_1)        -> no
    conv_in                        X = the noisy image
Those layers are quantized with their input as it is (unbalanced); the pages and `dqlab quantize` say so.

Units (block-wise reconstruction, quant.recon): the timestep/label embedding, conv_in, every down block, the
middle block, every up block, and the output head (conv_norm_out, SiLU, conv_out), in forward order. A UNet
carries skip connections from the down path to the up path, so the stream between units is not one tensor:
it is packed into one [rows, features] tensor (the current feature map followed by the skip tensors still
waiting), which each unit unpacks with the layout traced once from the model's config. A unit's loss and
error are measured on what it produced (its feature map, and for a down block its new skip tensors), not on
the skip tensors it passes through untouched.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from quant.families.base import BalanceGroup, Family, LayerKind, Stage, Unit, attention_modules
from quant.modules import find_timestep_context

KINDS = (  # in data-flow order within a stage
    LayerKind(r"^conv_in$", "conv_in", "conv in"),
    LayerKind(r"time_embedding\.linear_([12])$", "t_embed", "t-embed {0}"),
    LayerKind(r"resnets\.(\d+)\.time_emb_proj$", "t_proj", "resnet {0} t-proj"),
    LayerKind(r"resnets\.(\d+)\.conv1$", "conv1", "resnet {0} conv1"),
    LayerKind(r"resnets\.(\d+)\.conv2$", "conv2", "resnet {0} conv2"),
    LayerKind(r"resnets\.(\d+)\.conv_shortcut$", "shortcut", "resnet {0} shortcut"),
    LayerKind(r"attentions\.(\d+)\.to_([qkv])$", "qkv", "attn {0} {1}"),
    LayerKind(r"attentions\.(\d+)\.q$", "q", "attn {0} q operand"),
    LayerKind(r"attentions\.(\d+)\.k$", "k", "attn {0} k operand"),
    LayerKind(r"attentions\.(\d+)\.v$", "v", "attn {0} v operand"),
    LayerKind(r"attentions\.(\d+)\.softmax$", "softmax", "attn {0} softmax"),
    LayerKind(r"attentions\.(\d+)\.qkv_softmax$", "attn_operands", "attn {0} q k v softmax"),
    LayerKind(r"attentions\.(\d+)\.to_out\.0$", "to_out", "attn {0} out"),
    LayerKind(r"downsamplers\.(\d+)\.conv$", "downsample", "downsample {0}"),
    LayerKind(r"upsamplers\.(\d+)\.conv$", "upsample", "upsample {0}"),
    LayerKind(r"^conv_out$", "conv_out", "conv out"),
)

STAGES = (
    Stage(r"(time_embedding|class_embedding|time_proj|conv_in)(\.|$)", "input"),
    Stage(r"down_blocks\.(\d+)(\.|$)", "down {0}"),
    Stage(r"mid_block(\.|$)", "middle"),
    Stage(r"up_blocks\.(\d+)(\.|$)", "up {0}"),
    Stage(r"(conv_norm_out|conv_act|conv_out)", "output"),
)

# Why the layers outside every balance group keep their input scale (first pattern found in the name wins).
UNBALANCED = (
    ("time_emb_proj", "input is SiLU(time embedding): a per-channel scale does not pass through SiLU"),
    ("conv_shortcut", "input is the residual stream (a sum of two branches): no single affine producer"),
    ("downsamplers", "input is a resnet's output on the residual stream: no single affine producer"),
    ("upsamplers", "input is the upsampled residual stream: no single affine producer"),
    ("conv1", "input is SiLU(GroupNorm(h)): a per-channel scale does not pass through SiLU"),
    ("conv2", "input is SiLU(GroupNorm(h + time embedding)): a per-channel scale does not pass through SiLU"),
    ("conv_out", "input is SiLU(GroupNorm(h)): a per-channel scale does not pass through SiLU"),
    ("linear_1", "input is the fixed sinusoidal timestep projection: no parameters to fold into"),
    ("linear_2", "input is SiLU(linear_1 output): a per-channel scale does not pass through SiLU"),
    ("conv_in", "input is the noisy image itself: no producer inside the model"),
    ("to_", "attention without an affine norm before it: no producer to fold into"),
)


def balance_groups(model: nn.Module) -> list[BalanceGroup]:
    """Per self-attention: q/k/v (one shared b, folded into its affine GroupNorm) and to_out.0 (into to_v)."""
    groups = []
    for name, attn in attention_modules(model).items():
        if attn.is_cross_attention or attn.spatial_norm is not None:
            continue  # the input of k and v is not the normed hidden state
        norm = attn.group_norm
        if norm is not None and getattr(norm, "affine", False):
            groups.append(BalanceGroup(f"{name}.qkv", "norm_in", -1,
                                       (f"{name}.to_q", f"{name}.to_k", f"{name}.to_v"), f"{name}.group_norm"))
        groups.append(BalanceGroup(f"{name}.to_out.0", "attn_out", -1, (f"{name}.to_out.0",), f"{name}.to_v"))
    return groups


def takes_labels(model: nn.Module) -> bool:
    """A UNet is class-conditional when it has a class embedding (diffusers refuses labels otherwise)."""
    return getattr(model, "class_embedding", None) is not None


def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return model(x, timestep=t, class_labels=y if takes_labels(model) else None).sample


def num_classes(config) -> int:
    """A class-conditional UNet2DModel keeps its null class for guidance as the last row of its class embedding
    (num_class_embeds = classes + 1, as diffusers' DiT label table does); without one it is unconditional."""
    if config.num_class_embeds is None:
        if config.class_embed_type is not None:
            raise ValueError(f"UNet2DModel class_embed_type {config.class_embed_type!r} is not supported; the lab "
                             "samples unconditional UNets and class tables (num_class_embeds)")
        return 0
    if config.num_class_embeds < 2:
        raise ValueError(f"UNet2DModel num_class_embeds = {config.num_class_embeds}: a class-conditional UNet needs "
                         "its classes plus one null class for guidance")
    return config.num_class_embeds - 1


def describe(model: nn.Module) -> str:
    channels = ", ".join(map(str, model.config.block_out_channels))
    return f"UNet, {len(model.down_blocks)} resolutions ({channels} channels)"


# ---- reconstruction units ----------------------------------------------------------------------------------
def embedding(model: nn.Module, t: torch.Tensor, y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The conditioning vector UNet2DModel.forward adds to every resnet: time MLP (+ class embedding)."""
    emb = model.time_embedding(model.time_proj(t).to(dtype))
    if model.class_embedding is not None:
        labels = model.time_proj(y) if model.config.class_embed_type == "timestep" else y
        emb = emb + model.class_embedding(labels).to(dtype)
    return emb


def _pack(h: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([h.flatten(1)] + [s.flatten(1) for s in skips], dim=1)


def _unpack(stream: torch.Tensor, layout: list[tuple[int, ...]]) -> list[torch.Tensor]:
    sizes = [math.prod(shape) for shape in layout]
    return [part.reshape(-1, *shape) for part, shape in zip(stream.split(sizes, dim=1), layout)]


def _layouts(model: nn.Module) -> list[list[tuple[int, ...]]]:
    """The stream's layout (shapes of [h, skip...] without the row dimension) after conv_in, each down
    block, the middle block and each up block, traced on one zero image."""
    size = model.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    p = next(model.parameters())
    x = torch.zeros(1, model.config.in_channels, *size, device=p.device, dtype=p.dtype)
    t = torch.zeros(1, dtype=torch.long, device=p.device)
    y = torch.zeros(1, dtype=torch.long, device=p.device)
    shapes = lambda h, skips: [tuple(h.shape[1:])] + [tuple(s.shape[1:]) for s in skips]  # noqa: E731
    ctx = find_timestep_context(model)  # a quantized copy's quantizers read the timestep
    with contextlib.nullcontext() if ctx is None else ctx.fixed(t):
        return _trace(model, x, t, y, p.dtype, shapes)


def _trace(model, x, t, y, dtype, shapes) -> list[list[tuple[int, ...]]]:
    with torch.no_grad():
        emb = embedding(model, t, y, dtype)
        h = model.conv_in(x)
        skips = [h]
        out = [shapes(h, skips)]
        for block in model.down_blocks:
            h, res = block(hidden_states=h, temb=emb)
            skips += list(res)
            out.append(shapes(h, skips))
        if model.mid_block is not None:
            h = model.mid_block(h, emb)
            out.append(shapes(h, skips))
        for block in model.up_blocks:
            n = len(block.resnets)
            h, skips = block(h, tuple(skips[-n:]), emb), skips[:-n]
            out.append(shapes(h, skips))
    return out


def _check_supported(model: nn.Module) -> None:
    cfg = model.config
    if cfg.time_embedding_type != "positional" or cfg.center_input_sample:
        raise ValueError("block-wise reconstruction of a UNet2DModel supports positional time embeddings without "
                         "input centering")
    for block in list(model.down_blocks) + list(model.up_blocks):
        if hasattr(block, "skip_conv"):
            raise ValueError(f"block-wise reconstruction does not support {type(block).__name__} (skip-sample blocks)")


def recon_units(model: nn.Module) -> list[Unit]:
    """The units of a diffusers UNet2DModel, in forward order (see the module docstring)."""
    _check_supported(model)
    layouts = _layouts(model)
    emb_owners = ["time_embedding"] + (["class_embedding"] if model.class_embedding is not None else [])
    cond = lambda m, t, y, h: embedding(m, t, y, h.dtype)  # noqa: E731

    def run_embedding(m, stream, t, y):
        return cond(m, t, y, stream)

    def run_conv_in(m, x, t, y):
        h = m.conv_in(x)
        return _pack(h, [h])

    def new_parts(old: int, new: int):
        """The stream's parts a unit produced: its feature map (part 0) and skips old..new-1 (down blocks)."""
        def select(stream: torch.Tensor, layout) -> torch.Tensor:
            parts = _unpack(stream, layout)
            return torch.cat([parts[0].flatten(1)] + [p.flatten(1) for p in parts[1 + old:1 + new]], dim=1)
        return select

    units = [Unit("time_embedding", emb_owners, [], run_embedding, advances=False),
             Unit("conv_in", ["conv_in"], [], run_conv_in)]
    stage = 0  # index into layouts of the unit's input layout

    def run_block(kind: str, i: int, layout_in, layout_out):
        def run(m, stream, t, y):
            h, *skips = _unpack(stream, layout_in)
            emb = cond(m, t, y, h)
            if kind == "down":
                h, res = m.down_blocks[i](hidden_states=h, temb=emb)
                skips += list(res)
            elif kind == "mid":
                h = m.mid_block(h, emb)
            else:
                n = len(m.up_blocks[i].resnets)
                h, skips = m.up_blocks[i](h, tuple(skips[-n:]), emb), skips[:-n]
            return _pack(h, skips)
        return run

    def add(name: str, kind: str, i: int):
        nonlocal stage
        layout_in, layout_out = layouts[stage], layouts[stage + 1]
        old, new = len(layout_in) - 1, len(layout_out) - 1
        pick = new_parts(old, new) if kind == "down" else new_parts(0, 0)
        units.append(Unit(name, [name], [], run_block(kind, i, layout_in, layout_out),
                          output_part=lambda s, pick=pick, lo=layout_out: pick(s, lo)))
        stage += 1

    for i in range(len(model.down_blocks)):
        add(f"down_blocks.{i}", "down", i)
    if model.mid_block is not None:
        add("mid_block", "mid", 0)
    for i in range(len(model.up_blocks)):
        add(f"up_blocks.{i}", "up", i)
    final_layout = layouts[stage]

    def run_final(m, stream, t, y):
        (h,) = _unpack(stream, final_layout)
        return m.conv_out(m.conv_act(m.conv_norm_out(h)))

    units.append(Unit("final", ["conv_norm_out", "conv_out"], [], run_final))
    return units


FAMILY = Family(
    name="unet", title="UNet", classes=("UNet2DModel",), subfolder="unet",
    kinds=KINDS, stages=STAGES, balance_groups=balance_groups, unbalanced=UNBALANCED, recon_units=recon_units,
    float_io=("conv_in", "conv_out"), num_classes=num_classes, describe=describe, takes_labels=takes_labels,
    call=call,
)
