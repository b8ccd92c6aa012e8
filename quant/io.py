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

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from quant.config import QuantConfig
from quant.denoiser import CLASS_FAMILIES
from quant.guards import (FLOAT_DTYPES, TORCH_TO_SAFETENSORS, UntrustedFileError, check_parameter_count, check_sizes,
                          is_int, read_json, safetensors_header, write_text_atomic)
from quant.modules import act_quantizers, quant_layers
from quant.formats import element_codes, element_values, round_to_element
from quant.quantizers import is_off, pack_codes, qrange, unpack_codes

FORMAT = "dqlab-quantized"
VERSION = 2  # 2: a checksum over the weights and the record
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
    """Write `model` (a quantized copy made by quant.quantize) to `folder`, with `meta` merged into its JSON and a
    checksum over the weights and every recorded field (read_quantized refuses a folder edited or damaged
    since). Callers that replace a folder write into a fresh one and rename it (quant.guards.atomic_folder)."""
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
    record.update(json.loads(json.dumps(meta or {}, default=str)))
    record["checksum"] = content_checksum(folder / WEIGHTS, record)
    write_text_atomic(folder / META, json.dumps(record, indent=2))
    return folder


def content_checksum(weights: Path, record: dict) -> str:
    """sha256 of the weight file's bytes and of the record (every field but the checksum, canonical JSON)."""
    h = hashlib.sha256()
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    h.update(json.dumps({k: v for k, v in record.items() if k != "checksum"}, sort_keys=True).encode())
    return h.hexdigest()


def read_meta(folder) -> dict:
    """The folder's quant_config.json, checked to be ours (size and depth bounded). Raises QuantizedFolderError."""
    folder = Path(folder)
    try:
        meta = read_json(folder / META)
    except UntrustedFileError as exc:
        raise QuantizedFolderError(str(exc)) from None
    if meta.get("format") != FORMAT:
        raise QuantizedFolderError(f"{folder / META} is not a dqlab quantized model (format {meta.get('format')!r})")
    if not is_int(meta.get("version")) or not 1 <= meta["version"] <= VERSION:
        raise QuantizedFolderError(f"{folder / META} has format version {meta.get('version')!r}; this lab reads "
                                   f"versions 1 to {VERSION}: save it again with dqlab quantize --out")
    return meta


def _fail(folder: Path, what: str) -> QuantizedFolderError:
    return QuantizedFolderError(f"{folder}: {what}; the folder is damaged or was edited: save it again with "
                                "dqlab quantize --out")


def read_quantized(folder) -> tuple[nn.Module, QuantConfig, dict]:
    """(model, config, meta) rebuilt from a folder written by write_quantized, on the CPU in float32.

    Nothing is trusted: the checksum (folders of version 2) is verified; the model config's sizes are bounded and
    the model counted on the meta device before it is built; the weight file's header is checked against the
    model the config builds (every key, shape and dtype, each packed tensor's bit count, symmetry and length)
    before any tensor is read; and every scale and zero point is checked to be finite, positive and on its
    integer grid. A folder that fails any check raises QuantizedFolderError naming the file and the tensor."""
    import diffusers
    from safetensors.torch import load_file

    from quant.wrap import wrap_model

    folder = Path(folder)
    meta = read_meta(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise QuantizedFolderError(f"{folder} has no {WEIGHTS}; save it again with dqlab quantize --out")
    if meta["version"] >= 2:
        if meta.get("checksum") != content_checksum(weights, meta):
            raise _fail(folder, f"its files do not match the checksum in {META}")
    for key, kind in (("config", dict), ("transformer_config", dict), ("packed", dict)):
        if not isinstance(meta.get(key), kind):
            raise _fail(folder, f"{META} has no {key} object")
    try:
        config = QuantConfig.from_dict(meta["config"])
    except (KeyError, ValueError, TypeError) as exc:
        raise QuantizedFolderError(f"bad quantization config in {folder / META}: {exc}") from None
    cls_name = meta.get("transformer_class", "DiTTransformer2DModel")
    if cls_name not in MODEL_CLASSES:
        raise QuantizedFolderError(f"{folder / META} names model class {cls_name!r}; supported: "
                                   f"{', '.join(MODEL_CLASSES)}")
    where = f"{folder / META} (transformer_config)"
    cls = getattr(diffusers, cls_name)
    try:
        check_sizes(meta["transformer_config"], where)
        check_parameter_count(lambda: cls.from_config(meta["transformer_config"]), where)
    except UntrustedFileError as exc:
        raise QuantizedFolderError(str(exc)) from None
    model = cls.from_config(meta["transformer_config"])
    if all(m.quantizes for m in config.methods):
        wrap_model(model, config)
    try:
        header = safetensors_header(weights)
    except UntrustedFileError as exc:
        raise QuantizedFolderError(str(exc)) from None
    _check_header(model, meta, header, folder)
    tensors = load_file(str(weights))
    layers = quant_layers(model)
    for key, info in meta["packed"].items():
        prefix = key[: -len(".weight")]
        layer = layers[prefix]
        qmin, _ = qrange(info["bits"], info["symmetric"])
        codes = unpack_codes(tensors.pop(key + ".packed"), info["bits"], math.prod(info["shape"]))
        if "element" in info:  # an FP element or a block format (quant.formats): scales in their own format
            tensors[key] = _decode_weight(layer, info, codes, tensors, prefix, folder)
            continue
        scale, zero = tensors[prefix + ".w_scale"], tensors[prefix + ".w_zero"]
        _check_grid(scale, zero, layer.w_bits, layer.w_symmetric, f"{prefix}.w_scale / w_zero", folder)
        tensors[key] = ((codes.reshape(info["shape"]) + qmin).float() - zero) * scale
    for name, q in act_quantizers(model).items():
        if q.enabled:
            _check_grid(tensors[name + ".scale"], tensors[name + ".zero"], q.bits, q.symmetric,
                        f"activation quantizer {name}", folder)
        elif not (bool((tensors[name + ".scale"] == 1).all()) and bool((tensors[name + ".zero"] == 0).all())):
            # a quantizer the config leaves off is never calibrated: parameters there mean the config was edited
            raise _fail(folder, f"activation quantizer {name} holds calibrated parameters but the config leaves "
                                "it in float")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _fail(folder, f"tensor {name} holds NaN or inf values")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise QuantizedFolderError(f"{folder / WEIGHTS} does not match its config: {str(exc).splitlines()[0]}") from None
    return model.eval().requires_grad_(False), config, meta


def _format_scale_dtypes(layers: dict) -> dict:
    """Scale and zero-point tensors a number format stores in its own dtype (None: not stored at all)."""
    out = {}
    for n, layer in layers.items():
        fmt = layer.w_fmt
        if not (fmt.is_float or fmt.blocked):
            continue
        block = fmt.block_scale if fmt.blocked else "fp32"
        if block in ("e8m0", "e4m3"):
            out[f"{n}.w_scale"] = "U8"
        elif block == "fp16":
            out[f"{n}.w_scale"] = "F16"
        out[f"{n}.w_zero"] = None if fmt.is_float or layer.w_symmetric else "U8"
    return out


def _check_header(model: nn.Module, meta: dict, header: dict, folder: Path) -> None:
    """The weight file's header against the model its config builds: the same keys; each packed weight with the
    bit count, symmetry and shape of its layer and exactly the bytes they need; every other tensor of its
    buffer's shape (a TPQ quantizer's as long as the recorded timesteps)."""
    layers = {n: m for n, m in quant_layers(model).items() if not is_off(m.w_bits)}
    packed = meta["packed"]
    expected_packed = {f"{n}.weight" for n in layers}
    if set(packed) != expected_packed:
        odd = sorted(set(packed) ^ expected_packed)
        raise _fail(folder, f"the packed weights listed in {META} ({len(packed)}) are not the {len(expected_packed)} "
                            f"layers its config quantizes (first difference: {odd[0]})")
    for key, info in packed.items():
        layer = layers[key[: -len(".weight")]]
        if not (isinstance(info, dict) and is_int(info.get("bits")) and isinstance(info.get("symmetric"), bool)
                and isinstance(info.get("shape"), list)):
            raise _fail(folder, f"the packed entry of {key} in {META} is malformed")
        if info["bits"] != layer.w_bits or info["symmetric"] != layer.w_symmetric:
            raise _fail(folder, f"{key} is stored at {info['bits']} bits ({'symmetric' if info['symmetric'] else 'asymmetric'}) "
                                f"but the config quantizes it at {layer.w_bits} bits "
                                f"({'symmetric' if layer.w_symmetric else 'asymmetric'})")
        if info["shape"] != list(layer.weight.shape):
            raise _fail(folder, f"{key} is recorded with shape {info['shape']}, the model has {list(layer.weight.shape)}")
    timesteps = meta.get("tpq_timesteps")
    if timesteps is not None and not (isinstance(timesteps, list) and 1 <= len(timesteps) <= 10_000
                                      and all(is_int(t) for t in timesteps)):
        raise _fail(folder, f"tpq_timesteps in {META} must be a list of integer timesteps")
    state = model.state_dict()
    stored_as = _format_scale_dtypes(layers)
    per_t = {n + "." + b for n, q in act_quantizers(model).items() if q.per_timestep for b in ("scale", "zero", "timesteps")}
    expected = {}
    for name, t in state.items():
        if name in expected_packed:
            info = packed[name]
            nbytes = (math.prod(info["shape"]) * info["bits"] + 7) // 8
            expected[name + ".packed"] = ("U8", (nbytes,))
        elif name in stored_as:
            if stored_as[name] is not None:
                expected[name] = (stored_as[name], tuple(t.shape))
        else:
            shape = (len(timesteps or [0]),) if name in per_t else tuple(t.shape)
            expected[name] = ("F" if t.is_floating_point() else TORCH_TO_SAFETENSORS[str(t.dtype)], shape)
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise _fail(folder, f"{WEIGHTS} does not match its config: "
                            + (f"missing {', '.join(missing[:3])}" if missing else "")
                            + ("; " if missing and unexpected else "")
                            + (f"unexpected {', '.join(unexpected[:3])}" if unexpected else ""))
    # a low-rank branch (quant.branches) is 16-bit by design; every other float tensor is in the model's one dtype
    branch = {n for n in expected if n.endswith((".lowrank.l1", ".lowrank.l2"))}
    floats = sorted({header[n][0] for n, (dtype, _) in expected.items() if dtype == "F" and n not in branch})
    if len(floats) > 1:  # write_quantized stores every float tensor in the model's one dtype
        odd = next(n for n, (dtype, _) in expected.items()
                   if dtype == "F" and n not in branch and header[n][0] != floats[0])
        raise _fail(folder, f"{WEIGHTS} mixes float dtypes ({', '.join(floats)}; e.g. {odd} is {header[odd][0]})")
    for name, (dtype, shape) in expected.items():
        f_dtype, f_shape = header[name]
        ok_dtype = f_dtype in FLOAT_DTYPES if dtype == "F" else f_dtype == dtype
        if f_shape != shape or not ok_dtype:
            raise _fail(folder, f"tensor {name} in {WEIGHTS} is {f_dtype} {list(f_shape)}, expected "
                                f"{'a float' if dtype == 'F' else dtype} {list(shape)}")


def _decode_weight(layer, info: dict, codes: torch.Tensor, tensors: dict, prefix: str, folder: Path) -> torch.Tensor:
    """A weight stored under a number format: its scales decoded (E8M0 / E4M3 bytes, fp16), checked, put back
    as the layer's fp32 buffers, and the codes turned into values with the layer's own per-element scale."""
    fmt = layer.w_fmt
    if fmt.element != info.get("element") or fmt.group != info.get("group"):
        raise _fail(folder, f"{prefix}.weight is stored as {info.get('element')} (group {info.get('group')}) but the "
                            f"config quantizes it as {fmt.describe()}")
    scale = _decode_scale(tensors[prefix + ".w_scale"], fmt.block_scale if fmt.blocked else "fp32")
    zero = tensors[prefix + ".w_zero"].float() if prefix + ".w_zero" in tensors else torch.zeros_like(scale)
    if not bool(torch.isfinite(scale).all()) or not bool((scale >= 0).all()):
        raise _fail(folder, f"{prefix}.w_scale: scales must be finite and >= 0")
    if not fmt.is_float:
        _check_grid(scale.clamp_min(torch.finfo(torch.float16).tiny), zero, layer.w_bits, layer.w_symmetric,
                    f"{prefix}.w_scale / w_zero", folder)
    tensors[prefix + ".w_scale"], tensors[prefix + ".w_zero"] = scale, zero
    layer.w_scale, layer.w_zero = scale.reshape(layer.w_scale.shape), zero.reshape(layer.w_zero.shape)
    if prefix + ".w_tscale" in tensors:
        layer.w_tscale = tensors[prefix + ".w_tscale"].float().reshape(layer.w_tscale.shape)
    s, z = layer.weight_qparams()
    codes = codes.reshape(info["shape"])
    if fmt.is_float:
        return element_values(codes, fmt.element) * s
    qmin, _ = qrange(info["bits"], info["symmetric"])
    return ((codes + qmin).float() - z) * s


def _check_grid(scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool, what: str, folder: Path) -> None:
    """Step sizes finite and > 0; zero points integers inside the code range (0 for a symmetric quantizer)."""
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise _fail(folder, f"{what}: step sizes must be finite and > 0, found {float(scale.min()):g}")
    qmin, qmax = qrange(bits, symmetric)
    if not bool(torch.isfinite(zero).all()) or not bool((zero == zero.round()).all()):
        raise _fail(folder, f"{what}: zero points must be integers")
    lo, hi = (0, 0) if symmetric else (qmin, qmax)
    if bool((zero < lo).any()) or bool((zero > hi).any()):
        raise _fail(folder, f"{what}: zero points must lie in [{lo}, {hi}] for {bits}-bit "
                            f"{'symmetric' if symmetric else 'asymmetric'} codes, found "
                            f"[{float(zero.min()):g}, {float(zero.max()):g}]")
