"""Quantize a bundle end to end: calibration inputs from FP sampling, quantization, and a report.

    variant = quantize_bundle(bundle, QuantConfig(method="ptq4dit", w_bits=4, a_bits=8), CalibrationSpec())
    variant.report.rel_rms_step_median, variant.bundle          # the bundle shares scheduler / VAE with the FP one
    variant.recipe                                              # source + config + calibration: rebuilds it

The FP bundle is never modified (the app's cached one is shared by every session).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple

import torch

from analysis.models.bundle import ModelBundle
from analysis.models.sampling import CalibrationData
from analysis.quantization.calibration import (  # noqa: F401
    CALIBRATION_SEED,
    DEFAULT_CAL_SAMPLES,
    DEFAULT_CAL_STEPS,
    CalibrationSpec,
    calibrate,
    calibration_for,
)
from analysis.quantization.method_views import method_summary, rotation_histograms
from analysis.quantization.recipe import Recipe, recipe_of_run
from analysis.quantization.report import QuantReport
from quant.api import QuantConfig, quantize_with_details
from quant.forward import calibration_batches, forward
from quant.graph import balance_plan
from quant.io import fp_weight_bytes, weight_bytes
from quant.measures import RelRmsByTimestep, rel_rms, step_median
from quant.modules import quant_layers
from quant.quantizers import is_off

# Calibration batches whose layer inputs make the before / after rotation histograms.
HISTOGRAM_BATCHES = 2
# Share of a quantize_bundle call's progress bar that calibration sampling takes when it samples.
SAMPLING_SHARE = 0.6
HELD_OUT_IMAGES = 10  # FP images (one per class of the digit models) the held-out error is measured on


@dataclasses.dataclass
class Variant:
    """A model to evaluate or compare beside FP, the one type evaluation and comparison take (Variant.of reads
    what callers pass): the FP model itself (config None: no quantization), a quantized copy made here (new
    denoiser, shared scheduler/VAE; its config, report and the recipe that rebuilds it, None when it was
    calibrated on data no spec describes), or a bundle made elsewhere (custom: a loaded quantized folder, a
    perturbed copy)."""

    name: str
    bundle: ModelBundle
    config: QuantConfig | None = None
    report: QuantReport | None = None
    recipe: Recipe | None = None
    custom: bool = False  # a bundle made elsewhere whose setting is not known

    @property
    def is_fp(self) -> bool:
        """The FP model itself: the reference, sampled once and never scored against itself."""
        return self.config is None and not self.custom

    def config_dict(self) -> dict:
        """The setting as stored with a run: the config's dict (a loaded quantized folder's saved one), else
        {"method": "fp"} for FP or {"method": "custom"}."""
        if self.config is not None:
            return self.config.to_dict()
        if self.bundle.quant_config:
            return dict(self.bundle.quant_config)
        return {"method": "custom" if self.custom else "fp"}

    @classmethod
    def of(cls, name: str, value, fp: ModelBundle) -> "Variant":
        """`value` as a Variant: None or the FP bundle itself is FP; a Variant stays as it is; another bundle
        is custom (its saved quantization config, analysis.models.saved, is what config_dict() reports)."""
        if isinstance(value, Variant):
            return value
        if value is None or value is fp:
            return cls(name, fp)
        if isinstance(value, ModelBundle):
            return cls(name, value, custom=True)
        raise TypeError(f"variant {name!r} is a {type(value).__name__}; pass a Variant, a ModelBundle or None (FP)")


class OutputErrors(NamedTuple):
    """How far a model's noise prediction is from FP: relative RMS error ||eps_q - eps|| / ||eps|| over all
    inputs (total), per timestep ({t: error}, noisiest first), and per quantized layer on its own input."""

    total: float
    per_timestep: dict[int, float]
    layers: dict[str, float]


def _eps(out: torch.Tensor, latent_channels: int) -> torch.Tensor:
    return out[:, :latent_channels]  # learned-sigma models output a variance half the sampler does not use


@torch.no_grad()
def output_errors(fp_model: torch.nn.Module | None, q_model: torch.nn.Module, batches, latent_channels: int,
                  per_layer: bool = True, reference: torch.Tensor | None = None) -> OutputErrors:
    """The one per-timestep error of the lab: q_model's noise prediction against FP's on the same inputs, overall
    and per timestep (quant.measures.RelRmsByTimestep: sums per sample, so a batch may mix timesteps), and with
    per_layer each quantized layer's own relative RMS error (its quantized output vs its FP output on the same
    input). Used by quantization reports, sensitivity, and the comparison's per-step error.

    batches: (x, t, y) batches (or CalibrationData); reference: FP's outputs on them, concatenated in order
    (else fp_model runs on them)."""
    batches = calibration_batches(batches) if hasattr(batches, "batches") else batches
    layers = quant_layers(q_model) if per_layer else {}
    for layer in layers.values():
        layer.error_stats = [0.0, 0.0]
    acc = RelRmsByTimestep()
    try:
        offset = 0
        for x, t, y in batches:
            if reference is not None:
                ref = reference[offset:offset + len(x)].float()
                offset += len(x)
            else:
                ref = forward(fp_model, x, t, y).float()
            out = forward(q_model, x, t, y).float()
            acc.add(_eps(out, latent_channels), _eps(ref, latent_channels), t)
        layer_err = {n: rel_rms(*layer.error_stats) for n, layer in layers.items()}
    finally:
        for layer in layers.values():
            layer.error_stats = None
    return OutputErrors(acc.total(), acc.per_timestep(), layer_err)


def _lists(d: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def held_out_spec(spec: CalibrationSpec, images: int = HELD_OUT_IMAGES) -> CalibrationSpec:
    """The FP sampling run a variant's error is measured on: the calibration's setting (steps, guidance,
    sampler) on the `images` seeds right after the calibration seeds, so no image of it was trained or
    calibrated on, and none is an evaluation seed (those start at 0)."""
    return dataclasses.replace(spec, seed=spec.seed + spec.images, images=images)


def quantize_bundle(bundle: ModelBundle, config: QuantConfig,
                    calibration: CalibrationData | CalibrationSpec | None = None,
                    on_progress: Callable[[str, float], None] | None = None, batch_size: int = 64,
                    on_recon: Callable[[int, int, int, float], None] | None = None,
                    held_out: CalibrationData | CalibrationSpec | bool | None = None) -> Variant:
    """Quantize `bundle`'s transformer into a new Variant and measure it on the calibration inputs.

    calibration: a CalibrationSpec (sampled here, and timed), CalibrationData already sampled (by calibrate,
    which records its spec), or None for the default spec (seeds from CALIBRATION_SEED).
    on_progress(stage, fraction) is called at each stage (calibration sampling, quantizing, block-wise
    optimization, measuring); on_recon(unit index, number of units, iteration, loss) during the block-wise
    optimization (config.recon), for live loss curves.
    The Variant's report is a QuantReport (analysis.quantization.report: every field named there). Its
    rel_rms is measured on held-out seeds (held_out_spec: an FP sampling run on seeds neither calibration nor
    the block-wise optimization saw), rel_rms_in_sample on the calibration inputs (the gap is over-fitting).
    Its headline error is rel_rms_step_median: quant.measures.step_median of rel_rms_per_timestep.
    """
    progress = on_progress or (lambda stage, frac: None)
    cal_seconds = 0.0
    if calibration is None or isinstance(calibration, CalibrationSpec):
        progress("sampling calibration inputs", 0.0)
        start = time.perf_counter()
        calibration = calibrate(bundle, calibration, on_step=lambda d, n: progress(
            "sampling calibration inputs", SAMPLING_SHARE * d / n))
        cal_seconds = time.perf_counter() - start
    spec = getattr(calibration, "spec", None)
    progress("quantizing", SAMPLING_SHARE)
    start = time.perf_counter()
    cpu_start = time.process_time()
    iters = config.recon_iters

    def recon_progress(k: int, n: int, it: int, loss: float) -> None:
        progress(f"block-wise optimization ({config.recon}): unit {k + 1}/{n}, iteration {it}/{iters}, "
                 f"loss {loss:.4g}", 0.6 + 0.2 * (k + it / iters) / n)
        if on_recon is not None:
            on_recon(k, n, it, loss)

    result = quantize_with_details(bundle.denoiser, config, calibration, batch_size=batch_size,
                                   keep_reference=True, on_recon=recon_progress)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    progress("measuring the error vs FP", 0.8)
    batches = calibration_batches(calibration, batch_size)
    errors = output_errors(None, result.model, batches, bundle.latent_shape[0], reference=result.reference)
    if held_out is None or held_out is True:
        held_out = held_out_spec(spec) if spec is not None else None
    if isinstance(held_out, CalibrationSpec):
        progress("measuring the error vs FP on held-out seeds", 0.85)
        held_out = calibrate(bundle, held_out)
    held = None
    if held_out is not None and held_out is not False:
        held = output_errors(bundle.denoiser, result.model, calibration_batches(held_out, batch_size),
                             bundle.latent_shape[0], per_layer=False)
    held_spec = getattr(held_out, "spec", None) if held is not None else None
    n_quant = sum(1 for m in quant_layers(result.model).values()
                  if not is_off(m.w_bits) or m.act.enabled)
    report = QuantReport(
        method=config.method, w_bits=config.w_bits, a_bits=config.a_bits, attn_bits=config.attn_bits,
        tpq=config.quantizes and config.use_tpq, label=config.label, config=config.to_dict(),
        seconds=round(seconds, 3), cpu_seconds=round(cpu_seconds, 3), calibration_seconds=round(cal_seconds, 3),
        total_seconds=round(seconds + cal_seconds, 3),
        calibration=spec.to_dict() if spec is not None else None,
        calibration_rows=len(calibration) if hasattr(calibration, "__len__") else None,
        layers_quantized=n_quant, weight_bytes=weight_bytes(result.model),
        fp_weight_bytes=fp_weight_bytes(bundle.denoiser),
        rel_rms=errors.total if held is None else held.total,
        rel_rms_per_timestep=errors.per_timestep if held is None else held.per_timestep,
        rel_rms_step_median=step_median(errors.per_timestep if held is None else held.per_timestep),
        rel_rms_basis="in_sample" if held is None else "held_out",
        rel_rms_held_out=None if held is None else held.total, rel_rms_in_sample=errors.total,
        rel_rms_per_timestep_in_sample=errors.per_timestep,
        held_out=None if held_spec is None else held_spec.to_dict(), layer_error=errors.layers,
        vectors={g: b.tolist() for g, b in result.vectors.items()},
        salience={g: _lists(s) for g, s in result.salience.items()},
        ssc={g: _lists(e) for g, e in result.extras.items() if "eta" in e},
        recon=result.recon, balance=balance_plan(bundle.denoiser, set(result.vectors), config.method),
        methods=method_summary(result.methods),
        rotation_histograms=(rotation_histograms(result.model, batches[:HISTOGRAM_BATCHES])
                             if "rotation" in result.methods else {}),
    )
    progress("done", 1.0)
    name = config.label
    qbundle = bundle.with_denoiser(result.model, name=f"{bundle.name} [{name}]", quant_config=config.to_dict())
    recipe = None if spec is None else Recipe(source=bundle.name, config=config, calibration=spec,
                                              batch_size=batch_size)
    return Variant(name=name, bundle=qbundle, config=config, report=report, recipe=recipe)


def build(recipe: Recipe, bundle: ModelBundle | None = None,
          on_progress: Callable[[str, float], None] | None = None) -> Variant:
    """The recipe's quantized Variant. bundle: the FP bundle of recipe.source when it is already loaded."""
    from analysis.models.loading import load

    if bundle is None:
        bundle = load(recipe.source)
    elif bundle.name != recipe.source:
        raise ValueError(f"the recipe quantizes {recipe.source}, but the model given is {bundle.name}")
    return quantize_bundle(bundle, recipe.config, recipe.calibration, on_progress=on_progress,
                           batch_size=recipe.batch_size)


def rebuild(run, bundle: ModelBundle | None = None,
            on_progress: Callable[[str, float], None] | None = None) -> Variant:
    """The quantized Variant a stored run (analysis.evaluation.store.Run) scored, made again from its recipe."""
    return build(recipe_of_run(run), bundle, on_progress)


def unmatched_excludes(model: torch.nn.Module, patterns) -> list[str]:
    """The exclude patterns that match no quantizable layer or attention module (almost always typos)."""
    from quant.wrap import attention_modules, covered_layers, is_excluded

    names = list(covered_layers(model)) + list(attention_modules(model))
    return [p for p in patterns if not any(is_excluded(n, [p]) for n in names)]


def saved_zip(variant: Variant, base_source: str | None = None) -> bytes:
    """The variant saved as a model folder (analysis.models.saved layout) in a zip archive, for downloading; unzip it and
    pass the folder as --model to load it again."""
    import io
    import tempfile
    import zipfile
    from pathlib import Path

    from analysis.models.saved import save_quantized

    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_quantized(variant.bundle, variant.config, Path(tmp) / "model", base_source=base_source,
                                recipe=variant.recipe)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(folder.parent))
    return buf.getvalue()
