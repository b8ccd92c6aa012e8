"""The family table: one file a model family (dit.py, unet.py), each declaring a `FAMILY` (quant.families.base).

Every question about layer names is answered here, from those declarations, and nowhere else:

    family_for(model) / family_of(model)    the Family (or its name) of a denoiser, from its class
    layer_info(name)                        kind, readable role, stage of one layer (or unit) name
    layer_kind, readable_layer, layer_stage, layer_block, stage_of    views of layer_info
    balance_groups(model), recon_units(model), float_io(model)        the family's graph declarations

A third family is one new file in this folder with a module-level FAMILY (found when this package is imported),
or one `register(FAMILY)` call for a family declared elsewhere. See docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import re

import torch.nn as nn

from quant.families.base import (BalanceGroup, Family, LayerKind, Stage, Unit, attention_modules,  # noqa: F401
                                 unit_modules)

FAMILIES: dict[str, Family] = {}  # name -> Family, in registration order
CLASS_FAMILIES: dict[str, str] = {}  # diffusers class name -> family name


def register(family: Family) -> Family:
    """Add a family to the table (a repeated registration of the same name replaces it)."""
    for cls in family.classes:
        owner = CLASS_FAMILIES.get(cls)
        if owner is not None and owner != family.name:
            raise ValueError(f"class {cls} already belongs to family {owner!r}")
    FAMILIES[family.name] = family
    for cls in family.classes:
        CLASS_FAMILIES[cls] = family.name
    layer_info.cache_clear()
    return family


def unregister(name: str) -> None:
    """Take a family out of the table (a test's toy family)."""
    family = FAMILIES.pop(name, None)
    for cls in family.classes if family is not None else ():
        CLASS_FAMILIES.pop(cls, None)
    layer_info.cache_clear()


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base":
            family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
            if isinstance(family, Family):
                register(family)



def find_family(model: nn.Module) -> Family | None:
    """The model's Family by its class name, or None for a class no family declares."""
    name = CLASS_FAMILIES.get(type(model).__name__)
    return FAMILIES[name] if name is not None else None


def family_for(model: nn.Module) -> Family:
    """The model's Family; ValueError naming the class and the supported ones otherwise."""
    family = find_family(model)
    if family is None:
        raise ValueError(f"unsupported denoiser class {type(model).__name__}; the lab quantizes diffusers "
                         f"{', '.join(CLASS_FAMILIES)} models")
    return family


def family_of(model: nn.Module) -> str:
    """The family's name ('dit', 'unet', ...) from the model's class; ValueError for an unknown class."""
    return family_for(model).name


def family_named(name: str | Family | None) -> Family | None:
    if name is None or isinstance(name, Family):
        return name
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


# ---- the model-level declarations ---------------------------------------------------------------------------
def balance_groups(model: nn.Module) -> list[BalanceGroup]:
    """The layer groups whose per-channel scales fold exactly into an affine producer."""
    return family_for(model).balance_groups(model)


def recon_units(model: nn.Module) -> list[Unit]:
    """The units of block-wise reconstruction, in forward order."""
    return family_for(model).recon_units(model)


def float_io(model: nn.Module) -> tuple[str, ...]:
    """Exclude patterns that keep the ends of the network (what reads the noisy input, what writes the
    prediction) in floating point."""
    return family_for(model).float_io


# ---- layer names ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What the table says about one module name. kind 'other' and role None where no kind matches."""

    family: str | None
    kind: str
    role: str | None
    kind_index: int  # position of the kind in its family's data-flow order (len(kinds) for 'other')
    stage: str  # "block 3", "down 1", "final layer", ... ("other" when no family claims the name)
    stage_position: int  # sorts stages in forward order within a family
    stage_named: bool
    block: int  # the repeated block's index (a DiT's transformer block), -1 elsewhere


_STAGE_STRIDE = 1 << 16


def base_name(key: str) -> str:
    """The module name of a statistics key: 'a.b@2' (second call in one forward) -> 'a.b'."""
    return key.split("@", 1)[0]


def _claimant(name: str) -> Family | None:
    """The first family one of whose stages the name starts with."""
    return next((f for f in FAMILIES.values() if f.stage_of(name) is not None), None)


@functools.lru_cache(maxsize=1 << 16)  # figures and menus ask about the same few hundred names over and over
def layer_info(key: str, family: str | Family | None = None) -> LayerInfo:
    """Kind, readable role and stage of a module name or statistics key. Without `family` the first family in
    the table whose stages claim the name answers. A second call of a module in one forward ('name@2': a DiT's
    block-0 embedding, called again by its final layer) belongs to the family's last stage."""
    name = base_name(key)
    fam = family_named(family) or _claimant(name)
    candidates = [fam] if family is not None else [f for f in [fam, *FAMILIES.values()] if f is not None]
    kind, role, index = "other", None, -1
    for f in candidates:
        if (hit := f.kind_of(name)) is not None:
            entry, m = hit
            kind, role, index = entry.kind, entry.role.format(*m.groups()), f.kinds.index(entry)
            fam = fam or f
            break
    if fam is None:
        return LayerInfo(None, kind, role, 0, "other", 1 << 30, False, -1)
    index = index if index >= 0 else len(fam.kinds)
    found = fam.stage_of(name) if "@" not in key else None
    if found is None:  # a later call, or a name no stage claims: the family's last stage
        i, stage = len(fam.stages) - 1, fam.stages[-1]
        label, number = stage.label.replace("{0}", "").strip(), 0
    else:
        i, stage, m = found
        number = int(m.group(1)) if m.groups() and m.group(1) and m.group(1).isdigit() else 0
        label = stage.label.format(*m.groups())
    block = -1
    if fam.block_pattern is not None and (b := re.search(fam.block_pattern, name)) is not None:
        block = int(b.group(1))
    return LayerInfo(fam.name, kind, role, index, label, i * _STAGE_STRIDE + number, stage.named, block)


def layer_kind(key: str, family: str | Family | None = None) -> str:
    """The layer's kind: DiT qkv, to_out, fc1, fc2, adaLN, t_embed, final_adaLN, final, patch_embed; UNet conv_in,
    t_embed, t_proj, conv1, conv2, shortcut, qkv, to_out, downsample, upsample, conv_out; attention operands q,
    k, v, softmax; or 'other'."""
    return layer_info(key, family).kind


def layer_stage(key: str, family: str | Family | None = None) -> tuple[int, str]:
    """(forward position, label) of the part of the network a layer is in: a DiT's "patch embedding",
    "block i", "final layer"; a UNet's "input", "down i", "middle", "up i", "output"."""
    info = layer_info(key, family)
    return info.stage_position, info.stage


def stage_of(key: str, family: str | Family | None = None) -> str:
    """The stage's label alone: the unit of sensitivity's "block" granularity."""
    return layer_info(key, family).stage


def layer_block(key: str, family: str | Family | None = None) -> int:
    """The repeated block's index (a DiT's transformer_blocks.i), -1 for other layers and families."""
    return layer_info(key, family).block


def readable_layer(key: str, family: str | Family | None = None) -> str:
    """'transformer_blocks.3.ff.net.0.proj' -> 'block 3 · MLP fc1', 'down_blocks.1.resnets.0.conv1' ->
    'down 1 · resnet 0 conv1'; stages declared unnamed (a DiT's patch embedding, final layer) leave the role
    alone. A name with no role reads as its stage and the rest of its name ('block 3 · norm1.emb'); a second
    call in one forward ('name@2') is marked as such; names no family knows come back unchanged."""
    name, call = base_name(key), key.partition("@")[2]
    info = layer_info(name, family)  # the module's own stage, also for a later call
    if info.family is None:
        return key
    if info.role is not None:
        text = f"{info.stage} · {info.role}" if info.stage_named else info.role
    else:
        found = FAMILIES[info.family].stage_of(name)
        rest = name[found[2].end():].lstrip(".") if found is not None else name
        text = info.stage if not rest else (f"{info.stage} · {rest}" if info.stage_named else rest)
    return text + (f" (call {call})" if call else "")


def all_kinds() -> list[str]:
    """Every kind the table declares, in family and data-flow order, then 'other'."""
    return list(dict.fromkeys(k.kind for f in FAMILIES.values() for k in f.kinds)) + ["other"]


_discover()
