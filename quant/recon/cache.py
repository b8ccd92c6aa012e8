"""The activations the reconstruction holds, and the most it ever held at once.

Block-wise reconstruction needs, for the unit being optimized, its input rows (from the FP prefix and from
the quantized prefix) and the FP unit's output on them. Everything else is recomputed from these as the
units advance, so memory is one unit's inputs and outputs whatever the depth of the model (the official
PTQ4DiT code writes every block's inputs and outputs to a multi-GB file instead). This holder is the only
place the engine keeps activations; its peak counts are reported and tested.
"""
from __future__ import annotations

import torch


class ActivationCache:
    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self.peak_tensors = 0
        self.peak_bytes = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self._tensors[name] = tensor
        self.peak_tensors = max(self.peak_tensors, len(self._tensors))
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def pop(self, name: str) -> torch.Tensor | None:
        return self._tensors.pop(name, None)

    @property
    def bytes(self) -> int:
        # tensors that share storage (the FP and quantized streams with FP input) count once
        seen, total = set(), 0
        for t in self._tensors.values():
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    def names(self) -> list[str]:
        return list(self._tensors)
