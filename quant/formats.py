"""Number formats: integer and OCP floating-point element grids, and where their scales live.

A quantized tensor is x_hat = s * Q(x / s): Q rounds onto an element grid, s is a scale shared by a set of
elements. This file holds both halves and nothing else:

Element grids (OCP Microscaling Formats (MX) Specification v1.0, section 5.3):

    name       bits  exponent  mantissa  bias  largest normal  smallest subnormal   inf / NaN
    fp8_e4m3      8         4         3     7  448 = 1.75 2^8  2^-9                 no inf, S.1111.111 NaN
    fp8_e5m2      8         5         2    15  57344 = 1.75 2^15  2^-16             inf and NaN (exponent 31)
    fp6_e3m2      6         3         2     3  28 = 1.75 2^4   0.0625               none
    fp6_e2m3      6         2         3     1  7.5 = 1.875 2^2  0.125               none
    fp4_e2m1      4         2         1     1  6 = 1.5 2^2     0.5                  none

Conversion rounds to nearest, ties to even, and saturates: anything beyond the largest finite value becomes
that value (no inf, even for E5M2). A NaN is refused (the spec keeps NaN where a format has one; here a NaN
in a weight or activation is a bug upstream, not a value to carry).

Scale granularity: per tensor, per channel (weights: one per output channel), per token (activations: one per
row, computed at run time), or per block of G elements along the input (reduction) dimension, padded with
zeros when the dimension is not a multiple of G. The block scale has its own format:

    fp32   any float (int groups store it as fp16: `fp16`)
    e8m0   a power of two, 2^(floor(log2 amax) - emax_elem)            OCP MX (mxfp8, mxfp6, mxfp4)
    e4m3   an FP8 E4M3 value, amax / elem_max / s_tensor rounded to E4M3,
           times one FP32 tensor scale s_tensor = amax_tensor / (448 * elem_max)     NVIDIA NVFP4

Named presets are FormatSpec objects in PRESETS; `parse_format(name, bits, group)` turns what a user typed into
a checked FormatSpec. `fake_quant_elements` is the one elementwise quantizer every path (weights,
activations, GPTQ's column-by-column rounding, AdaRound, BKD) calls with a broadcastable scale.
"""
from __future__ import annotations

import dataclasses

import torch

from quant.quantizers import (_as_rows, _broadcast, fake_quant, fake_quantize, quant_params, search_range)


@dataclasses.dataclass(frozen=True)
class ElementFormat:
    """A sign-magnitude floating-point element: 1 sign bit, `ebits` exponent bits, `mbits` mantissa bits."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float  # largest finite value
    emax: int  # exponent of the largest normal binade (OCP's emax_elem)

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (1 - bias); subnormals share its step size."""
        return 1 - self.bias

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)


ELEMENTS: dict[str, ElementFormat] = {e.name: e for e in (
    ElementFormat("fp8_e4m3", 4, 3, 7, 448.0, 8),
    ElementFormat("fp8_e5m2", 5, 2, 15, 57344.0, 15),
    ElementFormat("fp6_e3m2", 3, 2, 3, 28.0, 4),
    ElementFormat("fp6_e2m3", 2, 3, 1, 7.5, 2),
    ElementFormat("fp4_e2m1", 2, 1, 1, 6.0, 2),
)}
FLOAT_ELEMENTS = tuple(ELEMENTS)
SCALE_FORMATS = ("fp32", "fp16", "e8m0", "e4m3")
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127


def element_grid(name: str) -> torch.Tensor:
    """Every finite value of an FP element format, ascending (negatives, zero once, positives): the table the
    tests check and the teaching view draws. Built from the bit patterns, not from the rounding code."""
    e = ELEMENTS[name]
    pos = []
    for code in range(2 ** (e.bits - 1)):
        exp, man = code >> e.mbits, code & ((1 << e.mbits) - 1)
        if exp == 0:
            v = man * 2.0 ** (e.emin - e.mbits)
        else:
            v = (1 + man / 2 ** e.mbits) * 2.0 ** (exp - e.bias)
        if v <= e.max:  # drops E4M3's NaN pattern and E5M2's inf / NaN exponent
            pos.append(v)
    pos = torch.tensor(sorted(set(pos)), dtype=torch.float64)
    return torch.cat([-pos.flip(0)[:-1], pos]).float()


def _binade_step(a: torch.Tensor, e: ElementFormat) -> torch.Tensor:
    """The grid step at each element of float32 `a`: 2^(floor(log2 |a|) - mbits), and below the smallest normal
    binade its step (subnormals). Masking a float32's bit pattern down to its exponent field is 2^floor(log2 |a|)
    in one pass; frexp + ldexp took three times as long on the CPU, and this runs on every activation."""
    p = (a.view(torch.int32) & 0x7F800000).view(torch.float32)
    return p.clamp_min_(2.0 ** e.emin).mul_(2.0 ** -e.mbits)


def round_to_element(v: torch.Tensor, name: str) -> torch.Tensor:
    """v rounded onto the element grid: nearest value, ties to even mantissa, saturating at +-max.

    In binade [2^e, 2^(e+1)) the grid step is 2^(e - mbits) (subnormals: the smallest normal binade's step), so
    rounding v / step to an integer with torch.round (half to even) is the spec's RNE. Every operation is a
    division or multiplication by a power of two or a round, exact in float32 for these formats. A value that
    rounds up to the next binade (1.96 -> 2.0 in E2M1) lands on its first grid point, which is representable.
    Saturating first is the same as saturating after: each format's max is the top grid point of its binade.
    """
    e = ELEMENTS[name]
    if torch.isnan(v).any():
        raise ValueError(f"cannot quantize NaN to {name}: the input holds NaN values")
    a = v.float().clamp(-e.max, e.max)  # a new tensor: the in-place steps below never touch v
    step = _binade_step(a, e)
    return a.div_(step).round_().mul_(step).to(v.dtype)


def grid_neighbours(v: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi): the grid points at or below v and above it (hi = lo + step; both clamped to +-max). AdaRound
    on a float grid learns which of the two each weight takes."""
    e = ELEMENTS[name]
    v32 = v.float().clamp(-e.max, e.max)
    step = _binade_step(v32, e)
    lo = torch.floor(v32 / step) * step
    return lo.clamp(-e.max, e.max), (lo + step).clamp(-e.max, e.max)


def round_element_ste(v: torch.Tensor, name: str) -> torch.Tensor:
    """round_to_element forward, identity backward inside the range (straight-through), zero outside."""
    e = ELEMENTS[name]
    with torch.no_grad():
        r = round_to_element(v.detach(), name)
    return v.clamp(-e.max, e.max) + (r - v.clamp(-e.max, e.max)).detach()


# --- codes: FP elements as bit patterns, for storage ------------------------------------------------------

def element_codes(v: torch.Tensor, name: str) -> torch.Tensor:
    """The bit pattern (sign bit first) of each value of v, which must already lie on the grid: for finite
    values the magnitude's bit pattern is its index among the non-negative grid values."""
    grid = element_grid(name)
    pos = grid[grid >= 0].to(v.device)
    mag = v.detach().abs().float()
    idx = torch.searchsorted(pos, mag)
    if not torch.equal(pos[idx.clamp(max=len(pos) - 1)], mag):
        raise ValueError(f"values are not on the {name} grid; quantize them first")
    sign = (v.detach() < 0).to(torch.int64)  # -0.0 is stored as +0
    return idx.to(torch.int64) | (sign << (ELEMENTS[name].bits - 1))


def element_values(codes: torch.Tensor, name: str) -> torch.Tensor:
    """Inverse of element_codes (float32)."""
    e = ELEMENTS[name]
    grid = element_grid(name)
    pos = grid[grid >= 0].to(codes.device)
    sign_bit = 1 << (e.bits - 1)
    codes = codes.to(torch.int64)
    mag_idx = codes & (sign_bit - 1)
    if (mag_idx >= len(pos)).any():
        raise ValueError(f"codes outside the finite {name} values (NaN / inf patterns are never stored)")
    mag = pos[mag_idx]
    return torch.where((codes & sign_bit) != 0, -mag, mag)


# --- scale formats --------------------------------------------------------------------------------------------

def e8m0_scale(amax: torch.Tensor, element: ElementFormat) -> torch.Tensor:
    """OCP MX shared scale 2^(floor(log2 amax) - emax_elem), the exponent clamped to E8M0's [-127, 127]; an
    all-zero block takes 2^-127 (its elements are zero whatever the scale)."""
    amax = amax.float()
    _, exp = torch.frexp(amax)
    e = torch.where(amax > 0, exp - 1 - element.emax, torch.full_like(exp, E8M0_MIN_EXP))
    return torch.ldexp(torch.ones_like(amax), e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP))


def round_scale(s: torch.Tensor, scale_format: str) -> torch.Tensor:
    """A positive fp32 scale rounded to what its storage format holds (fp32: unchanged)."""
    if scale_format == "fp16":
        return s.float().half().float()
    if scale_format == "e4m3":
        return round_to_element(s.float(), "fp8_e4m3")
    return s.float()


# --- the format a layer uses -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """What one side (weights or activations) of a layer is quantized to.

    element: "int" (uniform affine / symmetric integer grid) or an FP element name (ELEMENTS).
    bits: element bits (an FP element fixes its own; int 2-8).
    group: block size G along the input dimension, or None (per channel / per tensor / per token).
    block_scale: storage of the block scales: fp16 (int groups), e8m0 (MX), e4m3 (NVFP4); fp32 otherwise.
    tensor_scale: a second-level FP32 scale per tensor under the block scales (NVFP4).
    name: the preset or element name this spec was made from (what configs and labels show).
    """

    element: str = "int"
    bits: int = 8
    group: int | None = None
    block_scale: str = "fp32"
    tensor_scale: bool = False
    name: str = "int"

    @property
    def is_float(self) -> bool:
        return self.element != "int"

    @property
    def elem(self) -> ElementFormat | None:
        return ELEMENTS.get(self.element)

    @property
    def blocked(self) -> bool:
        return self.group is not None

    @property
    def qmax(self) -> float:
        """Largest element magnitude an amax maps onto (FP: the format's max; int: 2^(b-1) - 1)."""
        return self.elem.max if self.is_float else 2 ** (self.bits - 1) - 1

    def scale_bits_per_element(self, symmetric: bool = True) -> float:
        """Storage bits the block scales (and int zero points) add to each element; 0 without blocks."""
        if not self.blocked:
            return 0.0
        per_block = {"fp32": 32, "fp16": 16, "e8m0": 8, "e4m3": 8}[self.block_scale]
        if not self.is_float and not symmetric:
            per_block += 8  # one uint8 zero point per block
        return per_block / self.group

    def describe(self) -> str:
        """A short label: the preset's name, or the element name with its block size (int4-g32, fp4_e2m1 g16)."""
        if self.name in PRESETS or self.group is None:
            return self.name
        return f"{self.name} g{self.group}"


PRESETS: dict[str, FormatSpec] = {
    "mxfp8": FormatSpec("fp8_e4m3", 8, 32, "e8m0", False, "mxfp8"),
    "mxfp6": FormatSpec("fp6_e2m3", 6, 32, "e8m0", False, "mxfp6"),
    "mxfp4": FormatSpec("fp4_e2m1", 4, 32, "e8m0", False, "mxfp4"),
    "nvfp4": FormatSpec("fp4_e2m1", 4, 16, "e4m3", True, "nvfp4"),
    "int4-g32": FormatSpec("int", 4, 32, "fp16", False, "int4-g32"),
    "int4-g64": FormatSpec("int", 4, 64, "fp16", False, "int4-g64"),
    "int4-g128": FormatSpec("int", 4, 128, "fp16", False, "int4-g128"),
}
def int_format(bits: int | None) -> FormatSpec:
    """Today's integer grid at `bits` (per channel / per tensor, affine or symmetric)."""
    return FormatSpec("int", 8 if bits is None else int(bits), None, "fp32", False, "int")


FORMAT_NAMES = ("int",) + FLOAT_ELEMENTS + tuple(PRESETS)


def format_bits(name: str) -> int | None:
    """The element bits a format name fixes (None for plain int, which takes any)."""
    if name in PRESETS:
        return PRESETS[name].bits
    if name in ELEMENTS:
        return ELEMENTS[name].bits
    return None


def parse_format(name: str, bits: int, group: int | None = None, side: str = "w") -> FormatSpec:
    """The FormatSpec of a format name at `bits` with an optional block size; ValueError naming what is wrong.

    side ("w" or "a") only words the messages after the flags (--w-format, --w-bits, --w-group)."""
    if name not in FORMAT_NAMES:
        raise ValueError(f"unknown {side}_format {name!r}; choose one of {', '.join(FORMAT_NAMES)}")
    need = format_bits(name)
    if need is not None and bits != need:
        raise ValueError(f"{side}_format {name} holds {need}-bit elements but {side}_bits is {bits}; "
                         f"set {side}_bits to {need} (--{side}-bits {need})")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 2):
        raise ValueError(f"{side}_group must be an integer >= 2 (elements per block), got {group!r}")
    if name in PRESETS:
        spec = PRESETS[name]
        if group is not None and group != spec.group:
            raise ValueError(f"{side}_format {name} fixes blocks of {spec.group}; drop {side}_group {group} or "
                             f"use the element format ({spec.element}) with {side}_group {group}")
        return spec
    if name == "int":
        if not 2 <= bits <= 8:
            raise ValueError(f"{side}_bits must be 2-8 for int, got {bits}")
        return FormatSpec("int", bits, group, "fp16" if group else "fp32", False, "int")
    return FormatSpec(name, bits, group, "fp32", False, name)


# --- quantize-dequantize ---------------------------------------------------------------------------------------

def fake_quant_elements(x: torch.Tensor, spec: FormatSpec, scale: torch.Tensor, zero: torch.Tensor | None = None,
                        symmetric: bool = False, ste: bool = False) -> torch.Tensor:
    """x_hat = s Q(x / s) for a broadcastable (already expanded) scale; the int grid takes its zero point.

    ste: straight-through gradients to x (inside the range) and s, for BKD and learned step sizes."""
    if not spec.is_float:
        return fake_quant(x, scale, torch.zeros_like(scale) if zero is None else zero, spec.bits, symmetric)
    scale = scale.to(x.dtype)
    if ste or (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        return round_element_ste(x / scale, spec.element) * scale
    return round_to_element(x / scale, spec.element) * scale


def pad_blocks(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [..., K] -> [..., ceil(K / G), G], zero-padded along the last dimension."""
    k = x.shape[-1]
    pad = (-k) % group
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], (k + pad) // group, group)


def expand_blocks(s: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """Block values [..., nb] repeated to each element [..., K] (the padding dropped)."""
    return s.repeat_interleave(group, dim=-1)[..., :k]


def tensor_scale_for(amax: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """NVFP4's second-level FP32 scale: amax / (448 * elem_max), so the largest block scale is E4M3's max."""
    return (amax.float() / (ELEMENTS["fp8_e4m3"].max * spec.qmax)).clamp_min(1e-30)


def block_params(blocks: torch.Tensor, spec: FormatSpec, tensor_scale: torch.Tensor | None = None,
                 symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per block of `blocks` [..., nb, G], each [..., nb] (scale in its storage format).

    With a tensor scale (NVFP4) the returned block scale is the E4M3 value; the effective scale is it times
    the tensor scale."""
    if not spec.is_float:
        scale, zero = quant_params(blocks.amin(dim=-1), blocks.amax(dim=-1), spec.bits, symmetric)
        scale = round_scale(scale, spec.block_scale).clamp_min(torch.finfo(torch.float16).tiny)
        if not symmetric:  # the zero point from the rounded scale, so the range still holds 0 exactly
            lo = blocks.amin(dim=-1).clamp(max=0)
            zero = torch.round(-lo / scale).clamp(0, 2 ** spec.bits - 1)
        return scale, zero
    amax = blocks.abs().amax(dim=-1).float()
    if spec.block_scale == "e8m0":
        scale = e8m0_scale(amax, spec.elem)
    elif spec.block_scale == "e4m3":
        ts = torch.ones((), device=amax.device) if tensor_scale is None else tensor_scale.float()
        scale = round_to_element(amax / spec.qmax / ts, "fp8_e4m3")
    else:
        scale = round_scale(amax / spec.qmax, spec.block_scale)
    return scale, torch.zeros_like(scale)


def effective_scale(scale: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    """Block scale times the tensor scale (NVFP4); a zero block scale (an all-zero or negligible block) becomes
    the tensor scale itself, whose elements round to 0 anyway."""
    if tensor_scale is None:
        return scale.clamp_min(1e-30)
    s = scale * tensor_scale.float()
    return torch.where(scale > 0, s, tensor_scale.float().expand_as(s))


def fake_quant_blocks(x: torch.Tensor, spec: FormatSpec, tensor_scale: torch.Tensor | None = None,
                      symmetric: bool = True, ste: bool = False) -> torch.Tensor:
    """Dynamic block quantization along the last dimension (scales from x itself): activations of MX / NVFP4 /
    int groups, and weights when the caller needs no stored parameters. The scales broadcast over the block
    view [..., nb, G] instead of being repeated to every element."""
    k = x.shape[-1]
    blocks = pad_blocks(x, spec.group)
    ts = None
    if spec.tensor_scale:
        ts = tensor_scale if tensor_scale is not None else tensor_scale_for(x.detach().abs().amax(), spec)
    scale, zero = block_params(blocks.detach(), spec, ts, symmetric)
    z = zero[..., None] if not spec.is_float else None
    out = fake_quant_elements(blocks, spec, effective_scale(scale, ts)[..., None], z, symmetric, ste)
    return out.reshape(*x.shape[:-1], -1)[..., :k]


def fake_quantize_format(x: torch.Tensor, spec: FormatSpec, axis: int | None = -1, granularity: str = "channel",
                         symmetric: bool = True) -> torch.Tensor:
    """Quantize-dequantize x under `spec` in one call (scales from x itself, min-max).

    axis: the input (reduction) dimension for blocks; for "channel" the dimension that keeps one scale per index
    (a weight [out, in] uses axis 0); granularity: "tensor", "channel", "token" (one per row along the last
    dimension) or "block" (spec.group along `axis`)."""
    if spec.blocked or granularity == "block":
        if not spec.blocked:
            raise ValueError("block granularity needs a format with a group size")
        moved = x.movedim(axis, -1)
        return fake_quant_blocks(moved, spec, symmetric=symmetric).movedim(-1, axis)
    if not spec.is_float:
        if granularity == "token":
            return fake_quantize(x, spec.bits, axis=None if x.dim() < 2 else 0, symmetric=symmetric) \
                if x.dim() < 2 else _per_row_int(x, spec, symmetric)
        return fake_quantize(x, spec.bits, axis=axis if granularity == "channel" else None, symmetric=symmetric)
    if granularity == "tensor":
        amax = x.detach().abs().amax()
    elif granularity == "token":
        amax = x.detach().abs().amax(dim=-1, keepdim=True)
    else:
        dims = [d for d in range(x.dim()) if d != axis % x.dim()]
        amax = x.detach().abs().amax(dim=dims, keepdim=True)
    return fake_quant_elements(x, spec, (amax.float() / spec.qmax).clamp_min(1e-30))


def _per_row_int(x: torch.Tensor, spec: FormatSpec, symmetric: bool) -> torch.Tensor:
    scale, zero = quant_params(x.detach().amin(dim=-1, keepdim=True), x.detach().amax(dim=-1, keepdim=True),
                               spec.bits, symmetric)
    return fake_quant(x, scale, zero, spec.bits, symmetric)


def fp_range_quantizer(spec: FormatSpec):
    """quantize(rows, lo, hi) for quant.quantizers.search_range: rows on the FP grid with scale max(|lo|, hi) / max."""
    def quantize(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        scale = (torch.maximum(-lo, hi) / spec.qmax).clamp_min(1e-8)
        return fake_quant_elements(rows, spec, scale[:, None])
    return quantize


def fp_scale_search(x: torch.Tensor, spec: FormatSpec, axis: int | None = None, search: str = "minmax",
                    percentile: float = 99.99) -> torch.Tensor:
    """FP32 scale of an FP element format per tensor (axis None) or per index along `axis`: the searched clip
    amax over the format's largest value, shaped to broadcast against x."""
    lo, hi = search_range(_as_rows(x, axis), spec.bits, True, search, percentile, quantize=fp_range_quantizer(spec))
    scale = (torch.maximum(-lo, hi) / spec.qmax).clamp_min(1e-8)
    return _broadcast(scale, x, axis).to(x.device)


def bits_per_element(spec: FormatSpec, symmetric: bool = True) -> float:
    """Element bits plus the block scales' share (MXFP4 4.25, NVFP4 4.5 without the one FP32 tensor scale)."""
    return spec.bits + spec.scale_bits_per_element(symmetric)


__all__ = ["ElementFormat", "ELEMENTS", "FLOAT_ELEMENTS", "FormatSpec", "PRESETS", "FORMAT_NAMES", "parse_format",
           "element_grid", "round_to_element", "round_element_ste", "grid_neighbours", "element_codes",
           "element_values", "e8m0_scale", "round_scale", "fake_quant_elements", "fake_quant_blocks",
           "fake_quantize_format", "block_params", "pad_blocks", "expand_blocks", "tensor_scale_for",
           "effective_scale", "bits_per_element", "format_bits"]
