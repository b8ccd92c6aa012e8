"""Saving and loading a quantized model: one safetensors file with weights stored at their bit-width.

This module knows modules and tensors only. It writes and reads two files of a folder:
    quant_config.json   format tag, QuantConfig, the model's class and config, the shapes of the packed
                        weights, and whatever metadata the caller adds (analysis.models.saved adds the
                        scheduler config, the bundle's sampling metadata and the base source)
    model.safetensors   every tensor of the quantized model; quantized weights as bit-packed integer
                        codes ("<layer>.weight.packed", `bits` bits per code) beside their per-channel
                        w_scale / w_zero, everything else (biases, embeddings, norms, activation ranges) fp32
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from quant.config import QuantConfig
from quant.denoiser import CLASS_FAMILIES
from quant.modules import act_quantizers, quant_layers
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


# Model classes a saved folder may name: diffusers classes only, looked up by name (no code is loaded from
# the folder itself).
MODEL_CLASSES = tuple(CLASS_FAMILIES)


class QuantizedFolderError(ValueError):
    """A folder is not a readable quantized model; the message names the file and what is wrong."""


def write_quantized(model: nn.Module, config: QuantConfig, folder, meta: dict | None = None) -> Path:
    """Write `model` (a quantized copy made by quant.quantize) to `folder`, with `meta` merged into its JSON."""
    from safetensors.torch import save_file

    if type(model).__name__ not in MODEL_CLASSES:
        raise ValueError(f"cannot save a {type(model).__name__}; supported: {', '.join(MODEL_CLASSES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, packed = stored_tensors(model)
    save_file(tensors, str(folder / WEIGHTS))
    taq = [q.timesteps.tolist() for q in act_quantizers(model).values() if q.per_timestep]
    record = {"format": FORMAT, "version": VERSION, "config": config.to_dict(),
              "transformer_class": type(model).__name__,
              "transformer_config": json.loads(json.dumps({k: v for k, v in dict(model.config).items()
                                                           if k != "_name_or_path"}, default=str)),
              "packed": packed, "tpq_timesteps": taq[0] if taq else None,
              "weight_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    record.update(meta or {})
    (folder / META).write_text(json.dumps(record, indent=2, default=str))
    return folder


def read_meta(folder) -> dict:
    """The folder's quant_config.json, checked to be ours. Raises QuantizedFolderError."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantizedFolderError(f"cannot read {folder / META}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise QuantizedFolderError(f"{folder / META} is not a dqlab quantized model (format {fmt!r})")
    return meta


def read_quantized(folder) -> tuple[nn.Module, QuantConfig, dict]:
    """(model, config, meta) rebuilt from a folder written by write_quantized, on the CPU in float32."""
    import diffusers
    from safetensors.torch import load_file

    from quant.methods import get_method
    from quant.wrap import wrap_model

    folder = Path(folder)
    meta = read_meta(folder)
    if not (folder / WEIGHTS).exists():
        raise QuantizedFolderError(f"{folder} has no {WEIGHTS}; save it again with dqlab quantize --out")
    try:
        config = QuantConfig.from_dict(meta["config"])
    except (KeyError, ValueError, TypeError) as exc:
        raise QuantizedFolderError(f"bad quantization config in {folder / META}: {exc}") from None
    cls_name = meta.get("transformer_class", "DiTTransformer2DModel")
    if cls_name not in MODEL_CLASSES:
        raise QuantizedFolderError(f"{folder / META} names model class {cls_name!r}; supported: "
                                   f"{', '.join(MODEL_CLASSES)}")
    model = getattr(diffusers, cls_name).from_config(meta["transformer_config"])
    if get_method(config.method).quantizes:
        wrap_model(model, config)
    tensors = load_file(str(folder / WEIGHTS))
    for key, info in meta.get("packed", {}).items():
        prefix = key[: -len(".weight")]
        qmin, _ = qrange(info["bits"], info["symmetric"])
        numel = math.prod(info["shape"])
        codes = unpack_codes(tensors.pop(key + ".packed"), info["bits"], numel).reshape(info["shape"]) + qmin
        scale, zero = tensors[prefix + ".w_scale"], tensors[prefix + ".w_zero"]
        tensors[key] = ((codes.float() - zero) * scale).float()
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise QuantizedFolderError(f"{folder / WEIGHTS} does not match its config: {str(exc).splitlines()[0]}") from None
    return model.eval().requires_grad_(False), config, meta
