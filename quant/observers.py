"""Forward-hook observers: per-channel statistics of what each linear layer receives, per sample.

For a linear layer Y = X W^T with input X [B, tokens, C], the salience of input channel j for sample b is
s(X_j) = max over tokens of |X_bj| (PTQ4DiT, Wu et al. 2024, eq. 3). The observer records that, plus the
per-channel min and max, for every sample of every forward. Reductions run on the model's device inside
the hook; results stay there until the observer closes, so a pass makes no per-hook host copies.

Timesteps and labels come from a forward pre-hook on the top module (`timestep=` / `class_labels=` kwargs,
as diffusers' DiTTransformer2DModel takes them), so every row can be grouped by timestep afterwards.
A module that runs twice in one forward (in diffusers' DiT, block 0's embedding is called again by the
final layer) gets a second key, "name@2", so the two calls are not mixed.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.nn as nn


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of `model` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def weight_salience(weight: torch.Tensor) -> torch.Tensor:
    """s(W_j) = max over output rows of |W_oj|, one value per input channel (weight is [out, in])."""
    return weight.detach().abs().amax(dim=0)


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


class InputObserver:
    """Context manager: while open, records InputStats for `layers` on every forward of `model`.

    with InputObserver(model, linear_layers(model)) as obs:
        model(x, timestep=t, class_labels=y)
    stats = obs.stats()          # hooks are gone once the block exits
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]):
        self.model, self.layers = model, layers
        self._handles: list = []
        self._calls: dict[str, int] = {}
        self._t: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self._rows: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def __enter__(self) -> "InputObserver":
        self._handles.append(self.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_model(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        y = kwargs.get("class_labels", args[2] if len(args) > 2 else None)
        n = x.shape[0]
        self._t.append(_per_sample(t, n, x.device))
        self._y.append(_per_sample(y, n, x.device, fill=-1))
        self._calls.clear()

    def _make_hook(self, name: str):
        def hook(module, args):
            count = self._calls.get(name, 0) + 1
            self._calls[name] = count
            key = name if count == 1 else f"{name}@{count}"
            x = args[0].detach()
            x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, tokens, C]; [B, C] inputs get one token
            self._rows.setdefault(key, []).append((x.abs().amax(1).float(), x.amin(1).float(), x.amax(1).float()))
        return hook

    def stats(self) -> InputStats:
        """Everything observed so far, moved to the CPU once."""
        absmax, cmin, cmax = {}, {}, {}
        for key, rows in self._rows.items():
            a, lo, hi = zip(*rows)
            absmax[key], cmin[key], cmax[key] = torch.cat(a).cpu(), torch.cat(lo).cpu(), torch.cat(hi).cpu()
        t = torch.cat(self._t).cpu() if self._t else torch.empty(0, dtype=torch.long)
        y = torch.cat(self._y).cpu() if self._y else torch.empty(0, dtype=torch.long)
        return InputStats(t=t, y=y, absmax=absmax, cmin=cmin, cmax=cmax)


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
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    with InputObserver(model, layers) as obs:
        for x, t, y in batches:
            model(x.to(device, dtype), timestep=t.to(device), class_labels=y.to(device))
    return obs.stats()
