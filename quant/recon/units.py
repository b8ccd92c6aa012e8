"""The units a DiT is reconstructed by, in forward order, each a function of (hidden stream, t, y).

    pos_embed                         latent x -> patch tokens (the patch-embedding conv)
    transformer_blocks.i.norm1.emb    (t, y) -> conditioning vector (timestep MLP + label table), block i's own
    transformer_blocks.i              tokens -> tokens (adaLN modulation, attention, MLP)
    final                             tokens -> output patches (proj_out_1 modulation, proj_out_2)

Each unit is optimized alone, in this order, against the FP model's same unit (PTQ4DiT / BRECQ reconstruct
per block; they treat the patch embedding, the timestep MLP and the final layer as single units too).
diffusers gives every block its own copy of the embedding MLP (DiT-XL/2's checkpoints hold the same weights in
each), so block i's embedding is its own small unit right before the block; the block unit then leaves it
alone. The final layer calls block 0's embedding again, as diffusers' forward does.

The "hidden stream" is what flows from unit to unit: the latent before pos_embed, tokens after it. An
embedding unit reads only (t, y) and leaves the stream unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class Unit:
    """One reconstruction unit.

    name: the module the unit is (or "final" for proj_out_1 / proj_out_2).
    owns: module names whose quantized layers and activation quantizers this unit trains.
    skip: module names inside `owns` trained by an earlier unit (a block's embedding MLP).
    run: (model, stream, t, y) -> output; works on the FP model and on its quantized copy alike.
    advances: True if the output replaces the hidden stream (False for embedding units).
    output_part: what of the output the unit produced, for its loss and error (None: all of it). A UNet's
        stream also carries skip tensors a unit passes through unchanged (quant.unet_graph).
    """

    name: str
    owns: list[str]
    skip: list[str]
    run: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    advances: bool = True
    output_part: Callable[[torch.Tensor], torch.Tensor] | None = None

    def part(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.output_part is None else self.output_part(out)


def _patch_embed(model, x, t, y):
    return model.pos_embed(x)


def _embedding(i: int):
    def run(model, h, t, y):
        return model.transformer_blocks[i].norm1.emb(t, y, hidden_dtype=h.dtype)
    return run


def _block(i: int):
    def run(model, h, t, y):
        return model.transformer_blocks[i](h, timestep=t, class_labels=y)
    return run


def _final(model, h, t, y):
    # diffusers' DiT output layer, before unpatchify (a fixed permutation the loss does not need):
    # adaLN with block 0's conditioning, then the linear projection to patches.
    cond = model.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=h.dtype)
    shift, scale = model.proj_out_1(F.silu(cond)).chunk(2, dim=1)
    h = model.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
    return model.proj_out_2(h)


def dit_units(model: nn.Module) -> list[Unit]:
    """The units of a diffusers DiTTransformer2DModel (adaLN-Zero), in forward order."""
    if type(model).__name__ != "DiTTransformer2DModel":
        raise ValueError(f"block-wise reconstruction supports DiTTransformer2DModel, not {type(model).__name__}")
    units = [Unit("pos_embed", ["pos_embed"], [], _patch_embed)]
    for i in range(len(model.transformer_blocks)):
        block = f"transformer_blocks.{i}"
        emb = f"{block}.norm1.emb"
        units.append(Unit(emb, [emb], [], _embedding(i), advances=False))
        units.append(Unit(block, [block], [emb], _block(i)))
    units.append(Unit("final", ["proj_out_1", "proj_out_2"], [], _final))
    return units


def unit_modules(model: nn.Module, unit: Unit, kinds: tuple[type, ...]) -> dict[str, nn.Module]:
    """The modules of `kinds` under the unit's own modules, without those under its `skip` names."""
    found = {}
    for root in unit.owns:
        for name, mod in model.get_submodule(root).named_modules(prefix=root):
            if isinstance(mod, kinds) and not any(name == s or name.startswith(s + ".") for s in unit.skip):
                found[name] = mod
    return found
