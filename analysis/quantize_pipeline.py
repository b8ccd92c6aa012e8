"""Quantize a bundle end to end: calibration by FP sampling, quantization, and a report for the app and CLI."""
from __future__ import annotations

import dataclasses
from typing import Callable

from analysis.models import ModelBundle
from analysis.sampling import CalibrationData
from quant.api import QuantConfig


@dataclasses.dataclass
class Variant:
    """One quantized model: its bundle (new transformer, shared scheduler/VAE), config and measurements."""

    name: str
    bundle: ModelBundle
    config: QuantConfig
    report: dict


def calibration_for(bundle: ModelBundle, steps: int = 50, num_samples: int = 10, guidance: float | None = None,
                    seed: int = 0, scheduler: str = "ddim") -> CalibrationData:
    raise NotImplementedError


def quantize_bundle(bundle: ModelBundle, config: QuantConfig, calibration: CalibrationData | None = None,
                    on_progress: Callable[[str, float], None] | None = None) -> Variant:
    raise NotImplementedError
