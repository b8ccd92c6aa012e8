"""A third model family, declared as one file: a toy pre-norm MLP denoiser on 1x1 patches.

Put into quant/families/ (or registered with quant.families.register), it needs nothing else: the lab finds it
by its class name, names its layers, groups them by stage, folds a balancing vector into its LayerNorms,
reconstructs it unit by unit and keeps its ends in float, all from the declaration below.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.families.base import BalanceGroup, Family, LayerKind, Stage, Unit


class ToyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)  # affine: a per-channel scale on fc_in's input folds into it
        self.fc_in = nn.Linear(width, 2 * width)
        self.fc_out = nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc_out(F.gelu(self.fc_in(self.norm(h))))


class ToyDenoiser(nn.Module):
    """model(x, timestep=t, class_labels=y).sample, like a diffusers denoiser."""

    def __init__(self, channels: int = 2, width: int = 16, depth: int = 2, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(channels, width)
        self.time_mlp = nn.Linear(1, width)
        self.labels = nn.Embedding(num_classes + 1, width)
        self.blocks = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, channels)

    def embed(self, x, t, y):
        b, c, hh, ww = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        cond = self.time_mlp(t.float().reshape(-1, 1) / 1000) + self.labels(y)
        return self.stem(tokens) + cond[:, None]

    def unembed(self, h, shape):
        b, c, hh, ww = shape
        return self.head(h).transpose(1, 2).reshape(b, c, hh, ww)

    def forward(self, x, timestep, class_labels=None):
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(x.shape[0])
        h = self.embed(x, t, class_labels)
        for block in self.blocks:
            h = block(h)
        return types.SimpleNamespace(sample=self.unembed(h, x.shape))


def balance_groups(model: nn.Module) -> list[BalanceGroup]:
    return [BalanceGroup(f"blocks.{i}.fc_in", "norm_in", i, (f"blocks.{i}.fc_in",), f"blocks.{i}.norm")
            for i in range(len(model.blocks))]


def recon_units(model: nn.Module) -> list[Unit]:
    def block(i):
        return lambda m, h, t, y: m.blocks[i](h)

    units = [Unit("stem", ["stem", "time_mlp", "labels"], [], lambda m, x, t, y: m.embed(x, t, y))]
    units += [Unit(f"blocks.{i}", [f"blocks.{i}"], [], block(i)) for i in range(len(model.blocks))]
    return units + [Unit("head", ["head"], [], lambda m, h, t, y: m.head(h))]


FAMILY = Family(
    name="toy", title="Toy", classes=("ToyDenoiser",), subfolder="toy",
    kinds=(LayerKind(r"^stem$", "stem", "stem"), LayerKind(r"^time_mlp$", "t_embed", "t-embed"),
           LayerKind(r"fc_in$", "fc_in", "MLP in"), LayerKind(r"fc_out$", "fc_out", "MLP out"),
           LayerKind(r"^head$", "head", "head")),
    stages=(Stage(r"(stem|time_mlp|labels)$", "input"), Stage(r"blocks\.(\d+)(\.|$)", "block {0}"),
            Stage(r"head$", "output")),
    balance_groups=balance_groups,
    unbalanced=(("fc_out", "input is GELU(fc_in output)"), ("stem", "input is the noisy image"),
                ("time_mlp", "input is the timestep"), ("head", "input is the residual stream")),
    recon_units=recon_units, float_io=("stem", "head"),
    describe=lambda model: f"Toy, {len(model.blocks)} blocks",
)
