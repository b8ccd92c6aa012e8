"""CLIP score (Hessel et al. 2021, as torchmetrics computes it): 100 * max(cos(image embedding, text embedding), 0),
averaged over (image, prompt) pairs, with a CLIP model found locally. Never downloaded at evaluation time: the
model comes from a folder (--clip-model PATH or $DQLAB_CLIP_MODEL) with safetensors weights, e.g. a copy of
openai/clip-vit-large-patch14 made where the hub is reachable. Without one, the evaluation says so and goes on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

ENV = "DQLAB_CLIP_MODEL"
# CLIP's input normalisation (Radford et al. 2021, the released preprocessing)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
MISSING = (f"CLIP score needs a local CLIP model: pass --clip-model PATH (or set ${ENV}) to a folder holding a "
           "transformers CLIPModel with safetensors weights and its tokenizer; none is downloaded at evaluation time")


def clip_model_path(path: str | os.PathLike | None = None) -> Path | None:
    """The CLIP folder to use: the argument, else $DQLAB_CLIP_MODEL, else None. A named folder that is not a
    CLIP model is an error (ValueError naming what is missing)."""
    path = path or os.environ.get(ENV) or None
    if path is None:
        return None
    folder = Path(path).expanduser()
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ValueError(f"CLIP model folder {folder} has no config.json; {MISSING}")
    if "CLIPModel" not in (json.loads(cfg.read_text()).get("architectures") or []):
        raise ValueError(f"{cfg} does not describe a CLIPModel; {MISSING}")
    if not list(folder.glob("*.safetensors")):
        raise ValueError(f"CLIP model folder {folder} has no .safetensors weights; weights load from safetensors only")
    return folder


def load_clip(folder: Path, device="cpu"):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    return model.requires_grad_(False), tokenizer


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], folder: Path, device="cpu", batch_size: int = 64) -> float:
    """Mean CLIP score of images [N, 3, H, W] in [0, 1] against their prompts."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    model, tokenizer = load_clip(folder, device)
    size = model.config.vision_config.image_size
    mean = torch.tensor(MEAN, device=device)[:, None, None]
    std = torch.tensor(STD, device=device)[:, None, None]
    scores = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float().to(device)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        img = model.get_image_features(pixel_values=(x - mean) / std)
        tok = tokenizer(prompts[i:i + batch_size], padding=True, truncation=True,
                        max_length=model.config.text_config.max_position_embeddings, return_tensors="pt").to(device)
        txt = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        img, txt = (getattr(v, "pooler_output", v) for v in (img, txt))
        cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
        scores.append(100 * cos.clamp_min(0))
    return float(torch.cat(scores).mean())
