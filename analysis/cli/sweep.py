"""dqlab sweep: methods x bit-widths x options on one footing; the Pareto front and a recommendation.

    dqlab sweep --methods baseline,dilatequant --bits W8A8,W4A4 --num-samples 512 --steps 25 --json
    dqlab sweep --methods baseline --bits W8A8,W4A4,W4A8 --formats int,fp8_e4m3,int4-g32,fp4_e2m1,mxfp4,nvfp4
    dqlab sweep ... --tolerance fid_vs_fp=10 --tolerance rel_rms_step_median=0.1 --config-out pick.json
    dqlab quantize --config pick.json --out q/           # the recommended setting, as a model folder

Points already in the run store (same model, config, calibration, seeds, N) are read back, not measured
again: an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from analysis.cli import CLIError, add_common, add_guidance, check_output_file, emit
from analysis.quantization.calibration import CALIBRATION_SEED

# rel_rms_step_median: the median over timesteps of the noise prediction's relative error (rel_rms, pooled over
# timesteps and dominated by the last steps, is still accepted)
DEFAULT_TOLERANCES = ["fid_vs_fp=10", "rel_rms_step_median=0.1"]


def parse_tolerance(text: str) -> dict:
    from analysis.evaluation.sweep import QUALITY

    name, sep, value = text.partition("=")
    if not sep or name.strip() not in QUALITY:
        raise CLIError(f"--tolerance {text!r}: write MEASURE=VALUE with MEASURE one of {', '.join(QUALITY)}")
    try:
        limit = float(value)
    except ValueError:
        raise CLIError(f"--tolerance {text!r}: {value!r} is not a number") from None
    if not math.isfinite(limit) or limit < 0:
        raise CLIError(f"--tolerance {text!r}: the limit must be a finite number >= 0")
    return {name.strip(): limit}


def register(sub) -> None:
    p = sub.add_parser("sweep", help="a grid of methods x bit-widths x options: table, Pareto front, recommendation")
    add_common(p)
    p.add_argument("--methods", default="baseline,ptq4dit,dilatequant", help="comma-separated (default: %(default)s)")
    p.add_argument("--bits", default="W8A8,W4A8,W4A4", help="comma-separated W<w>A<a> (default: %(default)s)")
    p.add_argument("--options", default="default",
                   help="comma-separated, one point each: default, tpq, adaround, bkd, float-io, keep8:K; join with "
                        "'+' for one point with several (tpq+bkd) (default: %(default)s)")
    p.add_argument("--formats", default="int",
                   help="comma-separated number formats: int, fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, mxfp8, "
                        "mxfp6, mxfp4, nvfp4, int4-g32/g64/g128, or WEIGHT/ACTIVATION (nvfp4/fp8_e4m3); a format runs "
                        "at the bit-widths its weights hold, its activations where theirs do (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=512, help="images per point for FID (default: %(default)s)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps, calibration and evaluation (default: %(default)s)")
    add_guidance(p, "the model's evaluation guidance, the FID protocol")
    p.add_argument("--seed", type=int, default=0, help="first evaluation seed (default: %(default)s)")
    p.add_argument("--calib-samples", type=int, default=10, help="FP images for the shared calibration set")
    p.add_argument("--calib-seed", type=int, default=CALIBRATION_SEED, help="first calibration seed (default: %(default)s)")
    p.add_argument("--recon-iters", type=int, default=None, help="iterations per unit for adaround / bkd points")
    p.add_argument("--bootstrap", type=int, default=None, metavar="R",
                   help="bootstrap replicates per FID interval (default: 200; 0: no intervals)")
    p.add_argument("--tolerance", action="append", default=None, metavar="MEASURE=VALUE",
                   help="fid_vs_fp=X, rel_rms_step_median=Y (median over steps; rel_rms: pooled) or "
                        "label_agreement_drop=Z (at most), same_digit_vs_fp=S, "
                        "psnr_vs_fp=DB or ssim_vs_fp=V (at least); repeatable "
                        f"(default: {' and '.join(DEFAULT_TOLERANCES)})")
    p.add_argument("--method-option", action="append", default=None, metavar="NAME=VALUE",
                   help="a method option for every point whose method declares it, e.g. rank=4 or alpha=0.3 "
                        "(dqlab quantize --help lists them); repeatable; points name it in their label")
    p.add_argument("--config-out", type=Path, default=None,
                   help="write the first recommendation's QuantConfig here (for dqlab quantize --config)")
    p.add_argument("--data-dir", default=None, help="run store folder (default: $DQLAB_HOME or ~/.dqlab)")
    p.set_defaults(func=run)


def parse_method_options(items: list[str]) -> dict:
    """--method-option NAME=VALUE items as {name: typed value}."""
    from quant.methods import all_options
    from quant.options import parse_text

    declared = {o.name: o for o in all_options()}
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise CLIError(f"--method-option takes NAME=VALUE (e.g. rank=4), got {item!r}")
        if name not in declared:
            raise CLIError(f"--method-option {name}: unknown; method options: {', '.join(sorted(declared))}")
        out[name] = parse_text(declared[name], text)
    return out


def run(args) -> dict:
    from analysis.evaluation.store import Store
    from analysis.evaluation.sweep import SweepSpec, run_sweep
    from analysis.models.loading import load

    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    spec = SweepSpec(methods=split(args.methods), bits=[b.upper() for b in split(args.bits)], options=split(args.options),
                     formats=split(args.formats),
                     num_samples=args.num_samples, steps=args.steps, guidance=args.guidance, seed=args.seed,
                     calib_samples=args.calib_samples, calib_seed=args.calib_seed, recon_iters=args.recon_iters,
                     bootstrap=args.bootstrap, method_options=parse_method_options(args.method_option or []))
    spec.validate()
    if args.num_samples < 2:
        raise CLIError(f"--num-samples must be at least 2 for FID, got {args.num_samples}")
    tolerances = [parse_tolerance(t) for t in (args.tolerance or DEFAULT_TOLERANCES)]
    check_output_file(args.config_out, "--config-out", (".json",))
    if args.seed < 0 or args.calib_seed < 0:
        raise CLIError(f"--seed and --calib-seed must be >= 0, got {args.seed} and {args.calib_seed}")
    store = Store(args.data_dir)
    bundle = load(args.model, device=args.device, dtype=args.dtype)

    def on_point(i: int, n: int, point: dict) -> None:
        how = "from the store" if point["reused"] else f"measured in {point['seconds']:.0f}s"
        fid = "n/a" if point["fid_vs_fp"] is None else f"{point['fid_vs_fp']:.2f}"
        print(f"[{i}/{n}] {point['label']}: FID vs FP {fid}, {how}", file=sys.stderr, flush=True)

    show = None
    if sys.stderr.isatty():
        show = lambda stage, frac: print(f"\r[{frac:6.1%}] {stage[:70]:<70}", end="", file=sys.stderr)  # noqa: E731
    result = run_sweep(bundle, spec, store=store, on_progress=show, on_point=on_point)
    if show:
        print(file=sys.stderr)
    out = result.to_json(tolerances)
    if args.config_out is not None and out["recommendation"] and out["recommendation"]["config"]:
        from quant.guards import write_text_atomic

        args.config_out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.config_out, json.dumps(out["recommendation"]["config"], indent=2, sort_keys=True))
        out["config_out"] = str(args.config_out)
    emit(args, out, _human(out))
    return out


def _human(out: dict) -> str:
    front = set(out["front"])
    lines = [f"{'point':<34} {'FID vs FP':>22} {'err med':>9} {'agree':>6} {'same':>6} {'PSNR':>6} {'MiB':>6} "
             f"{'GBOPs':>7} {'s':>6}  front"]
    for p in out["points"]:
        iv = p["fid_vs_fp_interval"]
        fid = "n/a" if p["fid_vs_fp"] is None else (f"{p['fid_vs_fp']:.2f}" + (f" [{iv[0]:.1f}, {iv[1]:.1f}]" if iv else ""))
        agree = "" if p["label_agreement"] is None else f"{p['label_agreement']:.3f}"
        same = "" if p.get("same_digit_vs_fp") is None else f"{p['same_digit_vs_fp']:.3f}"
        psnr = "" if p.get("psnr_vs_fp") is None else f"{p['psnr_vs_fp']:.1f}"
        lines.append(f"{p['label']:<34} {fid:>22} {p.get('rel_rms_step_median') or 0:>9.4f} {agree:>6} {same:>6} {psnr:>6} "
                     f"{p['weight_bytes'] / 2 ** 20:>6.2f} {p['bops'] / 1e9:>7.2f} {p['seconds']:>6.0f}  "
                     + ("*" if p["label"] in front else ""))
    lines.append("rel_rms on held-out seeds; same = same digit as FP, PSNR vs FP in dB (per seed, same seeds)")
    lines.append(f"N={out['spec']['num_samples']}, {out['spec']['steps']} steps, guidance {out['guidance']:g}; "
                 f"{out['measured']} measured, {out['reused']} from the store, {out['seconds']:.0f}s")
    lines += [f"tolerance {r['tolerance']}: {r['reason']}" for r in out["recommendations"]]
    return "\n".join(lines)
