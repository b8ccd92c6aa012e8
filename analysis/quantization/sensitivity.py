"""Per-layer sensitivity: which layers cost the most accuracy when quantized, at which timesteps.

AIMET's QuantAnalyzer "per-layer analysis" made diffusion-aware. The model is quantized once at the chosen
bits (every activation range calibrated); then, one unit (a layer, a layer kind, or a block) at a time,
- "only": that unit quantized, every other layer in floating point;
- "all but": every layer quantized except that unit;
and the noise prediction is compared with FP's on the calibration inputs (the FP sampling trajectory),
timestep by timestep, as the relative RMS error ||eps_q - eps|| / ||eps||, and summarised per unit by the
median over timesteps (quant.measures.step_median: the headline error of a quantized model, which the last
step's blow-up does not dominate). Ranking by "only" says which
layers are hard to quantize by themselves; "all but" says how much keeping one of them in higher precision
buys back in the quantized model. Mixed precision keeps the top of the ranking at more bits.

    sens = sensitivity(bundle, w_bits=4, a_bits=4, calibration=cal)
    sens.ranking()            # a DataFrame, hardest first
    mixed_config(QuantConfig(w_bits=4, a_bits=4), top_layers(sens.to_json()["ranking"], 4))  # 4 layers at W8A8
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import numpy as np

from analysis.models.bundle import ModelBundle
from analysis.quantization.pipeline import output_errors
from quant.api import QuantConfig, quantize_with_details
from quant.families import family_of, layer_kind, layer_stage, stage_of
from quant.forward import calibration_batches
from quant.modules import quant_layers

GRANULARITIES = ("layer", "kind", "block")


def units_of(layers: list[str], granularity: str, family: str | None = None) -> dict[str, list[str]]:
    """Unit name -> the layers it switches together, in model order (blocks in forward order). kind and block
    units come from the family table (quant.families): a layer's kind (qkv, fc1, conv1, ...) or its stage
    ("block 3", "down 1", ...)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    key = {"layer": lambda n: n, "kind": lambda n: layer_kind(n, family),
           "block": lambda n: stage_of(n, family)}[granularity]
    units: dict[str, list[str]] = {}
    for name in layers:
        units.setdefault(key(name), []).append(name)
    if granularity == "block":  # in forward order (a UNet registers its middle block after the up blocks)
        return dict(sorted(units.items(), key=lambda kv: layer_stage(kv[1][0], family)[0]))
    return units


@contextlib.contextmanager
def in_float(layers: list):
    """Run the given quantized layers in floating point (weights and inputs) inside the block."""
    saved = [(layer.use_fp_weight, layer.act.mode) for layer in layers]
    try:
        for layer in layers:
            layer.use_fp_weight, layer.act.mode = True, "off"
        yield
    finally:
        for layer, (fp_weight, mode) in zip(layers, saved):
            layer.use_fp_weight, layer.act.mode = fp_weight, mode


@dataclasses.dataclass
class Sensitivity:
    """Per-unit, per-timestep relative RMS error of the noise prediction vs FP (rows: units, columns:
    timesteps, noisiest first)."""

    w_bits: int | None
    a_bits: int | None
    method: str
    granularity: str
    units: list[str]
    layers: dict[str, list[str]]  # unit -> its layers
    timesteps: list[int]
    only: np.ndarray  # [U, T]: only this unit quantized
    all_but: np.ndarray  # [U, T]: everything but this unit quantized
    all_quantized: np.ndarray  # [T]
    seconds: float
    calibration_rows: int

    @property
    def bits(self) -> str:
        return f"W{self.w_bits or 16}A{self.a_bits or 16}"

    def ranking(self):
        """One row per unit, hardest first: the error with only it quantized, the error with all but it
        quantized (each the median over timesteps), and the share of the fully quantized model's error that
        keeping it in float removes. That share is negative when keeping the unit in float RAISES the error:
        quantization errors of different layers can cancel, so removing one of them can leave the others'
        uncancelled (the patch embedding of the bundled DiT at W4A4 does this)."""
        import pandas as pd

        full = float(np.median(self.all_quantized))
        df = pd.DataFrame({
            "unit": self.units,
            "layers": [len(self.layers[u]) for u in self.units],
            "error_only_this_quantized": np.median(self.only, axis=1),
            "error_all_but_this_quantized": np.median(self.all_but, axis=1),
            "worst_timestep": [self.timesteps[i] for i in self.only.argmax(axis=1)],
        })
        df["error_removed_if_kept_float"] = (full - df["error_all_but_this_quantized"]) / full if full > 0 else 0.0
        df = df.sort_values("error_only_this_quantized", ascending=False, kind="stable").reset_index(drop=True)
        df.insert(0, "rank", np.arange(1, len(df) + 1))
        return df

    def to_json(self) -> dict:
        df = self.ranking()
        return {"w_bits": self.w_bits, "a_bits": self.a_bits, "method": self.method, "granularity": self.granularity,
                "timesteps": self.timesteps, "all_quantized": self.all_quantized.tolist(),
                "summary": "median over timesteps", "all_quantized_median": float(np.median(self.all_quantized)),
                "all_quantized_mean": float(self.all_quantized.mean()), "seconds": round(self.seconds, 3),
                "calibration_rows": self.calibration_rows,
                "ranking": [{**row, "layers_in_unit": self.layers[row["unit"]],
                             "only_per_timestep": self.only[self.units.index(row["unit"])].tolist(),
                             "all_but_per_timestep": self.all_but[self.units.index(row["unit"])].tolist()}
                            for row in df.to_dict(orient="records")]}


def sensitivity(bundle: ModelBundle, w_bits: int | None, a_bits: int | None, calibration, method: str = "baseline",
                granularity: str = "layer", base: QuantConfig | None = None, batch_size: int = 256,
                on_progress: Callable[[str, float], None] | None = None) -> Sensitivity:
    """Quantize `bundle`'s transformer once (`base` or QuantConfig(method, w_bits, a_bits)) and measure every
    unit's "only" and "all but" error per timestep on the calibration inputs. The bundle is not modified."""
    config = base or QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits)
    config.validate()
    progress = on_progress or (lambda stage, frac: None)
    start = time.perf_counter()
    progress("quantizing", 0.0)
    result = quantize_with_details(bundle.denoiser, config, calibration, batch_size=batch_size, keep_reference=True)
    model, reference = result.model, result.reference
    batches = calibration_batches(calibration, batch_size)
    channels = bundle.latent_shape[0]
    layers = quant_layers(model)
    units = units_of(list(layers), granularity, family_of(bundle.denoiser))

    def errors() -> list[float]:
        return list(output_errors(None, model, batches, channels, per_layer=False, reference=reference)
                    .per_timestep.values())

    full = errors()
    only, all_but = [], []
    names = list(units)
    for i, unit in enumerate(names):
        progress(f"unit {i + 1}/{len(names)}: {unit}", (i + 0.5) / len(names))
        members = [layers[n] for n in units[unit]]
        others = [m for n, m in layers.items() if n not in units[unit]]
        with in_float(others):
            only.append(errors())
        with in_float(members):
            all_but.append(errors())
    # output_errors lists timesteps noisiest first
    per_t_keys = sorted({int(t) for _, ts, _ in batches for t in ts.reshape(-1).tolist()}, reverse=True)
    progress("done", 1.0)
    return Sensitivity(w_bits=config.w_bits, a_bits=config.a_bits, method=config.method, granularity=granularity,
                       units=names, layers=units, timesteps=per_t_keys, only=np.array(only), all_but=np.array(all_but),
                       all_quantized=np.array(full), seconds=time.perf_counter() - start,
                       calibration_rows=len(calibration) if hasattr(calibration, "__len__") else 0)


def top_layers(ranking: list[dict], k: int, least: bool = False) -> list[str]:
    """The layers of the first k units of a ranking (Sensitivity.to_json()["ranking"], hardest first), or of
    the last k with least=True (the control a mixed-precision choice must beat at the same size)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rows = ranking[::-1] if least else ranking
    return [name for row in rows[:k] for name in row["layers_in_unit"]]


def mixed_config(base: QuantConfig, layers: list[str], keep_bits: tuple[int | None, int | None] = (8, 8)) -> QuantConfig:
    """`base` with the given layers at `keep_bits` ((None, None): floating point), the rest at base's bits."""
    return dataclasses.replace(base, layer_bits={name: list(keep_bits) for name in layers}).validate()
