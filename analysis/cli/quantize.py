"""dqlab quantize: calibrate and quantize a model, measure its error vs FP, and save it for `--model DIR`.

    dqlab quantize --method ptq4dit --w-bits 4 --a-bits 8 --out runs/ptq4dit-w4a8 --json
    dqlab sample --model runs/ptq4dit-w4a8 --out grid.png        # the saved folder loads like any model

rel_rms_step_median is the headline error: the median over timesteps of rel_rms_per_timestep, the
noise prediction's relative RMS error at each timestep. rel_rms is the relative RMS error ||eps_q - eps_fp|| / ||eps_fp|| of the noise prediction on held-out seeds (an
FP sampling run on seeds calibration never saw: the calibration's setting, the seeds after its own);
rel_rms_in_sample is the same on the calibration inputs themselves, which block-wise optimization trains on.
The saved folder holds the recipe (source, config, calibration) that rebuilds it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from analysis.cli import CLIError, add_common, add_guidance, emit, finite_float
from analysis.quantization.calibration import CALIBRATION_SEED, DEFAULT_CAL_SAMPLES, DEFAULT_CAL_STEPS

REPORT_FILE = "quant_report.json"  # written beside the model; loading ignores it


def add_quant_options(p, default_method: str = "ptq4dit"):
    """QuantConfig's fields and every method's own options as flags, derived from their declarations
    (quant.options): nothing here names an option. A method's option defaults to unset, so only the ones
    given reach the config, and one that the chosen method does not have is refused by name."""
    import argparse

    from quant.config import QuantConfig
    from quant.methods import REGISTRY, all_options

    groups = {"quantization": p.add_argument_group("quantization"),
              "recon": p.add_argument_group("block-wise optimization (after calibration)")}
    for opt in QuantConfig.describe():
        default = default_method if opt.name == "method" else opt.default
        _add_flag(groups[opt.group], opt, default, argparse)
    groups["quantization"].description = ("methods: " + "; ".join(f"{m.name}: {m.help}" for m in REGISTRY.values())
                                          + ". Methods combine with '+' where the math allows (e.g. hadamard+gptq)")
    for opt in all_options():
        _add_flag(groups[opt.group], opt, None, argparse)
    return groups["quantization"]


def _add_flag(group, opt, default, argparse) -> None:
    owner = f"{opt.method} only; " if opt.method else ""
    shown = "unset" if default is None else ("none" if default == [] else default)
    text = f"{opt.help} ({owner}default: {shown})".replace("%", "%%")
    if opt.kind in ("bool", "tristate"):
        group.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction, default=default, help=text)
    elif opt.kind == "patterns":
        group.add_argument(opt.flag, dest=opt.name, action="append", default=None, metavar="PATTERN",
                           help=text + "; repeatable")
    else:
        kind = {"int": int, "optional_int": int, "bits": int, "float": finite_float(),
                "optional_float": finite_float()}.get(opt.kind, str)
        # choices are checked by QuantConfig, so a bad value gets the same message from every face
        choices = f"; one of {', '.join(map(str, opt.choices))}" if opt.choices else ""
        group.add_argument(opt.flag, dest=opt.name, type=kind, default=default,
                           help=text.replace(" (", choices + " (", 1) if choices else text)


def config_from_args(args):
    """The QuantConfig the flags describe; a flag of another method than --method is an error naming both, and
    so is a quantization flag beside --method fp (which quantizes nothing)."""
    from quant.config import QuantConfig
    from quant.methods import all_options

    from quant.methods import components

    fields = {o.name: getattr(args, o.name) for o in QuantConfig.describe()}
    fields["exclude"] = list(fields["exclude"] or [])
    try:
        chosen = {m.name for m in components(args.method)}
    except ValueError as exc:
        raise CLIError(f"--method: {exc}") from None
    options = {}
    for opt in all_options():
        value = getattr(args, opt.name)
        if value is None:
            continue
        if opt.method not in chosen:
            raise CLIError(f"{opt.flag} is an option of {opt.method}, not of {args.method}; drop it or pass "
                           f"--method {opt.method} (alone or joined by '+')")
        options[opt.name] = value
    config = QuantConfig(**fields, options=options)
    if not config.quantizes:
        given = [o.flag for o in QuantConfig.describe() if o.name != "method" and fields[o.name] != o.default]
        if given:
            raise CLIError(f"{given[0]} has no effect with --method fp, which quantizes nothing; drop it or choose "
                           "a quantizing method")
    return config


def flags_beside_config(args, default_method: str) -> list[str]:
    """Quantization flags given together with --config, whose file replaces them: refused by name, never
    dropped in silence."""
    from quant.config import QuantConfig
    from quant.methods import all_options

    def unset(o):
        value = getattr(args, o.name)
        return value == (default_method if o.name == "method" else o.default) or (o.kind == "patterns" and not value)

    given = [o.flag for o in QuantConfig.describe() if not unset(o)]
    return given + [o.flag for o in all_options() if getattr(args, o.name) is not None]


def check_excludes(bundle, config) -> None:
    """An --exclude or layer_bits pattern that matches no layer is almost always a typo, and a config that keeps
    every layer in float quantizes nothing under a quantized label: refuse both before any work."""
    from analysis.quantization.pipeline import unmatched_excludes
    from quant.quantizers import is_off
    from quant.wrap import covered_layers, is_excluded

    unmatched = unmatched_excludes(bundle.denoiser, config.exclude)
    if unmatched:
        raise CLIError(f"--exclude {unmatched[0]!r} matches no layer; use an fnmatch pattern such as "
                       "'*.attn1.to_q' or a module name such as transformer_blocks.0")
    unmatched = unmatched_excludes(bundle.denoiser, list(config.layer_bits))
    if unmatched:
        raise CLIError(f"layer_bits pattern {unmatched[0]!r} matches no layer of {bundle.name}; use an fnmatch "
                       "pattern such as '*.attn1.to_q' or a module name such as transformer_blocks.0")
    if not config.quantizes:
        return
    layers = [n for n in covered_layers(bundle.denoiser) if not is_excluded(n, config.exclude)]
    if not any(not (is_off(w) and is_off(a)) for w, a in map(config.bits_for, layers)) and is_off(config.attn_bits):
        raise CLIError(f"the config quantizes no layer of {bundle.name} (exclude {config.exclude} and the bit-widths "
                       f"leave every layer in float), yet it would be labelled {config.label!r}; exclude fewer layers "
                       "or use --method fp")


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model, measure its error vs FP, save it for --model DIR")
    add_common(p)
    add_quant_options(p)
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-samples", type=int, default=DEFAULT_CAL_SAMPLES,
                   help="images sampled with the FP model for calibration (default: %(default)s)")
    c.add_argument("--calib-steps", type=int, default=DEFAULT_CAL_STEPS,
                   help="sampling steps of the calibration run; TPQ keeps one range per step (default: %(default)s)")
    c.add_argument("--calib-seed", type=int, default=CALIBRATION_SEED,
                   help="first calibration seed; evaluations sample from seed 0, so the default keeps calibration "
                        "and evaluation images apart (default: %(default)s)")
    add_guidance(c, "the evaluation guidance (the FID protocol), which calibration should match")
    c.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim")
    c.add_argument("--batch-size", type=int, default=64, help="calibration rows per forward (default: %(default)s)")
    from analysis.cli import add_prompts

    add_prompts(p, "to calibrate on, cycled over the calibration images (default: the bundled calibration set of "
                   "64 prompts)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="a QuantConfig as JSON (the Sweep page's download, dqlab sweep --config-out); it replaces "
                        "the quantization options above")
    p.add_argument("--out", type=Path, default=None,
                   help="folder to save the quantized model in (safetensors + quant_config.json); "
                        "without it the model is only measured. The folder is written beside and renamed into "
                        "place, so it always holds one complete model")
    p.add_argument("--force", action="store_true",
                   help="let --out replace a non-empty folder that is not a saved quantized model")
    p.set_defaults(func=run)


def _check_out(out: Path | None, force: bool = False) -> None:
    """Before any work: refuse to write over a file, or over a folder that holds something other than a saved
    model (unless --force); the folder is replaced whole (analysis.models.saved.save_quantized writes it beside and
    renames it into place)."""
    from analysis.cli import check_output_folder
    from quant.io import META

    if out is None:
        return
    check_output_folder(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file() and not force:
        raise CLIError(f"--out {out} is a non-empty folder that is not a saved quantized model; name a new or "
                       "empty folder, or pass --force to replace it with the quantized model")


def config_from_file(path: Path):
    """The QuantConfig in a JSON file, or a one-line error naming the file and what is wrong with it."""
    from quant.api import QuantConfig
    from quant.guards import UntrustedFileError, read_json

    try:
        data = read_json(path)
    except UntrustedFileError as exc:
        raise CLIError(f"--config: {exc}") from None
    try:
        return QuantConfig.from_dict(data, strict=True)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"--config {path}: {exc}") from None


def run(args) -> dict:
    from analysis.models.loading import load
    from analysis.models.saved import save_quantized
    from analysis.quantization.calibration import CalibrationSpec
    from analysis.quantization.method_views import method_headline
    from analysis.quantization.pipeline import quantize_bundle
    from quant.families import readable_layer

    from analysis.cli import read_prompts

    if args.config is not None:
        beside = flags_beside_config(args, "ptq4dit")
        if beside:
            raise CLIError(f"{beside[0]} is given beside --config, whose file sets every quantization option; put "
                           "it in the file or drop it")
        config = config_from_file(args.config)
    else:
        config = config_from_args(args)
    prompts = read_prompts(args)
    try:
        spec = CalibrationSpec(seed=args.calib_seed, images=args.calib_samples, steps=args.calib_steps,
                               guidance=args.guidance, scheduler=args.scheduler, prompts=prompts,
                               negative_prompt=args.negative_prompt)
    except ValueError as exc:
        flags = {"seed": "--calib-seed", "images": "--calib-samples", "steps": "--calib-steps",
                 "guidance": "--guidance", "scheduler": "--scheduler"}
        flag = next((f for name, f in flags.items() if str(exc).startswith(f"calibration {name} ")), None)
        raise CLIError(f"{exc} ({flag})" if flag else str(exc)) from None
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_out(args.out, args.force)
    bundle = load(args.model, device=args.device, dtype=args.dtype)
    read_prompts(args, bundle)  # prompts for a model that takes none: refused by name
    if bundle.quant_config:
        raise CLIError(f"{args.model} is already quantized ({bundle.name}); quantize its FP model instead")
    check_excludes(bundle, config)

    show = None
    if sys.stderr.isatty():
        show = lambda stage, frac: print(f"\r[{frac:6.1%}] {stage[:70]:<70}", end="", file=sys.stderr)  # noqa: E731
    variant = quantize_bundle(bundle, config, spec, on_progress=show, batch_size=args.batch_size,
                              on_recon=None if show else recon_lines(config))
    if show:
        print(file=sys.stderr)
    r = variant.report
    cal = r.calibration
    out = {"model": args.model, "method": config.method, "label": config.label, "w_bits": config.w_bits,
           "a_bits": config.a_bits, "attn_bits": config.attn_bits, "tpq": r.tpq,
           # seconds: the whole job's wall time; its named parts beside it
           "seconds": r.total_seconds, "quantize_seconds": r.seconds,
           "cpu_seconds": r.cpu_seconds, "calibration_seconds": r.calibration_seconds,
           "calibration_rows": r.calibration_rows, "calibration_steps": cal["steps"],
           "calibration_samples": cal["images"], "calibration": cal, "layers_quantized": r.layers_quantized,
           "weight_bytes": r.weight_bytes, "fp_weight_bytes": r.fp_weight_bytes,
           "rel_rms_step_median": r.rel_rms_step_median, "rel_rms": r.rel_rms,
           "rel_rms_per_timestep": r.rel_rms_per_timestep,
           "rel_rms_basis": r.rel_rms_basis, "rel_rms_in_sample": r.rel_rms_in_sample,
           "rel_rms_per_timestep_in_sample": r.rel_rms_per_timestep_in_sample, "held_out": r.held_out,
           "layer_error": r.layer_error, "config": config.to_dict(), "recon": recon_summary(r.recon),
           "balance": r.balance, "methods": method_headline(r.methods),
           "out": None}
    if args.out is not None:
        out["out"] = str(args.out)
        save_quantized(variant.bundle, config, args.out, base_source=args.model, recipe=variant.recipe,
                       extra_files={REPORT_FILE: json.dumps(out, indent=2, default=str)})
    mb = lambda n: f"{n / 2 ** 20:.2f} MiB"  # noqa: E731
    basis = f"held-out seeds; in sample {r.rel_rms_in_sample:.4g}" if r.rel_rms_basis == "held_out" \
        else "calibration inputs"
    human = (f"{config.label}: noise-prediction error vs FP {r.rel_rms_step_median:.4g} (median over steps; "
             f"pooled {r.rel_rms:.4g}; {basis}), {r.layers_quantized} layers, "
             f"{mb(r.weight_bytes)} (FP {mb(r.fp_weight_bytes)}), {out['seconds']:.1f}s "
             f"({r.calibration_seconds:.1f}s calibration sampling + {r.seconds:.1f}s quantization)"
             + (f" -> {out['out']}" if out["out"] else "") + "\n" + balance_lines(r.balance)
             + "".join("\n" + line for line in method_lines(out["methods"])))
    if out["recon"]:
        rs = out["recon"]
        human += (f"\n{config.recon}: {len(rs['units'])} units x {config.recon_iters} iterations on {rs['rows']} rows "
                  f"in {rs['seconds']:.1f}s; output error per unit before -> after: "
                  + ", ".join(f"{readable_layer(u['name'], bundle.family)} {u['error_before']:.3g} -> "
                              f"{u['error_after']:.3g}" for u in rs["units"]))
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


def method_lines(headline: dict) -> list[str]:
    """One line per rotation / low-rank / rounding method: what it did and what it costs."""
    lines = []
    if "rotation" in headline:
        r = headline["rotation"]
        lines.append(f"{r['method']}: {r['folded_layers']} layers rotated for free (folded into their producer), "
                     f"{r['online_layers']} online ({r['online_adds_per_token']} extra adds per token; "
                     f"constructions: {', '.join(r['kinds'])})")
    if "lowrank" in headline:
        r = headline["lowrank"]
        lines.append(f"{r['method']}: rank-{r['rank']} 16-bit branch on {r['layers']} layers, "
                     f"+{r['extra_bytes'] / 2 ** 10:.0f} KiB, +{r['extra_flops_per_position']} FLOPs per token "
                     f"({r['extra_flops_per_position'] / max(r['layer_flops_per_position'], 1):.0%} of the GEMMs)")
    if "rounding" in headline:
        r = headline["rounding"]
        lines.append(f"{r['method']}: weight rounding error {r['error_ratio']:.2f}x round-to-nearest's "
                     f"(Hessians from {r.get('rows')} rows), {r['seconds']:.1f}s")
    return lines


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
