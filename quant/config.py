"""QuantConfig: every choice a quantization run makes, serialisable to JSON so a saved model says how it was made."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from typing import Iterable

from quant.quantizers import SEARCHES

METHODS = ("fp", "baseline", "smoothquant", "ptq4dit", "dilatequant")
RHO_MODES = ("per_timestep", "per_sample")
# Methods whose default turns on time-step-aware activation quantization (DilateQuant's TPQ).
TPQ_BY_DEFAULT = ("dilatequant",)
# Block-wise optimization after the scales are set (quant.recon): none, PTQ4DiT's AdaRound reconstruction, or
# DilateQuant's block-wise distillation.
RECON_MODES = ("none", "adaround", "bkd")
RECON_INPUTS = ("quantized", "fp")
# Learning rates when recon_lr / recon_act_lr are None: (rounding or weight lr, activation-parameter lr).
# adaround: Adam's default for V and the official PTQ4DiT code's step-size lr (--cali_lr 4e-4).
RECON_LRS = {"adaround": (1e-3, 4e-4), "bkd": (1e-4, 1e-3)}


def is_excluded(name: str, patterns: Iterable[str]) -> bool:
    """fnmatch pattern, or a plain module name that is the layer itself or one of its parents."""
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p + ".") for p in patterns)


@dataclasses.dataclass
class QuantConfig:
    """How to quantize a diffusion transformer.

    method: fp (no quantization), baseline (plain PTQ), smoothquant (alpha balancing), ptq4dit (CSB + SSC),
        dilatequant (weight dilation + TPQ).
    w_bits / a_bits: weight and activation bit-widths, 2-8; 16 or None leaves them in floating point.
    attn_bits: bit-width of the attention operands q, k, v and the softmax output (None = not quantized).
    w_per_channel: one weight scale per output channel (else one per tensor).
    a_symmetric / w_symmetric: symmetric (no zero point) quantizers.
    scale_search: clip-range search for weights and activations: minmax, percentile or mse.
    percentile: the percentile used by the percentile search, in percent.
    tpq: one activation (scale, zero) per timestep; None = the method's default (on for dilatequant only).
    exclude: layer name patterns left in floating point (fnmatch patterns; a plain name also excludes
        everything under it, e.g. "transformer_blocks.0" or "*.norm1.linear").
    layer_bits: mixed precision: layer name pattern (as in exclude) -> [w_bits, a_bits] for the matching
        layers instead of w_bits / a_bits; the first matching pattern wins. E.g. the layers a sensitivity
        analysis ranks hardest kept at 8 bits while the rest run at 4.
    alpha: SmoothQuant's migration strength.
    ssc: PTQ4DiT's Spearman-weighted salience calibration (off = salience is the plain max over calibration).
    ssc_rho: "per_timestep" (default) computes one Spearman rho per timestep from that timestep's salience,
        as the paper's equations define SSC over timesteps, so the weighting does not depend on how many
        samples per timestep the calibration set holds; "per_sample" computes one rho per calibration row,
        as the official code does.
    recon: block-wise optimization after calibration (quant.recon): "none"; "adaround" (PTQ4DiT: learned
        weight rounding + activation step sizes, Lp loss); "bkd" (DilateQuant: weights with straight-through
        rounding, weight steps, activation scale and zero point per timestep, MSE). Any method combines with
        any mode, so e.g. baseline + tpq + bkd is DilateQuant's "BKD without WD" ablation.
    recon_iters: optimization steps per unit (each block, the patch embedding, each timestep MLP, the final
        layer). The papers: 20k (PTQ4DiT), 5k (DilateQuant); the default suits the bundled model on a CPU.
    recon_batch: calibration rows per step (both papers: 32).
    recon_lr / recon_act_lr: learning rate of the rounding variables (adaround) or weights and weight steps
        (bkd), and of the activation parameters; None = the mode's default (RECON_LRS).
    recon_rows: calibration rows drawn across timesteps for the optimization (DilateQuant: 5120 samples).
    recon_input: "quantized" feeds each unit the output of the already-quantized prefix (the papers');
        "fp" feeds it the FP prefix's output.
    """

    method: str = "baseline"
    w_bits: int | None = 8
    a_bits: int | None = 8
    attn_bits: int | None = None
    w_per_channel: bool = True
    a_symmetric: bool = False
    w_symmetric: bool = False
    scale_search: str = "minmax"
    percentile: float = 99.99
    tpq: bool | None = None
    exclude: list[str] = dataclasses.field(default_factory=list)
    layer_bits: dict[str, list[int | None]] = dataclasses.field(default_factory=dict)
    alpha: float = 0.5
    ssc: bool = True
    ssc_rho: str = "per_timestep"
    recon: str = "none"
    recon_iters: int = 200
    recon_batch: int = 32
    recon_lr: float | None = None
    recon_act_lr: float | None = None
    recon_rows: int = 256
    recon_input: str = "quantized"

    @property
    def recon_lrs(self) -> tuple[float, float]:
        """(rounding-or-weight lr, activation lr) resolved against the mode's defaults."""
        lr, act_lr = RECON_LRS.get(self.recon, (None, None))
        return (lr if self.recon_lr is None else float(self.recon_lr),
                act_lr if self.recon_act_lr is None else float(self.recon_act_lr))

    @property
    def use_tpq(self) -> bool:
        """TPQ resolved against the method default."""
        return self.method in TPQ_BY_DEFAULT if self.tpq is None else bool(self.tpq)

    @property
    def label(self) -> str:
        """A short name such as 'ptq4dit W4A8' or 'dilatequant W4A4 TPQ'."""
        if self.method == "fp":
            return "fp"
        bits = lambda b: "16" if b is None else str(b)  # noqa: E731
        name = f"{self.method} W{bits(self.w_bits)}A{bits(self.a_bits)}"
        if self.attn_bits is not None:
            name += f" attn{self.attn_bits}"
        if self.layer_bits:
            kept = sorted({f"W{bits(w)}A{bits(a)}" for w, a in self.layer_bits.values()})
            name += f" +{len(self.layer_bits)} at {'/'.join(kept)}"
        if self.use_tpq:
            name += " TPQ"
        if self.recon != "none":
            name += " +" + {"adaround": "AdaRound", "bkd": "BKD"}.get(self.recon, self.recon)
        return name

    def validate(self) -> "QuantConfig":
        """Raise ValueError naming the first bad field and what it accepts; return self when valid."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for field in ("w_bits", "a_bits", "attn_bits"):
            v = getattr(self, field)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not (2 <= v <= 8 or v == 16):
                raise ValueError(f"{field} must be an integer from 2 to 8, or 16 / None for no quantization; "
                                 f"got {v!r}")
        if self.scale_search not in SEARCHES:
            raise ValueError(f"unknown scale_search {self.scale_search!r}; choose one of {', '.join(SEARCHES)}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha}")
        if self.ssc_rho not in RHO_MODES:
            raise ValueError(f"unknown ssc_rho {self.ssc_rho!r}; choose one of {', '.join(RHO_MODES)}")
        if self.tpq is not None and not isinstance(self.tpq, bool):
            raise ValueError(f"tpq must be true, false or null, got {self.tpq!r}")
        if not isinstance(self.exclude, (list, tuple)) or not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(f"exclude must be a list of layer name patterns, got {self.exclude!r}")
        self._validate_layer_bits()
        self._validate_recon()
        return self

    def _validate_layer_bits(self) -> None:
        if not isinstance(self.layer_bits, dict):
            raise ValueError(f"layer_bits must map layer name patterns to [w_bits, a_bits], got {self.layer_bits!r}")
        for pattern, pair in self.layer_bits.items():
            if not isinstance(pattern, str) or not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"layer_bits[{pattern!r}] must be [w_bits, a_bits], got {pair!r}")
            for v in pair:
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not (2 <= v <= 8 or v == 16)):
                    raise ValueError(f"layer_bits[{pattern!r}] holds {v!r}; bits are integers from 2 to 8, "
                                     "or 16 / null for no quantization")

    def bits_for(self, layer: str) -> tuple[int | None, int | None]:
        """(w_bits, a_bits) of one layer: its layer_bits entry if a pattern matches, else the global ones."""
        for pattern, (w, a) in self.layer_bits.items():
            if is_excluded(layer, [pattern]):
                return w, a
        return self.w_bits, self.a_bits

    def _validate_recon(self) -> None:
        if self.recon not in RECON_MODES:
            raise ValueError(f"unknown recon {self.recon!r}; choose one of {', '.join(RECON_MODES)}")
        if self.recon_input not in RECON_INPUTS:
            raise ValueError(f"unknown recon_input {self.recon_input!r}; choose one of {', '.join(RECON_INPUTS)}")
        for field, low in (("recon_iters", 1), ("recon_batch", 1), ("recon_rows", 1)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{field} must be an integer >= {low}, got {v!r}")
        for field in ("recon_lr", "recon_act_lr"):
            v = getattr(self, field)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{field} must be a positive number (or null for the mode's default), got {v!r}")
        if self.recon != "none" and self.method == "fp":
            raise ValueError("recon needs a quantizing method; method 'fp' quantizes nothing")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exclude"] = list(self.exclude)
        d["layer_bits"] = {k: list(v) for k, v in self.layer_bits.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """Build and validate; unknown keys are an error (a typo must not silently fall back to a default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {unknown}; known fields: {sorted(names)}")
        d = dict(d)
        if "exclude" in d and d["exclude"] is not None:
            d["exclude"] = list(d["exclude"])
        if isinstance(d.get("layer_bits"), dict):
            d["layer_bits"] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in d["layer_bits"].items()}
        return cls(**d).validate()

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"quantization config is not valid JSON: {exc}") from None
        if not isinstance(d, dict):
            raise ValueError("quantization config JSON must be an object")
        return cls.from_dict(d)
