"""dqlab bench: the lab's speed and memory benchmark (analysis.evaluation.speed), ratios measured in one run."""
from __future__ import annotations

import sys
from pathlib import Path

from analysis.cli import CLIError, emit


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure sampling, quantization and INT8 forward speed and memory")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda (default: %(default)s)")
    p.add_argument("--shapes", default="bundled,dit-xl2",
                   help="bundled and/or dit-xl2, comma-separated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure, median kept (default: %(default)s)")
    p.add_argument("--xl2-blocks", type=int, default=None,
                   help="random DiT-XL/2 blocks (default: 2 on the CPU, 28 = the real depth on a GPU)")
    p.add_argument("--xl2-batch", type=int, default=None, help="images per forward at DiT-XL/2 shapes "
                   "(default: 4 on the CPU, 32 on a GPU)")
    p.add_argument("--sample-images", type=int, default=16, help="images per sampling run (default: %(default)s)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per sampling run (default: %(default)s)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the results table to this .md file")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args) -> dict:
    import torch

    from analysis.evaluation.speed import BenchOptions, markdown, run_benchmark

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device not in ("cpu", "cuda"):
        raise CLIError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is visible to torch here; use --device cpu")
    gpu = device == "cuda"
    opts = BenchOptions(device=device, repeats=args.repeats, sample_images=args.sample_images,
                        sample_steps=args.sample_steps,
                        xl2_blocks=args.xl2_blocks or (28 if gpu else 2), xl2_batch=args.xl2_batch or (32 if gpu else 4),
                        shapes=tuple(s.strip() for s in args.shapes.split(",") if s.strip()))
    try:
        opts.validate()
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.markdown is not None and args.markdown.suffix != ".md":
        raise CLIError(f"--markdown must name a .md file, got {args.markdown}")
    say = (lambda text: print(text, file=sys.stderr)) if sys.stderr.isatty() else None
    result = run_benchmark(opts, on_stage=say)
    table = markdown(result)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
        result["markdown_file"] = str(args.markdown)
    emit(args, result, table)
    return result
