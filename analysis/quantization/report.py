"""What one quantization measured: a typed report (docs/ARCHITECTURE.md, "Typed results").

    variant = quantize_bundle(bundle, config, spec)
    variant.report.rel_rms, variant.report.balance["foldable_share"]
    variant.report.to_dict()                     # plain JSON types: the CLI's --json, quant_report.json, figures
    QuantReport.from_dict(json.loads(text))      # also a report written by an older version

Every field has a default, so a report written before a field existed reads back (the field takes its default),
and a key this version does not know is kept in `extra` rather than dropped. To add a field: declare it below
with a default and a comment saying what it holds and in which units, set it where the report is made
(analysis.quantization.pipeline.quantize_bundle), and read it by attribute.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class QuantReport:
    # the setting
    method: str = "fp"
    w_bits: int | None = None
    a_bits: int | None = None
    attn_bits: int | None = None
    tpq: bool = False
    label: str = ""
    config: dict = dataclasses.field(default_factory=dict)  # QuantConfig.to_dict()
    # time: seconds is quantize + activation calibration (wall clock), cpu_seconds the process's CPU time for the
    # same (a busy machine does not inflate it), calibration_seconds the FP sampling when done here, total_seconds
    # the two; quantize_seconds the whole quantization job as an evaluation timed it (None outside one)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    calibration_seconds: float = 0.0
    total_seconds: float = 0.0
    quantize_seconds: float | None = None
    # the calibration set: its spec (CalibrationSpec.to_dict(), None for data no spec describes) and its rows
    calibration: dict | None = None
    calibration_rows: int | None = None
    # size
    layers_quantized: int = 0
    weight_bytes: int = 0  # stored at the bit-width (quant.io.weight_bytes)
    fp_weight_bytes: int = 0
    # error vs FP: relative RMS of the noise prediction, overall and per timestep, on held-out seeds (an FP
    # sampling run on seeds neither calibration nor block-wise optimization saw: rel_rms_basis "held_out", the
    # spec in held_out) or, for calibration data without a spec, on the calibration inputs ("in_sample"); and
    # each quantized layer's relative RMS error on its own input (calibration inputs)
    rel_rms: float = 0.0  # pooled over every timestep: the last steps dominate it
    # the headline error: median over timesteps of rel_rms_per_timestep (quant.measures.step_median), on the same
    # basis as rel_rms; None in a report stored before it existed that has no per-timestep curve to compute it from
    rel_rms_step_median: float | None = None
    rel_rms_per_timestep: dict[int, float] = dataclasses.field(default_factory=dict)
    rel_rms_basis: str = "in_sample"  # reports written before the held-out default measured in sample
    rel_rms_held_out: float | None = None  # = rel_rms when measured on held-out seeds
    held_out: dict | None = None  # CalibrationSpec.to_dict() of the held-out run
    # the same error on the calibration inputs themselves; the gap to rel_rms is over-fitting
    rel_rms_in_sample: float | None = None
    rel_rms_per_timestep_in_sample: dict[int, float] = dataclasses.field(default_factory=dict)
    layer_error: dict[str, float] = dataclasses.field(default_factory=dict)
    # per balanced group: the folded vector b, per-channel maxima before / after, SSC's rho and eta per timestep
    vectors: dict[str, list] = dataclasses.field(default_factory=dict)
    salience: dict[str, dict] = dataclasses.field(default_factory=dict)
    ssc: dict[str, dict] = dataclasses.field(default_factory=dict)
    # which layers took a folded scale and which did not, and why (quant.graph.balance_plan)
    balance: dict = dataclasses.field(default_factory=dict)
    # block-wise optimization (quant.recon.ReconReport.to_dict()), None without one
    recon: dict | None = None
    # what a rotation, low-rank or rounding method did, by role (analysis.quantization.method_views.method_summary)
    methods: dict = dataclasses.field(default_factory=dict)
    # rotated layer -> its input histogram before / after the rotation (method_views.rotation_histograms)
    rotation_histograms: dict = dataclasses.field(default_factory=dict)
    # keys of a stored report that this version does not know, kept as they were
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON types (timestep keys stay ints here; JSON turns them into strings, from_dict back)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantReport":
        """A report from its dict form, also one written by an older or newer version (see the module docstring)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        for key in ("rel_rms_per_timestep", "rel_rms_per_timestep_in_sample"):
            if isinstance(known.get(key), dict):
                known[key] = {int(t): float(e) for t, e in known[key].items()}
        if known.get("rel_rms_step_median") is None and known.get("rel_rms_per_timestep"):
            from quant.measures import step_median  # an older report: the same median from its stored curve

            known["rel_rms_step_median"] = step_median(known["rel_rms_per_timestep"])
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def __getitem__(self, key: str):
        """Read access by key, for code written against the report's dict form (new code reads attributes)."""
        if key in self.extra:
            return self.extra[key]
        if key == "extra" or not hasattr(self, key):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default
