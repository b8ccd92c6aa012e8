"""A quantized model bundle on disk: what `dqlab quantize --out DIR` writes and `--model DIR` reads.

Folder layout:
    quant_config.json   quant.io's record (format tag, QuantConfig, model class and config, packed weight
                        shapes) plus the scheduler config, the bundle's sampling metadata, the base
                        source it was made from and its recipe (analysis.quantization.recipe: source, config and
                        calibration, which rebuild it)
    model.safetensors   the quantized denoiser (quant.io: low-bit weights bit-packed)
    vae/                the base bundle's VAE when it has one (not quantized)
The folder is self-contained: loading it never needs the base model, whose weights may have changed since.
"""
from __future__ import annotations

from pathlib import Path

from analysis.models.bundle import ModelBundle, ModelLoadError
from quant.config import QuantConfig
from quant.io import QuantizedFolderError, read_quantized, write_quantized


def _bundle_meta(bundle: ModelBundle) -> dict:
    return {"name": bundle.name, "num_classes": bundle.num_classes, "latent_shape": list(bundle.latent_shape),
            "vae_scale_factor": bundle.vae_scale_factor, "default_guidance": bundle.default_guidance,
            "eval_guidance": bundle.eval_guidance, "bundled": bundle.bundled}


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
    return ModelBundle(name=name, denoiser=denoiser, scheduler_config=meta["scheduler_config"],
                       num_classes=b["num_classes"], latent_shape=tuple(b["latent_shape"]), vae=vae,
                       vae_scale_factor=b["vae_scale_factor"], default_guidance=b["default_guidance"],
                       eval_guidance=b.get("eval_guidance", b["default_guidance"]), bundled=b["bundled"],
                       quant_config=config.to_dict())
