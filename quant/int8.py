"""INT8 inference: W8A8 linears that really multiply int8 x int8 -> int32.

A fake-quantized linear (quant.modules.QuantLinear) computes Y = Q_a(X) Q_w(W)^T + b in floating point, with
    Q_a(X) = (A - z_a) d_a,   A = clamp(round(X / d_a) + z_a, 0, 255)   one (d_a, z_a) per tensor, or per
                                                                       sample by its timestep with TPQ
    Q_w(W) = (Q - z_w) d_w,   Q = the stored weight codes               one (d_w, z_w) per output channel j
Shifting both code ranges by 128 makes them int8 (A' = A - 128, z_a' = z_a - 128, likewise Q', z_w'), and
    Y_ij = d_a d_w[j] ( sum_k A'_ik Q'_jk  -  z_w'[j] sum_k A'_ik  -  z_a' sum_k Q'_jk  +  K z_a' z_w'[j] ) + b_j
The first term is one integer matmul that accumulates exactly in int32 (each product is at most 2^14, so K up
to 2^17 cannot overflow); the row sums of A' are a per-row vector, the column sums of Q' are precomputed from
the weight, and the rest are per-channel constants, all applied with the scales and the bias in one float
epilogue. Symmetric quantizers (z = 0, codes already signed) skip the shift and their correction terms.

Two kernels compute it. On x86 CPUs oneDNN's quantized linear (torch.ops.onednn.qlinear_pointwise, the
kernel behind torch's x86 inductor quantization) takes the unsigned codes A with z_a, the int8 weight
and the scales, and applies d_a, d_w, z_a and the bias inside the GEMM; it needs z_w' = 0, so an asymmetric
weight's z_w' term is added after it as one rank-1 update. Elsewhere (CUDA, other CPUs) torch._int_mm
computes the integer product and every other term is applied in a float epilogue.

The result equals the fake-quant layer up to float rounding order (the integer part is exact; the float
path rounds every product). Which layers are worth it depends on the shape: a matmul with few rows (the
adaLN projection sees one row per image) or a narrow one gains nothing from int8 once the activation is
quantized and the epilogue applied, so `plan_int8` times both paths per (rows, in, out) shape on the
machine at hand and `to_int8` converts only the layers whose shape was faster in int8.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import threading
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.denoiser import denoise
from quant.modules import ActQuantizer, QuantLinear, find_timestep_context, quant_layers
from quant.quantizers import qrange, quantize_codes

# torch._int_mm on CUDA needs more than 16 rows and row counts / widths in multiples of 8.
_CUDA_MIN_ROWS = 17
_CUDA_MULTIPLE = 8


def _offset(symmetric: bool) -> int:
    """What to subtract from 8-bit codes to make them int8: 128 for [0, 255], 0 for symmetric codes."""
    return 0 if symmetric else 128


def int8_eligible(layer: nn.Module) -> bool:
    """A QuantLinear with 8-bit weights and an enabled 8-bit activation quantizer (W8A8), and nothing run beside
    its GEMM (an online rotation or a low-rank branch stays on the fake-quant path)."""
    return (isinstance(layer, QuantLinear) and layer.w_bits == 8 and layer.act.enabled and layer.act.bits == 8
            and not layer.use_fp_weight and _int_grids(layer) and layer.rotation is None
            and layer.lowrank is None)


def _int_grids(layer) -> bool:
    """Per-channel / per-tensor int grids on both sides (an FP8 layer runs through quant.fp8 instead)."""
    w, a = getattr(layer, "w_fmt", None), getattr(layer.act, "fmt", None)
    weights_int = w is None or (not w.is_float and not w.blocked)
    return weights_int and (a is None or (not a.is_float and not layer.act.dynamic))


def onednn_available() -> bool:
    """True where torch ships oneDNN's quantized linear (x86 CPU builds): int8 GEMM with a fused epilogue."""
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")


KERNELS = ("auto", "onednn", "int_mm")


class Int8Linear(nn.Module):
    """Y = d_a d_w (A' Q'^T - z_w' rowsum(A') - z_a' colsum(Q') + K z_a' z_w') + b, the matmul in int8.

    kernel: "onednn" (CPU) hands the uint8 activation codes, the int8 weight and the scales to oneDNN's
    quantized linear, which applies d_a d_w, z_a and the bias inside the GEMM and writes float; only an
    asymmetric weight's z_w' term remains, one rank-1 update. "int_mm" (CUDA, or any CPU) runs
    torch._int_mm and applies every term in a float epilogue. "auto": onednn on a CPU that has it.
    """

    def __init__(self, layer: QuantLinear, kernel: str = "auto"):
        super().__init__()
        if not int8_eligible(layer):
            raise ValueError(f"Int8Linear needs a W8A8 QuantLinear, got {layer!r}")
        if kernel not in KERNELS:
            raise ValueError(f"unknown INT8 kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        if kernel == "onednn" and not onednn_available():
            raise ValueError("this torch build has no oneDNN quantized linear; use kernel='int_mm'")
        self.in_features, self.out_features, self.kernel = layer.in_features, layer.out_features, kernel
        w_off = _offset(layer.w_symmetric)
        with torch.no_grad():
            codes = quantize_codes(layer.weight, layer.w_scale, layer.w_zero, 8, layer.w_symmetric) - w_off
            n = self.out_features
            self.register_buffer("weight_int8", codes.to(torch.int8).contiguous())  # [out, in], like nn.Linear
            self.register_buffer("w_scale", layer.w_scale.reshape(-1).float().expand(n).clone())
            self.register_buffer("w_zero", (layer.w_zero.reshape(-1).float() - w_off).expand(n).clone())
            self.register_buffer("w_colsum", codes.sum(dim=1).float())
            self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
            # oneDNN's weight zero points: zero, the asymmetric part is applied apart (see _forward_onednn)
            self.register_buffer("_onednn_w_zp", torch.zeros(n, dtype=torch.int64), persistent=False)
        self.w_symmetric = layer.w_symmetric
        self.act: ActQuantizer = copy.deepcopy(layer.act)
        self.act.ctx = layer.act.ctx  # the model's one timestep context, not a copy of it
        self._packed = None  # oneDNN's packed weight, made on first use (an opaque tensor, never saved)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 x int8 -> int32, kernel={self.kernel}"

    def _use_onednn(self, x: torch.Tensor) -> bool:
        if self.kernel == "auto":
            return x.device.type == "cpu" and onednn_available()
        return self.kernel == "onednn"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, z = self.act.params_for(x)  # per tensor, or [B, 1, ...] per sample with TPQ
        if not self._use_onednn(x):
            return self._forward_int_mm(x, d.float(), z.float())
        if d.numel() == 1:
            return self._forward_onednn(x, float(d), int(z))
        # TPQ with timesteps mixed in one batch: one call per distinct (scale, zero); sampling never mixes
        d, z = d.reshape(-1), z.reshape(-1)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for dv, zv in torch.unique(torch.stack([d, z], dim=1), dim=0).tolist():
            rows = (d == dv) & (z == zv)
            out[rows] = self._forward_onednn(x[rows], dv, int(zv))
        return out

    def _forward_onednn(self, x: torch.Tensor, d: float, z: int) -> torch.Tensor:
        a, zp = _unsigned_codes(x, d, z, self.act.symmetric)
        return self.from_codes(a, d, zp).reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _packed_weight(self):
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)
        return self._packed

    def from_codes(self, a: torch.Tensor, d: float, zp: int) -> torch.Tensor:
        """The float output [rows, out] from this layer's uint8 activation codes `a` [rows, in] (zero point zp)."""
        y = torch.ops.onednn.qlinear_pointwise(a, d, zp, self._packed_weight(), self.w_scale, self._onednn_w_zp,
                                               self.bias, 1.0, 0, torch.float32, "none", [], "")
        if not self.w_symmetric:  # - d_a d_w z_w' sum_k (A_ik - z_a)
            centered = a.sum(dim=1, dtype=torch.int32).float().sub_(self.in_features * zp).mul_(d)
            y.addr_(centered, self.w_scale * self.w_zero, alpha=-1.0)
        return y

    def codes_with_gelu(self, a: torch.Tensor, d: float, zp: int, approximate: str, out_scale: float,
                        out_zero: int) -> torch.Tensor:
        """uint8 codes of GELU(this layer's output) on the grid (out_scale, out_zero), all inside oneDNN's GEMM
        (scales, bias, GELU as a post-op, the next quantizer's divide, round, shift and clamp): no float output
        is written. Needs symmetric weights (oneDNN takes no per-channel weight zero point)."""
        if not self.w_symmetric:
            raise ValueError("codes_with_gelu needs symmetric weights")
        return torch.ops.onednn.qlinear_pointwise(a, d, zp, self._packed_weight(), self.w_scale, self._onednn_w_zp,
                                                  self.bias, out_scale, out_zero, torch.uint8, "gelu", [],
                                                  approximate)

    def _forward_int_mm(self, x: torch.Tensor, d: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a_off = _offset(self.act.symmetric)
        qmin, qmax = qrange(8, self.act.symmetric)
        a = (x.float() / d).round_().add_(z).clamp_(qmin, qmax).sub_(a_off)  # exact small integers in float
        rows = a.reshape(-1, self.in_features)
        acc = _int_mm(rows.to(torch.int8), self.weight_int8.t())
        y = acc.reshape(*x.shape[:-1], self.out_features).float()
        if not self.w_symmetric:  # - z_w' * rowsum(A')
            y.addcmul_(a.sum(dim=-1, keepdim=True), self.w_zero, value=-1.0)
        if not self.act.symmetric:  # - z_a' colsum(Q') + K z_a' z_w'
            y.add_((z - a_off) * (self.in_features * self.w_zero - self.w_colsum))
        y.mul_(d * self.w_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = None  # oneDNN's opaque packed weight does not copy; it is rebuilt on use
        return state

    def _apply(self, fn, recurse=True):
        self._packed = None  # moved or cast: pack again on the next forward
        return super()._apply(fn, recurse)


class Int8FeedForward(nn.Module):
    """A DiT MLP (diffusers FeedForward: fc1 = GELU(proj), dropout, fc2) whose fc1 hands fc2 its int8 codes.

    fc1's GEMM applies its scales and bias, GELU (oneDNN post-op) and fc2's activation quantizer, and writes
    uint8 codes on fc2's grid; fc2 multiplies them as they are. Against running the two Int8Linears this
    drops GELU's pass over the [rows, 4 x width] hidden tensor, fc2's divide / round / clamp / convert passes
    over it, and fc1's float output (4 bytes an element become 1). The integer parts stay exact; GELU and the
    requantization round in oneDNN's float order instead of torch's, so a hidden value on a rounding boundary
    of fc2's grid can land on the neighbouring code (the same kind of difference as the epilogue's).
    Used when fc1 has symmetric weights (see Int8Linear.codes_with_gelu) and fc2's quantizer gives the whole
    batch one (scale, zero); otherwise, e.g. TPQ with timesteps mixed in a batch, the two layers run apart.
    """

    def __init__(self, fc1: Int8Linear, fc2: Int8Linear, approximate: str):
        super().__init__()
        self.fc1, self.fc2, self.approximate = fc1, fc2, approximate

    def extra_repr(self) -> str:
        return f"gelu={self.approximate}, fc1 -> uint8 codes -> fc2"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        d1, z1 = self.fc1.act.params_for(x)
        d2, z2 = self.fc2.act.params_for(x)  # fc2's input has x's batch dimensions
        if not (x.device.type == "cpu" and _one_value(d1, z1) and _one_value(d2, z2)):
            return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))
        d1, z1, d2, z2 = float(d1.flatten()[0]), int(z1.flatten()[0]), float(d2.flatten()[0]), int(z2.flatten()[0])
        a, zp = _unsigned_codes(x, d1, z1, self.fc1.act.symmetric)
        zp2 = z2 + 128 - _offset(self.fc2.act.symmetric)
        hidden = self.fc1.codes_with_gelu(a, d1, zp, self.approximate, d2, zp2)
        y = self.fc2.from_codes(hidden, d2, zp2)
        return y.reshape(*x.shape[:-1], self.fc2.out_features).to(x.dtype)


def _one_value(d: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether a quantizer's per-sample (scale, zero) is the same for every sample."""
    return d.numel() == 1 or (bool((d == d.flatten()[0]).all()) and bool((z == z.flatten()[0]).all()))


def _fusable_feed_forward(module: nn.Module) -> str | None:
    """GELU's `approximate` if `module` is a diffusers FeedForward whose fc1 and fc2 both run on oneDNN in
    int8 with fc1's weights symmetric; else None. (Duck-typed: quant/ does not import diffusers here.)"""
    net = getattr(module, "net", None)
    if type(module).__name__ != "FeedForward" or not isinstance(net, nn.ModuleList) or len(net) not in (3, 4):
        return None
    act, fc2 = net[0], net[2]
    if type(act).__name__ != "GELU" or not isinstance(getattr(act, "proj", None), Int8Linear):
        return None
    if not isinstance(fc2, Int8Linear) or not all(isinstance(m, nn.Dropout) for m in (net[1], *net[3:])):
        return None
    fc1 = act.proj
    if not (fc1.w_symmetric and onednn_available() and fc1.kernel in ("auto", "onednn")
            and fc2.kernel in ("auto", "onednn")):
        return None
    return act.approximate


# The last activation quantized, per thread: to_q, to_k and to_v read the same tensor with the same
# calibrated range (one input, one set of statistics), so it is quantized once. The entry holds a weak
# reference to the input tensor itself (so a new tensor at a reused address never matches) and its
# version counter (so an in-place change does not either).
_recent = threading.local()


def _unsigned_codes(x: torch.Tensor, d: float, z: int, symmetric: bool) -> tuple[torch.Tensor, int]:
    """(uint8 codes [rows, in] of x, their zero point) as oneDNN takes them: symmetric codes shift by 128."""
    key = (x._version, d, z, symmetric)
    last = getattr(_recent, "entry", None)
    if last is not None and last[0]() is x and last[1] == key:
        return last[2], last[3]
    qmin, qmax = qrange(8, symmetric)
    shift = 128 - _offset(symmetric)
    rows = x.reshape(-1, x.shape[-1]).float()
    a = (rows / d).round_().clamp_(qmin - z, qmax - z).add_(z + shift).to(torch.uint8)
    _recent.entry = (weakref.ref(x), key, a, z + shift)
    return a, z + shift


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm, with rows padded where the CUDA kernel needs it."""
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    m = a.shape[0]
    padded = max(_CUDA_MIN_ROWS, m)
    padded += (-padded) % _CUDA_MULTIPLE
    if padded != m:
        a = torch.cat([a, a.new_zeros(padded - m, a.shape[1])])
    return torch._int_mm(a, b)[:m]


@dataclasses.dataclass
class ShapeTiming:
    """One linear shape timed both ways: rows x in_features -> out_features."""

    rows: int
    in_features: int
    out_features: int
    float_ms: float
    int8_ms: float

    @property
    def int8(self) -> bool:
        return self.int8_ms < self.float_ms

    def key(self) -> str:
        return f"{self.rows}x{self.in_features}x{self.out_features}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "speedup": self.float_ms / self.int8_ms, "int8": self.int8}


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocation and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def layer_input_shapes(model: nn.Module, example: tuple) -> dict[str, tuple[int, ...]]:
    """The input shape each W8A8 linear sees in one forward of `example` = (x, t, y)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: the input goes on unchanged
        return hook

    hooks = [layer.register_forward_pre_hook(record(name))
             for name, layer in quant_layers(model).items() if int8_eligible(layer)]
    x, t, y = example
    p = next(model.parameters())
    try:
        with torch.no_grad():
            denoise(model, x.to(p.device, p.dtype), t.to(p.device), y.to(p.device))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _shape_key(input_shape: tuple[int, ...], layer: nn.Module) -> tuple[int, int, int]:
    """(rows, in, out): the matmul a linear runs on an input of this shape."""
    return math.prod(input_shape[:-1]), layer.in_features, layer.out_features


@torch.no_grad()
def plan_int8(model: nn.Module, example: tuple, repeats: int = 5, kernel: str = "auto") -> dict[str, dict]:
    """Per layer of `model` (a W8A8 quant model): whether its shape runs faster in int8, measured here.

    Each distinct (rows, in, out) shape seen in one forward of `example` is timed once through the
    fake-quant layer and through its Int8Linear, on random inputs with the layer's own quantizers (the
    TPQ quantizers answer for the example's first timestep). Returns layer name -> ShapeTiming.to_dict().
    """
    layers = quant_layers(model)
    shapes = layer_input_shapes(model, example)
    ctx = find_timestep_context(model)
    timings: dict[tuple, ShapeTiming] = {}
    p = next(model.parameters())
    with contextlib.nullcontext() if ctx is None else ctx.fixed(example[1][:1].to(p.device).long()):
        for name, shape in shapes.items():
            layer = layers[name]
            key = _shape_key(shape, layer)
            if key in timings:
                continue
            rows = key[0]
            x = torch.randn(1, rows, layer.in_features, device=p.device, dtype=p.dtype)
            fast = Int8Linear(layer, kernel)
            timings[key] = ShapeTiming(rows, layer.in_features, layer.out_features,
                                       float_ms=_median_ms(lambda: layer(x), repeats),
                                       int8_ms=_median_ms(lambda: fast(x), repeats))
    return {name: timings[_shape_key(shape, layers[name])].to_dict() for name, shape in shapes.items()}


def to_int8(model: nn.Module, plan: dict[str, dict] | None = None, kernel: str = "auto",
            fuse: bool = True) -> nn.Module:
    """A copy of `model` whose W8A8 linears run int8 matmuls: every eligible one, or those `plan` marks int8.
    fuse: a DiT MLP whose two linears both run in int8 (fc1 with symmetric weights, on oneDNN) becomes one
    Int8FeedForward, fc1 writing fc2's codes with GELU inside its GEMM.

    The input model is not modified. The copy keeps the model's timestep context, so TPQ quantizers still
    route each sample to its timestep's (scale, zero). Raises ValueError when nothing is W8A8.
    """
    new = copy.deepcopy(model)
    eligible = {n: m for n, m in quant_layers(new).items() if int8_eligible(m)}
    if not eligible:
        raise ValueError("no W8A8 linear layer to convert: quantize with --w-bits 8 --a-bits 8 first")
    converted = []
    for name, layer in eligible.items():
        if plan is not None and not plan.get(name, {}).get("int8", False):
            continue
        new.set_submodule(name, Int8Linear(layer, kernel))
        converted.append(name)
    if fuse:
        for name, module in list(new.named_modules()):
            approximate = _fusable_feed_forward(module)
            if approximate is not None:
                new.set_submodule(name, Int8FeedForward(module.net[0].proj, module.net[2], approximate))
    return new.eval()


def int8_layers(model: nn.Module) -> dict[str, Int8Linear]:
    """Every Int8Linear of `model` by name (inside a fused MLP: the MLP's name + .fc1 / .fc2)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
