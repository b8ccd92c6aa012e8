"""A quantized model bundle on disk: what `dqlab quantize --out DIR` writes and `--model DIR` reads.

Folder layout:
    quant_config.json   quant.io's record (format tag, QuantConfig, model class and config, packed weight
                        shapes) plus the scheduler config, the bundle's sampling metadata, the base
                        source it was made from and its recipe (analysis.quantization.recipe: source, config and
                        calibration, which rebuild it)
    model.safetensors   the quantized denoiser (quant.io: low-bit weights bit-packed)
    vae/                the base bundle's VAE when it has one (not quantized)
    text_encoder/, tokenizer/   a text-to-image model's FP text encoder and tokenizer (not quantized)
The folder is self-contained: loading it never needs the base model, whose weights may have changed since.
"""
from __future__ import annotations

from pathlib import Path

from analysis.models.bundle import ModelBundle, ModelLoadError
from quant.config import QuantConfig
from quant.io import QuantizedFolderError, read_quantized, write_quantized


def _bundle_meta(bundle: ModelBundle) -> dict:
    meta = {"name": bundle.name, "num_classes": bundle.num_classes, "latent_shape": list(bundle.latent_shape),
            "vae_scale_factor": bundle.vae_scale_factor, "default_guidance": bundle.default_guidance,
            "eval_guidance": bundle.eval_guidance, "bundled": bundle.bundled}
    if bundle.text is not None:
        meta["text"] = {"kind": bundle.text.kind, "max_length": bundle.text.max_length,
                        "use_mask": bundle.text.use_mask, "negative_prompt": bundle.negative_prompt}
    return meta


def save_quantized(bundle: ModelBundle, config: QuantConfig, folder, base_source: str | None = None,
                   recipe=None) -> Path:
    """Write a quantized bundle to `folder`, with the FP source it came from and the
    analysis.quantization.recipe.Recipe that made it when there is one (read_recipe reads it back)."""
    if not isinstance(bundle, ModelBundle):
        raise ValueError(f"expected a ModelBundle, got {type(bundle).__name__}; wrap a quantized denoiser with "
                         "fp_bundle.with_denoiser(model)")
    folder = write_quantized(bundle.denoiser, config, folder,
                             meta={"base_source": base_source, "scheduler_config": bundle.scheduler_config,
                                   "bundle": _bundle_meta(bundle),
                                   "recipe": recipe.to_dict() if recipe is not None else None})
    if bundle.vae is not None:
        bundle.vae.save_pretrained(folder / "vae", safe_serialization=True)
    if bundle.text is not None:
        bundle.text.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        bundle.text.tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def load_quantized(folder) -> ModelBundle:
    """Rebuild a saved quantized bundle (on the CPU, float32). Raises ModelLoadError naming what is wrong."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    try:
        denoiser, config, meta = read_quantized(folder)
    except QuantizedFolderError as exc:
        raise ModelLoadError(str(exc)) from None
    vae = None
    if (folder / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
    b = meta["bundle"]
    name = b["name"] if config.label in b["name"] else f"{b['name']} [{config.label}]"
    text, negative = _load_text(folder, b.get("text"))
    return ModelBundle(name=name, denoiser=denoiser, scheduler_config=meta["scheduler_config"],
                       num_classes=b["num_classes"], latent_shape=tuple(b["latent_shape"]), vae=vae,
                       vae_scale_factor=b["vae_scale_factor"], default_guidance=b["default_guidance"],
                       eval_guidance=b.get("eval_guidance", b["default_guidance"]), bundled=b["bundled"],
                       quant_config=config.to_dict(), text=text, negative_prompt=negative)


def _load_text(folder: Path, info: dict | None):
    """(TextEncoder, negative prompt) of a saved text-to-image model, (None, "") for other models."""
    if info is None:
        return None, ""
    from analysis.models.prompts import TextEncoder, check_prompt
    from analysis.models.text_encoders import MAX_TOKENS, load_text_encoder, load_tokenizer

    if not isinstance(info, dict) or info.get("kind") not in ("t5", "clip") or \
            not isinstance(info.get("max_length"), int) or not 1 <= info["max_length"] <= MAX_TOKENS:
        raise ModelLoadError(f"{folder / 'quant_config.json'}: bad text encoder record {str(info)[:200]}")
    encoder, kind = load_text_encoder(folder / "text_encoder")
    tokenizer = load_tokenizer(folder / "tokenizer")
    text = TextEncoder.build(tokenizer, encoder.eval().requires_grad_(False), info["max_length"],
                             bool(info.get("use_mask")), kind)
    try:
        negative = check_prompt(info.get("negative_prompt") or "", "negative prompt")
    except ValueError as exc:
        raise ModelLoadError(f"{folder / 'quant_config.json'}: {exc}") from None
    return text, negative
