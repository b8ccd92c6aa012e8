"""Saving and loading a quantized model: one safetensors file with weights stored at their bit-width.

This module knows modules and tensors only. It writes and reads two files of a folder:
    quant_config.json   format tag, QuantConfig, the model's class and config, the shapes of the packed
                        weights, and whatever metadata the caller adds (analysis.models.saved adds the
                        scheduler config, the bundle's sampling metadata and the base source)
    model.safetensors   every tensor of the quantized model; quantized weights as bit-packed codes
                        ("<layer>.weight.packed", `bits` bits per code: integer codes, or an FP element's
                        bit pattern) beside their scales, everything else (biases, embeddings, norms,
                        activation ranges) fp32

Scales are stored as the format holds them, so the file's size is the real size: per channel / per tensor
fp32 (with an int grid's zero points), block scales of MX formats as one E8M0 byte (the exponent + 127), of
NVFP4 as one FP8 E4M3 byte (its bit pattern) plus the fp32 tensor scale, of int groups as fp16 with one uint8
zero point per block (none when symmetric). An FP grid has no zero point and stores none.
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
from quant.formats import element_codes, element_values, round_to_element
from quant.quantizers import is_off, pack_codes, qrange, unpack_codes

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
        tensors[key + ".packed"] = pack_codes(layer.weight_codes(), layer.w_bits)
        del tensors[key]
        packed[key] = {"shape": list(layer.weight.shape), "bits": layer.w_bits, "symmetric": layer.w_symmetric}
        fmt = layer.w_fmt
        if fmt.is_float or fmt.blocked:
            packed[key].update(element=fmt.element, group=fmt.group, block_scale=fmt.block_scale)
            stored_as = fmt.block_scale if fmt.blocked else "fp32"
            tensors[f"{name}.w_scale"] = _encode_scale(layer.w_scale.detach(), stored_as)
            if fmt.is_float or layer.w_symmetric:
                del tensors[f"{name}.w_zero"]  # all zeros
            elif fmt.blocked:
                tensors[f"{name}.w_zero"] = layer.w_zero.detach().to(torch.uint8)
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, packed


def _encode_scale(s: torch.Tensor, scale_format: str) -> torch.Tensor:
    """A scale tensor in its storage format: E8M0 as the biased exponent byte, E4M3 as its bit pattern."""
    if scale_format == "e8m0":
        _, exp = torch.frexp(s.float())
        return (exp - 1 + 127).to(torch.uint8)
    if scale_format == "e4m3":
        return element_codes(round_to_element(s.float(), "fp8_e4m3"), "fp8_e4m3").to(torch.uint8)
    if scale_format == "fp16":
        return s.half()
    return s.float()


def _decode_scale(s: torch.Tensor, scale_format: str) -> torch.Tensor:
    if scale_format == "e8m0":
        return torch.ldexp(torch.ones(s.shape), s.to(torch.int32) - 127)
    if scale_format == "e4m3":
        return element_values(s.to(torch.int64), "fp8_e4m3")
    return s.float()


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
    modules = dict(model.named_modules())
    for key, info in meta.get("packed", {}).items():
        prefix = key[: -len(".weight")]
        numel = math.prod(info["shape"])
        codes = unpack_codes(tensors.pop(key + ".packed"), info["bits"], numel).reshape(info["shape"])
        if "element" not in info:  # an int grid per channel / per tensor (and every folder saved before formats)
            qmin, _ = qrange(info["bits"], info["symmetric"])
            scale, zero = tensors[prefix + ".w_scale"], tensors[prefix + ".w_zero"]
            tensors[key] = ((codes + qmin).float() - zero) * scale
            continue
        layer = modules.get(prefix)
        if layer is None or not hasattr(layer, "w_fmt") or layer.w_fmt.element != info["element"]:
            raise QuantizedFolderError(f"{folder / META}: {key} is stored as {info['element']} but the config "
                                       "quantizes that layer otherwise")
        scale = _decode_scale(tensors[prefix + ".w_scale"], info["block_scale"] if info["group"] else "fp32")
        zero = tensors[prefix + ".w_zero"].float() if prefix + ".w_zero" in tensors else torch.zeros_like(scale)
        tensors[prefix + ".w_scale"], tensors[prefix + ".w_zero"] = scale, zero
        layer.w_scale, layer.w_zero = scale.reshape(layer.w_scale.shape), zero.reshape(layer.w_zero.shape)
        if prefix + ".w_tscale" in tensors:
            layer.w_tscale = tensors[prefix + ".w_tscale"].float().reshape(layer.w_tscale.shape)
        s, z = layer.weight_qparams()
        if layer.w_fmt.is_float:
            tensors[key] = element_values(codes, info["element"]).reshape(info["shape"]) * s
        else:
            qmin, _ = qrange(info["bits"], info["symmetric"])
            tensors[key] = ((codes + qmin).float() - z) * s
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise QuantizedFolderError(f"{folder / WEIGHTS} does not match its config: {str(exc).splitlines()[0]}") from None
    return model.eval().requires_grad_(False), config, meta
