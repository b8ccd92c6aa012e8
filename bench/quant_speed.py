"""Speed of the quantization engine on the bundled model, every number measured in this one run:

1. forward time of the quantized transformer vs FP (batch 256 of calibration inputs, mixed timesteps) for
   baseline W8A8 and dilatequant W4A4 with TPQ: the cost of fake quantization at inference;
2. fake_quant's in-place no-grad path vs the out-of-place expression on an MLP-sized activation;
3. calibrate + quantize seconds per method (wall and process CPU time), the calibration sampling reported
   apart; target: under 10 s on 2 CPU cores.

    python bench/quant_speed.py --threads 2            # add --json for one JSON object

Timings take the fastest of --repeats runs, which discounts interference from other processes on a shared
machine; process CPU time is printed beside wall time for the same reason.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.models import load  # noqa: E402
from analysis.quantize_pipeline import calibration_for  # noqa: E402
from quant.api import QuantConfig, quantize_with_details  # noqa: E402
from quant.quantizers import fake_quant, qrange  # noqa: E402

FORWARD_CONFIGS = [QuantConfig(method="baseline", w_bits=8, a_bits=8),
                   QuantConfig(method="dilatequant", w_bits=4, a_bits=4)]
METHOD_CONFIGS = [QuantConfig(method="baseline", w_bits=8, a_bits=8),
                  QuantConfig(method="smoothquant", w_bits=8, a_bits=8),
                  QuantConfig(method="ptq4dit", w_bits=8, a_bits=8),
                  QuantConfig(method="dilatequant", w_bits=4, a_bits=4)]


def fastest(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def forward_seconds(model, x, t, y, repeats: int) -> float:
    model(x, timestep=t, class_labels=y)  # warm-up
    return fastest(lambda: model(x, timestep=t, class_labels=y), repeats)


def out_of_place(x, scale, zero, qmin, qmax):
    """The textbook expression, one new tensor per operation (what fake_quant does when gradients flow)."""
    return (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero) * scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--batch", type=int, default=256, help="forward batch size (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats, fastest kept (default: %(default)s)")
    p.add_argument("--method-repeats", type=int, default=2,
                   help="timed repeats of each calibrate + quantize (default: %(default)s)")
    p.add_argument("--calib-samples", type=int, default=10, help="calibration images (default: %(default)s)")
    p.add_argument("--calib-steps", type=int, default=50, help="calibration DDIM steps (default: %(default)s)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load("bundled:dit-mnist", device="cpu")
    fp = bundle.transformer
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__, "batch": args.batch,
           "repeats": args.repeats}

    start = time.perf_counter()
    cal = calibration_for(bundle, steps=args.calib_steps, num_samples=args.calib_samples)
    out["calibration_sampling_seconds"] = round(time.perf_counter() - start, 3)
    out["calibration_rows"] = len(cal)
    idx = torch.arange(args.batch) % len(cal)  # calibration rows, all timesteps mixed (TPQ gathers per sample)
    x, t, y = cal.x[idx], cal.t[idx], cal.y[idx]

    # 1. forward time, quantized vs FP
    fp_s = forward_seconds(fp, x, t, y, args.repeats)
    out["forward"] = {"fp_seconds": round(fp_s, 4)}
    for cfg in FORWARD_CONFIGS:
        q = quantize_with_details(fp, cfg, cal).model
        q_s = forward_seconds(q, x, t, y, args.repeats)
        out["forward"][cfg.label] = {"seconds": round(q_s, 4), "ratio_vs_fp": round(q_s / fp_s, 3)}
        del q

    # 2. fake_quant: in-place no-grad path vs out-of-place expression, on fc2's input at this batch
    width = fp.config.num_attention_heads * fp.config.attention_head_dim
    tokens = (bundle.latent_shape[1] // fp.config.patch_size) * (bundle.latent_shape[2] // fp.config.patch_size)
    act = torch.randn(args.batch, tokens, 4 * width)
    scale, zero = torch.tensor(0.02), torch.tensor(7.0)
    qmin, qmax = qrange(4)
    with torch.no_grad():
        same = torch.equal(fake_quant(act, scale, zero, 4), out_of_place(act, scale, zero, qmin, qmax))
        inplace_s = fastest(lambda: fake_quant(act, scale, zero, 4), args.repeats)
        oop_s = fastest(lambda: out_of_place(act, scale, zero, qmin, qmax), args.repeats)
    out["fake_quant"] = {"shape": list(act.shape), "in_place_seconds": round(inplace_s, 5),
                         "out_of_place_seconds": round(oop_s, 5), "speedup": round(oop_s / inplace_s, 2),
                         "identical": same}

    # 3. calibrate + quantize per method (activation calibration included, calibration sampling not)
    out["quantize"] = {}
    for cfg in METHOD_CONFIGS:
        best_wall, best_cpu = float("inf"), float("inf")
        for _ in range(args.method_repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            quantize_with_details(fp, cfg, cal)
            best_wall = min(best_wall, time.perf_counter() - wall)
            best_cpu = min(best_cpu, time.process_time() - cpu)
        out["quantize"][cfg.label] = {"seconds": round(best_wall, 3), "cpu_seconds": round(best_cpu, 3)}

    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"torch {out['torch']}, {out['threads']} threads; calibration: {out['calibration_rows']} rows sampled "
          f"in {out['calibration_sampling_seconds']:.1f}s")
    print(f"forward, batch {args.batch} (fastest of {args.repeats}): FP {fp_s * 1e3:.1f} ms")
    for cfg in FORWARD_CONFIGS:
        f = out["forward"][cfg.label]
        print(f"  {cfg.label:<24} {f['seconds'] * 1e3:8.1f} ms  = {f['ratio_vs_fp']:.2f} x FP")
    fq = out["fake_quant"]
    print(f"fake_quant on {fq['shape']}: in place {fq['in_place_seconds'] * 1e3:.1f} ms, out of place "
          f"{fq['out_of_place_seconds'] * 1e3:.1f} ms ({fq['speedup']:.1f}x), identical: {fq['identical']}")
    print("calibrate + quantize (no reconstruction; target < 10 s on 2 cores):")
    for label, r in out["quantize"].items():
        print(f"  {label:<24} {r['seconds']:6.2f} s wall, {r['cpu_seconds']:6.2f} s CPU")


if __name__ == "__main__":
    main()
