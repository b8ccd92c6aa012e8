"""Saving and loading quantized models: one safetensors file with weights stored at their bit-width.

Folder layout (what `dqlab quantize --out DIR` writes and `--model DIR` reads):
    quant_config.json   format tag, QuantConfig, transformer config, scheduler config, bundle metadata,
                        base source (provenance), and the shapes of the packed weights
    model.safetensors   every tensor of the quantized transformer; quantized weights as bit-packed integer
                        codes ("<layer>.weight.packed", `bits` bits per code) beside their per-channel
                        w_scale / w_zero, everything else (biases, embeddings, norms, activation ranges) fp32
    vae/                the base bundle's VAE when it has one (not quantized)
The folder is self-contained: loading it never needs the base model, whose weights may have changed since.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from quant.config import QuantConfig
from quant.modules import TimestepContext, act_quantizers, quant_layers
from quant.quantizers import is_off, pack_codes, qrange, quantize_codes, unpack_codes

FORMAT = "dqlab-quantized"
VERSION = 1
WEIGHTS = "model.safetensors"
META = "quant_config.json"


def stored_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors, packed): what save_quantized writes. Quantized weights become packed codes."""
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    packed = {}
    for name, layer in quant_layers(model).items():
        if is_off(layer.w_bits):
            continue
        key = f"{name}.weight"
        qmin, _ = qrange(layer.w_bits, layer.w_symmetric)
        codes = quantize_codes(layer.weight.detach(), layer.w_scale, layer.w_zero, layer.w_bits, layer.w_symmetric)
        tensors[key + ".packed"] = pack_codes(codes - qmin, layer.w_bits)
        del tensors[key]
        packed[key] = {"shape": list(layer.weight.shape), "bits": layer.w_bits, "symmetric": layer.w_symmetric}
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, packed


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every stored tensor of the model at its bit-width (= the size of model.safetensors' data)."""
    tensors, _ = stored_tensors(model)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def fp_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers in their own dtype (the FP reference)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _bundle_meta(bundle) -> dict:
    return {"name": bundle.name, "num_classes": bundle.num_classes, "latent_shape": list(bundle.latent_shape),
            "vae_scale_factor": bundle.vae_scale_factor, "default_guidance": bundle.default_guidance,
            "bundled": bundle.bundled}


def save_quantized(bundle_or_model, config: QuantConfig, folder, base_source: str | None = None) -> Path:
    """Write a quantized bundle (or a quantized transformer plus `base_source` for the rest) to `folder`."""
    from analysis.models import ModelBundle, load

    config.validate()
    if isinstance(bundle_or_model, ModelBundle):
        bundle = bundle_or_model
    elif isinstance(bundle_or_model, nn.Module):
        if base_source is None:
            raise ValueError("saving a bare quantized transformer needs base_source (the FP model it came from) "
                             "for its scheduler and VAE; or pass a ModelBundle")
        bundle = load(base_source, device="cpu").with_transformer(bundle_or_model)
    else:
        raise ValueError(f"expected a ModelBundle or an nn.Module, got {type(bundle_or_model).__name__}")
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    transformer = bundle.transformer
    tensors, packed = stored_tensors(transformer)
    save_file(tensors, str(folder / WEIGHTS))
    taq = [q.timesteps.tolist() for q in act_quantizers(transformer).values() if q.per_timestep]
    meta = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "base_source": base_source,
            "transformer_class": type(transformer).__name__,
            "transformer_config": json.loads(json.dumps({k: v for k, v in dict(transformer.config).items()
                                                         if k != "_name_or_path"}, default=str)),
            "scheduler_config": bundle.scheduler_config, "bundle": _bundle_meta(bundle), "packed": packed,
            "tpq_timesteps": taq[0] if taq else None,
            "weight_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    (folder / META).write_text(json.dumps(meta, indent=2, default=str))
    if bundle.vae is not None:
        bundle.vae.save_pretrained(folder / "vae", safe_serialization=True)
    return folder


def load_quantized(folder):
    """Rebuild a saved quantized bundle (on the CPU, float32). Raises ModelLoadError naming what is wrong."""
    from analysis.models import ModelBundle, ModelLoadError

    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {folder / META}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{folder / META} is not a dqlab quantized model (format {meta.get('format')!r})")
    if not (folder / WEIGHTS).exists():
        raise ModelLoadError(f"{folder} has no {WEIGHTS}; save it again with dqlab quantize --out")
    try:
        config = QuantConfig.from_dict(meta["config"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"bad quantization config in {folder / META}: {exc}") from None
    from diffusers import AutoencoderKL, DiTTransformer2DModel
    from safetensors.torch import load_file

    transformer = DiTTransformer2DModel.from_config(meta["transformer_config"])
    from quant.methods import get_method
    from quant.wrap import wrap_model

    if get_method(config.method).QUANTIZES:
        wrap_model(transformer, config, TimestepContext())
    tensors = load_file(str(folder / WEIGHTS))
    for key, info in meta.get("packed", {}).items():
        prefix = key[: -len(".weight")]
        qmin, _ = qrange(info["bits"], info["symmetric"])
        numel = math.prod(info["shape"])
        codes = unpack_codes(tensors.pop(key + ".packed"), info["bits"], numel).reshape(info["shape"]) + qmin
        scale, zero = tensors[prefix + ".w_scale"], tensors[prefix + ".w_zero"]
        tensors[key] = ((codes.float() - zero) * scale).float()
    try:
        transformer.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{folder / WEIGHTS} does not match its config: {str(exc).splitlines()[0]}") from None
    for q in act_quantizers(transformer).values():
        q.mode = "quant"
    vae = None
    if (folder / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
    b = meta["bundle"]
    name = b["name"] if config.label in b["name"] else f"{b['name']} [{config.label}]"
    return ModelBundle(name=name, transformer=transformer.eval().requires_grad_(False),
                       scheduler_config=meta["scheduler_config"], num_classes=b["num_classes"],
                       latent_shape=tuple(b["latent_shape"]), vae=vae, vae_scale_factor=b["vae_scale_factor"],
                       default_guidance=b["default_guidance"], bundled=b["bundled"],
                       quant_config=config.to_dict())
