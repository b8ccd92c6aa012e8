"""`dqlab`: the lab's actions headless. Each subcommand lives in its own module and prints JSON with --json.

Every failure the user can fix (a bad argument, a missing model, an unreadable folder) exits with status 2
and one line on stderr that names what was wrong.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# Subcommand modules, in help order. Each defines register(subparsers) and sets `func` on its parser;
# func(args) returns a JSON-able dict (printed with --json) and prints its own human-readable summary.
SUBCOMMANDS = ["models", "sample", "quantize", "eval", "runs", "salience"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dqlab", description="Quantize diffusion transformers and measure the damage.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"analysis.cli.{name}").register(sub)
    return parser


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    """Options shared by subcommands that load a model."""
    if model:
        p.add_argument("--model", default="bundled:dit-mnist",
                       help="bundled:dit-mnist, a local diffusers folder, or a hub id (default: %(default)s)")
        p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda (default: %(default)s)")
        p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def emit(args, result: dict, human: str) -> None:
    print(json.dumps(result, indent=2, default=str) if args.json else human)


def main(argv: list[str] | None = None) -> int:
    from analysis.models import ModelLoadError
    from analysis.quiet import configure_logging

    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ModelLoadError, ValueError, FileNotFoundError) as exc:
        print(f"dqlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
