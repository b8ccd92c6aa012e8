"""Text conditioning as integer ids: a text-to-image denoiser reads its prompts' embeddings from a table.

Everything in the engine passes a batch as (x, t, y) with y one integer per row: a class label for a DiT or a
class-conditional UNet. For a text-to-image denoiser (PixArt, Stable Diffusion) y is a row of a PromptTable,
the text encoder's output for one prompt, computed once (analysis.models.prompts encodes, this module only stores).
So calibration data, the reconstruction stream and the sampler's recorded inputs hold one integer per row,
never a [tokens, width] embedding per row (PixArt-sigma's T5 context is 300 x 4096 floats: 4.9 MB a row).

The table is append-only and keyed by the prompt's text, so an id never changes meaning: one table serves
every copy of a model (a quantized copy shares its FP model's table, copy.deepcopy keeps it shared) and every
user of a shared model (the app's cached one), whoever adds prompts to it.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn as nn

ATTRIBUTE = "_dqlab_prompts"
MAX_PROMPTS = 4096  # rows a table holds (PixArt-sigma at bfloat16: 2.4 MB a row)


class PromptTable:
    """Embeddings [tokens, width] and token masks [tokens] of prompts, one row per distinct prompt text."""

    def __init__(self, tokens: int, width: int, capacity: int = MAX_PROMPTS):
        self.tokens, self.width, self.capacity = int(tokens), int(width), int(capacity)
        self._ids: dict[str, int] = {}
        self._texts: list[str] = []
        self._emb: list[torch.Tensor] = []
        self._mask: list[torch.Tensor] = []
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lock = threading.Lock()
        self._local = threading.local()  # the ids of the forward running in this thread (for observers)

    def __len__(self) -> int:
        return len(self._emb)

    def __deepcopy__(self, memo) -> "PromptTable":
        return self  # shared by design: ids keep their meaning in every copy of the model

    def id_of(self, prompt: str) -> int | None:
        return self._ids.get(prompt)

    def prompt(self, row: int) -> str:
        """The text of row `row` (ValueError for an id the table does not hold)."""
        if not 0 <= int(row) < len(self._texts):
            raise ValueError(f"prompt id {row} is not in this model's prompt table ({len(self._texts)} prompts)")
        return self._texts[int(row)]

    def missing(self, prompts) -> list[str]:
        """The prompts (distinct, in order) that have no row yet."""
        return [p for p in dict.fromkeys(prompts) if p not in self._ids]

    def add(self, prompt: str, embedding: torch.Tensor, mask: torch.Tensor) -> int:
        """Store one prompt's embedding [tokens, width] and mask [tokens]; returns its id (the existing one
        when the prompt is already stored)."""
        if tuple(embedding.shape) != (self.tokens, self.width) or tuple(mask.shape) != (self.tokens,):
            raise ValueError(f"prompt embedding of shape {tuple(embedding.shape)} / mask {tuple(mask.shape)}; this "
                             f"table holds [{self.tokens}, {self.width}] / [{self.tokens}]")
        with self._lock:
            if prompt in self._ids:
                return self._ids[prompt]
            if len(self._emb) >= self.capacity:
                raise ValueError(f"the prompt table is full ({self.capacity} prompts); load the model again to "
                                 "start a new one")
            self._emb.append(embedding.detach())
            self._mask.append(mask.detach().to(torch.bool))
            self._ids[prompt] = len(self._emb) - 1
            self._texts.append(prompt)
            self._stacked = None
            return self._ids[prompt]

    @contextlib.contextmanager
    def rows(self, ids: torch.Tensor):
        """While a forward runs: which prompt ids its rows carry (forward hooks read them, as they read a DiT's
        class_labels argument)."""
        saved = getattr(self._local, "ids", None)
        self._local.ids = ids
        try:
            yield
        finally:
            self._local.ids = saved

    def current(self) -> torch.Tensor | None:
        return getattr(self._local, "ids", None)

    def lookup(self, ids: torch.Tensor, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [B, tokens, width], masks [B, tokens]) of the rows `ids` [B]."""
        stacked = self._stacked
        if stacked is None:
            with self._lock:
                if not self._emb:
                    raise ValueError("no prompt has been encoded for this model")
                stacked = self._stacked = (torch.stack(self._emb), torch.stack(self._mask))
        emb, mask = stacked
        ids = ids.reshape(-1).long()
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(emb)):
            raise ValueError(f"prompt id {int(ids.max()) if int(ids.max()) >= len(emb) else int(ids.min())} is not "
                             f"in this model's prompt table ({len(emb)} prompts)")
        ids = ids.to(emb.device)
        return emb[ids].to(device=device, dtype=dtype), mask[ids].to(device=device)


def attach_prompts(model: nn.Module, table: PromptTable) -> nn.Module:
    """Give a text-conditioned denoiser the table its y ids index (at load time; copies share it)."""
    object.__setattr__(model, ATTRIBUTE, table)
    return model


def prompt_table(model: nn.Module) -> PromptTable:
    table = getattr(model, ATTRIBUTE, None)
    if table is None:
        raise ValueError(f"this {type(model).__name__} has no prompt table: load it with analysis.models.load, or "
                         "give it one with quant.conditioning.attach_prompts")
    return table


def current_prompt_ids(model: nn.Module) -> torch.Tensor | None:
    """The prompt ids of the forward `model` is running in this thread (None for other models)."""
    table = getattr(model, ATTRIBUTE, None)
    return table.current() if table is not None else None


def text_inputs(model: nn.Module, y: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [B, tokens, width], mask [B, tokens]) of the rows' prompt ids, on the model's device."""
    p = next(model.parameters())
    return prompt_table(model).lookup(y, device=p.device, dtype=dtype)
