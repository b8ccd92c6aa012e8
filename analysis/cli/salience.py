"""dqlab salience: collect per-channel activation / weight salience in one sampling pass and save it (.npz).

The summary reports the cost of collecting against plain sampling with identical settings, measured in the
same run: a short warm-up, then the plain pass and the collecting pass (alternating when --repeats > 1;
the fastest of each is compared, which discounts interference from other processes on a shared machine;
`overhead_paired_median` is the median over repeats of collecting / the plain pass just before it).
The same ratio in process CPU time (`cpu_overhead_vs_sampling`) is reported beside it: on a machine shared
with other jobs the wall time swings with their load, while the CPU time this process spends moves far less.
Threads follow the lab's policy (analysis.threads: idle workers sleep, one thread per usable CPU);
`--threads N` sets the count.
"""
from __future__ import annotations

import sys
from pathlib import Path

from analysis.cli import CLIError, add_common, add_guidance, check_output_file, emit


def register(sub) -> None:
    p = sub.add_parser("salience", help="per-channel activation and weight salience per layer and timestep")
    add_common(p)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samples", type=int, default=16, help="calibration samples (classes cycle 0, 1, ...)")
    p.add_argument("--first-seed", type=int, default=0, help="sample i uses seed first-seed + i")
    add_guidance(p)
    p.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--batch-size", type=int, default=None, help="samples per forward (default: all)")
    p.add_argument("--reduce-samples", action="store_true",
                   help="keep one row per timestep and half instead of one per sample (large models, many steps)")
    p.add_argument("--attention", action="store_true", help="also record q, k, v and the softmax output")
    p.add_argument("--layers", default=None, help="regular expression selecting layers, e.g. 'blocks\\.(0|27)\\.'")
    p.add_argument("--mse-bits", default="", help="bit-widths for per-channel quantization error, e.g. 4,8 "
                                                  "(adds one forward per timestep after the pass)")
    p.add_argument("--repeats", type=int, default=1, help="timed plain/collecting pairs (default: %(default)s)")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain sampling pass (no overhead ratio)")
    p.add_argument("--out", type=Path, default=None, help="where to save the statistics (.npz)")
    p.set_defaults(func=run)


def run(args) -> dict:
    import torch

    from analysis.models.loading import load
    from analysis.models.sampling import parse_int_list
    from analysis.salience.collect import SalienceConfig, collect_timed
    from analysis.salience.measures import hardest_layers, profile_by_kind

    if not 1 <= args.steps <= 1000:
        raise CLIError(f"--steps must be between 1 and 1000, got {args.steps}")
    if args.samples < 1:
        raise CLIError(f"--samples must be >= 1, got {args.samples}")
    if args.repeats < 1:
        raise CLIError(f"--repeats must be >= 1, got {args.repeats}")
    check_output_file(args.out, "--out", (".npz",))
    mse_bits = tuple(parse_int_list(args.mse_bits)) if args.mse_bits.strip() else ()
    bundle = load(args.model, device=args.device, dtype=args.dtype)
    config = SalienceConfig(steps=args.steps, samples=args.samples, guidance=args.guidance, scheduler=args.scheduler,
                            batch_size=args.batch_size, first_seed=args.first_seed,
                            per_sample=not args.reduce_samples, attention=args.attention, layers=args.layers,
                            mse_bits=mse_bits)
    config.validate(bundle)
    say = (lambda text: print(text, file=sys.stderr)) if sys.stderr.isatty() else (lambda text: None)  # noqa: E731

    stats, timing = collect_timed(bundle, config, repeats=args.repeats, baseline=not args.no_baseline, say=say)
    seconds, plain = timing["seconds"], timing["plain_seconds"]
    overhead, cpu_overhead = timing["overhead_vs_sampling"], timing["cpu_overhead_vs_sampling"]
    written = None
    if args.out is not None:
        import os
        import uuid

        tmp = args.out.parent / f".{args.out.stem}.tmp-{uuid.uuid4().hex[:8]}.npz"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            stats.save(tmp)  # beside the destination, then renamed: never a half-written file at --out
            os.replace(tmp, args.out)
        finally:
            tmp.unlink(missing_ok=True)
        written = args.out
    hardest = hardest_layers(stats)
    profile = profile_by_kind(stats).round(3).to_dict(orient="records")
    summary = {"model": args.model, "device": str(bundle.device), "threads": torch.get_num_threads(),
               "layers": len(stats.layers), "timesteps": len(stats.timesteps), "samples": args.samples,
               "rows_per_timestep": len(stats.row_labels), "per_sample": stats.per_sample,
               "steps": args.steps, "guidance": stats.info["guidance"], "scheduler": args.scheduler,
               "seconds": round(seconds, 3), "sampling_seconds": round(min(plain), 3) if plain else None,
               "overhead_vs_sampling": overhead, "cpu_overhead_vs_sampling": cpu_overhead,
               "overhead_paired_median": timing["overhead_paired_median"], "repeats": args.repeats,
               "plain_seconds_all": [round(v, 3) for v in plain],
               "collect_seconds_all": [round(v, 3) for v in timing["collect_seconds"]],
               "plain_cpu_seconds_all": [round(v, 3) for v in timing["plain_cpu_seconds"]],
               "collect_cpu_seconds_all": [round(v, 3) for v in timing["collect_cpu_seconds"]],
               "mse_bits": list(stats.mse_bits), "mse_seconds": round(stats.info.get("mse_seconds", 0.0), 3),
               "hardest_layers": hardest, "profile_by_kind": profile,
               "out": str(written) if written else None,
               "file_mb": round(written.stat().st_size / 2**20, 2) if written else None}
    human = (f"{summary['layers']} layers x {summary['timesteps']} timesteps x {summary['rows_per_timestep']} rows "
             f"in {seconds:.1f}s" + (f" (overhead_vs_sampling {overhead:.3f}x wall, {cpu_overhead:.3f}x CPU time, "
                                      f"best of {args.repeats} pass{'es' if args.repeats > 1 else ''})"
                                      if overhead else "")
             + (f" -> {written}" if written else "") + "\nhardest layers (activation max/median):\n"
             + "\n".join(f"  {h['act_outlier_ratio']:8.2f}  {h['layer']}" for h in hardest))
    emit(args, summary, human)
    return summary
