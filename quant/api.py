"""Public entry points of the quantization engine: QuantConfig, quantize, save_quantized, load_quantized."""
from __future__ import annotations

from typing import Iterable

import torch.nn as nn

from quant.config import METHODS, QuantConfig

__all__ = ["QuantConfig", "METHODS", "quantize", "save_quantized", "load_quantized"]


def quantize(model: nn.Module, config: QuantConfig, calibration: Iterable) -> nn.Module:
    """A NEW quantized copy of `model` (never modified) calibrated on (x, t, y) batches."""
    raise NotImplementedError("quantize is being written")


def save_quantized(bundle_or_model, config: QuantConfig, folder, base_source: str | None = None):
    raise NotImplementedError("save_quantized is being written")


def load_quantized(folder):
    raise NotImplementedError("load_quantized is being written")
