"""The DiT family: diffusers DiTTransformer2DModel (adaLN-Zero blocks; Peebles & Xie, 2023).

Layers (diffusers naming; docs/ARCHITECTURE.md):
    pos_embed.proj                                 patch embedding (a conv on the noisy latent)
    transformer_blocks.i.norm1.emb.timestep_embedder.linear_1 / _2    the block's timestep MLP
    transformer_blocks.i.norm1.linear              adaLN: SiLU(conditioning) -> six chunks (shift, scale, gate x 2)
    transformer_blocks.i.attn1.to_q / to_k / to_v / to_out.0          self-attention
    transformer_blocks.i.ff.net.0.proj / ff.net.2                     MLP fc1 (GELU after it) and fc2
    proj_out_1, proj_out_2                         the final layer's adaLN and its projection to patches

Fold sites (quant.reparam): q/k/v share one vector folded into the msa shift/scale rows of adaLN; to_out.0's
folds into to_v's rows; fc1's into the mlp shift/scale rows. fc2 reads GELU(fc1), which a per-channel scale
does not pass through.

Reconstruction units, in forward order, each a function of (hidden stream, t, y):
    pos_embed                         latent x -> patch tokens
    transformer_blocks.i.norm1.emb    (t, y) -> conditioning vector (timestep MLP + label table), block i's own
    transformer_blocks.i              tokens -> tokens (adaLN modulation, attention, MLP)
    final                             tokens -> output patches (proj_out_1 modulation, proj_out_2)
Each unit is optimized alone against the FP model's same unit (PTQ4DiT / BRECQ reconstruct per block and treat
the patch embedding, the timestep MLP and the final layer as units too). diffusers gives every block its own
copy of the embedding MLP, so block i's embedding is its own small unit right before the block; the block unit
then leaves it alone. The final layer calls block 0's embedding again, as diffusers' forward does. The "hidden
stream" is the latent before pos_embed and tokens after it; an embedding unit leaves it unchanged.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from quant.families.base import BalanceGroup, Family, LayerKind, Stage, Unit

KINDS = (  # in data-flow order within a stage
    LayerKind(r"^pos_embed\.proj$", "patch_embed", "patch embed"),
    LayerKind(r"timestep_embedder\.linear_([12])$", "t_embed", "t-embed {0}"),
    LayerKind(r"norm1\.linear$", "adaLN", "adaLN"),
    LayerKind(r"attn\d*\.to_([qkv])$", "qkv", "attn {0}"),
    LayerKind(r"attn\d*\.q$", "q", "q"),
    LayerKind(r"attn\d*\.k$", "k", "k"),
    LayerKind(r"attn\d*\.v$", "v", "v"),
    LayerKind(r"attn\d*\.softmax$", "softmax", "softmax"),
    LayerKind(r"attn\d*\.qkv_softmax$", "attn_operands", "attn q k v softmax"),
    LayerKind(r"attn\d*\.to_out\.0$", "to_out", "attn out"),
    LayerKind(r"ff\.net\.0\.proj$", "fc1", "MLP fc1"),
    LayerKind(r"ff\.net\.2$", "fc2", "MLP fc2"),
    LayerKind(r"^proj_out_1$", "final_adaLN", "final adaLN"),
    LayerKind(r"^proj_out_2$", "final", "final out"),
)

STAGES = (
    Stage(r"pos_embed(\.|$)", "patch embedding", named=False),
    Stage(r"transformer_blocks\.(\d+)(\.|$)", "block {0}"),
    Stage(r"(proj_out|norm_out)", "final layer", named=False),
)

# Why the layers outside every balance group keep their input scale (first pattern found in the name wins).
UNBALANCED = (
    ("ff.net.2", "input is GELU(fc1 output): a per-channel scale does not pass through GELU"),
    ("norm1.linear", "input is SiLU(conditioning): a per-channel scale does not pass through SiLU"),
    ("linear_1", "input is the fixed sinusoidal timestep projection: no parameters to fold into"),
    ("linear_2", "input is SiLU(linear_1 output): a per-channel scale does not pass through SiLU"),
    ("pos_embed", "input is the noisy latent itself: no producer inside the model"),
    ("proj_out_1", "input is SiLU(conditioning): a per-channel scale does not pass through SiLU"),
    ("proj_out_2", "foldable into proj_out_1's shift/scale rows, but outside PTQ4DiT's balanced set"),
)


def balance_groups(model: nn.Module) -> list[BalanceGroup]:
    """Per adaLN-Zero block: q/k/v (one shared b, PTQ4DiT's setting) and fc1 into adaLN, to_out.0 into to_v."""
    groups = []
    for i, block in enumerate(getattr(model, "transformer_blocks", [])):
        if getattr(block, "norm_type", None) != "ada_norm_zero" or getattr(block.norm1, "linear", None) is None:
            continue
        p = f"transformer_blocks.{i}"
        groups += [
            BalanceGroup(f"{p}.attn1.qkv", "attn_in", i, (f"{p}.attn1.to_q", f"{p}.attn1.to_k", f"{p}.attn1.to_v"),
                         f"{p}.norm1.linear"),
            BalanceGroup(f"{p}.attn1.to_out.0", "attn_out", i, (f"{p}.attn1.to_out.0",), f"{p}.attn1.to_v"),
            BalanceGroup(f"{p}.ff.net.0.proj", "mlp_in", i, (f"{p}.ff.net.0.proj",), f"{p}.norm1.linear"),
        ]
    return groups


# ---- reconstruction units ----------------------------------------------------------------------------------
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


def recon_units(model: nn.Module) -> list[Unit]:
    """The units of a diffusers DiTTransformer2DModel (adaLN-Zero), in forward order (module docstring)."""
    units = [Unit("pos_embed", ["pos_embed"], [], _patch_embed)]
    for i in range(len(model.transformer_blocks)):
        block = f"transformer_blocks.{i}"
        emb = f"{block}.norm1.emb"
        units.append(Unit(emb, [emb], [], _embedding(i), advances=False))
        units.append(Unit(block, [block], [emb], _block(i)))
    units.append(Unit("final", ["proj_out_1", "proj_out_2"], [], _final))
    return units


FAMILY = Family(
    name="dit", title="DiT", classes=("DiTTransformer2DModel",), subfolder="transformer",
    kinds=KINDS, stages=STAGES, balance_groups=balance_groups, unbalanced=UNBALANCED, recon_units=recon_units,
    float_io=("pos_embed.proj", "proj_out_1", "proj_out_2"),
    config_classes=("Transformer2DModel",),  # the hub's DiT configs name the generic class; diffusers remaps it
    num_classes=lambda config: config.num_embeds_ada_norm,  # diffusers' label table adds the null row itself
    describe=lambda model: f"DiT, {len(model.transformer_blocks)} blocks",
    block_pattern=r"transformer_blocks\.(\d+)(\.|$)",
)
