"""`dqlab`: the lab's actions headless. Each subcommand lives in its own module and prints JSON with --json.

Every failure the user can fix (a bad argument, a missing model, an unreadable folder) exits with status 2
and one line on stderr that names what was wrong.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys

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


def add_guidance(p, default_help: str = "the model's default for sample grids") -> None:
    p.add_argument("--guidance", type=finite_float(0.0, 100.0), default=None,
                   help=f"classifier-free guidance scale, 1 = off (default: {default_help})")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dqlab", description="Quantize diffusion transformers and measure the damage.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"analysis.cli.{name}").register(sub)
    return parser


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    """Options shared by subcommands that load a model."""
    if model:
        p.add_argument("--model", default="bundled:dit-mnist",
                       help="bundled:dit-mnist, bundled:unet-mnist, a local diffusers folder (DiT or UNet), or a hub "
                            "id (default: %(default)s)")
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
    print(json.dumps(strict_json(result), indent=2, default=str, allow_nan=False) if args.json else human)


def main(argv: list[str] | None = None) -> int:
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
