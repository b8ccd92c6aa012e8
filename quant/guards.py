"""Reading files that may come from anyone: bounded readers, size checks and path guards, in one place.

Every loader of the lab (model folders, saved quantized folders, configs, the run store, caches) reads through
these, so a hostile or damaged file ends in one UntrustedFileError naming the file and what is wrong with it,
before anything large is allocated and before any path leaves the folder it belongs to:

    read_json(path)                 size and nesting depth bounded, the expected top-level type checked
    safetensors_header(path)        the header only (names, dtypes, shapes), checked against the file's size
    check_sizes(config, where)      a diffusers model config's sizes against bounds, before the model is built
    inside(root, *parts)            a path built from stored strings, proven to stay inside `root`
    atomic_folder(dest)             write a folder beside its destination, then rename it into place
    write_text_atomic(path, text)   the same for one file
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import uuid
from pathlib import Path

MAX_JSON_BYTES = 8 * 2 ** 20  # configs and metadata are kilobytes; a sweep config with layer tables stays far below
MAX_JSON_DEPTH = 32  # the deepest file the lab writes nests 5 levels
MAX_HEADER_BYTES = 64 * 2 ** 20  # safetensors' own limit is 100 MB; DiT-XL/2's header is ~60 KB
# Bytes per element of the safetensors dtypes a model file may hold.
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1}


class UntrustedFileError(ValueError):
    """A file is damaged, hostile or not what its folder says; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------

def json_depth(value) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in v)
    return depth


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def loads_json(text: str, where: str, expect: type | None = dict, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH, allow_nan: bool = False):
    """Parse `text` (what `where` holds) with its size and depth bounded; NaN and Infinity, which are not JSON,
    are refused unless `allow_nan` (Python's json writes them for a metric that could not be computed). Raises
    UntrustedFileError naming `where`."""
    if len(text) > max_bytes:
        raise UntrustedFileError(f"{where} is {len(text) / 2 ** 20:.1f} MiB, more than the {max_bytes // 2 ** 20} MiB "
                                 "a config may hold; it is not a file this lab wrote")
    try:
        value = json.loads(text) if allow_nan else json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise UntrustedFileError(f"{where} nests deeper than {max_depth} levels; it is not a file this lab wrote") \
            from None
    except (ValueError, TypeError) as exc:
        raise UntrustedFileError(f"{where} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if json_depth(value) > max_depth:
        raise UntrustedFileError(f"{where} nests deeper than {max_depth} levels; it is not a file this lab wrote")
    if expect is not None and not isinstance(value, expect):
        want = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise UntrustedFileError(f"{where} must hold {want}, found {type(value).__name__}")
    return value


def read_json(path, expect: type | None = dict, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """A JSON file read with its size checked before reading and its depth after parsing."""
    path = Path(path)
    try:
        if not path.is_file():
            raise UntrustedFileError(f"cannot read {path}: it is missing or not a file")
        size = path.stat().st_size
        if size > max_bytes:
            raise UntrustedFileError(f"{path} is {size / 2 ** 20:.1f} MiB, more than the {max_bytes // 2 ** 20} MiB "
                                     "a config may hold; it is not a file this lab wrote")
        raw = path.read_bytes()
    except OSError as exc:
        raise UntrustedFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UntrustedFileError(f"{path} is not UTF-8 text; it is not a JSON file") from None
    return loads_json(text, str(path), expect, max_bytes, max_depth)


# ---------------------------------------------------------------------------------------------------------
# Numbers inside configs
# ---------------------------------------------------------------------------------------------------------

def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(value, name: str, where: str, low: int, high: int) -> int:
    if not is_int(value) or not low <= value <= high:
        raise UntrustedFileError(f"{where}: {name} must be an integer from {low} to {high}, got {value!r}")
    return value


def check_number(value, name: str, where: str, low: float, high: float) -> float:
    if not is_number(value) or not low <= value <= high:
        raise UntrustedFileError(f"{where}: {name} must be a finite number from {low:g} to {high:g}, got {value!r}")
    return float(value)


# Bounds of a diffusers denoiser / VAE config, checked before a module is built. DiT-XL/2 (28 layers, 16 heads of
# 72, sample 32) and SD-sized UNets sit well inside; a config beyond them would allocate gigabytes first.
INT_BOUNDS = {
    "num_layers": (1, 128), "num_attention_heads": (1, 128), "attention_head_dim": (1, 1024),
    "in_channels": (1, 64), "out_channels": (1, 128), "patch_size": (1, 64), "sample_size": (1, 1024),
    "num_embeds_ada_norm": (1, 100_000), "num_class_embeds": (1, 100_000), "layers_per_block": (1, 16),
    "norm_num_groups": (1, 1024), "latent_channels": (1, 64), "time_embedding_dim": (1, 8192),
    "num_train_timesteps": (1, 100_000),
}
CHANNEL_BOUNDS = (1, 8192)  # every entry of block_out_channels
MAX_BLOCKS = 16  # entries of block_out_channels / down_block_types
MAX_PARAMETERS = 4_000_000_000  # DiT-XL/2 has 675M, SDXL's UNet 2.6B


def check_sizes(config: dict, where: str) -> None:
    """Refuse a model config whose sizes are out of bounds or of the wrong type, naming the field."""
    if not isinstance(config, dict):
        raise UntrustedFileError(f"{where} must hold an object, found {type(config).__name__}")
    for key, (low, high) in INT_BOUNDS.items():
        value = config.get(key)
        if value is None:
            continue
        if key == "sample_size" and isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise UntrustedFileError(f"{where}: sample_size must be one integer or [height, width], got {value!r}")
            for v in value:
                check_int(v, key, where, low, high)
            continue
        check_int(value, key, where, low, high)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_BLOCKS:
            raise UntrustedFileError(f"{where}: {key} must be a list of 1 to {MAX_BLOCKS} entries, got {value!r}"[:300])
        if key == "block_out_channels":
            for v in value:
                check_int(v, key, where, *CHANNEL_BOUNDS)
        elif not all(isinstance(v, str) for v in value):
            raise UntrustedFileError(f"{where}: {key} must be a list of block names")


def count_parameters_meta(build) -> int:
    """Parameters of the module `build()` makes, built on the meta device (no memory is allocated)."""
    import torch

    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def check_parameter_count(build, where: str, limit: int = MAX_PARAMETERS):
    """Build on the meta device first and refuse a model above `limit` parameters; returns the meta module's
    (name -> shape) state so callers can check a weight file against it without loading it."""
    import torch

    try:
        with torch.device("meta"):
            module = build()
    except Exception as exc:  # diffusers raises several types for a config it cannot build
        raise UntrustedFileError(f"{where} does not describe a model that can be built: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}") from None
    n = sum(t.numel() for t in module.state_dict().values())
    if n > limit:
        raise UntrustedFileError(f"{where} describes a model of {n / 1e9:.1f}G parameters, more than the "
                                 f"{limit / 1e9:.0f}G this lab loads")
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------------------

def safetensors_header(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors file's header, checked before any tensor is read: the header
    size, each tensor's byte range against its shape and dtype, and the data against the file's length."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UntrustedFileError(f"{path} is {size} bytes long: not a safetensors file (empty or truncated)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise UntrustedFileError(f"{path} is not a safetensors file (its header length {n} does not fit the "
                                         f"{size}-byte file); the file is damaged or of another format")
            text = fh.read(n)
    except OSError as exc:
        raise UntrustedFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = loads_json(text.decode("utf-8"), f"{path} (header)", dict, MAX_HEADER_BYTES, 4)
    except UnicodeDecodeError:
        raise UntrustedFileError(f"{path} is not a safetensors file (its header is not text)") from None
    data = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and info.get("dtype") in SAFETENSORS_DTYPES
                and isinstance(info.get("shape"), list) and all(is_int(d) and d >= 0 for d in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(is_int(o) for o in info["data_offsets"])):
            raise UntrustedFileError(f"{path}: the header entry of {name!r} is malformed; the file is damaged")
        begin, end = info["data_offsets"]
        nbytes = math.prod(info["shape"]) * SAFETENSORS_DTYPES[info["dtype"]]
        if not 0 <= begin <= end <= data or end - begin != nbytes:
            raise UntrustedFileError(f"{path}: tensor {name!r} ({info['dtype']} {info['shape']}) does not fit its "
                                     f"bytes in the file; the file is truncated or damaged")
        out[name] = (info["dtype"], tuple(info["shape"]))
    return out


TORCH_TO_SAFETENSORS = {"torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16",
                        "torch.bfloat16": "BF16", "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16",
                        "torch.int8": "I8", "torch.uint8": "U8", "torch.bool": "BOOL"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def check_state_keys(expected: dict[str, tuple], found: dict[str, tuple], where: str) -> None:
    """Strict key and shape check of a weight file's header against the model its config builds: missing and
    unexpected keys are named (the first few of each), and so is a shape or kind that differs."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        raise UntrustedFileError(f"{where} does not match its config: weights {'; '.join(parts)}; the weights "
                                 "belong to another model or the file is incomplete")
    for name, (shape, dtype) in expected.items():
        f_dtype, f_shape = found[name]
        if tuple(f_shape) != tuple(shape):
            raise UntrustedFileError(f"{where}: weight {name} has shape {list(f_shape)}, its config builds "
                                     f"{list(shape)}; the weights belong to another model")
        want_float = str(dtype) in ("torch.float32", "torch.float16", "torch.bfloat16", "torch.float64")
        if want_float != (f_dtype in FLOAT_DTYPES):
            raise UntrustedFileError(f"{where}: weight {name} is stored as {f_dtype}, expected "
                                     f"{'a float' if want_float else TORCH_TO_SAFETENSORS.get(str(dtype), dtype)}")


# ---------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------

def inside(root, *parts: str) -> Path:
    """root / parts, proven to lie inside `root` after resolving links and '..': a stored string can never name
    a path elsewhere (an absolute path, '../x', a link out). Raises UntrustedFileError."""
    root = Path(root)
    for part in parts:
        if not isinstance(part, str) or not part or "\x00" in part or Path(part).is_absolute() \
                or any(p in ("..", "") for p in Path(part).parts):
            raise UntrustedFileError(f"the stored name {part!r} is not a plain name inside {root}; the store or "
                                     "folder was edited by hand or is damaged")
    path = root.joinpath(*parts)
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise UntrustedFileError(f"{path} leads outside {root} (to {resolved}); refusing to follow it")
    return path


# ---------------------------------------------------------------------------------------------------------
# Atomic outputs
# ---------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_folder(dest):
    """Yield a fresh temporary folder beside `dest`; on success it replaces `dest` in two renames (the old folder
    moves aside, the new one into place, the old one is removed), so `dest` is at every moment either the old
    complete folder or the new complete one. On failure the temporary folder is removed and `dest` is untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = dest.parent / f".{dest.name}.tmp-{token}"
    old = dest.parent / f".{dest.name}.old-{token}"
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write `data` to a temporary sibling, flush it to disk, then rename it over `path`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))
