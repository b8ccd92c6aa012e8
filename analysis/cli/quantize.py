"""dqlab quantize: calibrate and quantize a model, measure its error vs FP, and save it for `--model DIR`.

    dqlab quantize --method ptq4dit --w-bits 4 --a-bits 8 --out runs/ptq4dit-w4a8 --json
    dqlab sample --model runs/ptq4dit-w4a8 --out grid.png        # the saved folder loads like any model

rel_error is ||eps_q - eps_fp|| / ||eps_fp|| of the noise prediction over the calibration inputs (the FP
model's own sampling trajectory), so it measures the quantized model on the inputs it was calibrated on.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from analysis.cli import CLIError, add_common, add_guidance, emit

# Calibration images use other seeds than the ones `dqlab eval` scores (it starts at 0), as evaluate does.
CALIB_SEED = 1_000_000
REPORT_FILE = "quant_report.json"  # written beside the model; loading ignores it


def add_quant_options(p, default_method: str = "ptq4dit"):
    """The QuantConfig fields as options. Values are checked by QuantConfig.validate (one clear line)."""
    q = p.add_argument_group("quantization")
    q.add_argument("--method", default=default_method,
                   help="fp, baseline, smoothquant, ptq4dit or dilatequant (default: %(default)s)")
    q.add_argument("--w-bits", type=int, default=8, help="weight bits, 2-8; 16 = float (default: %(default)s)")
    q.add_argument("--a-bits", type=int, default=8, help="activation bits, 2-8; 16 = float (default: %(default)s)")
    q.add_argument("--attn-bits", type=int, default=None,
                   help="bits of the attention operands q, k, v and softmax output (default: float)")
    q.add_argument("--tpq", action="store_true", default=None,
                   help="one activation range per timestep (default: on for dilatequant only)")
    q.add_argument("--no-tpq", dest="tpq", action="store_false", help="one activation range for all timesteps")
    q.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default: %(default)s)")
    q.add_argument("--no-ssc", dest="ssc", action="store_false",
                   help="PTQ4DiT without Spearman salience calibration (plain max over calibration data)")
    q.add_argument("--ssc-rho", default="per_timestep",
                   help="per_timestep or per_sample (the official code's) Spearman rho (default: %(default)s)")
    q.add_argument("--scale-search", default="minmax",
                   help="clip-range search: minmax, percentile or mse (default: %(default)s)")
    q.add_argument("--percentile", type=float, default=99.99,
                   help="percentile for --scale-search percentile (default: %(default)s)")
    q.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave matching layers in float: an fnmatch pattern such as '*.ff.net.2' or a module "
                        "name such as transformer_blocks.0 (repeatable)")
    r = p.add_argument_group("block-wise optimization (after calibration)")
    r.add_argument("--recon", default="none",
                   help="none, adaround (PTQ4DiT's reconstruction: learned rounding + activation steps) or bkd "
                        "(DilateQuant's block-wise distillation: weights, weight steps, per-timestep activation "
                        "parameters) (default: %(default)s)")
    # None: QuantConfig's default (one place holds the defaults; the CLI does not import torch to show --help)
    r.add_argument("--recon-iters", type=int, default=None,
                   help="optimization steps per block (PTQ4DiT: 20000, DilateQuant: 5000; default: 200)")
    r.add_argument("--recon-batch", type=int, default=None, help="calibration rows per step (default: 32)")
    r.add_argument("--recon-rows", type=int, default=None,
                   help="calibration rows drawn across timesteps for the optimization (default: 256)")
    r.add_argument("--recon-input", default=None,
                   help="quantized (each block sees the quantized prefix's output) or fp (default: quantized)")
    r.add_argument("--recon-lr", type=float, default=None,
                   help="lr of the rounding variables (adaround) or weights and weight steps (bkd) "
                        "(default: the mode's)")
    r.add_argument("--recon-act-lr", type=float, default=None,
                   help="lr of the activation step sizes (and zero points in bkd) (default: the mode's)")
    return q


def config_from_args(args):
    from quant.api import QuantConfig

    recon = {k: v for k, v in (("recon_iters", args.recon_iters), ("recon_batch", args.recon_batch),
                               ("recon_rows", args.recon_rows), ("recon_input", args.recon_input),
                               ("recon_lr", args.recon_lr), ("recon_act_lr", args.recon_act_lr)) if v is not None}
    return QuantConfig(method=args.method, w_bits=args.w_bits, a_bits=args.a_bits, attn_bits=args.attn_bits,
                       tpq=args.tpq, alpha=args.alpha, ssc=args.ssc, ssc_rho=args.ssc_rho,
                       scale_search=args.scale_search, percentile=args.percentile,
                       exclude=list(args.exclude), recon=args.recon, **recon).validate()


def check_excludes(bundle, config) -> None:
    """An --exclude pattern that matches no layer is almost always a typo: refuse it before any work."""
    from analysis.quantize_pipeline import unmatched_excludes

    unmatched = unmatched_excludes(bundle.transformer, config.exclude)
    if unmatched:
        raise CLIError(f"--exclude {unmatched[0]!r} matches no layer; use an fnmatch pattern such as "
                       "'*.attn1.to_q' or a module name such as transformer_blocks.0")


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model, measure its error vs FP, save it for --model DIR")
    add_common(p)
    add_quant_options(p)
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-samples", type=int, default=None,
                   help="images sampled with the FP model for calibration (default: the pipeline's, 10)")
    c.add_argument("--calib-steps", type=int, default=50,
                   help="sampling steps of the calibration run; TPQ keeps one range per step (default: %(default)s)")
    c.add_argument("--calib-seed", type=int, default=CALIB_SEED, help="first calibration seed (default: %(default)s)")
    add_guidance(c, "the evaluation guidance (the FID protocol), which calibration should match")
    c.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim")
    c.add_argument("--batch-size", type=int, default=64, help="calibration rows per forward (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder to save the quantized model in (safetensors + quant_config.json); "
                        "without it the model is only measured")
    p.set_defaults(func=run)


def _check_out(out: Path | None) -> None:
    """Refuse to write into a file or into a folder that holds something other than a saved model."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; name a folder (it is created if missing)")
    if out.is_dir() and any(out.iterdir()) and not (out / "quant_config.json").exists():
        raise CLIError(f"--out {out} is a non-empty folder that is not a saved quantized model; "
                       "name a new or empty folder")


def run(args) -> dict:
    from analysis.models import load
    from analysis.quantize_pipeline import DEFAULT_CAL_SAMPLES, calibration_for, quantize_bundle
    from analysis.bundle_io import save_quantized

    config = config_from_args(args)
    calib_samples = DEFAULT_CAL_SAMPLES if args.calib_samples is None else args.calib_samples
    if calib_samples < 1:
        raise CLIError(f"--calib-samples must be at least 1, got {calib_samples}")
    if not 1 <= args.calib_steps <= 1000:
        raise CLIError(f"--calib-steps must be between 1 and 1000, got {args.calib_steps}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_out(args.out)
    bundle = load(args.model, device=args.device, dtype=args.dtype)
    if bundle.quant_config:
        raise CLIError(f"{args.model} is already quantized ({bundle.name}); quantize its FP model instead")
    check_excludes(bundle, config)

    show = None
    if sys.stderr.isatty():
        show = lambda stage, frac: print(f"\r[{frac:6.1%}] {stage[:70]:<70}", end="", file=sys.stderr)  # noqa: E731
    on_step = (lambda d, n: show("sampling calibration inputs", 0.6 * d / n)) if show else None  # noqa: E731
    start = time.perf_counter()
    calibration = calibration_for(bundle, steps=args.calib_steps, num_samples=calib_samples, guidance=args.guidance,
                                  seed=args.calib_seed, scheduler=args.scheduler, on_step=on_step)
    cal_seconds = time.perf_counter() - start
    variant = quantize_bundle(bundle, config, calibration, on_progress=show, batch_size=args.batch_size,
                              on_recon=None if show else recon_lines(config))
    if show:
        print(file=sys.stderr)
    r = variant.report
    out = {"model": args.model, "method": config.method, "label": config.label, "w_bits": config.w_bits,
           "a_bits": config.a_bits, "attn_bits": config.attn_bits, "tpq": r["tpq"],
           # seconds: the whole job's wall time; its named parts beside it
           "seconds": round(cal_seconds + r["seconds"], 3), "quantize_seconds": r["seconds"],
           "cpu_seconds": r["cpu_seconds"], "calibration_seconds": round(cal_seconds, 3),
           "calibration_rows": r["calibration_rows"], "calibration_steps": args.calib_steps,
           "calibration_samples": calib_samples, "layers_quantized": r["layers_quantized"],
           "weight_bytes": r["weight_bytes"], "fp_weight_bytes": r["fp_weight_bytes"],
           "rel_error": r["rel_error"], "rel_error_per_timestep": r["rel_error_per_timestep"],
           "layer_error": r["layer_error"], "config": config.to_dict(), "recon": recon_summary(r["recon"]),
           "balance": r["balance"],
           "out": None}
    if args.out is not None:
        folder = save_quantized(variant.bundle, config, args.out, base_source=args.model)
        out["out"] = str(folder)
        (folder / REPORT_FILE).write_text(json.dumps(out, indent=2, default=str))
    mb = lambda n: f"{n / 2 ** 20:.2f} MiB"  # noqa: E731
    human = (f"{config.label}: rel_error {r['rel_error']:.4g} vs FP, {r['layers_quantized']} layers, "
             f"{mb(r['weight_bytes'])} (FP {mb(r['fp_weight_bytes'])}), {out['seconds']:.1f}s "
             f"({cal_seconds:.1f}s calibration sampling + {r['seconds']:.1f}s quantization)"
             + (f" -> {out['out']}" if out["out"] else "") + "\n" + balance_lines(r["balance"]))
    if out["recon"]:
        rs = out["recon"]
        human += (f"\n{config.recon}: {len(rs['units'])} units x {config.recon_iters} iterations on {rs['rows']} rows "
                  f"in {rs['seconds']:.1f}s; output error per unit before -> after: "
                  + ", ".join(f"{u['name'].replace('transformer_blocks.', 'block ')} {u['error_before']:.3g} -> "
                              f"{u['error_after']:.3g}" for u in rs["units"] if "emb" not in u["name"]))
    emit(args, out, human)
    return out


def balance_lines(plan: dict) -> str:
    """Which layers took a folded per-channel scale, and why the others did not (one line per reason)."""
    n_bal = sum(len(g["layers"]) for g in plan["balanced"])
    lines = [f"balanced {n_bal} of {plan['layers']} layers ({plan['foldable_layers']} can fold exactly, "
             f"{plan['foldable_share']:.0%}): " + (", ".join(g["group"] for g in plan["balanced"]) or "none")]
    by_reason: dict[str, list[str]] = {}
    for layer, why in plan["unbalanced"].items():
        by_reason.setdefault(why, []).append(layer)
    for why, layers in by_reason.items():
        lines.append(f"not balanced, {len(layers)} layer{'s' if len(layers) > 1 else ''} ({layers[0]}"
                     f"{', ...' if len(layers) > 1 else ''}): {why}")
    return "\n".join(lines)


def recon_lines(config):
    """Without a terminal, the block-wise optimization reports one stderr line per finished unit."""
    if config.recon == "none":
        return None
    start = time.perf_counter()

    def on_recon(k: int, n: int, it: int, loss: float) -> None:
        if it == config.recon_iters:
            print(f"{config.recon}: unit {k + 1}/{n} done, loss {loss:.4g}, {time.perf_counter() - start:.0f}s",
                  file=sys.stderr, flush=True)
    return on_recon


def recon_summary(recon: dict | None) -> dict | None:
    """The block-wise optimization's report without the loss curves (they stay in the Python report)."""
    if not recon:
        return None
    return {**recon, "units": [{k: v for k, v in u.items() if k != "losses"} for u in recon["units"]]}
