"""Quantize a bundle end to end: calibration inputs from FP sampling, quantization, and a report.

    cal = calibration_for(bundle)                               # FP sampling with fixed seeds and labels
    variant = quantize_bundle(bundle, QuantConfig(method="ptq4dit", w_bits=4, a_bits=8), cal)
    variant.report["rel_error"], variant.bundle                  # the bundle shares scheduler / VAE with the FP one

The FP bundle is never modified (the app's cached one is shared by every session).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from analysis.models import ModelBundle
from analysis.sampling import CalibrationData, sample
from quant.api import QuantConfig, calibration_batches, quantize_with_details
from quant.denoiser import balance_plan, denoise
from quant.io import fp_weight_bytes, weight_bytes
from quant.modules import quant_layers
from quant.quantizers import is_off

DEFAULT_CAL_SAMPLES = 10
DEFAULT_CAL_STEPS = 50


@dataclasses.dataclass
class Variant:
    """One quantized model: its bundle (new transformer, shared scheduler/VAE), config and measurements."""

    name: str
    bundle: ModelBundle
    config: QuantConfig
    report: dict


def calibration_for(bundle: ModelBundle, steps: int = DEFAULT_CAL_STEPS, num_samples: int = DEFAULT_CAL_SAMPLES,
                    guidance: float | None = None, seed: int = 0, scheduler: str = "ddim",
                    on_step: Callable[[int, int], None] | None = None) -> CalibrationData:
    """The transformer inputs of an FP sampling run: labels cycle through the classes, seeds seed..seed+N-1.

    Every step is recorded, so each calibration set covers all timesteps of the sampler (TPQ needs them).
    guidance None: the bundle's evaluation guidance, so the calibrated ranges match the evaluated trajectories.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    labels = [i % bundle.num_classes for i in range(num_samples)] if bundle.conditional else None
    seeds = [seed + i for i in range(num_samples)]
    guidance = bundle.eval_guidance if guidance is None else guidance
    result = sample(bundle, labels, seeds, steps=steps, guidance=guidance, scheduler=scheduler, decode=False,
                    record="all", on_step=on_step)
    return result.calibration


def _eps(out: torch.Tensor, latent_channels: int) -> torch.Tensor:
    return out[:, :latent_channels]  # learned-sigma models output a variance half the sampler does not use


@torch.no_grad()
def output_errors(fp_model: torch.nn.Module | None, q_model: torch.nn.Module, batches: list, latent_channels: int,
                  per_layer: bool = True, reference: torch.Tensor | None = None
                  ) -> tuple[float, dict[int, float], dict[str, float]]:
    """Relative error of the noise prediction vs FP, ||eps_q - eps||/||eps||, over all batches and per timestep;
    and each quantized layer's own relative error (its quantized output vs its FP output on the same input).

    reference: the FP outputs of the batches, concatenated (else fp_model is run on them)."""
    layers = quant_layers(q_model) if per_layer else {}
    for layer in layers.values():
        layer.error_stats = [0.0, 0.0]
    num, den = 0.0, 0.0
    per_t: dict[int, list[float]] = {}
    try:
        q_dev = next(q_model.parameters())
        offset = 0
        for x, t, y in batches:
            if reference is not None:
                ref = _eps(reference[offset:offset + len(x)].float(), latent_channels)
                offset += len(x)
            else:
                fp_dev = next(fp_model.parameters())
                ref = _eps(denoise(fp_model, x.to(fp_dev.device, fp_dev.dtype), t.to(fp_dev.device),
                                   y.to(fp_dev.device)).float(), latent_channels)
            out = _eps(denoise(q_model, x.to(q_dev.device, q_dev.dtype), t.to(q_dev.device),
                               y.to(q_dev.device)).float(), latent_channels).to(ref.device)
            e = (out - ref).pow(2).flatten(1).sum(1).cpu()
            r = ref.pow(2).flatten(1).sum(1).cpu()
            num, den = num + float(e.sum()), den + float(r.sum())
            for ti, ei, ri in zip(t.tolist(), e.tolist(), r.tolist()):
                acc = per_t.setdefault(int(ti), [0.0, 0.0])
                acc[0] += ei
                acc[1] += ri
        layer_err = {n: (s[0] / s[1]) ** 0.5 if s[1] > 0 else 0.0 for n, l in layers.items() for s in [l.error_stats]}
    finally:
        for layer in layers.values():
            layer.error_stats = None
    rel = (num / den) ** 0.5 if den > 0 else 0.0
    per_t_err = {t: (a / b) ** 0.5 if b > 0 else 0.0 for t, (a, b) in sorted(per_t.items(), reverse=True)}
    return rel, per_t_err, layer_err


def _lists(d: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def quantize_bundle(bundle: ModelBundle, config: QuantConfig, calibration: CalibrationData | None = None,
                    on_progress: Callable[[str, float], None] | None = None, batch_size: int = 64,
                    on_recon: Callable[[int, int, int, float], None] | None = None) -> Variant:
    """Quantize `bundle`'s transformer into a new Variant and measure it on the calibration inputs.

    on_progress(stage, fraction) is called at each stage (calibration sampling, quantizing, block-wise
    optimization, measuring); on_recon(unit index, number of units, iteration, loss) during the block-wise
    optimization (config.recon), for live loss curves.
    report: method, w_bits, a_bits, attn_bits, tpq, label, seconds (quantize + activation calibration, wall
    clock; cpu_seconds: the process's CPU time for the same, which a busy machine does not inflate),
    calibration_seconds (FP sampling, when done here), layers_quantized, weight_bytes (stored at the
    bit-width), fp_weight_bytes, rel_error, rel_error_per_timestep, layer_error, and per balanced group:
    vectors (b), salience (per-channel maxima before / after), ssc (rho, eta per timestep); balance (which
    layers took a folded scale, which did not and why: quant.denoiser.balance_plan); recon (the
    block-wise optimization's quant.recon.ReconReport as a dict, or None).
    """
    config.validate()
    progress = on_progress or (lambda stage, frac: None)
    cal_seconds = 0.0
    if calibration is None:
        progress("sampling calibration inputs", 0.0)
        start = time.perf_counter()
        calibration = calibration_for(bundle, on_step=lambda d, n: progress("sampling calibration inputs",
                                                                             0.6 * d / n))
        cal_seconds = time.perf_counter() - start
    progress("quantizing", 0.6)
    start = time.perf_counter()
    cpu_start = time.process_time()
    iters = config.recon_iters

    def recon_progress(k: int, n: int, it: int, loss: float) -> None:
        progress(f"block-wise optimization ({config.recon}): unit {k + 1}/{n}, iteration {it}/{iters}, "
                 f"loss {loss:.4g}", 0.6 + 0.2 * (k + it / iters) / n)
        if on_recon is not None:
            on_recon(k, n, it, loss)

    result = quantize_with_details(bundle.transformer, config, calibration, batch_size=batch_size,
                                   keep_reference=True, on_recon=recon_progress)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    progress("measuring the error vs FP", 0.8)
    batches = calibration_batches(calibration, batch_size)
    rel, per_t, layer_err = output_errors(None, result.model, batches, bundle.latent_shape[0],
                                          reference=result.reference)
    n_quant = sum(1 for m in quant_layers(result.model).values()
                  if not is_off(m.w_bits) or m.act.enabled)
    report = {
        "method": config.method, "w_bits": config.w_bits, "a_bits": config.a_bits, "attn_bits": config.attn_bits,
        "tpq": config.use_tpq if config.method != "fp" else False, "label": config.label,
        "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3), "calibration_seconds": round(cal_seconds, 3),
        "calibration_rows": len(calibration) if hasattr(calibration, "__len__") else None,
        "layers_quantized": n_quant, "weight_bytes": weight_bytes(result.model),
        "fp_weight_bytes": fp_weight_bytes(bundle.transformer),
        "rel_error": rel, "rel_error_per_timestep": per_t, "layer_error": layer_err,
        "vectors": {g: b.tolist() for g, b in result.vectors.items()},
        "salience": {g: _lists(s) for g, s in result.salience.items()},
        "ssc": {g: _lists(e) for g, e in result.extras.items() if "eta" in e},
        "config": config.to_dict(), "recon": result.recon,
        "balance": balance_plan(bundle.transformer, set(result.vectors), config.method),
    }
    progress("done", 1.0)
    name = config.label
    qbundle = bundle.with_transformer(result.model, name=f"{bundle.name} [{name}]", quant_config=config.to_dict())
    return Variant(name=name, bundle=qbundle, config=config, report=report)


def unmatched_excludes(model: torch.nn.Module, patterns) -> list[str]:
    """The exclude patterns that match no quantizable layer or attention module (almost always typos)."""
    from quant.wrap import attention_modules, covered_layers, is_excluded

    names = list(covered_layers(model)) + list(attention_modules(model))
    return [p for p in patterns if not any(is_excluded(n, [p]) for n in names)]


def saved_zip(variant: Variant, base_source: str | None = None) -> bytes:
    """The variant saved as a model folder (analysis.bundle_io layout) in a zip archive, for downloading; unzip it and
    pass the folder as --model to load it again."""
    import io
    import tempfile
    import zipfile
    from pathlib import Path

    from analysis.bundle_io import save_quantized

    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_quantized(variant.bundle, variant.config, Path(tmp) / "model", base_source=base_source)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(folder.parent))
    return buf.getvalue()
