"""Relative output error vs FP of each method on the bundled model, all on one calibration set, with the
per-layer errors of the pairs the methods' papers order (PTQ4DiT vs baseline, DilateQuant vs baseline).

    python bench/quant_error.py                  # add --json for one JSON object

Each row equals `dqlab quantize --method M --w-bits W --a-bits A [--tpq] --json` (same calibration seeds,
samples and steps), which samples the calibration set again per call; this script samples it once.
rel_rms = ||eps_q - eps_fp|| / ||eps_fp|| over every calibration input; a layer's error is its quantized
output vs its FP output on the same input (the inputs already carry the upstream quantization error).
"""
from __future__ import annotations

import argparse
import json

from analysis.threads import configure

configure()  # the lab's thread policy, before torch makes its pool (see analysis.threads)

from analysis.models.loading import load
from analysis.quantization.calibration import CALIBRATION_SEED, calibration_for
from analysis.quantization.pipeline import quantize_bundle
from quant.api import QuantConfig
from quant.families import balance_groups

CONFIGS = [
    ("baseline", 8, 8, None), ("smoothquant", 8, 8, None), ("ptq4dit", 8, 8, None),
    ("baseline", 4, 8, None), ("smoothquant", 4, 8, None), ("ptq4dit", 4, 8, None), ("dilatequant", 4, 8, None),
    ("baseline", 4, 4, None), ("baseline", 4, 4, True), ("smoothquant", 4, 4, None), ("ptq4dit", 4, 4, None),
    ("dilatequant", 4, 4, None), ("dilatequant", 4, 4, False),
]
# (claim, better, worse, strict): the orderings the papers claim
CLAIMS = [("W8A8 ptq4dit <= baseline", "ptq4dit W8A8", "baseline W8A8", False),
          ("W4A8 ptq4dit < baseline", "ptq4dit W4A8", "baseline W4A8", True),
          ("W4A4 dilatequant (TPQ) < baseline", "dilatequant W4A4 TPQ", "baseline W4A4", True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled:dit-mnist")
    p.add_argument("--calib-samples", type=int, default=10)
    p.add_argument("--calib-steps", type=int, default=50)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    bundle = load(args.model, device="cpu")
    cal = calibration_for(bundle, steps=args.calib_steps, num_samples=args.calib_samples, seed=CALIBRATION_SEED)
    reports = {}
    for method, w, a, tpq in CONFIGS:
        v = quantize_bundle(bundle, QuantConfig(method=method, w_bits=w, a_bits=a, tpq=tpq), cal)
        reports[v.name] = v.report.to_dict()
        if not args.json:
            print(f"{v.name:<26} rel_rms {v.report.rel_rms:.5f}   ({v.report.seconds:.1f} s, "
                  f"{v.report.cpu_seconds:.1f} s CPU)", flush=True)
    balanced = {n for g in balance_groups(bundle.denoiser) for n in g.layers}  # the family table's fold sites
    claims = []
    for text, better, worse, strict in CLAIMS:
        rb, rw = reports[better]["rel_rms"], reports[worse]["rel_rms"]
        holds = rb < rw if strict else rb <= rw
        layers = {n: (reports[better]["layer_error"][n], reports[worse]["layer_error"][n])
                  for n in reports[better]["layer_error"] if n in balanced}
        claims.append({"claim": text, "better": better, "worse": worse, "rel_rms": [rb, rw], "holds": holds,
                       "balanced_layers_better": sum(b < w_ for b, w_ in layers.values()),
                       "balanced_layers": len(layers), "layer_error": layers})
    if args.json:
        print(json.dumps({"calibration_rows": len(cal), "reports": {k: {kk: r[kk] for kk in (
            "rel_rms", "rel_rms_per_timestep", "layer_error", "seconds", "cpu_seconds")}
            for k, r in reports.items()}, "claims": claims}, indent=2))
        return
    for c in claims:
        rb, rw = c["rel_rms"]
        print(f"\n{c['claim']}: {rb:.5f} vs {rw:.5f} -> {'holds' if c['holds'] else 'DOES NOT HOLD'}; balanced "
              f"layers with lower own error: {c['balanced_layers_better']}/{c['balanced_layers']}")
        print(f"  {'layer':<40} {c['better']:>22} {c['worse']:>22}")
        for name, (b, w) in c["layer_error"].items():
            print(f"  {name:<40} {b:22.5f} {w:22.5f}")


if __name__ == "__main__":
    main()
