"""Side-by-side sampling: the FP model and quantized variants on the same labels and seeds.

Three views of the damage quantization does:
- per image: MSE and PSNR of each variant's image against the FP image of the same (label, seed);
- per timestep, along the FP trajectory: every variant's transformer gets exactly the inputs the FP model saw
  at each sampling step, and its noise prediction is compared with FP's (relative RMS error,
  quant.measures). This isolates the error each step adds, without the accumulation;
- per timestep, along each variant's own trajectory: the drift of x_t from FP's x_t (relative RMS). This is
  the accumulated error the final image shows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import torch

from analysis.evaluation.metrics import transformer_outputs
from analysis.evaluation.per_seed import mse_per_image, psnr, ssim_per_image  # noqa: F401  (psnr: this module's API)
from analysis.evaluation.speed import forward_profile
from analysis.models.bundle import ModelBundle
from analysis.models.sampling import sample
from analysis.quantization.pipeline import Variant, output_errors
from quant.measures import relative_rms, step_median

FP_NAME = "FP"


@dataclasses.dataclass
class Comparison:
    """Aligned results: images[name][i] is the image for labels[i], seeds[i] from model `name`."""

    names: list[str]  # FP first, then the variants in the order given
    labels: list[int]
    seeds: list[int]
    steps: int
    guidance: float
    images: dict[str, torch.Tensor]
    image_errors: list[dict]  # {"variant", "index", "label", "seed", "mse", "psnr", "ssim", "same_digit"}
    step_error: list[dict]  # {"variant", "step", "t", "rel_rms"} along the FP trajectory
    drift: list[dict]  # {"variant", "step", "t", "rel_rms_drift"} along each variant's own trajectory
    seconds: dict[str, float]
    label_agreement: dict[str, float] | None = None  # bundled digit model only
    speed: dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> analysis.evaluation.speed.forward_profile

    def summary(self) -> list[dict]:
        """One row per model: mean MSE vs FP and its PSNR (infinite for images identical to FP, FP's own row
        included), mean SSIM vs FP, the share of images the digit classifier reads as the same digit as their FP
        twin (bundled digit model), the median over steps of the per-step error and the last step's drift, label agreement with the count it is measured
        on, seconds."""
        rows = []
        for name in self.names:
            errs = [r for r in self.image_errors if r["variant"] == name]
            mse = sum(r["mse"] for r in errs) / len(errs) if errs else 0.0
            steps = [r["rel_rms"] for r in self.step_error if r["variant"] == name]
            drift = [r["rel_rms_drift"] for r in self.drift if r["variant"] == name]
            rows.append({
                "variant": name,
                "mse_vs_fp": mse,
                "psnr_vs_fp": psnr(mse),
                "ssim_vs_fp": sum(r["ssim"] for r in errs) / len(errs) if errs else 1.0,
                "same_digit_vs_fp": (None if not errs or errs[0].get("same_digit") is None
                                     else sum(r["same_digit"] for r in errs) / len(errs)) if name != self.names[0]
                else (1.0 if self.label_agreement else None),
                "step_rel_rms_median": step_median({i: e for i, e in enumerate(steps)}),
                "final_drift": drift[-1] if drift else 0.0,
                "label_agreement": (self.label_agreement or {}).get(name),
                "label_agreement_n": len(self.labels) if self.label_agreement else None,
                "seconds": self.seconds.get(name),
                **self.speed.get(name, {}),
            })
        return rows


def psnr_text(value: float) -> str:
    return "identical" if math.isinf(value) else f"{value:.1f} dB"


def image_errors(reference: torch.Tensor, images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-image MSE and PSNR of `images` against `reference` (both [N, C, H, W] in [0, 1])."""
    mse = mse_per_image(images, reference).tolist()
    return mse, [psnr(m) for m in mse]


@torch.no_grad()
def compare(fp: ModelBundle, variants: Mapping[str, Variant | ModelBundle], labels: list[int], seeds: list[int],
            steps: int = 50, guidance: float | None = None, scheduler: str = "ddim", batch_size: int | None = None,
            on_progress: Callable[[str, float], None] | None = None, base_name: str = FP_NAME) -> Comparison:
    """Sample `labels` x `seeds` (one image per pair) with the FP bundle and every variant (name -> Variant, or
    a ModelBundle: analysis.quantization.pipeline.Variant.of), and measure how far each variant is from FP per image and per timestep.

    on_progress(stage, fraction) is called as sampling and scoring advance (fraction of the whole job).
    base_name: the name of `fp` in the result ("FP"; say what it is when the reference is itself quantized,
    e.g. a saved quantized folder loaded as the model).
    """
    if base_name in variants:
        raise ValueError(f"the name {base_name!r} is reserved for the reference model; rename that variant")
    bundles = {name: Variant.of(name, v, fp).bundle for name, v in variants.items()}
    for name, b in bundles.items():
        if b.latent_shape != fp.latent_shape or b.num_classes != fp.num_classes:
            raise ValueError(f"variant {name!r} does not match the FP model (latents {b.latent_shape} vs "
                             f"{fp.latent_shape}); compare variants of the same model")
    guidance = fp.default_guidance if guidance is None else float(guidance)
    # Work units: one sampling pass per model, plus one scoring pass per variant (and FP's reference outputs).
    n_models = 1 + len(bundles)
    total = 2 * n_models
    done = [0]

    def stage_cb(stage: str):
        def cb(d, n):
            if on_progress is not None:
                on_progress(f"{stage}: step {d}/{n}", (done[0] + d / n) / total)
        return cb

    def advance(stage: str):
        done[0] += 1
        if on_progress is not None:
            on_progress(stage, done[0] / total)

    kw = dict(steps=steps, guidance=guidance, scheduler=scheduler, batch_size=batch_size, keep_trajectory=True)
    fp_res = sample(fp, labels, seeds, record="all", on_step=stage_cb(f"Sampling {base_name}"), **kw)
    advance(f"Sampled {base_name}")
    calib = fp_res.calibration
    fp_out = transformer_outputs(fp.denoiser, calib, fp.latent_shape[0])
    advance(f"{base_name} outputs")
    timesteps = calib.timesteps
    images, seconds = {base_name: fp_res.images}, {base_name: fp_res.seconds}
    # Speed beside quality: every model's forward on the same batch (the FP trajectory's inputs of one step,
    # guidance included), timed here, with the stored size of its weights.
    speed_batch = next(calib.batches(2 * len(labels)))
    speed = {base_name: forward_profile(fp.denoiser, speed_batch)}
    errs, step_rows, drift_rows = [], [], []
    fp_digits = None
    if fp.bundled and fp.conditional:
        from analysis.evaluation.classifier import predict

        fp_digits = predict(fp_res.images)
    for name, b in bundles.items():
        res = sample(b, labels, seeds, on_step=stage_cb(f"Sampling {name}"), **kw)
        advance(f"Sampled {name}")
        images[name], seconds[name] = res.images, res.seconds
        speed[name] = forward_profile(b.denoiser, speed_batch)
        mse, ps = image_errors(fp_res.images, res.images)
        ssim = ssim_per_image(res.images, fp_res.images).tolist()
        same = [None] * len(mse)
        if fp_digits is not None:
            same = (predict(res.images) == fp_digits).tolist()
        errs += [{"variant": name, "index": i, "label": labels[i], "seed": seeds[i], "mse": m, "psnr": p,
                  "ssim": q, "same_digit": d} for i, (m, p, q, d) in enumerate(zip(mse, ps, ssim, same))]
        per_t = output_errors(None, b.denoiser, calib, fp.latent_shape[0], per_layer=False, reference=fp_out)[1]
        step_rows += [{"variant": name, "step": i, "t": t, "rel_rms": per_t[t]} for i, t in enumerate(timesteps)]
        drift_rows += [{"variant": name, "step": i, "t": timesteps[i], "rel_rms_drift": relative_rms(xv, xf)}
                       for i, (xv, xf) in enumerate(zip(res.trajectory, fp_res.trajectory))]
        advance(f"Scored {name}")
    agreement = None
    if fp.bundled and fp.conditional:
        from analysis.evaluation.classifier import label_agreement

        agreement = {name: label_agreement(imgs, labels) for name, imgs in images.items()}
    return Comparison(names=[base_name, *bundles], labels=list(labels), seeds=list(seeds), steps=steps,
                      guidance=guidance, images=images, image_errors=errs, step_error=step_rows, drift=drift_rows,
                      seconds=seconds, label_agreement=agreement, speed=speed)


def grid_layout(classes: list[int], seeds_per_class: int, seed0: int = 0) -> tuple[list[int], list[int]]:
    """Labels and seeds for a grid with one row per seed and one column per class (seed-major order)."""
    seeds = list(range(seed0, seed0 + seeds_per_class))
    return [c for _ in seeds for c in classes], [s for s in seeds for _ in classes]


def comparison_table(comparison: Comparison, scores: list[dict] | None = None) -> tuple[list[dict], dict]:
    """The Compare page's table and label agreements from one comparison and its FID rows (evaluate.score_row).

    Returns (rows, agreement): one row per model with PSNR as text, the per-step errors, one label agreement
    with the N it is measured on (the FID samples when scored, a larger N, else the grid), and the FID columns
    with intervals as text; agreement is {name: (value, N)} for captions."""
    summary = comparison.summary()
    agreement = {r["variant"]: (r["label_agreement"], r["label_agreement_n"]) for r in summary}
    by_name = {s["variant"]: s for s in scores or []}
    for name, s in by_name.items():
        if s.get("label_agreement") is not None:
            agreement[name] = (s["label_agreement"], s["num_samples"])
    interval = lambda iv: None if not iv else f"[{iv[0]:.2f}, {iv[1]:.2f}]"  # noqa: E731
    from analysis.evaluation.evaluate import PER_SEED_KEYS

    rows = []
    for r in summary:
        row = {k: v for k, v in r.items() if k not in ("label_agreement", "label_agreement_n")}
        row["psnr_vs_fp"] = psnr_text(r["psnr_vs_fp"])
        row["label_agreement"], row["label_agreement_N"] = agreement[r["variant"]]
        s = by_name.get(r["variant"])
        if s is not None:
            row.update({k: v for k, v in s.items()
                        if k not in ("variant", "label_agreement", "num_samples", *PER_SEED_KEYS)})
            # the per-seed measures on the FID samples (N images), beside the grid's own
            for key, fmt in (("same_digit_vs_fp", "{:.3f}"), ("psnr_vs_fp", "{:.2f}"), ("ssim_vs_fp", "{:.3f}")):
                row[f"{key}_scored"] = per_seed_value_text(s, key, fmt)
            row["fid_N"] = s["num_samples"]
            row["fid_interval"], row["fid_vs_fp_interval"] = interval(s.get("fid_interval")), \
                interval(s.get("fid_vs_fp_interval"))
        rows.append(row)
    return rows, agreement


def per_seed_value_text(scores: dict, key: str, fmt: str) -> str | None:
    """'0.932 [0.921, 0.942]' for one per-seed measure of a scored row; "identical" for FP's own PSNR."""
    value, iv = scores.get(key), scores.get(f"{key}_interval")
    if value is None:
        return "identical" if key == "psnr_vs_fp" and scores.get("fid_vs_fp") == 0.0 and \
            scores.get("ssim_vs_fp") == 1.0 else None
    text = fmt.format(value)
    if iv and None not in iv:
        text += f" [{fmt.format(iv[0])}, {fmt.format(iv[1])}]"
    return text


# ---- the table a reader sees, and comparisons kept in the run store --------------------------------------
COLUMN_NAMES = {"variant": "model", "psnr_vs_fp": "PSNR vs FP (grid)", "mse_vs_fp": "MSE vs FP (grid)",
                "step_rel_rms_median": "noise-prediction error vs FP (median over steps)", "final_drift": "final rel. RMS drift of x_t",
                "label_agreement": "label agreement", "label_agreement_N": "label agreement N",
                "fid": "FID vs real", "fid_interval": "FID vs real 95% CI", "fid_floor": "real-vs-real floor",
                "fid_vs_fp": "FID vs FP", "fid_vs_fp_interval": "FID vs FP 95% CI", "fid_N": "FID N",
                "ssim_vs_fp": "SSIM vs FP (grid)", "same_digit_vs_fp": "same digit as FP (grid)",
                "same_digit_vs_fp_scored": "same digit as FP (FID N, 95% CI)",
                "psnr_vs_fp_scored": "PSNR vs FP dB (FID N, 95% CI)", "ssim_vs_fp_scored": "SSIM vs FP (FID N, 95% CI)",
                "seconds": "sampling s", "forward_ms": "forward ms (median)",
                "forward_ms_spread": "forward ms range", "forward_peak_mib": "forward peak MiB",
                "weights_mib": "weights MiB", "feature_extractor": "FID features", "run_id": "run"}
STORE_NOTE = "comparison"  # stored runs of a comparison carry this note and a shared comparison id


def metrics_rows(comparison: Comparison, scores: list[dict] | None = None) -> list[dict]:
    """comparison_table's rows with readable column names (COLUMN_NAMES), for the page's table and its CSV."""
    rows, _ = comparison_table(comparison, scores)
    return [{COLUMN_NAMES.get(k, k): v for k, v in row.items() if k != "warning"} for row in rows]


def comparison_view(cmp: Comparison, scores: list[dict] | None, ncol: int) -> dict:
    """Everything the Compare page draws, in plain data (grids as PIL images): the same form whether the
    comparison was just computed or read back from the store (latest_comparison)."""
    from analysis.evaluation.images import make_grid

    # grids large enough for a projector (a cell at least 96 px), each column labelled with its class
    col_labels = [str(c) for c in cmp.labels[:ncol]] if min(cmp.labels[:ncol], default=-1) >= 0 else None
    return {"names": list(cmp.names), "steps": cmp.steps, "guidance": cmp.guidance, "n_images": len(cmp.labels),
            "grids": {name: make_grid(cmp.images[name], ncol=ncol, col_labels=col_labels, target=96)
                      for name in cmp.names},
            "rows": metrics_rows(cmp, scores), "step_error": cmp.step_error, "drift": cmp.drift,
            "image_errors": cmp.image_errors, "scores": scores}


def store_comparison(store, model: str, view: dict, cmp: Comparison,
                     variants: Mapping[str, Variant | ModelBundle | None], produced_by: str | None = None) -> str:
    """Keep a comparison in the run store, one run per model (note "comparison", its grid as grid.png, each
    variant's config and recipe), so the variants and their results survive a page reload and rebuild from
    the store. produced_by: the FP model's source, device and precision in words, kept for captions.
    Returns the comparison's id."""
    import uuid

    from analysis.evaluation.store import RunRecord

    cid = uuid.uuid4().hex[:12]
    for name, row in zip(view["names"], view["rows"]):
        v = variants.get(name)
        v = None if v is None else Variant.of(name, v, None)  # FP rows have no entry
        config, recipe = ({"method": "fp"}, None) if v is None else (v.config_dict(), v.recipe)
        metrics = {"comparison": cid, "position": view["names"].index(name), "row": row, "produced_by": produced_by,
                   "label_agreement": row.get("label agreement"),
                   "step_error": [r for r in view["step_error"] if r["variant"] == name],
                   "drift": [r for r in view["drift"] if r["variant"] == name],
                   "score": next((x for x in view["scores"] or [] if x["variant"] == name), None),
                   "psnr": [None if math.isinf(r["psnr"]) else r["psnr"] for r in view["image_errors"]
                            if r["variant"] == name]}
        store.add(RunRecord(model=model, method=config["method"], label=name, config=config,
                            num_samples=view["n_images"], seeds=cmp.seeds, labels=cmp.labels, metrics=metrics,
                            timings={"total": cmp.seconds.get(name)}, steps=cmp.steps, guidance=cmp.guidance,
                            note=STORE_NOTE, recipe=None if recipe is None else recipe.to_dict()),
                  files={"grid.png": view["grids"][name]})
    return cid


def latest_comparison(store, model: str, comparison: str | None = None) -> dict | None:
    """The newest comparison of `model` kept in the store (or the one whose id is `comparison`), in
    comparison_view's form (grids as file paths), or None."""
    runs = [r for r in store.list(model=model) if r.note == STORE_NOTE and "comparison" in r.metrics
            and (comparison is None or r.metrics["comparison"] == comparison)]
    if not runs:
        return None
    cid = runs[0].metrics["comparison"]
    group = sorted((r for r in runs if r.metrics["comparison"] == cid), key=lambda r: r.metrics.get("position", 0))
    first = group[0]
    names = [r.label for r in group]
    return {"names": names, "steps": first.steps, "guidance": first.guidance, "n_images": first.num_samples,
            "grids": {r.label: r.files.get("grid.png") for r in group}, "rows": [r.metrics["row"] for r in group],
            "step_error": [e for r in group for e in r.metrics.get("step_error", [])],
            "drift": [e for r in group for e in r.metrics.get("drift", [])],
            "image_errors": [{"variant": r.label, "psnr": math.inf if p is None else p}
                             for r in group[1:] for p in r.metrics.get("psnr", [])],
            "scores": [r.metrics["score"] for r in group if r.metrics.get("score")] or None,
            "run_ids": [r.id for r in group], "created": first.created, "comparison": cid,
            "produced_by": first.metrics.get("produced_by")}
