"""dqlab models: what `--model` accepts."""
from __future__ import annotations

from analysis.cli import add_common, emit


def register(sub) -> None:
    p = sub.add_parser("models", help="list the models that can be loaded")
    add_common(p, model=False)
    p.set_defaults(func=run)


def run(args) -> dict:
    from analysis.models.loading import available_models

    rows = available_models()
    lines = [f"{r['name']:28s} {r['kind']:8s} " + ("ready" if r["available"] else
             "weights missing" if r["available"] is False else "needs network or a local copy") for r in rows]
    lines.append("Any local diffusers folder (DiTPipeline or DDPMPipeline layout, or a bare DiT or UNet2DModel) works "
                 "too: --model PATH")
    result = {"models": rows}
    emit(args, result, "\n".join(lines))
    return result
