"""dqlab sample: a grid (or one PNG per image) of every listed class with every listed seed; an unconditional
model (a UNet without a class embedding) samples one image per seed."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from analysis.cli import CLIError, add_common, add_guidance, check_output_file, check_output_folder, emit


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate images for classes x seeds")
    add_common(p)
    p.add_argument("--classes", default=None,
                   help="e.g. 0,1,2 or 0-9 (default: 0-9; not for an unconditional model, which takes --seeds alone)")
    p.add_argument("--seeds", default="0-7", help="e.g. 0-15 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50)
    add_guidance(p)
    p.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward (default: all)")
    p.add_argument("--int8", action="store_true",
                   help="a W8A8 model (--model FOLDER from dqlab quantize --out): run its linears as int8 matmuls "
                        "where that measures faster here")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path, default=None,
                     help="grid PNG: one row per class, one column per seed (default: samples.png here, or "
                          "samples-1.png ... when that exists)")
    out.add_argument("--out-dir", type=Path, default=None, help="one PNG per image, class{c}_seed{s}.png")
    p.set_defaults(func=run)


def run(args) -> dict:
    from analysis.evaluation.images import make_grid, save_images
    from analysis.models.loading import load
    from analysis.models.sampling import NO_CLASS, parse_int_list, sample

    start = time.perf_counter()
    from analysis.models.sampling import MAX_LIST

    def int_list(flag: str, text: str) -> list[int]:
        try:
            return parse_int_list(text)
        except ValueError as exc:
            raise CLIError(f"{flag}: {exc}") from None

    seeds = int_list("--seeds", args.seeds)
    if args.steps < 1 or args.steps > 1000:
        raise CLIError(f"--steps must be between 1 and 1000, got {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_output_file(args.out, "--out", (".png",))
    check_output_folder(args.out_dir, "--out-dir")
    bundle = load(args.model, device=args.device, dtype=args.dtype)
    if not bundle.conditional and args.classes is not None:
        raise CLIError(f"{args.model} is unconditional: sample it with --seeds alone, without --classes")
    classes = int_list("--classes", args.classes or "0-9") if bundle.conditional else [NO_CLASS]
    if len(classes) * len(seeds) > MAX_LIST:
        raise CLIError(f"--classes x --seeds asks for {len(classes) * len(seeds)} images, more than {MAX_LIST}; "
                       "ask for fewer")
    plan = None
    if args.int8:
        from analysis.evaluation.speed import int8_bundle

        try:
            bundle, plan = int8_bundle(bundle, batch_images=min(args.batch_size or 16, len(classes) * len(seeds)))
        except ValueError as exc:
            raise CLIError(f"--int8: {exc}") from None
    labels = [c for c in classes for _ in seeds]
    if bundle.device.type == "cpu":  # a forward too small to feed every thread runs on fewer (analysis.threads)
        from analysis.threads import fit_to_model

        guided = 2 if (bundle.default_guidance if args.guidance is None else args.guidance) != 1 else 1
        fit_to_model(bundle.denoiser.config, guided * min(args.batch_size or len(labels), len(labels)))
    seed_list = [s for _ in classes for s in seeds]
    show = (lambda d, n: print(f"\rstep {d}/{n}", end="" if d < n else "\n", file=sys.stderr)) if sys.stderr.isatty() else None
    result = sample(bundle, labels, seed_list, steps=args.steps, guidance=args.guidance,
                    scheduler=args.scheduler, batch_size=args.batch_size, on_step=show)
    written = []
    if args.out_dir is None and args.out is None:
        args.out = _free_name(Path("samples.png"))
    if args.out:
        from analysis.evaluation.images import png_bytes
        from quant.guards import write_bytes_atomic

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.out, png_bytes(make_grid(result.images, ncol=len(seeds))))
        written = [str(args.out)]
    elif args.out_dir:
        names = [f"class{c}_seed{s}" if c != NO_CLASS else f"seed{s}" for c, s in zip(labels, seed_list)]
        written = [str(p) for p in save_images(result.images, names, args.out_dir)]
    summary = {"model": args.model, "images": len(labels), "classes": classes if bundle.conditional else None,
               "seeds": seeds,
               "steps": args.steps, "scheduler": args.scheduler,
               "guidance": bundle.default_guidance if args.guidance is None else args.guidance,
               "device": str(bundle.device), "sampling_seconds": round(result.seconds, 3), "files": written}
    if plan is not None:
        summary["int8_layers"] = sum(e["int8"] for e in plan.values())
        summary["int8_eligible_layers"] = len(plan)
    if bundle.bundled and bundle.conditional:
        from analysis.evaluation.classifier import label_agreement

        summary["label_agreement"] = round(label_agreement(result.images, labels), 4)
    # seconds: the whole command's wall time (loading, sampling, writing, scoring); sampling_seconds a part
    summary["seconds"] = round(time.perf_counter() - start, 3)
    human = f"{len(labels)} images in {summary['seconds']:.1f}s (sampling {result.seconds:.1f}s)" + (
        f", label agreement {summary['label_agreement']:.1%}" if "label_agreement" in summary else "") + (
        f", int8 in {summary['int8_layers']} of {summary['int8_eligible_layers']} W8A8 layers" if plan else "") + (
        f" -> {written[0] if len(written) == 1 else args.out_dir}" if written else "")
    emit(args, summary, human)
    return summary


def _free_name(path: Path) -> Path:
    """`path`, or the first of path-1, path-2, ... that does not exist: a default never overwrites a file."""
    k = 0
    candidate = path
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return candidate
