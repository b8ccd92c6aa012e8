"""The real-vs-real FID floor of the bundled digits at several N, by the current and the earlier definition.

Current (analysis.evaluation.metrics.fid_floor): N real images from one half of the 5000 digits against the other half,
the reference part every FID vs real compares with, so a perfect model and the floor are measured alike.
Earlier: N real images against the other 5000 - N, a reference of another size than the model's FID used.

    python bench/fid_floor.py --n 512,2048 --json
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def earlier_floor(features: torch.Tensor, n: int, splits: int = 3, seed: int = 0) -> float:
    """The definition the lab used before: N against the other M - N real images."""
    from analysis.evaluation.metrics import fid_from_features

    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(splits):
        perm = torch.randperm(len(features), generator=gen)
        values.append(fid_from_features(features[perm[:n]], features[perm[n:]]))
    return float(np.mean(values))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="512,2048")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from analysis.evaluation import metrics as M
    from analysis.evaluation.store import Store

    feats = M.reference_features(M.bundled_reference(), cache_dir=Store().cache_dir)
    rows = []
    for n in [int(v) for v in args.n.split(",")]:
        now = M.fid_floor(feats, n)
        rows.append({"n": n, "floor": now["fid_floor"], "floor_sizes": now["floor_sizes"],
                     "earlier_floor": earlier_floor(feats, n), "earlier_sizes": [n, len(feats) - n]})
        if not args.json:
            r = rows[-1]
            print(f"N={n}: floor {r['floor']:.2f} ({r['floor_sizes'][0]} vs {r['floor_sizes'][1]}), earlier "
                  f"{r['earlier_floor']:.2f} ({n} vs {len(feats) - n})")
    if args.json:
        print(json.dumps({"feature_extractor": M.DIGITS_EXTRACTOR, "rows": rows, "definition": M.FLOOR_DEFINITION}))


if __name__ == "__main__":
    main()
