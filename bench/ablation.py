"""Ablation of both papers' switches at W4A8 and W4A4, all in one run: one calibration set, one FP sampling.

    python bench/ablation.py --json                                   # the defaults: N = 2048, 50 steps
    python bench/ablation.py --num-samples 256 --steps 10 --recon-iters 50 --bits w4a8   # a quick look

Rows per bit-width (each one QuantConfig; "+" switches on):
    baseline                   plain PTQ
    CSB                        ptq4dit without SSC
    CSB+SSC                    ptq4dit
    TPQ                        baseline with per-timestep activation ranges
    WD                         dilatequant without TPQ
    WD+TPQ                     dilatequant
    AdaRound                   baseline + reconstruction
    CSB+SSC+AdaRound           PTQ4DiT as published
    TPQ+BKD                    DilateQuant's "BKD without WD"
    WD+TPQ+BKD                 DilateQuant as published
    GPTQ                       second-order weight rounding (Frantar et al. 2022)
    Hadamard                   rotated layer inputs (folded into to_v where exact, online elsewhere)
    SVD                        SVDQuant: smoothing + rank-32 16-bit branch
    Hadamard+GPTQ, SVD+GPTQ    the rotation or the branch, then GPTQ on the weight left to quantize
    GPTQ+TPQ, Hadamard+TPQ, SVD+TPQ, Hadamard+GPTQ+TPQ, SVD+GPTQ+TPQ, WD+Hadamard+GPTQ+TPQ   with TPQ
    Hadamard+GPTQ+TPQ+BKD      the rotation, GPTQ and TPQ, then DilateQuant's block-wise distillation
Each row reports FID vs FP (same labels and seeds as the FP images; with its bootstrap interval), FID vs real,
label agreement, rel_rms (noise prediction vs FP on the calibration inputs), the quantization time (with the
block-wise optimization's share and its mean time per transformer block) and the peak memory of the
quantization (CUDA: peak allocated; CPU: peak resident memory above the level before, sampled every 10 ms).
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

from analysis.threads import configure

configure()  # the lab's thread policy, before torch makes its pool (see analysis.threads)

import torch

from analysis.evaluation.evaluate import EvalOptions, eval_guidance, evaluate_variants
from analysis.models.loading import load
from analysis.quantization.calibration import CALIBRATION_SEED, calibration_for
from analysis.quantization.pipeline import quantize_bundle
from quant.api import QuantConfig
from quant.families import layer_info, readable_layer

ROWS = {
    "baseline": dict(method="baseline"),
    "CSB": dict(method="ptq4dit", options={"ssc": False}),
    "CSB+SSC": dict(method="ptq4dit"),
    "TPQ": dict(method="baseline", tpq=True),
    "WD": dict(method="dilatequant", tpq=False),
    "WD+TPQ": dict(method="dilatequant"),
    "AdaRound": dict(method="baseline", recon="adaround"),
    "CSB+SSC+AdaRound": dict(method="ptq4dit", recon="adaround"),
    "TPQ+BKD": dict(method="baseline", tpq=True, recon="bkd"),
    "WD+TPQ+BKD": dict(method="dilatequant", recon="bkd"),
    "GPTQ": dict(method="gptq"),
    "Hadamard": dict(method="hadamard"),
    "SVD": dict(method="svdquant"),
    "Hadamard+GPTQ": dict(method="hadamard+gptq"),
    "SVD+GPTQ": dict(method="svdquant+gptq"),
    "GPTQ+TPQ": dict(method="gptq", tpq=True),
    "Hadamard+TPQ": dict(method="hadamard", tpq=True),
    "SVD+TPQ": dict(method="svdquant", tpq=True),
    "Hadamard+GPTQ+TPQ": dict(method="hadamard+gptq", tpq=True),
    "SVD+GPTQ+TPQ": dict(method="svdquant+gptq", tpq=True),
    "WD+Hadamard+GPTQ+TPQ": dict(method="dilatequant+hadamard+gptq"),
    "Hadamard+GPTQ+TPQ+BKD": dict(method="hadamard+gptq", tpq=True, recon="bkd"),
}


class PeakMemory:
    """Peak memory of a block of code: CUDA peak allocated, or on the CPU the resident set sampled every 10 ms
    (minus its level at the start)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.base, self.high, self.stop = _rss(), _rss(), threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(0.01):
            self.high = max(self.high, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.high, _rss()) - self.base



def _is_block(unit: str, family: str) -> bool:
    info = layer_info(unit, family)
    return info.block >= 0 and readable_layer(unit, family) == info.stage

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _bits(text: str) -> tuple[int, int]:
    w, a = text.lower().lstrip("w").split("a")
    return int(w), int(a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled:dit-mnist")
    p.add_argument("--device", default="auto")
    p.add_argument("--bits", default="w4a8,w4a4", help="comma-separated bit-widths (default: %(default)s)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run (default: all)")
    p.add_argument("--num-samples", type=int, default=2048, help="images per variant for FID (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps for calibration and evaluation")
    p.add_argument("--calib-samples", type=int, default=10)
    p.add_argument("--recon-iters", type=int, default=QuantConfig.recon_iters)
    p.add_argument("--recon-rows", type=int, default=QuantConfig.recon_rows)
    p.add_argument("--recon-batch", type=int, default=QuantConfig.recon_batch)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}")
    bundle = load(args.model, device=args.device)
    opts = EvalOptions(num_samples=args.num_samples, steps=args.steps, cache_fp=False)
    start = time.perf_counter()
    cal = calibration_for(bundle, steps=args.steps, num_samples=args.calib_samples,
                          guidance=eval_guidance(bundle, opts), seed=CALIBRATION_SEED)
    cal_seconds = time.perf_counter() - start
    recon = dict(recon_iters=args.recon_iters, recon_rows=args.recon_rows, recon_batch=args.recon_batch)
    variants, measured = {}, {}
    for bits in args.bits.split(","):
        w, a = _bits(bits)
        for row in rows:
            fields = dict(ROWS[row], w_bits=w, a_bits=a)
            config = QuantConfig(**fields, **(recon if fields.get("recon") else {}))
            name = f"W{w}A{a} {row}"
            with PeakMemory(bundle.device) as mem:
                t0 = time.perf_counter()
                variant = quantize_bundle(bundle, config, cal)
                seconds = time.perf_counter() - t0
            r = variant.report
            # the units that are a whole repeated block (family table: a DiT's transformer blocks), not the
            # small embedding unit each block has
            blocks = [u["seconds"] for u in (r.recon or {}).get("units", []) if _is_block(u["name"], bundle.family)]
            measured[name] = {"row": row, "bits": f"W{w}A{a}", "label": config.label, "config": config.to_dict(),
                              "rel_rms": r.rel_rms,
                              "rel_rms_per_timestep": r.rel_rms_per_timestep, "quantize_seconds": round(seconds, 3),
                              "recon_seconds": (r.recon or {}).get("seconds"),
                              "seconds_per_block": round(sum(blocks) / len(blocks), 3) if blocks else None,
                              "peak_memory_bytes": mem.peak,
                              "recon_cached_bytes": (r.recon or {}).get("peak_cached_bytes")}
            variants[name] = variant
            if not args.json:
                print(f"{name:<24} rel_rms {r['rel_rms']:.4f}  quantize {seconds:7.1f} s  "
                      f"peak {mem.peak / 2 ** 20:7.1f} MiB", flush=True)
    results = evaluate_variants(bundle, variants, opts)
    for res in results:
        m = res.metrics
        measured[res.name].update(fid_vs_fp=m.get("fid_vs_fp"), fid_vs_fp_interval=m.get("fid_vs_fp_interval"),
                                  fid=m.get("fid"), fid_interval=m.get("fid_interval"),
                                  label_agreement=m.get("label_agreement"), sampling_seconds=res.timings["sampling"])
    out = {"model": args.model, "device": str(bundle.device), "threads": torch.get_num_threads(),
           "num_samples": args.num_samples, "steps": args.steps, "guidance": eval_guidance(bundle, opts),
           "calibration_rows": len(cal), "calibration_seconds": round(cal_seconds, 3), "recon": recon,
           "feature_extractor": results[0].metrics.get("feature_extractor") if results else None,
           "rows": measured, "seconds": round(time.perf_counter() - start, 3)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"\nN = {args.num_samples}, {args.steps} steps, guidance {out['guidance']:g}, "
          f"recon {args.recon_iters} iterations x batch {args.recon_batch} on {args.recon_rows} rows")
    print(f"{'variant':<24} {'FID vs FP':>10} {'95% interval':>18} {'rel_rms':>10} {'time s':>8} {'s/block':>8}"
          f" {'peak MiB':>9}")
    for name, m in measured.items():
        iv = m.get("fid_vs_fp_interval") or [float("nan")] * 2
        print(f"{name:<24} {m['fid_vs_fp']:>10.2f} {f'[{iv[0]:.1f}, {iv[1]:.1f}]':>18} {m['rel_rms']:>10.4f} "
              f"{m['quantize_seconds']:>8.1f} {m['seconds_per_block'] or 0:>8.2f} "
              f"{m['peak_memory_bytes'] / 2 ** 20:>9.1f}")


if __name__ == "__main__":
    main()
