"""Uniform affine fake quantization (docs/ARCHITECTURE.md, "The formulas"), vectorized over
channels.

    q = clamp(round(x / d) + z, 0, 2^b - 1),   x_hat = (q - z) d          (asymmetric)
    q = clamp(round(x / d), -2^(b-1), 2^(b-1) - 1),   x_hat = q d           (symmetric, z = 0)

Rounding uses a straight-through estimator, so gradients reach x (inside the clip range) and d, as
later quantization-aware steps (BKD, reconstruction) need. A bit-width of None or >= 16 means "off".

Clip-range search finds (lo, hi) per channel: min-max, a percentile of the values, or the clip ratio
that minimises the squared error over a grid. Every search runs on a [channels, values] matrix at once;
the only Python loop is over the (fixed, small) grid of clip ratios, never over channels.
"""
from __future__ import annotations

import torch

SEARCHES = ("minmax", "percentile", "mse")
# Clip ratios tried by the MSE search (1 = the min-max range), as in the BRECQ / Q-Diffusion search.
MSE_GRID = torch.linspace(1.0, 0.2, 41).tolist()
_EPS = 1e-8


def is_off(bits: int | None) -> bool:
    """True when `bits` means no quantization (None or 16 and above)."""
    return bits is None or bits >= 16


def qrange(bits: int, symmetric: bool = False) -> tuple[int, int]:
    """The integer code range: [0, 2^b - 1] asymmetric, [-2^(b-1), 2^(b-1) - 1] symmetric."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def quant_params(x_min: torch.Tensor, x_max: torch.Tensor, bits: int,
                 symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size d and zero point z for the range [x_min, x_max] (broadcastable tensors).

    The range is widened to include 0 so that zero (padding, ReLU/GELU zeros) is exact. Symmetric
    quantizers take d = max(|x_min|, |x_max|) / (2^(b-1) - 1) and z = 0.
    """
    x_min = torch.as_tensor(x_min, dtype=torch.float32)
    x_max = torch.as_tensor(x_max, dtype=torch.float32)
    lo, hi = torch.minimum(x_min, torch.zeros_like(x_min)), torch.maximum(x_max, torch.zeros_like(x_max))
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = torch.maximum(-lo, hi).clamp_min(_EPS) / qmax
        return scale, torch.zeros_like(scale)
    scale = (hi - lo).clamp_min(_EPS) / (qmax - qmin)
    zero = torch.round(-lo / scale).clamp(qmin, qmax)
    return scale, zero


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int | None,
               symmetric: bool = False) -> torch.Tensor:
    """x_hat = (clamp(round(x / d) + z, qmin, qmax) - z) * d, with straight-through rounding."""
    if is_off(bits):
        return x
    qmin, qmax = qrange(bits, symmetric)
    scale = scale.to(x.dtype)
    zero_point = zero_point.to(x.dtype)
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero_point.requires_grad)):
        return _fake_quant_no_grad(x, scale, zero_point, qmin, qmax)
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def _fake_quant_no_grad(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                       qmax: int) -> torch.Tensor:
    """The same arithmetic in place on one new tensor, for inference.

    The out-of-place expression allocates a tensor per operation; on CPU this version is about 4x faster
    (measured when it was written), which is most of the cost of a quantized forward. torch's fused
    fake_quantize_per_*_affine kernels were slower still on CPU.
    """
    q = x / scale
    return q.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                   symmetric: bool = False) -> torch.Tensor:
    """The integer codes q (as int32), for storage; fake_quant(x) == (q - z) * d."""
    qmin, qmax = qrange(bits, symmetric)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def _as_rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """[channels, values]: one row per index along `axis`, or a single row for per-tensor."""
    if axis is None:
        return x.detach().reshape(1, -1)
    return x.detach().movedim(axis, 0).reshape(x.shape[axis], -1)


def _broadcast(v: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A [channels] vector shaped to broadcast against x along `axis` (a scalar-like tensor if per-tensor)."""
    if axis is None:
        return v.reshape([1] * x.dim())
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.reshape(shape)


def search_range(rows: torch.Tensor, bits: int, symmetric: bool = False, search: str = "minmax",
                 percentile: float = 99.99, quantize=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip range (lo, hi) per row of `rows` [C, N] by min-max, percentile or MSE search, all rows at once.

    quantize(rows, lo, hi) -> rows quantized with clip range (lo, hi) [C] per row: the grid the MSE search measures
    its error on (quant.formats passes an FP element grid's); None: the integer grid at `bits`."""
    if search not in SEARCHES:
        raise ValueError(f"unknown scale search {search!r}; choose one of {SEARCHES}")
    rows = rows.float()
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    if search == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        n = rows.shape[1]
        # kthvalue has no size limit (torch.quantile refuses inputs above 16M values)
        k_hi = max(1, min(n, int(round(percentile / 100 * n))))
        k_lo = max(1, min(n, n + 1 - k_hi))
        lo, hi = rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values
    elif search == "mse":
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for ratio in MSE_GRID:  # the grid of clip ratios, each evaluated for every row at once
            c_lo, c_hi = lo * ratio, hi * ratio
            if quantize is not None:
                err = (quantize(rows, c_lo, c_hi) - rows).pow(2).mean(dim=1)
            else:
                scale, zero = quant_params(c_lo, c_hi, bits, symmetric)
                err = (fake_quant(rows, scale[:, None], zero[:, None], bits, symmetric) - rows).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
        lo, hi = best_lo, best_hi
    return lo, hi


def search_params(x: torch.Tensor, bits: int, axis: int | None = None, symmetric: bool = False,
                  search: str = "minmax", percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for x, per tensor (axis=None) or one per index along `axis`, shaped to broadcast."""
    lo, hi = search_range(_as_rows(x, axis), bits, symmetric, search, percentile)
    scale, zero = quant_params(lo, hi, bits, symmetric)
    return _broadcast(scale, x, axis).to(x.device), _broadcast(zero, x, axis).to(x.device)


def fake_quantize(x: torch.Tensor, bits: int | None, axis: int | None = None, symmetric: bool = False,
                  search: str = "minmax", percentile: float = 99.99) -> torch.Tensor:
    """Quantize-dequantize x in one call: per tensor (axis=None) or per index along `axis`.

    axis=0 on a weight [out, in] gives the per-output-channel quantization the methods use.
    bits None or >= 16 returns x unchanged.
    """
    if is_off(bits):
        return x
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2-8 (or None / 16 for off), got {bits}")
    if axis is not None:
        axis = axis % x.dim()
    scale, zero = search_params(x, bits, axis, symmetric, search, percentile)
    return fake_quant(x, scale, zero, bits, symmetric)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes (< 2^bits) into a uint8 bit stream, `bits` bits per code."""
    flat = codes.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits - 1, -1, -1, device=flat.device)
    bitmat = ((flat[:, None] >> shifts) & 1).reshape(-1)  # most significant bit first
    pad = (-bitmat.numel()) % 8
    bitmat = torch.cat([bitmat, bitmat.new_zeros(pad)]).reshape(-1, 8)
    weights = 2 ** torch.arange(7, -1, -1, device=flat.device)
    return (bitmat * weights).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_codes: the first `numel` codes as int64."""
    shifts = torch.arange(7, -1, -1, device=packed.device)
    bitmat = ((packed.to(torch.int64)[:, None] >> shifts) & 1).reshape(-1)[:numel * bits].reshape(numel, bits)
    weights = 2 ** torch.arange(bits - 1, -1, -1, device=packed.device)
    return (bitmat * weights).sum(dim=1)
