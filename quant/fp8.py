"""FP8 inference: W8A8 E4M3 linears that multiply in FP8 through torch._scaled_mm, where the GPU has it.

A fake-quantized FP8 linear (quant.modules.QuantLinear with fp8_e4m3 weights and activations) computes
    Y = Q_a(X) Q_w(W)^T + b,   Q_a(X) = s_a E4M3(X / s_a),   Q_w(W) = s_w[j] E4M3(W_j / s_w[j])
in float. Both E4M3 factors are exactly representable as torch.float8_e4m3fn (the cast rounds to nearest
even and saturates at 448, the same as quant.formats.round_to_element), so

    Y = s_a s_w[j] (A W'^T)_ij + b_j,   A = E4M3(X / s_a),  W' = E4M3(W / s_w)

is one FP8 GEMM with a row scale (s_a, per tensor, or per sample by its timestep with TPQ) and a column scale
(s_w per output channel), which torch._scaled_mm applies in its epilogue. Fake-quant stays the reference:
the products are exact and the sum differs from the float path only by accumulation order.

Only CUDA GPUs with FP8 tensor cores (compute capability 8.9: Ada, Hopper and later) are used: elsewhere
`Fp8Linear` refuses, and `to_fp8` converts nothing, so a CPU run keeps the fake-quant model. (torch also has a
CPU _scaled_mm, used by the tests to check the arithmetic; it is no faster than float there.)
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from quant.formats import round_to_element
from quant.modules import ActQuantizer, QuantLinear, quant_layers

E4M3_MAX = 448.0
# cuBLASLt FP8 GEMMs need the inner and output dimensions in multiples of 16 (rows are padded here).
_MULTIPLE = 16


def fp8_supported(device: torch.device | str) -> bool:
    """True on a CUDA device with FP8 matmuls (compute capability >= 8.9) and a torch that has them."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_eligible(layer: nn.Module) -> bool:
    """A QuantLinear with FP8 E4M3 weights per channel or per tensor and a static per-tensor FP8 E4M3 activation
    quantizer (TPQ allowed), with dimensions the FP8 GEMM takes."""
    if not isinstance(layer, QuantLinear) or layer.use_fp_weight:
        return False
    act = layer.act
    return (layer.w_fmt.element == "fp8_e4m3" and not layer.w_fmt.blocked and act.enabled
            and act.fmt.element == "fp8_e4m3" and not act.dynamic
            and layer.in_features % _MULTIPLE == 0 and layer.out_features % _MULTIPLE == 0)


class Fp8Linear(nn.Module):
    """Y = s_a s_w (A W'^T) + b with A, W' in float8_e4m3fn, one torch._scaled_mm call.

    allow_cpu: run on a CPU too (torch's reference _scaled_mm; for tests, it is not faster than float)."""

    def __init__(self, layer: QuantLinear, allow_cpu: bool = False, out_dtype: torch.dtype | None = None):
        super().__init__()
        if not fp8_eligible(layer):
            raise ValueError(f"Fp8Linear needs a W8A8 fp8_e4m3 QuantLinear (per-tensor activations, dimensions in "
                             f"multiples of {_MULTIPLE}), got {layer!r}")
        device = layer.weight.device
        if not (fp8_supported(device) or (allow_cpu and device.type == "cpu")):
            raise ValueError(f"FP8 matmuls need a CUDA GPU with compute capability 8.9 or newer (Ada, Hopper); this "
                             f"model is on {device}. The fake-quant FP8 model runs anywhere and gives the same images.")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.out_dtype = out_dtype
        with torch.no_grad():
            scale = layer.w_scale.reshape(-1).float()
            codes = round_to_element(layer.weight.float() / scale.reshape(-1, 1), "fp8_e4m3")
            self.register_buffer("weight_fp8", codes.to(torch.float8_e4m3fn).contiguous())  # [out, in]
            self.register_buffer("w_scale", scale.expand(self.out_features).reshape(1, -1).contiguous())
            self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.act: ActQuantizer = copy.deepcopy(layer.act)
        self.act.ctx = layer.act.ctx  # the model's one timestep context, not a copy of it

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8_e4m3 x fp8_e4m3 (torch._scaled_mm)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s_a = self.act.params_for(x)[0].float()  # one scale, or [B, 1, ...] per sample with TPQ
        a = (x.float() / s_a).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        rows = a.reshape(-1, self.in_features)
        m = rows.shape[0]
        row_scale = s_a.expand(*x.shape[:-1], 1).reshape(-1, 1).contiguous()
        pad = (-m) % _MULTIPLE
        if pad and x.device.type == "cuda":
            rows = torch.cat([rows, rows.new_zeros(pad, self.in_features)])
            row_scale = torch.cat([row_scale, row_scale.new_ones(pad, 1)])
        # row-wise scaling (one scale per row of A, one per column of W'^T) wants a bfloat16 output on CUDA
        out_dtype = self.out_dtype or (torch.bfloat16 if x.device.type == "cuda" else torch.float32)
        y = torch._scaled_mm(rows, self.weight_fp8.t(), scale_a=row_scale, scale_b=self.w_scale, out_dtype=out_dtype)
        y = y[:m].float()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def to_fp8(model: nn.Module, allow_cpu: bool = False) -> tuple[nn.Module, list[str]]:
    """A copy of `model` with every eligible FP8 linear running in FP8, and the names converted. On a device
    without FP8 matmuls nothing converts (the copy is the fake-quant model) unless allow_cpu."""
    model = copy.deepcopy(model)
    device = next(model.parameters()).device
    if not (fp8_supported(device) or (allow_cpu and device.type == "cpu")):
        return model, []
    names = []
    for name, layer in quant_layers(model).items():
        if fp8_eligible(layer):
            model.set_submodule(name, Fp8Linear(layer, allow_cpu=allow_cpu))
            names.append(name)
    return model, names
