"""Coverage of the FID bootstrap intervals (analysis.evaluation.metrics.fid_interval), measured on simulated features.

Real and generated "features" are Gaussian with a known shift, so the quantity the interval claims to cover,
the expected FID at this N, is known to simulation accuracy (the mean FID over many independent draws). Each
trial draws one pair of sets, computes the interval from them alone, and counts whether it holds that value.
A 95% interval should hold it in about 95% of the trials.

    python bench/interval_coverage.py --trials 1000          # percentile and normal, unpaired and paired
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

CASES = {  # name: (paired, shift): well separated sets, and near-identical ones (a W8A8 variant vs FP)
    "unpaired, shifted": (False, 0.3),
    "unpaired, same distribution": (False, 0.0),
    "paired, perturbed": (True, 0.3),
    "paired, nearly identical": (True, 0.05),
}


def _draw(gen: torch.Generator, dims: int, n: int, m: int, paired: bool, shift: float):
    """(generated, reference) feature sets: paired sets share rows (the same seeds) up to a perturbation."""
    ref = torch.randn(m, dims, generator=gen, dtype=torch.float64)
    if paired:
        return ref + shift * torch.randn(m, dims, generator=gen, dtype=torch.float64) + 0.1 * shift, ref
    return torch.randn(n, dims, generator=gen, dtype=torch.float64) + shift, ref


def expected_fid(dims: int, n: int, m: int, paired: bool, shift: float, draws: int = 2000, seed: int = 1) -> float:
    """E[FID] at these sizes, the mean over independent draws (batched: one Frechet distance per draw)."""
    from analysis.evaluation.metrics import frechet_distance, weighted_statistics

    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        a, b = _draw(gen, dims, n, m, paired, shift)
        one = lambda x: torch.ones(1, len(x), dtype=torch.float64)  # noqa: E731
        values.append(float(frechet_distance(*weighted_statistics(a, one(a)), *weighted_statistics(b, one(b)))))
    return float(np.mean(values))


def coverage(trials: int = 200, dims: int = 3, n: int = 150, m: int = 300, paired: bool = False, shift: float = 0.3,
             method: str = "percentile", replicates: int | None = None, level: float = 0.95, seed: int = 0) -> dict:
    """The share of `trials` simulated measurements whose interval holds the expected FID."""
    from analysis.evaluation.metrics import fid_interval

    target = expected_fid(dims, n, m, paired, shift)
    gen = torch.Generator().manual_seed(seed + 100)
    hits, used = 0, None
    for trial in range(trials):
        a, b = _draw(gen, dims, n, m, paired, shift)
        r = fid_interval(a, b, paired=paired, level=level, method=method, replicates=replicates, seed=trial)
        hits += r["fid_interval"][0] <= target <= r["fid_interval"][1]
        used = r["method"], r["replicates"]
    return {"coverage": hits / trials, "nominal": level, "trials": trials, "method": used[0], "replicates": used[1],
            "expected_fid": target, "dims": dims, "n": n, "m": m if not paired else n, "paired": paired, "shift": shift}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for name, (paired, shift) in CASES.items():
        for method, replicates in (("percentile", None), ("normal", 100)):
            r = coverage(args.trials, paired=paired, shift=shift, method=method, replicates=replicates,
                         n=300 if paired else 150)
            rows.append({"case": name, **r})
            if not args.json:
                print(f"{name:<30} {r['method']:<10} {r['replicates']:>5} replicates: coverage {r['coverage']:.3f} "
                      f"(nominal {r['nominal']:.2f}, {r['trials']} trials)", flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
