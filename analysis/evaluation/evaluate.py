"""One call per evaluation: quantize (if asked), sample FP and variants at the same seeds, score, store.

    result = evaluate(bundle, QuantConfig(method="ptq4dit", w_bits=8, a_bits=8), num_samples=2048)
    result.metrics["fid"], result.metrics["fid_vs_fp"], result.run_id

Scores per variant: FID against real images (the bundled digits, or a folder the user names), FID against
the FP model's images at the same labels and seeds, PSNR / SSIM against the FP image of the same seed and
label or prompt, label agreement (bundled digit model), for a text-to-image model the CLIP score when a CLIP
model is available locally, and on request IS / KID / precision-recall. A text-to-image model is evaluated on
prompts (the bundled evaluation set unless given), never on its calibration prompts. FP images for a given model and sampling setting are cached on disk, so a
sweep over many configurations samples FP once.

The FID protocol: images are sampled at the model's evaluation guidance (`bundle.eval_guidance`: the value
that minimises FP's FID vs real for the bundled model, measured and recorded in its card; PTQ4DiT's 1.5 for
hub DiTs), not at the stronger guidance that draws pretty grids. Strong guidance trades diversity for
fidelity and leaves the data distribution, so at guidance 4 a damaged model can score a "better" FID than
FP. Every FID carries its N, a bootstrap confidence interval, and FID vs real also the real-vs-real floor
at the same N: two variants whose intervals overlap are not told apart by this measurement.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

import torch

from analysis.evaluation import metrics as M
from analysis.evaluation.distributed import is_main, sample_sharded
from analysis.evaluation.per_seed import per_seed_identity, wilson_interval
from analysis.evaluation.store import RunRecord, Store
from analysis.models.bundle import ModelBundle
from analysis.models.sampling import sample
from analysis.quantization.calibration import CALIBRATION_SEED, DEFAULT_CAL_SAMPLES, CalibrationSpec
from analysis.quantization.pipeline import Variant
from quant.config import quantizes

FP_NAME = "FP"
# The named parts of a result's wall time; "total" is their sum. quantize_seconds includes the calibration
# sampling; the FP parts are shared by every variant scored in the same call.
TIMING_PARTS = ("fp_sampling", "shared_scoring", "quantize_seconds", "sampling", "scoring")
# The per-seed identity of each image with its FP twin (analysis.evaluation.per_seed), in every result
PER_SEED_KEYS = ("same_digit_vs_fp", "same_digit_vs_fp_interval", "psnr_vs_fp", "psnr_vs_fp_interval", "ssim_vs_fp",
                 "ssim_vs_fp_interval")
GRID_IMAGES = 100  # images in a stored grid (10 classes x 10 seeds for the digits)


@dataclasses.dataclass
class EvalOptions:
    """What to measure and how. reference: None (bundled digits for the bundled model; none otherwise), a
    folder path, or an analysis.evaluation.metrics.Reference. extractor: auto | digits | inception."""

    num_samples: int = 2048
    steps: int = 50
    guidance: float | None = None  # None: the bundle's evaluation guidance (the FID protocol)
    scheduler: str = "ddim"
    seed: int = 0
    reference: object = None
    extractor: str = "auto"
    isc: bool = False
    kid: bool = False
    prc: bool = False
    kid_subset_size: int | None = None
    inception_weights: str | None = None
    batch_size: int | None = None
    cache_fp: bool = True
    calib_samples: int | None = None  # None: the calibration default (analysis.quantization.calibration)
    calib_seed: int = CALIBRATION_SEED  # calibration images use other seeds than the evaluated ones
    # bootstrap replicates per FID interval: None the default (metrics.fid_interval), 0 no interval (a quick
    # look, or a test: the two intervals of a variant are ~2000 FIDs at the default)
    bootstrap: int | None = None
    prompts: list[str] | None = None  # text-to-image: evaluated prompts (None: the bundled evaluation set)
    clip_model: str | None = None  # a local CLIP folder for the CLIP score (None: $DQLAB_CLIP_MODEL, else none)

    def calibration(self, bundle: ModelBundle) -> CalibrationSpec:
        """The calibration of a variant this evaluation quantizes: at the evaluated steps, guidance and
        sampler (per-timestep (TPQ) parameters are keyed by the timesteps the sampler will visit)."""
        return CalibrationSpec(seed=self.calib_seed, images=self.calib_samples or DEFAULT_CAL_SAMPLES,
                               steps=self.steps, guidance=eval_guidance(bundle, self), scheduler=self.scheduler)
        # a text model calibrates on the bundled calibration prompts, never on the evaluated ones


@dataclasses.dataclass
class EvalResult:
    name: str
    config: dict
    metrics: dict  # fid, fid_vs_fp, label_agreement, num_samples, feature_extractor, warning, ...
    timings: dict  # seconds per phase and "total"
    run_id: int | None
    images: torch.Tensor  # [N, C, H, W] in [0, 1]; not persisted except as a grid

    def to_json(self) -> dict:
        return {"name": self.name, "run_id": self.run_id, **self.metrics, "seconds": self.timings.get("total"),
                "timings": self.timings, "config": self.config}


def eval_labels_seeds(num_classes: int, n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Balanced classes (image i asks for class i mod K) with consecutive seeds from `seed`; an unconditional
    model (K = 0) gets the no-class label on every image."""
    from analysis.models.sampling import NO_CLASS

    labels = [i % num_classes for i in range(n)] if num_classes else [NO_CLASS] * n
    return labels, list(range(seed, seed + n))


def eval_prompts(bundle: ModelBundle, opts: EvalOptions) -> list[str] | None:
    """The prompt of every evaluated image of a text-to-image model (prompt i mod P), None for other models."""
    if not bundle.text_conditioned:
        if opts.prompts:
            raise ValueError(f"{bundle.name} is not a text-to-image model: evaluate it without prompts")
        return None
    from analysis.models.prompts import cycle, read_prompt_set

    return cycle(list(opts.prompts) if opts.prompts else read_prompt_set("evaluation"), opts.num_samples)


def sampling_batch_size(bundle: ModelBundle) -> int:
    """Images per sampling batch: small latents go in large batches; DiT-XL-sized ones in small ones."""
    c, h, w = bundle.latent_shape
    big = c * h * w > 2048
    if bundle.device.type == "cuda":
        return 64 if big else 1024
    return 8 if big else 256


def resolve_reference(bundle: ModelBundle, reference) -> M.Reference | None:
    if isinstance(reference, M.Reference):
        return reference
    if reference is not None and str(reference) != "":
        return M.folder_reference(reference, size=tuple(bundle.image_shape[1:]))
    return M.bundled_reference() if bundle.bundled else None


def eval_guidance(bundle: ModelBundle, opts: EvalOptions) -> float:
    """The guidance every evaluated image is sampled at: the option, else the bundle's protocol value."""
    return bundle.eval_guidance if opts.guidance is None else float(opts.guidance)


def images_bytes(bundle: ModelBundle, n: int) -> int:
    """Memory an evaluation of n images holds at once: FP and variant images in float32, their uint8 copies."""
    return n * math.prod(bundle.image_shape) * (4 + 4 + 1 + 1)


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # not every platform reports it
        return None


def check_options(bundle: ModelBundle, opts: EvalOptions) -> tuple[str, M.Reference | None]:
    """Everything that can be wrong before any sampling: fail in a second, not after an hour."""
    if opts.guidance is not None and not (math.isfinite(opts.guidance) and opts.guidance >= 0):
        raise ValueError(f"guidance must be a finite number >= 0, got {opts.guidance}")
    if opts.num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 for FID, got {opts.num_samples}")
    need, have = images_bytes(bundle, opts.num_samples), physical_memory()
    if have and need > have / 2:
        raise ValueError(f"num_samples {opts.num_samples} needs about {need / 2 ** 30:.1f} GiB for the images alone, "
                         f"more than half of this machine's {have / 2 ** 30:.1f} GiB; lower --num-samples")
    if not 1 <= opts.steps <= 1000:
        raise ValueError(f"steps must be between 1 and 1000, got {opts.steps}")
    if opts.bootstrap is not None and (opts.bootstrap < 0 or opts.bootstrap == 1):
        raise ValueError(f"bootstrap replicates must be 0 (no interval) or at least 2, got {opts.bootstrap}")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {opts.batch_size}")
    if opts.kid and opts.kid_subset_size is not None and not 2 <= opts.kid_subset_size <= opts.num_samples:
        raise ValueError(f"KID subset size {opts.kid_subset_size} needs 2 <= size <= the sample count "
                         f"({opts.num_samples}); lower --kid-subset-size or raise --num-samples")
    extractor = M.resolve_extractor(opts.extractor, bundle.bundled)
    if extractor == M.INCEPTION_EXTRACTOR:
        M.resolve_inception_weights(opts.inception_weights)
    reference = resolve_reference(bundle, opts.reference)
    if bundle.text_conditioned:
        from analysis.evaluation.clip_score import clip_model_path

        clip_model_path(opts.clip_model)  # a named folder that is not a CLIP model fails now
    if opts.kid and reference is not None and opts.kid_subset_size is not None and opts.kid_subset_size > len(reference):
        raise ValueError(f"KID subset size {opts.kid_subset_size} exceeds the {len(reference)} reference images")
    return extractor, reference


def model_fingerprint(bundle: ModelBundle) -> str:
    """A hash of the transformer's weights: the FP sample cache must not outlive a retrained model."""
    h = hashlib.sha256(bundle.name.encode())
    for name, tensor in bundle.denoiser.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


_KEY_LOCKS: dict[str, threading.Lock] = {}
_KEY_GUARD = threading.Lock()


@contextlib.contextmanager
def _one_at_a_time(key: str):
    """Hold the lock of `key` (one per key, for the whole process): the FP samples of one cache file are sampled
    once while other sessions of the app asking for the same file wait, then read it."""
    with _KEY_GUARD:
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with lock:
        yield


def _fp_images(bundle: ModelBundle, labels, seeds, opts: EvalOptions, guidance: float, cache_dir: Path | None,
               on_step) -> tuple[torch.Tensor, float, bool]:
    """FP images for these labels/seeds, from the disk cache when the same model and setting ran before.
    Sessions of one process asking for the same images at once sample them once: the others wait for the
    cache file (_one_at_a_time)."""
    path = None
    if cache_dir is not None and opts.cache_fp:
        # a text model's labels are prompt table ids, which mean something only in this process: key its texts
        what = labels if not bundle.text_conditioned else \
            ([bundle.text.table.prompt(i) for i in labels], bundle.negative_prompt)
        key = hashlib.sha256(repr((model_fingerprint(bundle), what, seeds, opts.steps, guidance, opts.scheduler,
                                   str(bundle.dtype))).encode()).hexdigest()[:20]
        path = cache_dir / f"{key}.pt"
    if path is None:
        images, seconds = _sample_images(bundle, labels, seeds, opts, guidance, on_step)
        return images, seconds, False
    with _one_at_a_time(str(path)):
        if path.exists():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                return cached["images"].float() / 255.0, float(cached["seconds"]), True
            except Exception:  # a damaged cache file is recomputed, never trusted
                path.unlink(missing_ok=True)
        images, seconds = _sample_images(bundle, labels, seeds, opts, guidance, on_step)
        if images is None:  # another rank of a torchrun job: rank 0 holds the merged set
            return None, seconds, False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        torch.save({"images": (images * 255).round().to(torch.uint8), "seconds": seconds}, tmp)
        os.replace(tmp, path)
        return images, seconds, False


def _sample_images(bundle: ModelBundle, labels, seeds, opts: EvalOptions, guidance: float,
                   on_step) -> tuple[torch.Tensor | None, float]:
    """(images in [0, 1] on the uint8 grid, sampling seconds), sharded over the ranks of a torchrun job.

    Images are rounded to uint8, which is what the metrics read and what a shard sends, so one process and
    K processes give the same set."""
    def run(lab, sd, batch):
        res = sample(bundle, lab, sd, steps=opts.steps, guidance=guidance, scheduler=opts.scheduler,
                     batch_size=batch, on_step=on_step)
        return (res.images.clamp(0, 1) * 255).round() / 255.0, res.seconds

    return sample_sharded(run, labels, seeds, opts.batch_size or sampling_batch_size(bundle))


def evaluate_variants(fp: ModelBundle, variants: Mapping[str, Variant | ModelBundle | None],
                      options: EvalOptions | None = None,
                      store: Store | None = None, on_progress: Callable[[str, float], None] | None = None,
                      note: str | None = None, extra_metrics: Mapping[str, dict] | None = None) -> list[EvalResult]:
    """Score several variants (name -> Variant, or what Variant.of reads: a ModelBundle, None for FP) at the
    same labels and seeds. FP is sampled once (or read from the cache). Each result is stored when a store is
    given. extra_metrics: name -> entries stored with that variant's metrics (the recipe key of a sweep point).
    Returns one EvalResult per variant, in order (none on ranks other than 0 of a torchrun job, which only
    sample their share)."""
    opts = options or EvalOptions()
    extractor, reference = check_options(fp, opts)
    guidance = eval_guidance(fp, opts)
    labels, seeds = eval_labels_seeds(fp.num_classes, opts.num_samples, opts.seed)
    prompts = eval_prompts(fp, opts)
    if prompts is not None:
        labels = fp.prompt_ids(prompts)  # each encoded once by the FP text encoder; every variant shares the table
    clip_folder = None
    if prompts is not None:
        from analysis.evaluation.clip_score import clip_model_path

        clip_folder = clip_model_path(opts.clip_model)
    cache_dir = store.cache_dir if store is not None else None
    variants = {name: Variant.of(name, v, fp) for name, v in variants.items()}
    names = list(variants)
    total = 2 * (1 + len(names))
    progress = [0.0]

    def report(stage: str, frac_of_unit: float = 0.0):
        if on_progress is not None:
            on_progress(stage, min(1.0, (progress[0] + frac_of_unit) / total))

    def step_cb(stage):
        return lambda d, n: report(f"{stage}: step {d}/{n}", d / n)

    score_kw = dict(extractor=extractor, isc=opts.isc, kid=opts.kid, prc=opts.prc, kid_subset_size=opts.kid_subset_size,
                    inception_weights=opts.inception_weights, device=fp.device, cache_dir=cache_dir)
    t0 = time.perf_counter()
    fp_images, fp_seconds, fp_cached = _fp_images(fp, labels, seeds, opts, guidance,
                                                  cache_dir / "fp_samples" if cache_dir else None,
                                                  step_cb(f"Sampling {FP_NAME}"))
    fp_wall = time.perf_counter() - t0
    if not is_main():
        # another rank of a torchrun job: sample its share of every variant, leave scoring to rank 0
        for v in variants.values():
            if not v.is_fp:
                _sample_images(v.bundle, labels, seeds, opts, guidance, None)
        return []
    fp_feats = M.extract_features(fp_images, extractor, inception_weights=opts.inception_weights, device=fp.device)
    ref_feats = floor = None
    if reference is not None:
        all_ref = M.reference_features(reference, extractor, inception_weights=opts.inception_weights,
                                       device=fp.device, cache_dir=cache_dir)
        # FID vs real and the floor compare against the same half of the real set (metrics.split_reference)
        ref_feats = M.split_reference(all_ref)[0]
        floor = M.fid_floor(all_ref, len(fp_images))
    classify = None
    if fp.bundled and fp.conditional:
        from analysis.evaluation.classifier import predict

        fp_pred = predict(fp_images)
        classify = lambda imgs: fp_pred if imgs is fp_images else predict(imgs)  # noqa: E731
    shared_scoring = time.perf_counter() - t0 - fp_wall  # FP and reference features, the floor
    progress[0] += 1
    results = []
    for name in names:
        v = variants[name]
        vb, is_fp, config, recipe = v.bundle, v.is_fp, v.config_dict(), v.recipe
        if recipe is not None and recipe.calibration.overlaps(seeds):
            m_warning = (f"the calibration seeds {recipe.calibration.seed}..{recipe.calibration.seed + recipe.calibration.images - 1} "
                         "overlap the evaluated seeds: this variant is scored partly on its calibration images")
        else:
            m_warning = None
        timings = {"fp_sampling": round(fp_wall, 3), "fp_cached": fp_cached,
                   "shared_scoring": round(shared_scoring, 3)}
        t1 = time.perf_counter()
        if is_fp:
            images = fp_images
        else:
            images, _ = _sample_images(vb, labels, seeds, opts, guidance, step_cb(f"Sampling {name}"))
        timings["sampling"] = round(time.perf_counter() - t1, 3)
        progress[0] += 1
        report(f"Scoring {name}")
        t2 = time.perf_counter()
        feats = fp_feats if is_fp else M.extract_features(images, extractor, inception_weights=opts.inception_weights,
                                                          device=fp.device)
        m = _score(images, feats, fp_images, fp_feats, reference, ref_feats, floor, is_fp, extractor, opts, score_kw)
        if m_warning:
            m["warning"] = "; ".join(w for w in (m.get("warning"), m_warning) if w)
        m.update(_variant_measures(v))
        if prompts is not None:  # a stored run's labels are table ids: keep the prompts themselves
            m.update(_clip_measures(images, prompts, clip_folder, fp.device),
                     prompts=list(dict.fromkeys(prompts)), negative_prompt=fp.negative_prompt)
        m.update((extra_metrics or {}).get(name, {}))
        m.update(per_seed_identity(images, fp_images, classify))
        if classify is not None:
            hits = int((classify(images) == torch.as_tensor(labels)).sum())
            m["label_agreement"] = hits / len(labels)
            m["label_agreement_interval"] = list(wilson_interval(hits, len(labels)))
        timings["scoring"] = round(time.perf_counter() - t2, 3)
        # Seconds mean one thing everywhere: the wall time of producing this result, as the sum of its named
        # parts (the shared FP sampling, this variant's quantization, sampling and scoring).
        timings.update(_variant_timings(v))
        timings["total"] = round(sum(timings.get(k, 0.0) for k in TIMING_PARTS), 3)
        progress[0] += 1
        report(f"Scored {name}")
        run_id = None
        if store is not None:
            run_id = store.add(RunRecord(
                model=fp.name, method=config["method"], label=name, config=config,
                num_samples=len(images), seeds=seeds, labels=labels, metrics=m, timings=timings,
                steps=opts.steps, guidance=guidance, scheduler=opts.scheduler, note=note,
                recipe=None if recipe is None else recipe.to_dict()),
                files={"grid.png": _grid(images[:GRID_IMAGES], fp.num_classes),
                       "fp_grid.png": _grid(fp_images[:GRID_IMAGES], fp.num_classes)})
        results.append(EvalResult(name=name, config=config, metrics=m, timings=timings, run_id=run_id, images=images))
    return results


def recipe_key(fingerprint: str, config: dict, opts: EvalOptions, guidance: float, calibration: dict | None) -> str:
    """A hash of everything that decides a result: the model's weights, the quantization config, the
    calibration set, the evaluated labels and seeds, sampling and scoring. Equal keys mean a stored result
    can stand in for a new measurement."""
    what = {"model": fingerprint, "config": config, "calibration": calibration if quantizes(config) else None,
            "num_samples": opts.num_samples, "seed": opts.seed, "steps": opts.steps, "guidance": float(guidance),
            "scheduler": opts.scheduler, "extractor": opts.extractor, "reference": str(opts.reference or "")}
    if opts.bootstrap is not None:  # only a non-default interval changes the key (stored runs keep theirs)
        what["bootstrap"] = opts.bootstrap
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def find_stored(store: Store, model: str, key: str):
    """The newest stored run of `model` whose recipe key is `key`, or None."""
    for run in store.list(model=model):
        if run.metrics.get("recipe_key") == key:
            return run
    return None


def evaluate(bundle: ModelBundle, config, options: EvalOptions | None = None, store: Store | None = None,
             calibration=None, on_progress: Callable[[str, float], None] | None = None,
             note: str | None = None, fingerprint: str | None = None) -> EvalResult | None:
    """The whole evaluation of one configuration (a quant.api.QuantConfig, or None for FP): validate, quantize
    (skipped for method "fp"), sample FP and the variant at the same seeds, score, and store.

    calibration: a CalibrationSpec, CalibrationData sampled by analysis.quantization.calibration.calibrate (it carries its
    spec), or None for the evaluation's own (opts.calibration). The run is stored with its recipe key, so a
    later sweep finds it (fingerprint: model_fingerprint(bundle), when the caller has it already)."""
    from quant.api import QuantConfig

    config = config or QuantConfig(method="fp")
    quantized = config.quantizes
    opts = options or EvalOptions()
    check_options(bundle, opts)  # fail before the (slow) quantization
    t0 = time.perf_counter()
    guidance = eval_guidance(bundle, opts)
    if calibration is None and quantized:
        calibration = opts.calibration(bundle)
    spec = calibration if isinstance(calibration, CalibrationSpec) else getattr(calibration, "spec", None)
    calib = None if not quantized or spec is None else spec.resolved(bundle).to_dict()
    extra = {}
    # Only a known calibration set can be matched later (data sampled without a spec cannot).
    if store is not None and (calib is not None or not quantized):
        extra["recipe_key"] = recipe_key(fingerprint or model_fingerprint(bundle), config.to_dict(), opts, guidance,
                                         calib)
    if not quantized:
        variants = {FP_NAME: None}
    else:
        from analysis.quantization.pipeline import quantize_bundle

        q_progress = (lambda stage, frac: on_progress(f"Quantizing: {stage}", 0.3 * frac)) if on_progress else None
        variant = quantize_bundle(bundle, config, calibration=calibration, on_progress=q_progress)
        variant.report.quantize_seconds = round(time.perf_counter() - t0, 3)
        variants = {config.label: variant}
    e_progress = None
    if on_progress is not None:
        offset = 0.3 if quantized else 0.0
        e_progress = lambda stage, frac: on_progress(stage, offset + (1 - offset) * frac)  # noqa: E731
    results = evaluate_variants(bundle, variants, opts, store=store, on_progress=e_progress, note=note,
                                extra_metrics={name: extra for name in variants})
    return results[0] if results else None  # None on the other ranks of a torchrun job


def _score(images, feats, fp_images, fp_feats, reference, ref_feats, floor, is_fp: bool, extractor: str,
           opts: EvalOptions, score_kw: dict) -> dict:
    """FID vs real (with its interval and the real-vs-real floor) and vs FP (with its paired interval), from
    features extracted once; IS / KID / precision-recall through torch-fidelity when asked."""
    m = {"num_samples": len(images), "feature_extractor": extractor, "warning": M.fid_warning(len(images))}
    if reference is not None:
        vs_real = M.fid_interval(feats, ref_feats, replicates=opts.bootstrap)
        m.update(fid=vs_real["fid"], fid_interval=vs_real["fid_interval"], reference_size=len(ref_feats),
                 fid_floor=floor["fid_floor"], floor_sizes=floor["floor_sizes"],
                 floor_definition=floor["floor_definition"], interval_level=vs_real["level"],
                 bootstrap_replicates=vs_real["replicates"], interval_method=vs_real["method"],
                 interval_method_text=M.INTERVAL_METHODS.get(vs_real["method"]), interval_estimand=M.INTERVAL_ESTIMAND)
    else:
        m.update(fid=None, fid_interval=None, fid_floor=None, reference_size=0,
                 warning="no reference images given: FID vs real was not computed (pass a folder of real images)")
    if is_fp:  # the same images: identical by construction, not a measurement
        m.update(fid_vs_fp=0.0, fid_vs_fp_interval=[0.0, 0.0])
    else:
        vs_fp = M.fid_interval(feats, fp_feats, paired=True, replicates=opts.bootstrap)
        m.update(fid_vs_fp=vs_fp["fid"], fid_vs_fp_interval=vs_fp["fid_interval"],
                 fid_vs_fp_interval_method=vs_fp["method"], fid_vs_fp_replicates=vs_fp["replicates"])
    if opts.isc or opts.kid or opts.prc:
        against = reference if reference is not None else fp_images
        extra = M.compute_metrics(images, against, fid=False, **{**score_kw, "kid": opts.kid and reference is not None,
                                                                 "prc": opts.prc and reference is not None})
        m.update({k: v for k, v in extra.items() if k.startswith(("isc", "kid", "precision", "recall", "f_score"))})
    return m


def score_row(result: EvalResult) -> dict:
    """One variant's scores as a flat row for tables and metrics_figure."""
    m = result.metrics
    return {"variant": result.name, "fid": m.get("fid"), "fid_interval": m.get("fid_interval"),
            "fid_floor": m.get("fid_floor"), "fid_vs_fp": m.get("fid_vs_fp"),
            "fid_vs_fp_interval": m.get("fid_vs_fp_interval"), "label_agreement": m.get("label_agreement"),
            **{k: m.get(k) for k in PER_SEED_KEYS},
            "clip_score": m.get("clip_score"),
            "num_samples": m["num_samples"], "feature_extractor": m.get("feature_extractor"),
            "run_id": result.run_id, "warning": m.get("warning")}


def _variant_measures(v: Variant) -> dict:
    """What the quantization measured (error vs FP on held-out seeds and in sample, stored size), kept with the run so
    a stored result answers the same questions as a fresh one."""
    if v.is_fp:
        from quant.io import fp_weight_bytes

        size = fp_weight_bytes(v.bundle.denoiser)
        return {"rel_rms": 0.0, "rel_rms_step_median": 0.0, "weight_bytes": size, "fp_weight_bytes": size}
    r = v.report
    if r is None:
        return {}
    # JSON object keys are strings: keep the timesteps as numbers
    return {"rel_rms": r.rel_rms, "rel_rms_step_median": r.rel_rms_step_median, "rel_rms_basis": r.rel_rms_basis, "rel_rms_in_sample": r.rel_rms_in_sample,
            "rel_rms_held_out": r.rel_rms_held_out, "weight_bytes": r.weight_bytes,
            "fp_weight_bytes": r.fp_weight_bytes,
            "rel_rms_per_timestep": [[int(t), float(e)] for t, e in r.rel_rms_per_timestep.items()]}


def _variant_timings(v: Variant) -> dict:
    """The variant's quantization time, when this evaluation produced it (evaluate() sets quantize_seconds)."""
    value = None if v.report is None else v.report.quantize_seconds
    return {"quantize_seconds": value} if isinstance(value, (int, float)) else {}


def _clip_measures(images: torch.Tensor, prompts: list[str], folder, device) -> dict:
    """The CLIP score of a text-to-image variant, or why there is none (no local CLIP model)."""
    if folder is None:
        from analysis.evaluation.clip_score import MISSING

        return {"clip_score": None, "clip_score_note": MISSING}
    from analysis.evaluation.clip_score import clip_score

    return {"clip_score": round(clip_score(images, prompts, folder, device=device), 4), "clip_model": str(folder)}


def _grid(images: torch.Tensor, num_classes: int):
    from analysis.evaluation.images import make_grid

    return make_grid(images, ncol=min(num_classes, 10) if num_classes else 10)
