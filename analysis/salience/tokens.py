"""Salience per token position of what cross-attention's keys and values read: the text embedding.

Every cross-attention k / v projection of a text-to-image denoiser reads the same tensor at every timestep: the
prompt's embedding (PixArt: the T5 output through the caption projection; Stable Diffusion: the CLIP output).
Its outliers sit on a few token positions, not spread over channels: MixDQ (Zhao et al. 2024) reports the BOS
token of SD's CLIP embedding at magnitude 828 against 10-15 elsewhere. So beside the per-channel view
s(X_j) = max over tokens |X_j|, this module gives the per-token view

    s(X_p) = max over channels |X_p|       for token position p of each prompt

with the token strings, the token mask (padding), and the channel maxima per token position.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from analysis.models.bundle import ModelBundle


@dataclasses.dataclass
class TokenSalience:
    """Per-token maxima of the cross-attention k/v input for a list of prompts (all numpy, on the CPU)."""

    prompts: list[str]
    tokens: list[list[str]]  # token strings per prompt, [P][L]
    absmax: np.ndarray  # [P, L] max over channels of |X| at each token position
    mask: np.ndarray  # [P, L] True where the token is real (PixArt masks padding; SD attends to all 77)
    attended: bool  # whether the denoiser attends to padded positions (SD: yes)
    source: str  # which tensor: "caption_projection output" or "text encoder output"

    def summary(self, top: int = 5) -> dict:
        """The largest token positions over all prompts and the ratio of the largest to the median."""
        live = self.absmax if self.attended else np.where(self.mask, self.absmax, np.nan)
        med = float(np.nanmedian(live))
        flat = [(float(live[i, j]), i, j) for i in range(live.shape[0]) for j in range(live.shape[1])
                if np.isfinite(live[i, j])]
        flat.sort(reverse=True)
        return {"source": self.source, "prompts": len(self.prompts), "tokens_per_prompt": int(self.absmax.shape[1]),
                "median": med, "max_over_median": (flat[0][0] / med) if flat and med > 0 else None,
                "top": [{"prompt": i, "position": j, "token": self.tokens[i][j], "absmax": v} for v, i, j in flat[:top]],
                "by_position": [float(np.nanmax(c)) if np.isfinite(c).any() else None for c in live.T]}


@torch.no_grad()
def token_salience(bundle: ModelBundle, prompts: list[str]) -> TokenSalience:
    """s(X_p) of the tensor cross-attention k / v read, for each prompt and token position."""
    if not bundle.text_conditioned:
        raise ValueError(f"{bundle.name} is not a text-to-image model: it has no cross-attention to a prompt")
    from quant.conditioning import text_inputs

    ids = bundle.prompt_ids(prompts)
    model = bundle.denoiser
    emb, mask = text_inputs(model, torch.tensor(ids), bundle.dtype)
    source = "text encoder output"
    if bundle.family == "pixart" and model.caption_projection is not None:
        emb = model.caption_projection(emb)  # what every block's attn2.to_k / to_v read
        source = "caption_projection output"
    absmax = emb.abs().amax(dim=-1).float().cpu().numpy()
    tok = bundle.text.tokenizer(prompts, padding="max_length", max_length=bundle.text.max_length, truncation=True,
                                add_special_tokens=True)
    tokens = [bundle.text.tokenizer.convert_ids_to_tokens(row) for row in tok["input_ids"]]
    real = np.array(tok["attention_mask"], dtype=bool)
    return TokenSalience(prompts=list(prompts), tokens=tokens, absmax=absmax, mask=real,
                         attended=not bundle.text.use_mask, source=source)
