"""Prompts for text-to-image models: the bundled prompt sets, prompt files, and the text encoder that turns a
prompt into the embedding the denoiser attends to, once per prompt.

    read_prompt_set("calibration")     64 prompts written for calibrating (ViDiT-Q calibrates PixArt on 64)
    read_prompt_set("evaluation")      32 other prompts, for evaluations (never the calibration ones)
    read_prompts_file("my.txt")        one prompt a line; blank lines and lines starting with # are skipped
    encoder.ids(["a red car", ""])     row ids in the denoiser's prompt table (quant.conditioning), encoding
                                       only prompts not seen before

The text encoder (T5 for PixArt, CLIP for Stable Diffusion) and the VAE stay in the model's FP precision and
are never quantized: the lab quantizes the denoiser, which is where the compute of sampling is.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from analysis.models.resources import asset_path
from quant.conditioning import PromptTable

PROMPT_SETS = ("calibration", "evaluation")
MAX_PROMPT_CHARS = 2000  # one prompt (T5 and CLIP truncate long before)
MAX_PROMPTS_FILE_BYTES = 1 << 20  # a prompt file
MAX_FILE_PROMPTS = 4096
NEGATIVE_DEFAULT = ""  # the empty prompt: classifier-free guidance's unconditional branch, as the pipelines do
ENCODE_BATCH = 16


def check_prompt(prompt: str, what: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"{what} must be text, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"{what} has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    if "\x00" in prompt:
        raise ValueError(f"{what} holds a NUL character")
    return prompt


def parse_prompts(text: str, source: str = "prompts") -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{source} holds no prompt (one a line; lines starting with # are comments)")
    if len(prompts) > MAX_FILE_PROMPTS:
        raise ValueError(f"{source} holds {len(prompts)} prompts; at most {MAX_FILE_PROMPTS} are accepted")
    return [check_prompt(p, f"line {i + 1} of {source}") for i, p in enumerate(prompts)]


def read_prompts_file(path) -> list[str]:
    """The prompts of a UTF-8 text file, one a line (size bounded before reading)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist; give a text file with one prompt a line")
    size = path.stat().st_size
    if size > MAX_PROMPTS_FILE_BYTES:
        raise ValueError(f"prompt file {path} is {size} bytes; at most {MAX_PROMPTS_FILE_BYTES} are read")
    try:
        text = path.read_bytes()[:MAX_PROMPTS_FILE_BYTES].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_prompts(text, str(path))


def read_prompt_set(name: str) -> list[str]:
    """A bundled prompt set: 'calibration' or 'evaluation'."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; the lab ships {', '.join(PROMPT_SETS)}")
    return parse_prompts(asset_path("prompts", f"{name}.txt").read_text(encoding="utf-8"), f"prompt set {name}")


def cycle(prompts: list[str], n: int) -> list[str]:
    """n prompts: prompt i mod len(prompts) for image i (as classes cycle for a class-conditional model)."""
    if not prompts:
        raise ValueError("no prompts given")
    return [prompts[i % len(prompts)] for i in range(n)]


@dataclasses.dataclass
class TextEncoder:
    """A pipeline's tokenizer and text encoder (FP, never quantized) and the table of prompts it encoded.

    max_length: tokens per prompt (PixArt-sigma 300, PixArt-alpha 120, Stable Diffusion's CLIP 77), padded.
    use_mask: whether the denoiser is given the token mask (PixArt: yes; Stable Diffusion attends to all 77).
    """

    tokenizer: object
    model: torch.nn.Module
    max_length: int
    use_mask: bool
    table: PromptTable
    kind: str  # "t5" or "clip"

    @classmethod
    def build(cls, tokenizer, model: torch.nn.Module, max_length: int, use_mask: bool, kind: str) -> "TextEncoder":
        width = model.config.d_model if kind == "t5" else model.config.hidden_size
        return cls(tokenizer, model, int(max_length), use_mask, PromptTable(max_length, width), kind)

    def ids(self, prompts, on_encode=None) -> list[int]:
        """The table rows of `prompts`, encoding (in batches) only those the table does not hold yet."""
        prompts = [check_prompt(p) for p in prompts]
        todo = self.table.missing(prompts)
        for i in range(0, len(todo), ENCODE_BATCH):
            chunk = todo[i:i + ENCODE_BATCH]
            emb, mask = self.encode(chunk)
            for prompt, e, m in zip(chunk, emb, mask):
                self.table.add(prompt, e, m)
            if on_encode is not None:
                on_encode(min(i + ENCODE_BATCH, len(todo)), len(todo))
        return [self.table.id_of(p) for p in prompts]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [P, max_length, width], masks [P, max_length]) as the diffusers pipelines compute them:
        padded to max_length and truncated; PixArt passes the mask to T5 and to the denoiser; Stable Diffusion
        runs CLIP over all 77 positions unless its config asks for a mask."""
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        p = next(self.model.parameters())
        ids, mask = tok.input_ids.to(p.device), tok.attention_mask.to(p.device)
        pass_mask = self.kind == "t5" or getattr(self.model.config, "use_attention_mask", False)
        out = self.model(ids, attention_mask=mask if pass_mask else None)[0]
        keep = mask if self.use_mask else torch.ones_like(mask)
        return out, keep.bool()

    def to(self, device=None, dtype=None) -> "TextEncoder":
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kwargs:
            self.model.to(**kwargs)
        return self
