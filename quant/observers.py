"""Forward-hook observers: per-channel statistics of what each linear or conv layer receives, per sample.

For a linear layer Y = X W^T with input X [B, tokens, C], the salience of input channel j for sample b is
s(X_j) = max over tokens of |X_bj| (PTQ4DiT, Wu et al. 2024, eq. 3); a convolution's input [B, C, H, W] is
handed on as [B, positions, C], so its tokens are the spatial positions. The observer records that, plus the
per-channel min and max, for every sample of every forward. Reductions run on the model's device inside
the hook; results stay there until the observer closes, so a pass makes no per-hook host copies.

Timesteps and labels come from a forward pre-hook on the top module (`timestep=` / `class_labels=` kwargs,
as diffusers' DiTTransformer2DModel takes them), so every row can be grouped by timestep afterwards.
A module that runs twice in one forward (in diffusers' DiT, block 0's embedding is called again by the
final layer) gets a second key, "name@2", so the two calls are not mixed.

Optional extras (off by default, so existing callers see exactly the same statistics):
- attention operands: for each attention module given, the outputs of to_q / to_k / to_v (keys "name.q",
  "name.k", "name.v", channels = heads x head_dim) and the softmax output P = softmax(q k^T / sqrt(d))
  (key "name.softmax", one "channel" per head: max / min of P over queries and keys). P is recomputed in a
  hook from q and k, so the model's own attention processor is never replaced.
- on-device group reduction (`group_null_label`): each forward's rows are reduced to one row per
  (timestep, conditional / unconditional) group before they are kept, so a long pass on a large model
  stores [groups, C] per forward instead of [batch, C]. Reduced rows carry y = -1 (conditional, classes
  mixed) or the null label (unconditional).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.nn as nn

from quant.conditioning import current_prompt_ids
from quant.forward import forward_batches
from quant.measures import weight_salience  # noqa: F401  (s(W), defined once in quant.measures)


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of `model` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@dataclasses.dataclass
class InputStats:
    """Per-sample, per-input-channel statistics; row m of every tensor is sample m of the observed passes."""

    t: torch.Tensor  # [M] timestep of each sample
    y: torch.Tensor  # [M] class label of each sample (the null label for unconditional rows)
    absmax: dict[str, torch.Tensor]  # layer -> [M, C] max over tokens of |X_j|
    cmin: dict[str, torch.Tensor]  # layer -> [M, C] min over tokens of X_j
    cmax: dict[str, torch.Tensor]  # layer -> [M, C] max over tokens of X_j

    @property
    def layers(self) -> list[str]:
        return list(self.absmax)

    @property
    def timesteps(self) -> list[int]:
        """Distinct timesteps in the order first seen (noisiest first for a sampling pass)."""
        return list(dict.fromkeys(self.t.tolist()))


class LayerInputHooks:
    """Context manager: forward pre-hooks on `layers` that hand each call's input to on_input(key, x).

    The key is the layer name, or "name@2" for a layer's second call in one forward (block 0's embedding in
    diffusers' DiT). Layers fed the very same tensor (to_q, to_k, to_v) share one computation: cached(x, fn)
    returns the previous result while x is the same, unmodified tensor (the cache holds a reference to it,
    so its memory cannot be reused by another tensor meanwhile). Every hook is removed on exit.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], on_input=None):
        self.model, self.layers = model, layers
        self.on_input = on_input
        self._handles: list = []
        self._calls: dict[str, int] = {}
        self._last: tuple | None = None  # (input tensor, its version, result) of the latest computed call

    def __enter__(self):
        self._handles.append(self.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name, module)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def _on_model(self, module, args, kwargs):
        self._calls.clear()
        self._last = None
        self.on_forward(args, kwargs)

    def on_forward(self, args, kwargs) -> None:
        """Called before every forward of the model (a subclass reads the timesteps here)."""

    def _make_hook(self, name: str, module: nn.Module):
        channels_first = isinstance(module, nn.Conv2d)

        def hook(module, args):
            x = args[0]
            if channels_first:  # [B, C, H, W] -> [B, positions, C] (a view): positions are a conv's tokens
                x = x.flatten(2).transpose(1, 2)
            self.on_input(self._key(name), x)
        return hook

    def _key(self, name: str) -> str:
        count = self._calls.get(name, 0) + 1
        self._calls[name] = count
        return name if count == 1 else f"{name}@{count}"

    def cached(self, x: torch.Tensor, compute):
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        value = compute(x)
        self._last = (x, x._version, value)
        return value


class InputObserver(LayerInputHooks):
    """Context manager: while open, records InputStats for `layers` on every forward of `model`.

    with InputObserver(model, linear_layers(model)) as obs:
        model(x, timestep=t, class_labels=y)
    stats = obs.stats()          # hooks are gone once the block exits
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module],
                 attention: dict[str, nn.Module] | None = None, group_null_label: int | None = None):
        super().__init__(model, layers, on_input=self._record)
        self.attention = attention or {}
        self.group_null_label = group_null_label
        self._groups: tuple[torch.Tensor, int] | None = None  # (row -> group index, group count) this forward
        self._pending_q: dict[str, torch.Tensor] = {}
        self._t: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self._rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # key -> [(min, max) per forward]

    def __enter__(self) -> "InputObserver":
        super().__enter__()
        for name, attn in self.attention.items():
            for op in ("q", "k", "v"):
                self._handles.append(getattr(attn, f"to_{op}").register_forward_hook(self._make_operand_hook(name, op, attn)))
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._pending_q.clear()

    def on_forward(self, args, kwargs) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        y = kwargs.get("class_labels", args[2] if len(args) > 2 else None)
        if y is None:  # a text-to-image denoiser: the prompt ids of this forward (quant.conditioning)
            y = current_prompt_ids(self.model)
        n = x.shape[0]
        t_rows, y_rows = _per_sample(t, n, x.device), _per_sample(y, n, x.device, fill=-1)
        if self.group_null_label is None:
            self._t.append(t_rows)
            self._y.append(y_rows)
            return
        # One group per (timestep, unconditional?) pair present in this forward; computed once per forward.
        uncond = (y_rows == self.group_null_label).long()
        keys, inverse = torch.unique(t_rows * 2 + uncond, return_inverse=True)
        self._groups = (inverse, keys.numel())
        self._t.append(keys // 2)
        self._y.append(torch.where(keys % 2 == 1, self.group_null_label, -1))

    def _record(self, key: str, x: torch.Tensor) -> None:
        self._rows.setdefault(key, []).append(self.cached(x, self._reduce))

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.detach()
        flat = flat.reshape(flat.shape[0], -1, flat.shape[-1])  # [B, tokens, C]; [B, C] inputs get one token
        # Only min and max are reduced here; max |x| = max(-min x, max x) is formed once, in stats().
        return self._group(flat.amin(1).float(), flat.amax(1).float())

    def _group(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._groups is not None:  # max(-min, max) commutes with the group max, so min/max suffice
            inverse, n_groups = self._groups
            lo, hi = _group_reduce(lo, inverse, n_groups, "amin"), _group_reduce(hi, inverse, n_groups, "amax")
        return lo, hi

    def _make_operand_hook(self, name: str, op: str, attn: nn.Module):
        def hook(module, args, output):
            key = self._key(f"{name}.{op}")
            self._record(key, output)
            if op == "q":
                self._pending_q[name] = output.detach()
            elif op == "k" and name in self._pending_q:
                self._record_softmax(self._key(f"{name}.softmax"), attn, self._pending_q.pop(name), output.detach())
        return hook

    def _record_softmax(self, key: str, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> None:
        """P = softmax(q k^T * scale) per head, as the attention processor computes it; one channel per head."""
        heads = attn.heads
        b = q.shape[0]
        q = q.reshape(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.reshape(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        p = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        self._rows.setdefault(key, []).append(self._group(p.amin(dim=(2, 3)), p.amax(dim=(2, 3))))  # [B, heads]

    def stats(self) -> InputStats:
        """Everything observed so far, moved to the CPU once."""
        absmax, cmin, cmax = {}, {}, {}
        for key, rows in self._rows.items():
            lo, hi = zip(*rows)
            cmin[key], cmax[key] = torch.cat(lo).cpu(), torch.cat(hi).cpu()
            absmax[key] = torch.maximum(-cmin[key], cmax[key])
        t = torch.cat(self._t).cpu() if self._t else torch.empty(0, dtype=torch.long)
        y = torch.cat(self._y).cpu() if self._y else torch.empty(0, dtype=torch.long)
        return InputStats(t=t, y=y, absmax=absmax, cmin=cmin, cmax=cmax)


def _group_reduce(rows: torch.Tensor, inverse: torch.Tensor, n_groups: int, how: str) -> torch.Tensor:
    """[B, C] -> [n_groups, C]: max or min over the rows of each group (vectorized scatter, on rows' device)."""
    out = rows.new_empty((n_groups, rows.shape[1]))
    return out.scatter_reduce(0, inverse[:, None].expand_as(rows), rows, how, include_self=False)


def _per_sample(v, n: int, device, fill: int = -1) -> torch.Tensor:
    if v is None:
        return torch.full((n,), fill, dtype=torch.long, device=device)
    v = torch.as_tensor(v, device=device).long().reshape(-1)
    return v.expand(n) if v.numel() == 1 else v


@torch.no_grad()
def observe_inputs(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   layers: dict[str, nn.Module] | None = None) -> InputStats:
    """Run `model` on (x, t, y) batches (e.g. CalibrationData.batches()) and return the inputs' statistics."""
    layers = linear_layers(model) if layers is None else layers
    with InputObserver(model, layers) as obs:
        forward_batches(model, batches)
    return obs.stats()
