"""dqlab bench: the lab's speed and memory benchmark (analysis.evaluation.speed), ratios measured in one run."""
from __future__ import annotations

import sys
from pathlib import Path

from analysis.cli import CLIError, check_output_file, emit


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure sampling, quantization and INT8 forward speed and memory")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda (default: %(default)s)")
    p.add_argument("--shapes", default=None,
                   help="bundled and/or dit-xl2, comma-separated (default: both; none with --contention unless given)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure, median kept (default: %(default)s)")
    p.add_argument("--xl2-blocks", type=int, default=None,
                   help="random DiT-XL/2 blocks (default: 2 on the CPU, 28 = the real depth on a GPU)")
    p.add_argument("--xl2-batch", type=int, default=None, help="images per forward at DiT-XL/2 shapes "
                   "(default: 4 on the CPU, 32 on a GPU)")
    p.add_argument("--sample-images", type=int, default=16, help="images per sampling run (default: %(default)s)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per sampling run (default: %(default)s)")
    p.add_argument("--contention", action="store_true",
                   help="the contention section: sampling, salience, calibrate + quantize and BKD quiet and beside a "
                        "busy process per CPU, for each thread policy (see analysis.evaluation.contention)")
    p.add_argument("--contention-jobs", default=None, help="comma-separated, of sampling, salience, quantize, bkd, "
                   "app-first-grid, app-salience (default: the first four)")
    p.add_argument("--contention-policies", default=None, help="comma-separated, of default, '1 thread', "
                   "'N threads + PASSIVE', lab (default: all)")
    p.add_argument("--contention-steps", type=int, default=10, help="DDIM steps of the contention jobs "
                   "(default: %(default)s)")
    p.add_argument("--contention-repeats", type=int, default=1, help="timed runs per contention job and setting "
                   "(default: %(default)s)")
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
    from analysis.evaluation.contention import ContentionOptions, run_contention
    from analysis.evaluation.contention import markdown as contention_markdown

    gpu = device == "cuda"
    shapes = args.shapes if args.shapes is not None else ("" if args.contention else "bundled,dit-xl2")
    opts = BenchOptions(device=device, repeats=args.repeats, sample_images=args.sample_images,
                        sample_steps=args.sample_steps,
                        xl2_blocks=(28 if gpu else 2) if args.xl2_blocks is None else args.xl2_blocks,
                        xl2_batch=(32 if gpu else 4) if args.xl2_batch is None else args.xl2_batch,
                        shapes=tuple(s.strip() for s in shapes.split(",") if s.strip()))
    listed = lambda text: tuple(v.strip() for v in text.split(",") if v.strip())  # noqa: E731
    contention = ContentionOptions(steps=args.contention_steps, repeats=args.contention_repeats)
    if args.contention_jobs is not None:
        contention.jobs = listed(args.contention_jobs)
    if args.contention_policies is not None:
        contention.policies = listed(args.contention_policies)
    try:
        if opts.shapes or not args.contention:
            opts.validate()
        contention.validate()
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    check_output_file(args.markdown, "--markdown", (".md",))
    say = (lambda text: print(text, file=sys.stderr)) if sys.stderr.isatty() else None
    result, tables = {}, []
    if opts.shapes:
        result = run_benchmark(opts, on_stage=say)
        tables.append(markdown(result))
    if args.contention:
        result["contention"] = run_contention(contention, on_stage=say)
        tables.append(contention_markdown(result["contention"]))
    table = "\n\n".join(tables)
    if args.markdown is not None:
        from quant.guards import write_text_atomic

        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.markdown, table + "\n")
        result["markdown_file"] = str(args.markdown)
    emit(args, result, table)
    return result
