"""GPTQ (Frantar et al., ICLR 2023): second-order weight rounding, one layer at a time.

For a layer Y = X W^T the rounding error of W shows in the output as ||(W - Q) X^T||^2 = tr((W - Q) H (W - Q)^T)
with H = 2 X^T X / n over the n calibration rows (tokens x samples x timesteps, as the calibration draws
them). GPTQ quantizes the input columns one at a time and moves each column's error onto the columns not yet
quantized, weighted by the inverse Hessian (Optimal Brain Surgeon's update):

    H   <- H + lambda I,   lambda = damp * mean(diag H)                      (damping, paper: 1%)
    U   = chol(H^-1)^T  (upper)                                              (the rows of H^-1 needed, stably)
    for column j:  q_j = quant(w_j);  e = (w_j - q_j) / U_jj;  w_k -= e U_jk  for k > j
    ("lazy batch" form: inside a block of 128 columns, then once per block for the columns after it)

act_order quantizes the columns in order of decreasing diag(H) (the inputs with most energy first). The
rounding itself is the layer's own weight quantizer (QuantLinear.quantize_columns): its scales, its format.
Scales are set from the weight before GPTQ runs ("static groups" in the reference code's terms).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.forward import forward_batches
from quant.modules import QuantConv2d, quant_layers
from quant.quantizers import is_off


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, quantize_columns: Callable, block: int = 128,
                  damp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """Q for a weight w [out, in] and its input Hessian [in, in]; quantize_columns(cols [out, k], index [k])
    rounds columns as the layer's quantizer does. Returns Q [out, in] in w's dtype (every entry on the grid)."""
    dtype = w.dtype
    w = w.detach().float().clone()
    h = hessian.detach().float().clone()
    n = w.shape[1]
    dead = torch.diagonal(h) == 0  # inputs that were always zero: any weight there is free
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n, device=w.device)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(n, device=h.device, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for start in range(0, n, block):
        stop = min(start + block, n)
        w1, u1 = w[:, start:stop].clone(), u[start:stop, start:stop]
        err = torch.zeros_like(w1)
        for i in range(stop - start):
            col = w1[:, i:i + 1]
            qc = quantize_columns(col, order[start + i:start + i + 1])
            q[:, start + i:start + i + 1] = qc
            e = (col - qc) / u1[i, i]
            w1[:, i:] -= e @ u1[i:i + 1, i:]
            err[:, i:i + 1] = e
        w[:, stop:] -= err @ u[start:stop, stop:]
    return q[:, torch.argsort(order)].to(dtype)


def output_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's squared output error on the calibration rows (x 2 / n)."""
    e = (w - q).float()
    return float(((e @ hessian.float()) * e).sum())


class HessianHooks:
    """Context manager: H = 2 X^T X / n of what each layer's GEMM multiplies (its activation quantizer's output,
    after any online rotation), for every given layer in one pass. A conv's rows are its unfolded patches."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.h: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self._handles = []

    def __enter__(self):
        for name, layer in self.layers.items():
            self._handles.append(layer.act.register_forward_hook(self._hook(name, layer)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str, layer: nn.Module):
        def hook(module, args, out):
            x = out.detach()
            if isinstance(layer, QuantConv2d):
                x = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride).transpose(1, 2)
            x = x.reshape(-1, x.shape[-1]).float()
            if name not in self.h:
                self.h[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                self.n[name] = 0
            self.h[name] += 2.0 * x.T @ x
            self.n[name] += x.shape[0]
        return hook

    def hessians(self) -> dict[str, torch.Tensor]:
        return {k: v / max(self.n[k], 1) for k, v in self.h.items()}


@torch.no_grad()
def gptq_model(model: nn.Module, batches: list, block: int = 128, damp: float = 0.01,
               act_order: bool = False, rows: int | None = 256, batch_size: int = 64) -> dict:
    """Round every quantized layer's weight of a wrapped, calibrated model by GPTQ, in place.

    One pass collects every layer's Hessian with the activations quantized and the weights in float (each
    layer sees its FP prefix: GPTQ's layer-parallel form, not the sequential one). Returns a report:
    per layer the output error tr(E H E^T) of round-to-nearest and of GPTQ, and the seconds. rows: calibration
    rows drawn at random across every timestep for the Hessians (None: all)."""
    from quant.recon.engine import calibration_rows

    start = time.perf_counter()
    if rows is not None:
        x, t, y = calibration_rows(batches, rows)
        batches = [(x[i:i + batch_size], t[i:i + batch_size], y[i:i + batch_size])
                   for i in range(0, len(x), batch_size)]
    layers = {n: m for n, m in quant_layers(model).items() if not is_off(m.w_bits) and getattr(m, "groups", 1) == 1}
    for layer in layers.values():
        layer.use_fp_weight = True
    try:
        with HessianHooks(layers) as hooks:
            forward_batches(model, batches)
    finally:
        for layer in layers.values():
            layer.use_fp_weight = False
    hessians = hooks.hessians()
    hessian_s = time.perf_counter() - start
    report = {}
    for name, layer in layers.items():
        if name not in hessians:
            continue
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        h = hessians[name].to(w.device)
        q = gptq_quantize(w, h, layer.quantize_columns, block, damp, act_order)
        rtn = layer.quantize_columns(w.float(), torch.arange(w.shape[1], device=w.device))
        report[name] = {"rtn_error": output_error(w, rtn, h), "gptq_error": output_error(w, q, h)}
        layer.weight.data.copy_(q.reshape(layer.weight.shape))
        layer._cache = None
    rtn, gptq = sum(r["rtn_error"] for r in report.values()), sum(r["gptq_error"] for r in report.values())
    return {"layers": report, "rtn_error": rtn, "gptq_error": gptq,
            "error_ratio": gptq / rtn if rtn > 0 else 1.0, "hessian_seconds": hessian_s,
            "rows": sum(len(b[0]) for b in batches), "seconds": time.perf_counter() - start}
