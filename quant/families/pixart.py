"""The PixArt family: diffusers PixArtTransformer2DModel (PixArt-alpha, Chen et al. 2023; PixArt-sigma, Chen et al.
2024): adaLN-single, self-attention, cross-attention to T5 embeddings through a caption projection.

PixArt block i (norm_type "ada_norm_single", LayerNorms without affine parameters):
    modulation  (shift, scale, gate)_{msa, mlp} = scale_shift_table_i + adaln_single.linear(SiLU(e_t)), chunked
                in the order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp: ONE linear that
                every block shares, plus a learned [6, D] table per block (PixArt-alpha, Chen et al. 2023, 2.3)
    attn1 q/k/v   X = LN(h)(1 + scale_msa) + shift_msa. A per-block scale cannot fold: the linear's rows are
                  shared by all blocks. A scale shared by all blocks folds exactly: the shared linear's shift
                  and scale rows and bias /= b, and in every block's table shift /= b and scale ->
                  (1 + scale)/b - 1 (the DiT fold of quant.reparam.fold_adaln, applied to both summands).
    attn1 to_out.0  X = softmax(q k^T) V: to_v's rows and bias /= b (per block)
    attn2 to_q      X = h, the residual stream (PixArt applies no norm before cross-attention): no producer
    attn2 to_k/to_v X = caption_projection(T5 embedding), the same tensor for every block: one scale shared
                    by every block's k and v folds into caption_projection.linear_2's rows and bias
    attn2 to_out.0  into attn2.to_v's rows and bias (per block)
    ff.net.0.proj   X = LN(h)(1 + scale_mlp) + shift_mlp: like attn1, one scale shared by all blocks
    ff.net.2        X = GELU(fc1): no
    adaln_single.linear (SiLU input), timestep MLP, caption_projection.linear_1 (input: the text encoder's
    output, outside the model) / linear_2 (GELU input), pos_embed (the latent), proj_out (modulated by the raw
    timestep embedding e_t itself, which also feeds the shared linear through SiLU): no
Units: pos_embed, adaln_single (t -> modulation), caption_projection (prompt -> text tokens), each block with
the text embedding streamed beside the tokens (recomputed from the prompt ids of the rows), final layer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.conditioning import prompt_table, text_inputs
from quant.families.base import BalanceGroup, Family, LayerKind, Stage, Unit

# PixArt pipelines decode latents with a VAE of scale factor 8; PixArt-alpha's size conditions are image pixels.
PIXART_VAE_FACTOR = 8

KINDS = (  # in data-flow order within a stage
    LayerKind(r"^pos_embed\.proj$", "patch_embed", "patch embed"),
    LayerKind(r"^adaln_single\.emb\.timestep_embedder\.linear_([12])$", "t_embed", "t-embed {0}"),
    LayerKind(r"^adaln_single\.linear$", "adaLN_single", "adaLN-single (shared)"),
    LayerKind(r"^caption_projection\.linear_([12])$", "caption_proj", "caption proj {0}"),
    LayerKind(r"attn1\.to_([qkv])$", "qkv", "self-attn {0}"),
    LayerKind(r"attn1\.q$", "q", "self-attn q operand"),
    LayerKind(r"attn1\.k$", "k", "self-attn k operand"),
    LayerKind(r"attn1\.v$", "v", "self-attn v operand"),
    LayerKind(r"attn1\.softmax$", "softmax", "self-attn softmax"),
    LayerKind(r"attn1\.to_out\.0$", "to_out", "self-attn out"),
    LayerKind(r"attn2\.to_q$", "cross_q", "cross-attn q"),
    LayerKind(r"attn2\.to_([kv])$", "cross_kv", "cross-attn {0}"),
    LayerKind(r"attn2\.q$", "cross_q_operand", "cross-attn q operand"),
    LayerKind(r"attn2\.([kv])$", "cross_kv_operand", "cross-attn {0} operand (text tokens)"),
    LayerKind(r"attn2\.softmax$", "cross_softmax", "cross-attn softmax"),
    LayerKind(r"attn2\.to_out\.0$", "cross_out", "cross-attn out"),
    LayerKind(r"ff\.net\.0\.proj$", "fc1", "MLP fc1"),
    LayerKind(r"ff\.net\.2$", "fc2", "MLP fc2"),
    LayerKind(r"^proj_out$", "final", "final out"),
)

STAGES = (
    Stage(r"pos_embed(\.|$)", "patch embedding", named=False),
    Stage(r"(adaln_single|caption_projection)(\.|$)", "conditioning"),
    Stage(r"transformer_blocks\.(\d+)(\.|$)", "block {0}"),
    Stage(r"(proj_out|norm_out|scale_shift_table)", "final layer", named=False),
)

def _pixart_blocks(model: nn.Module) -> list[str]:
    return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]


def balance_groups(model: nn.Module) -> list[BalanceGroup]:
    """Shared self-attention input and MLP input (into adaln_single.linear + every block's table), shared
    cross-attention k/v (into caption_projection.linear_2), each block's to_out.0 of both attentions (into its
    to_v)."""
    blocks = _pixart_blocks(model)
    groups = [
        BalanceGroup("attn1.qkv (all blocks)", "adaln_single_attn", -1,
                     tuple(f"{p}.attn1.to_{c}" for p in blocks for c in "qkv"), "adaln_single.linear",
                     inputs=tuple(f"{p}.attn1.to_q" for p in blocks)),
        BalanceGroup("ff.net.0.proj (all blocks)", "adaln_single_mlp", -1,
                     tuple(f"{p}.ff.net.0.proj" for p in blocks), "adaln_single.linear",
                     inputs=tuple(f"{p}.ff.net.0.proj" for p in blocks)),
    ]
    if model.caption_projection is not None and all(b.attn2 is not None for b in model.transformer_blocks):
        groups.append(BalanceGroup("attn2.kv (all blocks)", "cross_kv", -1,
                                   tuple(f"{p}.attn2.to_{c}" for p in blocks for c in "kv"),
                                   "caption_projection.linear_2"))
    for i, p in enumerate(blocks):
        groups.append(BalanceGroup(f"{p}.attn1.to_out.0", "attn_out", i, (f"{p}.attn1.to_out.0",), f"{p}.attn1.to_v"))
        if model.transformer_blocks[i].attn2 is not None:
            groups.append(BalanceGroup(f"{p}.attn2.to_out.0", "attn_out", i, (f"{p}.attn2.to_out.0",),
                                       f"{p}.attn2.to_v"))
    return groups


UNBALANCED = (
    ("attn2.to_q", "input is the residual stream (PixArt applies no norm before cross-attention): no producer"),
    ("ff.net.2", "input is GELU(fc1 output): a per-channel scale does not pass through GELU"),
    ("adaln_single.linear", "input is SiLU(timestep embedding): a per-channel scale does not pass through SiLU"),
    ("linear_1", "input is the fixed sinusoidal timestep projection, or the text encoder's output: no producer "
                 "inside the denoiser"),
    ("caption_projection.linear_2", "input is GELU(linear_1 output): a per-channel scale does not pass through GELU"),
    ("linear_2", "input is SiLU(linear_1 output): a per-channel scale does not pass through SiLU"),
    ("pos_embed", "input is the noisy latent itself: no producer inside the model"),
    ("proj_out", "modulated by the timestep embedding itself, which also feeds adaLN-single through SiLU: no "
                 "parameter to fold into"),
)


def size_conditions(model: nn.Module, x: torch.Tensor) -> dict:
    """PixArt-alpha's micro-conditions (image resolution and aspect ratio) when the model uses them."""
    if not getattr(model, "use_additional_conditions", False):
        return {"resolution": None, "aspect_ratio": None}
    h, w = x.shape[-2] * PIXART_VAE_FACTOR, x.shape[-1] * PIXART_VAE_FACTOR
    res = torch.tensor([[h, w]], device=x.device, dtype=x.dtype).repeat(x.shape[0], 1)
    ar = torch.tensor([[h / w]], device=x.device, dtype=x.dtype).repeat(x.shape[0], 1)
    return {"resolution": res, "aspect_ratio": ar}


def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    emb, mask = text_inputs(model, y, x.dtype)
    with prompt_table(model).rows(y):
        return model(x, encoder_hidden_states=emb, encoder_attention_mask=mask.to(x.dtype), timestep=t,
                     added_cond_kwargs=size_conditions(model, x)).sample


def _pixart_mask_bias(mask: torch.Tensor, dtype) -> torch.Tensor:
    # as PixArtTransformer2DModel.forward turns a [B, tokens] keep-mask into an attention bias
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def _pixart_conditioning(model, t, y, h):
    """(modulation [B, 6D], raw timestep embedding [B, D], text tokens [B, tokens, D], mask bias) for the rows."""
    size = size_conditions(model, torch.empty(len(t), 1, model.config.sample_size, model.config.sample_size,
                                              device=h.device, dtype=h.dtype))
    mod, e_t = model.adaln_single(t, size, batch_size=len(t), hidden_dtype=h.dtype)
    emb, mask = text_inputs(model, y, h.dtype)
    text = model.caption_projection(emb) if model.caption_projection is not None else emb
    return mod, e_t, text.reshape(len(t), -1, model.inner_dim), _pixart_mask_bias(mask, h.dtype)


def recon_units(model: nn.Module) -> list:
    """The units of a PixArtTransformer2DModel, in forward order (see the module docstring)."""
    def patch_embed(m, x, t, y):
        return m.pos_embed(x)

    def modulation(m, h, t, y):
        size = size_conditions(m, torch.empty(len(t), 1, m.config.sample_size, m.config.sample_size,
                                              device=h.device, dtype=h.dtype))
        return m.adaln_single(t, size, batch_size=len(t), hidden_dtype=h.dtype)[0]

    def caption(m, h, t, y):
        emb, _ = text_inputs(m, y, h.dtype)
        return m.caption_projection(emb)

    def block(i: int):
        def run(m, h, t, y):
            mod, _, text, bias = _pixart_conditioning(m, t, y, h)
            return m.transformer_blocks[i](h, encoder_hidden_states=text, encoder_attention_mask=bias, timestep=mod)
        return run

    def final(m, h, t, y):
        _, e_t, _, _ = _pixart_conditioning(m, t, y, h)
        shift, scale = (m.scale_shift_table[None] + e_t[:, None]).chunk(2, dim=1)
        return m.proj_out(m.norm_out(h) * (1 + scale) + shift)

    units = [Unit("pos_embed", ["pos_embed"], [], patch_embed),
             Unit("adaln_single", ["adaln_single"], [], modulation, advances=False)]
    if model.caption_projection is not None:
        units.append(Unit("caption_projection", ["caption_projection"], [], caption, advances=False))
    units += [Unit(p, [p], [], block(i)) for i, p in enumerate(_pixart_blocks(model))]
    units.append(Unit("final", ["proj_out"], [], final))
    return units


def describe(model: nn.Module) -> str:
    return f"PixArt, {len(model.transformer_blocks)} blocks"


FAMILY = Family(
    name="pixart", title="PixArt", classes=("PixArtTransformer2DModel",), subfolder="transformer",
    kinds=KINDS, stages=STAGES, balance_groups=balance_groups, unbalanced=UNBALANCED, recon_units=recon_units,
    float_io=("pos_embed.proj", "proj_out"), describe=describe, takes_labels=lambda model: False, call=call,
    block_pattern=r"transformer_blocks\.(\d+)(\.|$)", text_conditioned=True,
)
