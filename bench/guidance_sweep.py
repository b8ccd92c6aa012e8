"""FP's FID vs real across classifier-free guidance scales: which guidance the FID protocol should use.

    python bench/guidance_sweep.py --guidance 1,1.5,2,3 --num-samples 2048 --steps 50   # add --json

Each row: FID vs real with its bootstrap interval, the real-vs-real floor at the same N, their ratio, and
label agreement (bundled model). Samples go through analysis.evaluation.evaluate (the FP sample cache of the run
store is reused, so a second run with the same settings only scores). The guidance with the lowest FID is
the model's evaluation guidance; record it in the model's bundle.json ("eval_guidance") and card.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from analysis.threads import configure

configure()  # the lab's thread policy, before torch makes its pool (see analysis.threads)

from analysis.evaluation.evaluate import EvalOptions, evaluate
from analysis.evaluation.store import Store
from analysis.models.loading import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled:dit-mnist")
    p.add_argument("--guidance", default="1,1.5,2,3", help="comma-separated guidance scales")
    p.add_argument("--num-samples", type=int, default=2048)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--data-dir", default=None, help="run store (default: $DQLAB_HOME or ~/.dqlab)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    bundle = load(args.model)
    store = Store(args.data_dir)
    rows = []
    for g in [float(v) for v in args.guidance.split(",")]:
        t0 = time.perf_counter()
        opts = EvalOptions(num_samples=args.num_samples, steps=args.steps, guidance=g)
        m = evaluate(bundle, None, opts, store=store).metrics
        rows.append({"guidance": g, "fid": m["fid"], "fid_interval": m["fid_interval"], "fid_floor": m["fid_floor"],
                     "fid_over_floor": m["fid"] / m["fid_floor"] if m["fid_floor"] else None,
                     "label_agreement": m.get("label_agreement"), "num_samples": m["num_samples"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"guidance {g:g}: FID {m['fid']:.2f}", file=sys.stderr)
    best = min(rows, key=lambda r: r["fid"])
    if args.json:
        print(json.dumps({"model": args.model, "steps": args.steps, "rows": rows, "best_guidance": best["guidance"]},
                         indent=2))
        return
    print(f"{args.model}, N = {args.num_samples}, {args.steps} DDIM steps, digit-classifier features\n")
    print("| guidance | FID vs real [95% interval] | real-vs-real floor | FID / floor | label agreement |")
    print("|---|---|---|---|---|")
    for r in rows:
        agree = "n/a" if r["label_agreement"] is None else f"{r['label_agreement']:.3f}"
        print(f"| {r['guidance']:g} | {r['fid']:.2f} [{r['fid_interval'][0]:.2f}, {r['fid_interval'][1]:.2f}] | "
              f"{r['fid_floor']:.2f} | {r['fid_over_floor']:.1f}x | {agree} |")
    print(f"\nlowest FID at guidance {best['guidance']:g}")


if __name__ == "__main__":
    main()
