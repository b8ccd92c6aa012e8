"""Loading a text-to-image pipeline's tokenizer and text encoder: transformers classes named in an allow-list,
safetensors weights only, no remote code, folders bounded in size before reading (analysis.models.loading and
analysis.models.saved both read them)."""
from __future__ import annotations

import json
from pathlib import Path

from analysis.models.bundle import ModelLoadError

TEXT_ENCODERS = {"T5EncoderModel": "t5", "CLIPTextModel": "clip"}  # classes loaded, by the config's architectures
MAX_TOKENS = 512
MAX_TOKENIZER_BYTES = 64 << 20  # a tokenizer folder (T5's spiece.model is 0.8 MB, CLIP's vocab + merges 2 MB)
# Sizes a text encoder's config may give, checked before anything is allocated (T5-XXL: d_model 4096, d_ff 10240,
# 24 layers, 64 heads, vocabulary 32128; CLIP ViT-L/14's text tower: width 768, 12 layers, 77 positions).
CONFIG_BOUNDS = {"vocab_size": (1, 1 << 20), "d_model": (1, 1 << 14), "d_kv": (1, 1 << 12), "d_ff": (1, 1 << 16),
                 "num_layers": (1, 256), "num_heads": (1, 1024), "hidden_size": (1, 1 << 14),
                 "intermediate_size": (1, 1 << 16), "num_hidden_layers": (1, 256), "num_attention_heads": (1, 1024),
                 "max_position_embeddings": (1, 1 << 16)}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def safetensors_only(part: Path, what: str) -> None:
    if not (part / "config.json").exists():
        raise ModelLoadError(f"{part} is missing: a text-to-image pipeline folder needs its {what} "
                             f"({part.name}/config.json and safetensors weights)")
    if not list(part.glob("*.safetensors")):
        raise ModelLoadError(f"{part} has no .safetensors weights; this project loads safetensors only "
                             "(convert .bin weights with save_pretrained(safe_serialization=True))")


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is missing: a text-to-image pipeline folder needs its tokenizer")
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    if size > MAX_TOKENIZER_BYTES:
        raise ModelLoadError(f"{folder} holds {size} bytes; a tokenizer folder is read only up to "
                             f"{MAX_TOKENIZER_BYTES} bytes")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers raises several types for malformed or unsupported folders
        raise ModelLoadError(f"could not load the tokenizer in {folder}: {str(exc).splitlines()[0][:300]} (T5's "
                             "spiece.model needs the sentencepiece package; a tokenizer.json needs nothing more)") from None


def load_text_encoder(folder: Path):
    import transformers

    safetensors_only(folder, "text encoder")
    from quant import guards

    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{folder / 'config.json'} must hold an object")
    for key, (low, high) in CONFIG_BOUNDS.items():
        if key in config:
            try:
                guards.check_int(config[key], key, str(folder / "config.json"), low, high)
            except guards.UntrustedFileError as exc:
                raise ModelLoadError(str(exc)) from None
    archs = config.get("architectures") or []
    cls = next((a for a in archs if a in TEXT_ENCODERS), None)
    if cls is None:
        raise ModelLoadError(f"{folder / 'config.json'} describes a {', '.join(archs) or 'model without architectures'}; "
                             f"this lab loads text encoders {', '.join(TEXT_ENCODERS)}")
    try:
        model = getattr(transformers, cls).from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not load the text encoder in {folder}: {str(exc).splitlines()[0][:300]}") from None
    return model, TEXT_ENCODERS[cls]


