"""Sweep: a grid of methods x bit-widths x options, measured on one shared footing, its Pareto front, and
the cheapest setting within a quality tolerance.

    spec = SweepSpec(methods=["baseline", "dilatequant"], bits=["W8A8", "W4A8", "W4A4"], options=["default"])
    result = run_sweep(bundle, spec, store=Store())
    result.front("bops")                                      # labels on the quality-vs-BOPs front
    recommend(result.points, {"fid_vs_fp": 10.0})             # the cheapest point within the tolerance

Every point shares one FP calibration set (the same seeds, steps and guidance) and is scored against one FP
reference sample set (same labels and seeds; FP is sampled once and cached). Each point is stored in the run
store with a recipe key (analysis.evaluation.evaluate.recipe_key); a point whose key is already stored is read back
instead of measured, so an interrupted sweep resumes where it stopped and a repeated one costs seconds.

Per point: FID vs FP with its 95% interval, FID vs real, label agreement (bundled model), the per-seed identity
with FP (same digit, PSNR, SSIM, each with its interval: analysis.evaluation.per_seed), rel_rms (relative RMS
error of the noise prediction vs FP on held-out seeds, the in-sample value beside it) and its per-timestep
profile, stored weight bytes, BOPs (analysis.quantization.sizes) and the time it took.

Options (one per point, combined with every method and bit-width):
    default      the method's own setting (TPQ on for dilatequant only)
    tpq          one activation range per timestep (DilateQuant's TPQ)
    adaround     + block-wise AdaRound reconstruction (PTQ4DiT)
    bkd          + block-wise distillation (DilateQuant)
    float-io     the ends of the network kept in floating point: the layers that read the noisy input and
                 write the prediction, as the model's family declares them (a DiT's patch embedding and final
                 layer, a UNet's conv_in and conv_out); a point label says float-io
    keep8:K      mixed precision: the K layers the sensitivity analysis ranks hardest at W8A8 (points whose
                 bits are already 8 skip it)
    keep8-least:K  the control: the K layers ranked easiest at W8A8 (the same size as keep8:K)
Options other than keep8 join with '+' into one point: "tpq+bkd" is TPQ with block-wise distillation on top,
"tpq+float-io" TPQ with the ends in float (one reconstruction a point: adaround and bkd do not join).
The sensitivity ranking (analysis.quantization.sensitivity, plain PTQ at the point's bits, on the shared calibration set)
is cached beside the store.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Callable

from analysis.evaluation.evaluate import (
    PER_SEED_KEYS,
    EvalOptions,
    eval_guidance,
    evaluate,
    find_stored,
    model_fingerprint,
    recipe_key,
)
from analysis.evaluation.store import Store
from analysis.models.bundle import ModelBundle
from analysis.quantization.calibration import CALIBRATION_SEED, calibrate
from analysis.quantization.sensitivity import mixed_config, top_layers
from analysis.quantization.sizes import bops, float_bits_of, mac_table
from quant.config import METHODS, QuantConfig, quantizes
from quant.methods import all_options, components
from quant.options import check
from quant.families import FAMILIES
from quant.formats import FORMAT_NAMES, format_bits
from quant.measures import step_median
from quant.wrap import planned_branches

# float-io's layers are the family's (quant.families: FAMILY.float_io), filled in per model by point_config.
OPTIONS = {"default": {}, "tpq": {"tpq": True}, "adaround": {"recon": "adaround"}, "bkd": {"recon": "bkd"},
           "float-io": {"exclude": "float_io"}}
SWEEP_METHODS = tuple(m for m in METHODS if quantizes(m))  # every registered method; FP is always measured
MIXED = re.compile(r"keep8(-least)?:(\d+)$")
# rel_rms_step_median is the headline error (quant.measures.step_median: median over timesteps of the per-step
# relative RMS error); rel_rms, the error pooled over timesteps, is kept so older tolerances and rows still read.
QUALITY = {"fid_vs_fp": "FID vs FP", "rel_rms_step_median": "noise-prediction error (median over steps)",
           "rel_rms": "relative RMS error (pooled over steps)", "label_agreement_drop": "label agreement drop",
           "same_digit_vs_fp": "share of seeds with the same digit as FP", "psnr_vs_fp": "PSNR vs FP (dB)",
           "ssim_vs_fp": "SSIM vs FP"}
HIGHER_IS_BETTER = {"same_digit_vs_fp", "psnr_vs_fp", "ssim_vs_fp"}  # a tolerance on these is a lower bound
COSTS = {"bops": "BOPs", "weight_bytes": "weight bytes"}


def _is_method(spec: str) -> bool:
    """A registered method or a composition the registry accepts (quant.methods.compose)."""
    from quant.methods import compose

    try:
        compose(spec)
    except ValueError:
        return False
    return True


def parse_bits(text: str) -> tuple[int | None, int | None]:
    """'W4A8' -> (4, 8); 16 (or F) means floating point for that operand."""
    m = re.fullmatch(r"\s*[wW](\d+|[fF])[aA](\d+|[fF])\s*", text)
    if not m:
        raise ValueError(f"cannot read bit-width {text!r}; write it as W8A8, W4A8, W4A4 (16 = float)")
    w, a = (None if g.lower() in ("f", "16") else int(g) for g in m.groups())
    for v in (w, a):
        if v is not None and not 2 <= v <= 8:
            raise ValueError(f"bit-width {text!r}: bits must be 2 to 8, or 16 for float")
    return w, a


def parse_format_item(text: str) -> tuple[str, str | None]:
    """A formats-axis entry: 'mxfp4' (both sides where it fits) or 'W/A' such as 'nvfp4/fp8_e4m3' or
    'int4-g32/int'."""
    w, sep, a = text.strip().partition("/")
    for name in (w, a) if sep else (w,):
        if name not in FORMAT_NAMES:
            raise ValueError(f"unknown format {name!r} in the formats axis; choose from {', '.join(FORMAT_NAMES)}, "
                             "or write WEIGHT/ACTIVATION such as nvfp4/fp8_e4m3")
    return w, (a if sep else None)


def format_fields(item: str, bits: str) -> dict | None:
    """The QuantConfig format fields of a formats-axis entry at `bits`, or None where the weight side cannot
    take the format (mxfp4 at W8A8). A single name applies to the activations too where their bits fit it
    (W4A8 mxfp4: weights MXFP4, activations int8), so at W4A8 only the weights vary."""
    w_bits, a_bits = parse_bits(bits)
    w, a = parse_format_item(item)
    fits = lambda name, b: b is not None and format_bits(name) in (None, b)  # noqa: E731
    if w_bits is not None and not fits(w, w_bits):
        return None
    if a is None:
        a = w if fits(w, a_bits) else "int"
    elif a_bits is not None and not fits(a, a_bits):
        return None
    return {"w_format": w if w_bits is not None else "int", "a_format": a if a_bits is not None else "int"}


def bits_text(w: int | None, a: int | None) -> str:
    return f"W{w or 16}A{a or 16}"


def check_option(option: str) -> None:
    if MIXED.match(option):
        return
    parts = option.split("+")
    for part in parts:
        if part not in OPTIONS:
            raise ValueError(f"unknown sweep option {part!r}; choose from {', '.join(OPTIONS)} (joined by '+' for one "
                             "point, e.g. tpq+bkd), keep8:K (the K most sensitive layers at W8A8) or keep8-least:K")
    if len(parts) > 1 and "default" in parts:
        raise ValueError(f"sweep option {option!r}: default is the method's own setting and joins nothing; drop it")
    if len(set(parts)) < len(parts):
        raise ValueError(f"sweep option {option!r} names an option twice")
    recons = [p for p in parts if "recon" in OPTIONS[p]]
    if len(recons) > 1:
        raise ValueError(f"sweep option {option!r}: {' and '.join(recons)} are both reconstructions; a point runs "
                         "one, choose either")


def check_method_options(values: dict, methods: list[str]) -> None:
    """ValueError unless each name is an option of a method the sweep runs and its value fits."""
    declared = {o.name: o for o in all_options()}
    used = {c.name for m in methods for c in components(m)}
    for name, value in values.items():
        opt = declared.get(name)
        if opt is None:
            raise ValueError(f"unknown method option {name!r}; method options: {', '.join(sorted(declared))}")
        if opt.method not in used:
            raise ValueError(f"{name} is an option of {opt.method}, which no method of this sweep runs; add it to "
                             "the methods or drop the option")
        check(opt, value)


def option_parts(option: str) -> list[str]:
    """The OPTIONS entries of a point's option ('tpq+bkd' -> ['tpq', 'bkd'])."""
    return [] if MIXED.match(option) else option.split("+")


@dataclasses.dataclass
class SweepSpec:
    """The grid and the shared measurement setting. recon_iters: iterations per unit for the adaround / bkd
    options (None: QuantConfig's default)."""

    methods: list[str]
    bits: list[str]
    options: list[str] = dataclasses.field(default_factory=lambda: ["default"])
    formats: list[str] = dataclasses.field(default_factory=lambda: ["int"])
    num_samples: int = 512
    steps: int = 25
    guidance: float | None = None
    seed: int = 0
    calib_samples: int = 10
    calib_seed: int = CALIBRATION_SEED
    scheduler: str = "ddim"
    recon_iters: int | None = None
    bootstrap: int | None = None  # replicates per FID interval (EvalOptions.bootstrap; 0: no intervals)
    # method options for every point whose method declares them ({"rank": 4}); points name them in their label
    method_options: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> "SweepSpec":
        if not self.methods or not self.bits or not self.options:
            raise ValueError("a sweep needs at least one method, one bit-width and one option")
        for m in self.methods:
            if not quantizes(m) or not _is_method(m):
                raise ValueError(f"unknown method {m!r} for a sweep; choose from "
                                 f"{', '.join(SWEEP_METHODS)} or several joined by '+' (FP is always measured)")
        for b in self.bits:
            parse_bits(b)
        for o in self.options:
            check_option(o)
        if not self.formats:
            raise ValueError("a sweep needs at least one format (int for today's grids)")
        for f in self.formats:
            parse_format_item(f)
        if not self.grid():
            raise ValueError(f"no format of {self.formats} fits any bit-width of {self.bits}: FP4 formats need W4, "
                             "FP8 ones W8, FP6 ones W6")
        if self.calib_samples < 1:
            raise ValueError(f"calibration samples must be >= 1, got {self.calib_samples}")
        if self.bootstrap is not None and self.bootstrap < 0:
            raise ValueError(f"bootstrap replicates must be >= 0 (0: no intervals), got {self.bootstrap}")
        if self.recon_iters is not None and self.recon_iters < 1:
            raise ValueError(f"recon iterations must be >= 1, got {self.recon_iters}")
        check_method_options(self.method_options, self.methods)
        return self

    def eval_options(self) -> EvalOptions:
        return EvalOptions(num_samples=self.num_samples, steps=self.steps, guidance=self.guidance,
                           scheduler=self.scheduler, seed=self.seed, calib_samples=self.calib_samples,
                           calib_seed=self.calib_seed, bootstrap=self.bootstrap)

    def grid(self) -> list[tuple[str, str, str, str]]:
        """(method, bits, format, option) of every point, in order. Mixed precision needs bits below 8 to mix
        with; a format is skipped at bits its weights cannot hold."""
        def lower(bits):
            return any(v is not None and v < 8 for v in parse_bits(bits))
        return [(m, b, f, o) for b in self.bits for f in self.formats for m in self.methods for o in self.options
                if (not MIXED.match(o) or lower(b)) and format_fields(f, b) is not None]

    def size(self) -> int:
        return len(self.grid())


def point_config(method: str, bits: str, option: str, spec: SweepSpec, layers: list[str] | None = None,
                 family: str = "dit", fmt: str = "int") -> QuantConfig:
    """The QuantConfig of one grid point (keep8:K needs the layers the sensitivity ranking picked; float-io
    keeps the ends the model's family declares in float; fmt is the point's formats-axis entry)."""
    w, a = parse_bits(bits)
    fields = dict(method=method, w_bits=w, a_bits=a, **(format_fields(fmt, bits) or {}))
    own = {o.name for c in components(method) for o in c.describe_options()}
    fields["options"] = {k: v for k, v in spec.method_options.items() if k in own}
    if MIXED.match(option):
        return mixed_config(QuantConfig(**fields), layers or [])
    for part in option_parts(option):
        fields.update(OPTIONS[part])
    if fields.get("exclude") == "float_io":
        fields["exclude"] = list(FAMILIES[family].float_io)
    if fields.get("recon") and spec.recon_iters is not None:
        fields["recon_iters"] = spec.recon_iters
    return QuantConfig(**fields).validate()


@dataclasses.dataclass
class SweepResult:
    spec: SweepSpec
    model: str
    guidance: float
    points: list[dict]  # FP first
    seconds: float
    measured: int  # points measured in this run (the others came from the store)
    sensitivity: dict  # bits -> the ranking used for keep8:K points (Sensitivity.to_json())

    def front(self, cost: str = "bops", quality: str = "fid_vs_fp") -> list[str]:
        return pareto_front(self.points, cost, quality)

    def to_json(self, tolerances: list[dict] | None = None) -> dict:
        recs = [recommend(self.points, t) for t in (tolerances or [])]
        return {"model": self.model, "spec": dataclasses.asdict(self.spec), "guidance": self.guidance,
                "points": self.points, "front": self.front("bops"), "front_by_size": self.front("weight_bytes"),
                "recommendations": recs, "recommendation": recs[0] if recs else None,
                "seconds": round(self.seconds, 3), "measured": self.measured,
                "reused": len(self.points) - self.measured,
                "sensitivity": {b: s["ranking"][:10] for b, s in self.sensitivity.items()}}


def _quality(point: dict, quality: str) -> float | None:
    """The point's value of `quality` oriented so that lower is better (higher-is-better measures negated);
    FP's PSNR vs itself, which has no finite value, is the best there is."""
    value = point.get(quality)
    if value is None and quality == "psnr_vs_fp" and not quantizes(point.get("method")):
        return float("-inf")
    if value is None:
        return None
    return -float(value) if quality in HIGHER_IS_BETTER else float(value)


def pareto_front(points: list[dict], cost: str = "bops", quality: str = "fid_vs_fp") -> list[str]:
    """Labels of the points no other point beats: p is on the front unless some point is no worse on both
    `cost` and `quality` and strictly better on one (lower cost and lower error are better; for
    higher-is-better measures such as PSNR, higher). Points with equal cost and quality are all on the front
    or all off it. Cheapest first."""
    pts = [p for p in points if p.get(cost) is not None and _quality(p, quality) is not None]

    def beats(a, b):
        ca, qa, cb, qb = a[cost], _quality(a, quality), b[cost], _quality(b, quality)
        return ca <= cb and qa <= qb and (ca < cb or qa < qb)

    front = [p for p in pts if not any(beats(o, p) for o in pts if o is not p)]
    front.sort(key=lambda p: (p[cost], _quality(p, quality)))
    return [p["label"] for p in front]


def recommend(points: list[dict], tolerance: dict, cost: str = "bops") -> dict:
    """The cheapest point whose quality is within `tolerance` ({"fid_vs_fp": x}, {"rel_rms": y},
    {"label_agreement_drop": z}: at most; {"same_digit_vs_fp": s}, {"psnr_vs_fp": dB}, {"ssim_vs_fp": v}: at
    least), with one sentence saying why. It is on the front by construction."""
    if len(tolerance) != 1:
        raise ValueError(f"a tolerance names one measure, e.g. {{'fid_vs_fp': 10}}; got {tolerance}")
    (quality, limit), = tolerance.items()
    if quality not in QUALITY:
        raise ValueError(f"unknown tolerance measure {quality!r}; choose from {', '.join(QUALITY)}")
    bound = -float(limit) if quality in HIGHER_IS_BETTER else float(limit)
    sign = ">=" if quality in HIGHER_IS_BETTER else "<="
    ok = [p for p in points if _quality(p, quality) is not None and _quality(p, quality) <= bound]
    fp = next((p for p in points if not quantizes(p["method"])), None)
    if not ok:
        return {"tolerance": tolerance, "label": None, "config": None,
                "reason": f"No setting in this sweep has {QUALITY[quality]} {sign} {limit:g}; keep FP or widen the grid."}
    best = min(ok, key=lambda p: (p[cost], _quality(p, quality)))  # equal cost: the better one (as the front)
    cheaper = [p for p in points if p[cost] < best[cost] and p is not best]
    # the nearest cheaper point, the better one of equal cost: what a step down would give up
    nearest = max(cheaper, key=lambda p: (p[cost], -(_quality(p, quality) or 0))) if cheaper else None
    value = _format_quality(best, quality)
    reason = f"{best['label']} is the cheapest setting with {QUALITY[quality]} {sign} {limit:g} ({value}, N={best['num_samples']})"
    if fp is not None and best is not fp:
        reason += (f": {best[cost] / fp[cost]:.2f}x FP's {COSTS[cost]} and {best['weight_bytes'] / fp['weight_bytes']:.2f}x "
                   "its weight bytes")
    if nearest is not None:
        reason += f"; the next cheaper point, {nearest['label']}, has {_format_quality(nearest, quality)}"
    return {"tolerance": tolerance, "label": best["label"], "config": best["config"], "reason": reason + "."}


def _format_quality(point: dict, quality: str) -> str:
    value = point.get(quality)
    if value is None:
        return "identical to FP" if quality == "psnr_vs_fp" and not quantizes(point.get("method")) else "n/a"
    interval = point.get(f"{quality}_interval")
    if interval and None not in interval:
        return f"{value:.3g} [{interval[0]:.3g}, {interval[1]:.3g}]" if quality != "fid_vs_fp" else \
            f"{value:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"
    return f"{value:.3g}"


def _point(label: str, method: str, bits: str, option: str, config: dict, run, table: dict, float_bits: int,
           reused: bool, fp_agreement: float | None, fmt: str = "int", model=None) -> dict:
    m = run.metrics
    qc = QuantConfig.from_dict(config) if quantizes(method) else None
    # a low-rank branch or an online rotation runs beside the quantized GEMMs: its bit-operations count too
    plans = planned_branches(model, qc) if qc is not None and model is not None else None
    agreement = m.get("label_agreement")
    t = run.timings
    return {
        "label": label, "method": method, "bits": bits, "format": fmt, "option": option, "config": config,
        "fid_vs_fp": m.get("fid_vs_fp"), "fid_vs_fp_interval": m.get("fid_vs_fp_interval"),
        "fid": m.get("fid"), "fid_interval": m.get("fid_interval"), "fid_floor": m.get("fid_floor"),
        "label_agreement": agreement,
        "label_agreement_drop": None if agreement is None or fp_agreement is None else fp_agreement - agreement,
        "rel_rms": m.get("rel_rms"), "rel_rms_per_timestep": m.get("rel_rms_per_timestep"),
        # rows stored before the median existed keep their fields; their curve gives the same median
        "rel_rms_step_median": m.get("rel_rms_step_median", None if m.get("rel_rms_per_timestep") is None
                                     else step_median(m["rel_rms_per_timestep"])),
        "rel_rms_in_sample": m.get("rel_rms_in_sample"), "rel_rms_basis": m.get("rel_rms_basis"),
        **{k: m.get(k) for k in PER_SEED_KEYS},
        "weight_bytes": m.get("weight_bytes"), "bops": bops(table, qc, float_bits, plans),
        "num_samples": run.num_samples, "feature_extractor": run.feature_extractor,
        # this point's own work: FP's is its sampling; a variant's its quantization, sampling and scoring
        "seconds": round(sum(t.get(k, 0.0) for k in ("quantize_seconds", "sampling", "scoring")
                             + (("fp_sampling",) if not quantizes(method) else ())), 3),
        "run_id": run.id, "reused": reused,
    }


def run_sweep(bundle: ModelBundle, spec: SweepSpec, store: Store | None = None,
              on_progress: Callable[[str, float], None] | None = None,
              on_point: Callable[[int, int, dict], None] | None = None) -> SweepResult:
    """Measure every point of the grid (plus FP), reading points already in the store. on_progress(stage,
    fraction of the whole sweep) reports within points; on_point(index, total, point) after each one."""
    spec.validate()
    check_float_io(bundle, spec)
    store = store or Store()
    start = time.perf_counter()
    opts = spec.eval_options()
    guidance = eval_guidance(bundle, opts)
    fingerprint = model_fingerprint(bundle)
    calib_spec = opts.calibration(bundle).resolved(bundle)  # one FP calibration set for every point
    table, fbits = mac_table(bundle.denoiser), float_bits_of(bundle.denoiser)
    progress = on_progress or (lambda stage, frac: None)
    grid = [("fp", "FP", "int", "default")] + spec.grid()
    total = len(grid)
    calibration: list = []  # drawn once, on the first point that needs measuring
    rankings: dict[str, dict] = {}
    points, seen, measured = [], set(), 0

    def get_calibration():
        if not calibration:
            progress("sampling the shared FP calibration set", len(points) / total)
            calibration.append(calibrate(bundle, calib_spec))
        return calibration[0]

    fp_agreement = None
    for i, (method, bits, fmt, option) in enumerate(grid):
        mixed = MIXED.match(option)
        if not quantizes(method):
            config, label = QuantConfig(method="fp"), "FP"
        else:
            top = None
            if mixed:
                rkey = bits if fmt == "int" else f"{bits} {fmt}"
                if rkey not in rankings:
                    rankings[rkey] = _ranking(bundle, bits, get_calibration, calib_spec, fingerprint, store,
                                              lambda s, f: progress(f"sensitivity {rkey}: {s}", (i + f / 2) / total),
                                              fmt)
                k = int(mixed.group(2))
                top = top_layers(rankings[rkey]["ranking"], k, least=bool(mixed.group(1)))
            config = point_config(method, bits, option, spec, top, bundle.family, fmt)
            label = config.label + (f" (least sensitive {k})" if mixed and mixed.group(1) else "")
            if "float-io" in option_parts(option):
                label += " float-io"
        cfg = config.to_dict()
        ident = json.dumps(cfg, sort_keys=True)
        if ident in seen:  # e.g. dilatequant's default already has TPQ
            continue
        seen.add(ident)
        key = recipe_key(fingerprint, cfg, opts, guidance, calib_spec.to_dict() if quantizes(method) else None)
        run = find_stored(store, bundle.name, key)
        reused = run is not None
        if run is None:
            progress(f"{label}: measuring", i / total)
            result = evaluate(bundle, config, opts, store=store,
                              calibration=get_calibration() if quantizes(method) else None,
                              fingerprint=fingerprint,
                              on_progress=lambda s, f: progress(f"{label}: {s}", (i + f) / total))
            run = store.get(result.run_id)
            measured += 1
        point = _point(label, method, bits, option, cfg, run, table, fbits, reused, fp_agreement, fmt,
                       model=bundle.denoiser)
        if not quantizes(method):
            fp_agreement = point["label_agreement"]
            point["label_agreement_drop"] = 0.0 if fp_agreement is not None else None
        points.append(point)
        progress(f"{label}: done", (i + 1) / total)
        if on_point is not None:
            on_point(i + 1, total, point)
    return SweepResult(spec=spec, model=bundle.name, guidance=guidance, points=points,
                       seconds=time.perf_counter() - start, measured=measured, sensitivity=rankings)


def check_float_io(bundle: ModelBundle, spec: SweepSpec) -> list[str]:
    """The layers float-io keeps in float on this model; ValueError when the spec asks for float-io and the
    family's patterns match none of them (a float-io point would silently equal its default point)."""
    from analysis.quantization.pipeline import unmatched_excludes

    patterns = list(FAMILIES[bundle.family].float_io)
    missing = unmatched_excludes(bundle.denoiser, patterns)
    kept = [p for p in patterns if p not in missing]
    if any("float-io" in option_parts(o) for o in spec.options) and not kept:
        raise ValueError(f"float-io keeps no layer of {bundle.name} in float: the {bundle.family} family's patterns "
                         f"{', '.join(patterns) or '(none)'} match no quantized layer; drop the option")
    return kept


def _ranking(bundle: ModelBundle, bits: str, get_calibration, calib_spec, fingerprint: str, store: Store,
             on_progress, fmt: str = "int") -> dict:
    """The per-layer sensitivity ranking at `bits` on the shared calibration set, cached beside the store (it
    is deterministic for a model and calibration set, and a resumed sweep must rebuild the same mixed configs)."""
    from analysis.quantization.sensitivity import sensitivity

    w, a = parse_bits(bits)
    ident = [fingerprint, bits, calib_spec.to_dict()] + ([fmt] if fmt != "int" else [])  # int keys as before
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    path = store.data_dir / "sensitivity" / f"{key}.json"
    if path.exists():
        from quant.guards import read_json

        try:
            return read_json(path)  # size and depth bounded: the store's folder may hold anything
        except ValueError:  # a damaged cache file is recomputed
            path.unlink(missing_ok=True)
    base = QuantConfig(method="baseline", w_bits=w, a_bits=a, **(format_fields(fmt, bits) or {}))
    out = sensitivity(bundle, w, a, get_calibration(), base=base, on_progress=on_progress).to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)  # a reader sees the whole file or none
    return out
