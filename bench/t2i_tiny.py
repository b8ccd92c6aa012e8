"""The text-to-image flow end to end on tiny random pipelines (tests/tiny_t2i.py: PixArt-sigma and Stable
Diffusion with real diffusers / transformers classes at toy widths), measured in one run:

    python bench/t2i_tiny.py --json                      # both pipelines, every method at W8A8 and W4A8
    python bench/t2i_tiny.py --family pixart --prompts 16 --steps 10 --num-samples 32

Per pipeline: sampling (determinism checked), the salience pass and the token view of cross-attention's k/v
input, the fold-site table (which layers fold, which do not and why), and for every method x bit-width the
quantization (rel_rms on the calibration inputs) and an evaluation against FP on the bundled evaluation prompts
(FID vs FP in the digit classifier's features, as no Inception weights are available offline, with N; PSNR and
SSIM against the FP image of the same seed and prompt). The cost of calibration per prompt is split into text
encoding (once per prompt) and FP sampling with the inputs recorded (per calibration image).

Random weights: the numbers show that the flow runs and what it costs, not the quality of a real checkpoint.
Results are written to --out (JSON) after every measurement, so a stop loses nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.tiny_t2i builds the pipelines

METHODS = ("baseline", "smoothquant", "ptq4dit", "dilatequant")
BITS = ((8, 8), (4, 8))
RECON = ("adaround", "bkd")


def measure(family: str, folder: Path, args, out: dict, save) -> None:
    from analysis.evaluation.evaluate import EvalOptions, evaluate
    from analysis.models.loading import load
    from analysis.models.prompts import read_prompt_set
    from analysis.models.sampling import sample
    from analysis.quantization.calibration import CalibrationSpec, calibrate
    from analysis.salience.collect import SalienceConfig, collect
    from analysis.salience.tokens import token_salience
    from quant.api import QuantConfig
    from quant.graph import balance_plan

    res = out.setdefault(family, {})
    t0 = time.perf_counter()
    bundle = load(str(folder))
    res["load_seconds"] = round(time.perf_counter() - t0, 3)
    res["describe"] = bundle.describe()
    res["denoiser_params"] = sum(p.numel() for p in bundle.denoiser.parameters())
    res["text_encoder_params"] = sum(p.numel() for p in bundle.text.model.parameters())

    prompts = read_prompt_set("calibration")[:args.prompts]
    t0 = time.perf_counter()
    bundle.prompt_ids(prompts)
    encode = time.perf_counter() - t0
    res["calibration_cost"] = {"prompts": len(prompts), "encode_seconds": round(encode, 4),
                               "encode_seconds_per_prompt": round(encode / len(prompts), 5)}
    spec = CalibrationSpec(images=len(prompts), steps=args.steps, prompts=tuple(prompts))
    t0 = time.perf_counter()
    cal = calibrate(bundle, spec)
    sampling = time.perf_counter() - t0
    res["calibration_cost"].update(steps=args.steps, rows=len(cal), sampling_seconds=round(sampling, 3),
                                   sampling_seconds_per_prompt=round(sampling / len(prompts), 4))
    save()

    a = sample(bundle, None, [0, 1], steps=args.steps, prompts=prompts[:2])
    b = sample(bundle, None, [0, 1], steps=args.steps, prompts=prompts[:2])
    res["sample"] = {"images": list(a.images.shape), "seconds": round(a.seconds, 3),
                     "deterministic": bool(torch.equal(a.images, b.images))}
    t0 = time.perf_counter()
    stats = collect(bundle, SalienceConfig(steps=args.steps, samples=4, prompts=tuple(prompts[:4])))
    tokens = token_salience(bundle, prompts[:8]).summary()
    res["salience"] = {"layers": len(stats.layers), "timesteps": len(stats.timesteps),
                       "seconds": round(time.perf_counter() - t0, 3),
                       "token_source": tokens["source"], "token_max_over_median": tokens["max_over_median"],
                       "top_tokens": tokens["top"][:3]}
    plan = balance_plan(bundle.denoiser)
    res["fold_sites"] = {"layers": plan["layers"], "foldable_layers": plan["foldable_layers"],
                         "foldable_share": round(plan["foldable_share"], 3),
                         "groups": [(g["group"], len(g["layers"]), g["producer"]) for g in plan["balanced"]],
                         "refused": _reasons(plan["unbalanced"])}
    save()

    opts = EvalOptions(num_samples=args.num_samples, steps=args.steps, extractor="digits", cache_fp=False)
    configs = [QuantConfig(method=m, w_bits=w, a_bits=a) for m in METHODS for w, a in BITS]
    configs += [QuantConfig(method="ptq4dit", w_bits=4, a_bits=8, recon="adaround", recon_iters=args.recon_iters),
                QuantConfig(method="dilatequant", w_bits=4, a_bits=8, recon="bkd", recon_iters=args.recon_iters)]
    rows = res.setdefault("methods", [])
    for config in configs:
        t0 = time.perf_counter()
        r = evaluate(bundle, config, opts, calibration=spec)
        m = r.metrics
        rows.append({"label": config.label, "recon": config.recon, "rel_rms": round(m["rel_rms"], 5),
                     "fid_vs_fp": round(m["fid_vs_fp"], 4), "fid_vs_fp_interval": [round(v, 4) for v in m["fid_vs_fp_interval"]],
                     "psnr_vs_fp": m["psnr_vs_fp"], "ssim_vs_fp": m["ssim_vs_fp"], "N": m["num_samples"],
                     "weight_bytes": m["weight_bytes"], "fp_weight_bytes": m["fp_weight_bytes"],
                     "seconds": round(time.perf_counter() - t0, 2)})
        save()


def _reasons(unbalanced: dict) -> list:
    """Refused layers grouped by reason: [(reason, count, an example layer)]."""
    by: dict[str, list[str]] = {}
    for layer, why in unbalanced.items():
        by.setdefault(why, []).append(layer)
    return [(why, len(layers), layers[0]) for why, layers in by.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["pixart", "sd", "both"], default="both")
    p.add_argument("--prompts", type=int, default=8, help="calibration prompts (one image each)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=32, help="images per model in the evaluation")
    p.add_argument("--recon-iters", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("t2i_tiny.json"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from analysis.quiet import configure_logging
    from tests.tiny_t2i import save_pixart_sigma, save_stable_diffusion

    configure_logging()
    out = {"threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "args": {k: str(v) for k, v in vars(args).items()}}

    def save():
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2, default=str))
        os.replace(tmp, args.out)

    with tempfile.TemporaryDirectory() as tmp:
        builders = {"pixart": save_pixart_sigma, "sd": save_stable_diffusion}
        for family in (["pixart", "sd"] if args.family == "both" else [args.family]):
            folder = builders[family](Path(tmp) / family)
            measure(family, folder, args, out, save)
    save()
    print(json.dumps(out, indent=2, default=str) if args.json else f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
