"""Quantized modules: activation quantizer (static or per timestep), linear, conv, and an attention processor.

Weights are quantized once per output channel (the dequantized weight is cached until the weight or its
step size changes); activations are quantized per tensor at run time with calibrated parameters. With TPQ
(DilateQuant, Liu et al. 2024) an activation quantizer holds one (scale, zero point) per calibrated timestep
and every sample of a batch gathers its own by its timestep, so a batch may mix timesteps.

The timestep of each sample reaches the quantizers through a TimestepContext that a forward pre-hook on
the transformer fills from its `timestep=` argument, so the diffusers model runs unchanged.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.branches import LowRankBranch, OnlineRotation  # noqa: F401 (re-exported for wrap / io)
from quant.formats import (FormatSpec, block_params, effective_scale, element_codes, expand_blocks, fake_quant_blocks,
                           fake_quant_elements, fake_quantize_format, fp_range_quantizer, fp_scale_search, int_format,
                           pad_blocks, round_to_element, tensor_scale_for)
from quant.quantizers import (fake_quant, is_off, qrange, quant_params, quantize_codes,
                              search_params, search_range)

# Values kept per observed row for percentile / MSE activation search (with the exact min and max).
SAMPLES_PER_ROW = 512


class TimestepContext:
    """The per-sample timesteps of the forward in progress: a named, removable hook shared by every quantizer of
    one model.

    attach(model) registers its forward pre-hook (which reads `timestep=`) and keeps the handle, so remove()
    takes it off again; the quantizers that read it hold it (ActQuantizer.ctx), which is how
    find_timestep_context(model) finds it: nothing is stored on the model itself. fixed(t) sets the timesteps by
    hand for code that runs parts of the model without its forward (reconstruction units, shape tracing).
    """

    name = "timestep context"

    def __init__(self) -> None:
        self.t: torch.Tensor | None = None
        self.handle = None

    def __repr__(self) -> str:
        return f"TimestepContext(attached={self.handle is not None})"

    def attach(self, model: nn.Module) -> "TimestepContext":
        self.remove()
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)
        return self

    def attached_to(self, model: nn.Module) -> bool:
        return self.handle is not None and self.handle.id in model._forward_pre_hooks

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    @contextlib.contextmanager
    def fixed(self, t: torch.Tensor | None):
        """Inside the block the quantizers see timesteps `t` (per sample); the previous value comes back after."""
        saved, self.t = self.t, t
        try:
            yield self
        finally:
            self.t = saved

    def hook(self, module, args, kwargs):
        """Forward pre-hook (with_kwargs=True) on the denoiser: read `timestep` per sample."""
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        x = args[0] if args else kwargs.get("hidden_states")
        if t is None:
            self.t = None
            return
        t = torch.as_tensor(t, device=x.device).reshape(-1).long()
        self.t = t.expand(x.shape[0]) if t.numel() == 1 else t


def find_timestep_context(model: nn.Module) -> TimestepContext | None:
    """The TimestepContext the model's activation quantizers share, or None for a model without quantizers."""
    return next((m.ctx for m in model.modules() if isinstance(m, ActQuantizer) and m.ctx is not None), None)


def timestep_context(model: nn.Module) -> TimestepContext:
    """The model's TimestepContext, attached on first use: wrapping a model twice does not stack two hooks."""
    ctx = find_timestep_context(model)
    if ctx is None or not ctx.attached_to(model):
        ctx = (ctx or TimestepContext()).attach(model)
    return ctx


class ActQuantizer(nn.Module):
    """Activation fake quantizer with calibrated parameters, one set or one per timestep (TPQ).

    Static per tensor (the default): the calibrated (scale, zero) quantize the whole tensor, on an int grid or an
    FP element grid (fmt). Dynamic (per_token, or a block format such as MXFP4 / NVFP4 / int4-g32): the scales
    come from each tensor at run time (one per row of the input dimension, or one per block of G along it);
    the calibrated scale is then a per-tensor FP32 scale applied under them: NVFP4's second level, and with TPQ
    one per timestep for any dynamic format.
    Modes: "observe" records statistics and passes x through; "quant" fake-quantizes; "off" passes through.
    Buffers: scale [T], zero [T], timesteps [T] (T = 1 without TPQ, timestep -1 meaning any).
    channel_axis: the input dimension of the layer reading x (-1 for a linear, 1 for a conv), along which
    blocks run and per-token scales reduce.
    """

    def __init__(self, bits: int | None, symmetric: bool = False, search: str = "minmax",
                 percentile: float = 99.99, per_timestep: bool = False, ctx: TimestepContext | None = None,
                 num_timesteps: int = 1, fmt: FormatSpec | None = None, per_token: bool = False,
                 channel_axis: int = -1):
        super().__init__()
        self.fmt = fmt if fmt is not None else int_format(bits)
        self.per_token, self.channel_axis = per_token, channel_axis
        if self.fmt.is_float or self.dynamic:
            symmetric = True  # FP grids and dynamic scales are symmetric: no zero point
        self.bits, self.symmetric, self.search, self.percentile = bits, symmetric, search, percentile
        self.per_timestep = per_timestep
        self.ctx = ctx
        self.mode = "quant"
        n = num_timesteps if per_timestep else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero", torch.zeros(n))
        self.register_buffer("timesteps", torch.full((n,), -1, dtype=torch.long))
        self._rows: list[tuple[torch.Tensor, ...]] = []

    @property
    def enabled(self) -> bool:
        return not is_off(self.bits)

    @property
    def dynamic(self) -> bool:
        """Scales computed from each tensor at run time (per token or per block)."""
        return self.per_token or self.fmt.blocked

    @property
    def uses_tensor_scale(self) -> bool:
        """A dynamic quantizer applies its calibrated per-tensor scale (NVFP4's, or any with TPQ)."""
        return self.fmt.tensor_scale or self.per_timestep

    def extra_repr(self) -> str:
        fmt = "" if self.fmt.name == "int" and not self.fmt.blocked else f", format={self.fmt.describe()}"
        tok = ", per_token" if self.per_token else ""
        return (f"bits={self.bits}{fmt}{tok}, symmetric={self.symmetric}, tpq={self.per_timestep}, "
                f"T={self.scale.numel()}")

    def _sample_t(self, batch: int, device) -> torch.Tensor:
        t = self.ctx.t if self.ctx is not None else None
        if t is None:
            if self.per_timestep:
                raise RuntimeError("a per-timestep (TPQ) quantizer ran without a timestep: call the transformer "
                                   "with timestep=..., so its pre-hook can route each sample")
            return torch.full((batch,), -1, dtype=torch.long, device=device)
        if t.numel() != batch:
            if t.numel() == 1:
                return t.expand(batch)
            raise RuntimeError(f"activation batch {batch} does not match {t.numel()} timesteps of this forward")
        return t.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.mode == "off":
            return x
        if self.mode == "observe":
            self._observe(x)
            return x
        if self.dynamic:
            return self._dynamic(x)
        if self.fmt.is_float:
            return fake_quant_elements(x, self.fmt, self.params_for(x)[0])
        return fake_quant(x, *self.params_for(x), self.bits, self.symmetric)

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token or per-block scales from x itself, under the calibrated tensor scale where one is used."""
        ts = self.params_for(x)[0] if self.uses_tensor_scale else None
        moved = x.movedim(self.channel_axis, -1)
        if ts is not None and not self.fmt.tensor_scale:  # TPQ: quantize x / s_t, then scale back
            ts_m = ts.movedim(self.channel_axis, -1)
            return self._dynamic_core(moved / ts_m, None).mul(ts_m).movedim(-1, self.channel_axis)
        if ts is not None:
            ts = ts.movedim(self.channel_axis, -1)
        return self._dynamic_core(moved, ts).movedim(-1, self.channel_axis)

    def _dynamic_core(self, x: torch.Tensor, ts: torch.Tensor | None) -> torch.Tensor:
        if self.fmt.blocked:
            return fake_quant_blocks(x, self.fmt, ts, self.symmetric)
        return fake_quantize_format(x, self.fmt, axis=-1, granularity="token", symmetric=self.symmetric)

    def params_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) broadcastable to x: one pair, or (TPQ) each sample's pair by its timestep."""
        if not self.per_timestep or self.scale.numel() == 1:
            return self.scale[:1].reshape([1] * x.dim()), self.zero[:1].reshape([1] * x.dim())
        t = self._sample_t(x.shape[0], x.device)
        # nearest calibrated timestep, so sampling with another step count still finds parameters
        idx = (t[:, None] - self.timesteps[None, :]).abs().argmin(dim=1)
        shape = [-1] + [1] * (x.dim() - 1)
        return self.scale[idx].reshape(shape), self.zero[idx].reshape(shape)

    # --- calibration -------------------------------------------------------------------------------------
    def start_observing(self) -> None:
        self._rows = []
        self.mode = "observe"

    def stop_observing(self) -> None:
        """Back to quantizing; whatever was recorded and not finalized is dropped."""
        self._rows = []
        self.mode = "quant"

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(x.shape[0], -1).float()
        t = self._sample_t(x.shape[0], x.device)
        entry = (t, rows.amin(dim=1), rows.amax(dim=1))
        if self.search != "minmax":
            n = rows.shape[1]
            if n > SAMPLES_PER_ROW:
                gen = torch.Generator(device="cpu").manual_seed(n)  # the same positions for every row
                idx = torch.randperm(n, generator=gen)[:SAMPLES_PER_ROW].to(rows.device)
                rows = rows[:, idx]
            entry = entry + (rows,)
        self._rows.append(entry)

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the observed rows into (scale, zero) per timestep (TPQ) or for all rows, and switch to quant."""
        if not self._rows:
            raise RuntimeError("this quantizer saw no data during calibration")
        parts = list(zip(*self._rows))
        t, lo, hi = (torch.cat(p) for p in parts[:3])
        groups, inv = (torch.unique(t, return_inverse=True) if self.per_timestep
                       else (t.new_full((1,), -1), torch.zeros_like(t)))
        g = groups.numel()
        g_lo = torch.full((g,), float("inf"), device=lo.device).scatter_reduce(0, inv, lo, "amin")
        g_hi = torch.full((g,), float("-inf"), device=hi.device).scatter_reduce(0, inv, hi, "amax")
        if self.search != "minmax":
            values = torch.cat(parts[3])
            for k in range(g):  # loop over timestep groups (tens), each search vectorized
                v = values[inv == k].reshape(1, -1)
                v = torch.cat([v, g_lo[k].reshape(1, 1), g_hi[k].reshape(1, 1)], dim=1)  # keep exact extremes
                grid = fp_range_quantizer(self.fmt) if self.fmt.is_float and not self.dynamic else None
                c_lo, c_hi = search_range(v, self.bits, self.symmetric, self.search, self.percentile, quantize=grid)
                g_lo[k], g_hi[k] = c_lo[0], c_hi[0]
        scale, zero = self._params_from_range(g_lo, g_hi)
        self.scale = scale.to(self.scale.device)
        self.zero = zero.to(self.zero.device)
        self.timesteps = groups.to(self.timesteps.device)
        self._rows = []
        self.mode = "quant"

    def _params_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of calibrated ranges: the int grid's, amax / elem_max for an FP grid, and for a dynamic
        quantizer its tensor scale (NVFP4: amax / (448 * 6); otherwise amax / elem_max)."""
        amax = torch.maximum(-lo, hi).clamp_min(1e-30)
        if self.dynamic:
            scale = tensor_scale_for(amax, self.fmt) if self.fmt.tensor_scale else amax / self.fmt.qmax
            return scale, torch.zeros_like(scale)
        if self.fmt.is_float:
            return amax / self.fmt.qmax, torch.zeros_like(amax)
        return quant_params(lo, hi, self.bits, self.symmetric)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A TPQ quantizer's buffers are as long as the calibration's timestep count: adopt the saved size.
        for name in ("scale", "zero", "timesteps"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _WeightQuant:
    """Mixin: a weight quantized once per output channel, per tensor, or per block of G along its input
    dimension (w_fmt), its dequantized copy cached until it changes.

    Buffers: w_scale and w_zero, [out, 1, ...] per channel, [1, ...] per tensor, [out, blocks] per block (a conv's
    input dimension is in x kh x kw, flattened); w_tscale [1] for a format with a tensor scale (NVFP4)."""

    def _init_weight_quant(self, bits: int | None, per_channel: bool, symmetric: bool, search: str,
                           percentile: float, fmt: FormatSpec | None = None) -> None:
        self.w_fmt = fmt if fmt is not None else int_format(bits)
        if self.w_fmt.is_float:
            symmetric = True  # FP grids are symmetric about zero
        self.w_bits, self.w_per_channel, self.w_symmetric = bits, per_channel, symmetric
        self.w_search, self.w_percentile = search, percentile
        out = self.weight.shape[0]
        if self.w_fmt.blocked:
            k = self.weight[0].numel()
            shape = [out, -(-k // self.w_fmt.group)]
        else:
            shape = [out] + [1] * (self.weight.dim() - 1) if per_channel else [1] * self.weight.dim()
        self.register_buffer("w_scale", torch.ones(shape, device=self.weight.device))
        self.register_buffer("w_zero", torch.zeros(shape, device=self.weight.device))
        if self.w_fmt.tensor_scale:
            self.register_buffer("w_tscale", torch.ones(1, device=self.weight.device))
        self.use_fp_weight = False  # True while calibrating activations on the FP (folded) model
        # While block-wise reconstruction learns this layer's rounding (quant.recon.adaround), a callable that
        # returns the soft-rounded weight; None otherwise (it is never saved).
        self.weight_override = None
        self.error_stats: list[float] | None = None  # [sum sq error, sum sq reference] when measuring
        self._cache: tuple | None = None
        # quant.branches: an online input rotation and a float low-rank branch, set by wrap_model's layer plan
        self.rotation: OnlineRotation | None = None
        self.lowrank: LowRankBranch | None = None
        if not is_off(bits):
            self.calibrate_weight()

    @torch.no_grad()
    def calibrate_weight(self) -> None:
        """Weight scales from the current weight: per output channel (axis 0), per tensor, or per block (the
        block scale's own rule: E8M0 / E4M3 / fp16 from each block's range; the range search is per channel /
        tensor only)."""
        fmt, w = self.w_fmt, self.weight.detach()
        if fmt.blocked:
            flat = w.reshape(w.shape[0], -1).float()
            ts = None
            if fmt.tensor_scale:
                ts = tensor_scale_for(flat.abs().amax(), fmt).reshape(1)
                self.w_tscale = ts.to(w.device)
            scale, zero = block_params(pad_blocks(flat, fmt.group), fmt, ts, self.w_symmetric)
        elif fmt.is_float:
            scale = fp_scale_search(w, fmt, 0 if self.w_per_channel else None, self.w_search, self.w_percentile)
            zero = torch.zeros_like(scale)
        else:
            scale, zero = search_params(w, self.w_bits, 0 if self.w_per_channel else None,
                                        self.w_symmetric, self.w_search, self.w_percentile)
        self.w_scale = scale.reshape(self.w_scale.shape).to(w.device)
        self.w_zero = zero.reshape(self.w_zero.shape).to(w.device)
        self._cache = None

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) broadcastable to the weight: block scales expanded to every element and multiplied by
        the tensor scale (NVFP4); the per-channel / per-tensor buffers as they are."""
        if not self.w_fmt.blocked:
            return self.w_scale, self.w_zero
        shape, k = self.weight.shape, self.weight[0].numel()
        scale = effective_scale(self.w_scale, getattr(self, "w_tscale", None) if self.w_fmt.tensor_scale else None)
        expand = lambda v: expand_blocks(v, self.w_fmt.group, k).reshape(shape)  # noqa: E731
        return expand(scale), expand(self.w_zero)

    def fake_quant_weight(self, w: torch.Tensor, ste: bool = False) -> torch.Tensor:
        """w on this layer's grid with its scales (w may be a latent weight under training)."""
        scale, zero = self.weight_qparams()
        if not self.w_fmt.is_float:
            return fake_quant(w, scale, zero, self.w_bits, self.w_symmetric)
        return fake_quant_elements(w, self.w_fmt, scale, ste=ste)

    @torch.no_grad()
    def weight_codes(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The stored codes of the weight (int64, non-negative): int grid codes minus qmin, or FP bit patterns."""
        w = self.weight.detach() if w is None else w
        scale, zero = self.weight_qparams()
        if self.w_fmt.is_float:
            # the same rounding fake_quant_elements does, so codes * scale is the quantized weight bit for bit
            return element_codes(round_to_element(w / scale.to(w.dtype), self.w_fmt.element), self.w_fmt.element)
        qmin, _ = qrange(self.w_bits, self.w_symmetric)
        return (quantize_codes(w, scale, zero, self.w_bits, self.w_symmetric) - qmin).to(torch.int64)

    def quantize_columns(self, cols: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize some input columns of the weight exactly as this layer's weight quantizer does
        (its format and scales): the rounding step GPTQ (quant.gptq) calls column by column. cols is [out, k]
        (a conv's weight flattened to [out, in * kh * kw]) and index [k] their flat column positions, which
        pick each column's scales (per channel, per tensor, or its block's)."""
        scale, zero = self.weight_qparams()
        shape = self.weight.shape
        scale = scale.expand(shape).reshape(shape[0], -1)[:, index].to(cols)
        zero = zero.expand(shape).reshape(shape[0], -1)[:, index].to(cols)
        if not self.w_fmt.is_float:
            return fake_quant(cols, scale, zero, self.w_bits, self.w_symmetric)
        return fake_quant_elements(cols, self.w_fmt, scale)

    def quantized_weight(self) -> torch.Tensor:
        if is_off(self.w_bits) or self.use_fp_weight:
            return self.weight
        if getattr(self, "weight_override", None) is not None:
            return self.weight_override()
        if torch.is_grad_enabled() and (self.weight.requires_grad or self.w_scale.requires_grad):
            return self.fake_quant_weight(self.weight)
        key = (id(self.weight), self.weight.data_ptr(), self.weight._version, id(self.w_scale), self.w_scale._version,
               id(self.w_zero), self.w_zero._version)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                wq = self.fake_quant_weight(self.weight)
            self._cache = (key, wq)
        return self._cache[1]

    def _measure(self, x: torch.Tensor, y: torch.Tensor, reference) -> None:
        """Accumulate this layer's own error: quantized output vs FP output on the same (unquantized) input."""
        with torch.no_grad():
            ref = reference(x)
            if self.error_stats is None:
                self.error_stats = [0.0, 0.0]
            self.error_stats[0] += float((y - ref).float().pow(2).sum())
            self.error_stats[1] += float(ref.float().pow(2).sum())


class QuantLinear(_WeightQuant, nn.Linear):
    """Y = Q_a(X) Q_w(W)^T + b. Still an nn.Linear (same weight/bias names), so hooks and statistics work."""

    def __init__(self, linear: nn.Linear, w_bits: int | None, act: ActQuantizer, per_channel: bool = True,
                 w_symmetric: bool = False, search: str = "minmax", percentile: float = 99.99,
                 w_fmt: FormatSpec | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.act = act
        self._init_weight_quant(w_bits, per_channel, w_symmetric, search, percentile, w_fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation(x)
        y = F.linear(self.act(x), self.quantized_weight(), self.bias)
        if self.lowrank is not None:
            y = y + self.lowrank.linear(x)
        if self.error_stats is not None:
            self._measure(x, y, self.float_forward)
        return y

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer in float on an (already rotated) input: what the quantized output is compared with."""
        y = F.linear(x, self.weight, self.bias)
        return y if self.lowrank is None else y + self.lowrank.linear(x)

    def extra_repr(self) -> str:
        fmt = "" if self.w_fmt.name == "int" and not self.w_fmt.blocked else f", w_format={self.w_fmt.describe()}"
        return f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}{fmt}"


class QuantConv2d(_WeightQuant, nn.Conv2d):
    """A convolution (a DiT's patch embedding, a UNet's convs) with weights per output channel and its input
    per tensor."""

    def __init__(self, conv: nn.Conv2d, w_bits: int | None, act: ActQuantizer, per_channel: bool = True,
                 w_symmetric: bool = False, search: str = "minmax", percentile: float = 99.99,
                 w_fmt: FormatSpec | None = None):
        nn.Module.__init__(self)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(conv, attr))
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.act = act
        self._init_weight_quant(w_bits, per_channel, w_symmetric, search, percentile, w_fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(self.act(x), self.quantized_weight(), self.bias)
        if self.lowrank is not None:
            y = y + self.lowrank.conv(x, self)
        if self.error_stats is not None:
            self._measure(x, y, self.float_forward)
        return y

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        return y if self.lowrank is None else y + self.lowrank.conv(x, self)

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, k={self.kernel_size}, w_bits={self.w_bits}"


class QuantAttnProcessor:
    """diffusers attention with q, k, v and the softmax output fake-quantized (softmax computed explicitly).

    The quantizers live on the Attention module itself (attn.q_quant, k_quant, v_quant, softmax_quant), so
    they are in its state dict and move with .to(); this processor holds no state.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            raise NotImplementedError("QuantAttnProcessor supports self-attention without a spatial norm")
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:  # a UNet attention normalises its input itself (diffusers' order)
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (v.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for v in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query, key, value = attn.q_quant(query), attn.k_quant(key), attn.v_quant(value)
        scores = (query @ key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1])
        probs = attn.softmax_quant(scores.softmax(dim=-1))
        out = (probs @ value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def act_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ActQuantizer)}


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized linear / conv of `model` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}


@contextlib.contextmanager
def calibrating(model: nn.Module):
    """While open, every enabled activation quantizer of `model` records what it sees and every quantized
    layer computes with its FP weight (the folded FP model); on a clean exit the quantizers finalize their
    ranges. On any exit they are back in "quant" mode with nothing recorded and the weights quantized."""
    quantizers = [q for q in act_quantizers(model).values() if q.enabled]
    layers = list(quant_layers(model).values())
    for q in quantizers:
        q.start_observing()
    for layer in layers:
        layer.use_fp_weight = True
    try:
        yield quantizers
        for q in quantizers:
            q.finalize()
    finally:
        for q in quantizers:
            q.stop_observing()
        for layer in layers:
            layer.use_fp_weight = False
