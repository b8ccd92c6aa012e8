"""dqlab sensitivity: rank layers (or layer kinds, or blocks) by the output error each causes when quantized.

    dqlab sensitivity --w-bits 4 --a-bits 4 --steps 25 --json
    dqlab sensitivity --granularity kind --method ptq4dit --w-bits 4 --a-bits 8

Per unit and timestep: the relative RMS error of the noise prediction vs FP with only that unit quantized, and
with everything but that unit quantized, on an FP calibration set (its own seeds, disjoint from the ones
`dqlab eval` scores).
"""
from __future__ import annotations

import sys

from analysis.cli import CLIError, add_common, add_guidance, emit
from analysis.quantization.calibration import CALIBRATION_SEED


def register(sub) -> None:
    p = sub.add_parser("sensitivity", help="per-layer sensitivity per timestep: quantize one unit at a time")
    add_common(p)
    p.add_argument("--method", default="baseline", help="quantization method of the analysis (default: %(default)s)")
    p.add_argument("--w-bits", type=int, default=4, help="weight bits (default: %(default)s)")
    p.add_argument("--a-bits", type=int, default=4, help="activation bits (default: %(default)s)")
    p.add_argument("--w-format", default="int", help="weight number format, as dqlab quantize (default: %(default)s)")
    p.add_argument("--a-format", default="int", help="activation number format (default: %(default)s)")
    p.add_argument("--w-group", type=int, default=None, help="weight block size (default: per channel)")
    p.add_argument("--a-group", type=int, default=None, help="activation block size (default: per tensor)")
    p.add_argument("--granularity", default="layer", help="layer, kind or block (default: %(default)s)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of the calibration run (default: %(default)s)")
    p.add_argument("--samples", type=int, default=4, help="FP images of the calibration run (default: %(default)s)")
    p.add_argument("--calib-seed", type=int, default=CALIBRATION_SEED, help="first calibration seed (default: %(default)s)")
    add_guidance(p, "the model's evaluation guidance")
    p.add_argument("--top", type=int, default=10, help="rows of the ranking in the summary (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> dict:
    from analysis.models.loading import load
    from analysis.quantization.calibration import calibration_for
    from analysis.quantization.sensitivity import GRANULARITIES, sensitivity
    from quant.api import QuantConfig

    if args.granularity not in GRANULARITIES:
        raise CLIError(f"--granularity {args.granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    if not 1 <= args.steps <= 1000:
        raise CLIError(f"--steps must be between 1 and 1000, got {args.steps}")
    if args.samples < 1:
        raise CLIError(f"--samples must be >= 1, got {args.samples}")
    w = None if args.w_bits == 16 else args.w_bits
    a = None if args.a_bits == 16 else args.a_bits
    if w is None and a is None:
        raise CLIError("--w-bits 16 --a-bits 16 quantizes nothing, so every layer would rank by a zero error; "
                       "give a bit-width below 16 to at least one of them")
    if args.calib_seed < 0:
        raise CLIError(f"--calib-seed must be >= 0, got {args.calib_seed}")
    config = QuantConfig(method=args.method, w_bits=w, a_bits=a, w_format=args.w_format, a_format=args.a_format,
                         w_group=args.w_group, a_group=args.a_group).validate()
    if not config.quantizes:
        raise CLIError(f"--method {config.method} quantizes nothing; pick a quantizing method")
    bundle = load(args.model, device=args.device, dtype=args.dtype)
    cal = calibration_for(bundle, steps=args.steps, num_samples=args.samples, guidance=args.guidance,
                          seed=args.calib_seed)
    show = None
    if sys.stderr.isatty():
        show = lambda stage, frac: print(f"\r[{frac:6.1%}] {stage[:70]:<70}", end="", file=sys.stderr)  # noqa: E731
    sens = sensitivity(bundle, w, a, cal, base=config, granularity=args.granularity, on_progress=show)
    if show:
        print(file=sys.stderr)
    out = {"model": args.model, "steps": args.steps, "samples": args.samples, **sens.to_json()}
    rows = out["ranking"][:max(0, args.top)]
    human = "\n".join([f"{config.label}, {len(out['ranking'])} {args.granularity} units, {out['seconds']:.0f}s; "
                       f"all quantized: mean error {out['all_quantized_mean']:.4f}",
                       f"{'rank':>4} {'unit':<52} {'only':>8} {'all but':>8} {'worst t':>7}"]
                      + [f"{r['rank']:>4} {r['unit']:<52} {r['error_only_this_quantized']:>8.4f} "
                         f"{r['error_all_but_this_quantized']:>8.4f} {r['worst_timestep']:>7}" for r in rows])
    emit(args, out, human)
    return out
