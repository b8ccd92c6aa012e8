"""`dqlab`: the lab's actions headless. Each subcommand lives in its own module and prints JSON with --json.

Every failure the user can fix (a bad argument, a missing model, an unreadable folder) exits with status 2
and one line on stderr that names what was wrong.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path

# Subcommand modules, in help order. Each defines register(subparsers) and sets `func` on its parser;
# func(args) returns a JSON-able dict (printed with --json) and prints its own human-readable summary.
SUBCOMMANDS = ["models", "sample", "quantize", "eval", "sweep", "sensitivity", "runs", "salience", "bench"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage block), as every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_float(minimum: float | None = None, maximum: float | None = None):
    """An argparse type for a finite number within [minimum, maximum]: 'nan' and 'inf' are refused here, at
    the boundary, instead of flowing into sampling and out as invalid JSON."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            lo = "-inf" if minimum is None else f"{minimum:g}"
            hi = "inf" if maximum is None else f"{maximum:g}"
            raise argparse.ArgumentTypeError(f"{value:g} is outside [{lo}, {hi}]")
        return value
    return parse


def _existing_ancestor(path: Path, flag: str) -> Path:
    """The nearest existing ancestor of `path`, which must be a writable folder (an output under a file, or in a
    folder this user cannot write, is refused before any work)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{flag} {path}: {parent} is a file, not a folder; choose a path in a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CLIError(f"{flag} {path}: the folder {parent} is not writable; choose another path")
            return parent
    raise CLIError(f"{flag} {path}: no existing folder above it")


def check_output_file(path: Path | None, flag: str, suffixes: tuple[str, ...] = ()) -> None:
    """An output file named by `flag`, checked before the work starts: its suffix, not a folder, in a writable
    folder. The file itself is written later to a temporary sibling and renamed into place."""
    if path is None:
        return
    if suffixes and path.suffix.lower() not in suffixes:
        raise CLIError(f"{flag} must name a {' or '.join(suffixes)} file, got {path}")
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a folder; name a file in it, e.g. {path / ('out' + (suffixes or ('',))[0])}")
    if path.exists() and not path.is_file():
        raise CLIError(f"{flag} {path} exists and is not a regular file; choose another path")
    _existing_ancestor(path, flag)


def check_output_folder(path: Path | None, flag: str) -> None:
    """An output folder named by `flag`: not a file, in a writable folder (created when missing)."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {path} is a file; name a folder (it is created if missing)")
    _existing_ancestor(path, flag)


def add_guidance(p, default_help: str = "the model's default for sample grids") -> None:
    p.add_argument("--guidance", type=finite_float(0.0, 100.0), default=None,
                   help=f"classifier-free guidance scale, 1 = off (default: {default_help})")


def add_prompts(p, what: str) -> None:
    """--prompt / --prompts FILE / --negative-prompt for a text-to-image model (PixArt, Stable Diffusion)."""
    g = p.add_argument_group("prompts (text-to-image models)")
    g.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help=f"a prompt {what}; repeat for several")
    g.add_argument("--prompts", default=None, metavar="FILE", help=f"a text file, one prompt a line, {what}")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="the unconditional branch of classifier-free guidance (default: the empty prompt)")


def read_prompts(args, bundle=None) -> list[str] | None:
    """The prompts given on the command line (None when none were); checks they fit the model."""
    from analysis.models.prompts import check_prompt, read_prompts_file

    if args.prompt and args.prompts:
        raise CLIError("give --prompt (repeatable) or --prompts FILE, not both")
    try:
        if args.prompts:
            prompts = read_prompts_file(args.prompts)
        elif args.prompt:
            prompts = [check_prompt(p, "--prompt") for p in args.prompt]
        else:
            prompts = None
        if args.negative_prompt is not None:
            check_prompt(args.negative_prompt, "--negative-prompt")
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if bundle is not None and not bundle.text_conditioned and (prompts or args.negative_prompt is not None):
        raise CLIError(f"{bundle.name} is not a text-to-image model: it takes "
                       + ("--classes" if bundle.num_classes else "--seeds alone") + ", not prompts")
    return prompts


def threads_count(text: str) -> int:
    """argparse type of --threads: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dqlab", description="Quantize diffusion transformers and measure the damage.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"analysis.cli.{name}").register(sub)
    for p in sub.choices.values():  # every command runs torch: each takes the thread count (see analysis.threads)
        p.add_argument("--threads", type=threads_count, default=None,
                       help="CPU threads for torch (default: one per usable CPU; OMP_NUM_THREADS when set)")
    return parser


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    """Options shared by subcommands that load a model."""
    if model:
        p.add_argument("--model", default="bundled:dit-mnist",
                       help="bundled:dit-mnist, bundled:unet-mnist, a local diffusers folder (DiT, UNet, PixArt or "
                            "Stable Diffusion pipeline), or a hub id (default: %(default)s)")
        p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda (default: %(default)s)")
        p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def strict_json(value):
    """`value` with every non-finite float replaced by None, so the output parses with any strict JSON parser
    (Python's json writes NaN and Infinity, which are not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def emit(args, result: dict, human: str) -> None:
    from analysis.threads import current

    if args.json:
        result.setdefault("thread_policy", current().to_dict())
    print(json.dumps(strict_json(result), indent=2, default=str, allow_nan=False) if args.json else human)


def main(argv: list[str] | None = None) -> int:
    from analysis.threads import configure, threads_arg

    argv = sys.argv[1:] if argv is None else argv
    try:
        # before anything imports torch: the wait policy is fixed when torch creates its thread pool
        configure(threads_arg(argv))
    except ValueError as exc:  # a bad --threads or OMP_NUM_THREADS
        print(f"dqlab: error: {exc}", file=sys.stderr)
        return 2
    from analysis.models.bundle import ModelLoadError
    from analysis.quiet import configure_logging

    configure_logging()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, its one line already printed)
        return int(exc.code or 0)
    try:
        args.func(args)
    except (CLIError, ModelLoadError, ValueError, FileNotFoundError) as exc:
        print(f"dqlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
