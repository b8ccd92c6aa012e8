"""The shape of a family declaration (docs/ARCHITECTURE.md, "The family table").

A family is one kind of diffusers denoiser (a DiT, a UNet, ...). Everything the lab must know about its layers
is declared once, in one file of quant/families/, as a `Family`:

    classes       the diffusers class names that are this family (how a model is recognised)
    subfolder     where a pipeline folder keeps the denoiser ("transformer", "unet")
    num_classes(config)    classes a user may ask for (0: unconditional); the label table's last row is the null
                  class for guidance
    kinds         LayerKind(pattern, kind, role): what each quantized layer is, in data-flow order within a stage
    stages        Stage(pattern, label): the parts of the network in forward order ("block 3", "down 1", ...);
                  sensitivity's "block" granularity and the layer menus group by them
    balance_groups(model)  the layer groups whose per-channel scales fold exactly (BalanceGroup)
    unbalanced    (name pattern, why) for every other quantized layer: why its input scale cannot fold
    recon_units(model)     the units of block-wise reconstruction, in forward order (Unit)
    float_io      exclude patterns of "keep the ends in float": the layers that read the noisy input and write
                  the prediction

The dataclasses of the declarations (BalanceGroup, Unit) live here too, so the family files import nothing
but torch, diffusers and this module: every other layer of quant/ and analysis/ reads the table.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch
import torch.nn as nn


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """A kind of layer by the tail of its module name (re.search). `role` is the readable name; it may use the
    pattern's groups: LayerKind(r"resnets\\.(\\d+)\\.conv1$", "conv1", "resnet {0} conv1")."""

    pattern: str
    kind: str
    role: str

    def match(self, name: str) -> re.Match | None:
        return re.search(self.pattern, name)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A part of the network, by the head of a module name (re.match). `label` may use the pattern's first group
    ("block {0}"), which also orders stages of one pattern (block 2 before block 10). named=False: readable
    layer names leave the stage out (a DiT's patch embedding and final layer read well by their role alone)."""

    pattern: str
    label: str
    named: bool = True

    def match(self, name: str) -> re.Match | None:
        return re.match(self.pattern, name)


@dataclasses.dataclass(frozen=True)
class BalanceGroup:
    """Layers that share one input and so one scaling vector b, and where 1/b folds (quant.reparam.apply_scaling).

    kind: attn_in (q/k/v of a DiT block, folded into adaLN's msa chunks), attn_out (to_out.0, folded into to_v),
        mlp_in (fc1, folded into adaLN's mlp chunks), norm_in (layers fed by an affine norm: gamma, beta /= b).
    """

    name: str  # e.g. "transformer_blocks.0.attn1.qkv"
    kind: str
    block: int  # the repeated block the group is in (-1 where the family has none)
    layers: tuple[str, ...]  # qualified names of the layers whose input columns are scaled by b
    producer: str = ""  # the module 1/b folds into (adaLN linear, to_v, a norm)


@dataclasses.dataclass
class Unit:
    """One unit of block-wise reconstruction (quant.recon).

    name: the module the unit is (or "final" for a DiT's output layer).
    owns: module names whose quantized layers and activation quantizers this unit trains.
    skip: module names inside `owns` trained by an earlier unit (a DiT block's embedding MLP).
    run: (model, stream, t, y) -> output; works on the FP model and on its quantized copy alike.
    advances: True if the output replaces the hidden stream (False for embedding units).
    output_part: what of the output the unit produced, for its loss and error (None: all of it). A UNet's
        stream also carries skip tensors a unit passes through unchanged (quant.families.unet).
    """

    name: str
    owns: list[str]
    skip: list[str]
    run: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    advances: bool = True
    output_part: Callable[[torch.Tensor], torch.Tensor] | None = None

    def part(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.output_part is None else self.output_part(out)


def unit_modules(model: nn.Module, unit: Unit, kinds: tuple[type, ...]) -> dict[str, nn.Module]:
    """The modules of `kinds` under the unit's own modules, without those under its `skip` names."""
    found = {}
    for root in unit.owns:
        for name, mod in model.get_submodule(root).named_modules(prefix=root):
            if isinstance(mod, kinds) and not any(name == s or name.startswith(s + ".") for s in unit.skip):
                found[name] = mod
    return found


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every diffusers Attention module of the model, by name (what attn_bits quantizes and salience observes)."""
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def class_labels_call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The call of a class-conditional diffusers denoiser: model(x, timestep=t, class_labels=y).sample."""
    return model(x, timestep=t, class_labels=y).sample


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: see the module docstring for each field."""

    name: str  # "dit"
    title: str  # "DiT", as a sentence names it
    classes: tuple[str, ...]
    subfolder: str
    kinds: tuple[LayerKind, ...]
    stages: tuple[Stage, ...]
    balance_groups: Callable[[nn.Module], list[BalanceGroup]]
    unbalanced: tuple[tuple[str, str], ...]
    recon_units: Callable[[nn.Module], list[Unit]]
    float_io: tuple[str, ...]
    config_classes: tuple[str, ...] = ()  # other _class_name values a saved config may give for this family
    num_classes: Callable[[object], int] = lambda config: 0  # from the model's config; ValueError if unsupported
    describe: Callable[[nn.Module], str] = lambda model: type(model).__name__
    takes_labels: Callable[[nn.Module], bool] = lambda model: True
    call: Callable = class_labels_call  # (model, x, t, y or None) -> the prediction tensor
    block_pattern: str | None = None  # the repeated block's index (salience tables' "block" column)

    def kind_of(self, name: str) -> tuple[LayerKind, re.Match] | None:
        for entry in self.kinds:
            if (hit := entry.match(name)) is not None:
                return entry, hit
        return None

    def stage_of(self, name: str) -> tuple[int, Stage, re.Match] | None:
        for i, stage in enumerate(self.stages):
            if (hit := stage.match(name)) is not None:
                return i, stage, hit
        return None

    def why_unbalanced(self, name: str) -> str:
        """The first reason whose pattern occurs in the layer's name."""
        return next((why for key, why in self.unbalanced if key in name), "no affine producer of its input")
