"""dqlab runs: list stored evaluations, show one in full, or delete one."""
from __future__ import annotations

from analysis.cli import CLIError, emit


def register(sub) -> None:
    p = sub.add_parser("runs", help="list the stored evaluation runs")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--data-dir", default=None, help="run store folder (default: $DQLAB_HOME or ~/.dqlab)")
    p.add_argument("--model", default=None, help="only runs of this model")
    p.add_argument("--method", default=None, help="only runs of this method")
    p.add_argument("--w-bits", type=int, default=None)
    p.add_argument("--a-bits", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="newest N runs")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--show", type=int, default=None, metavar="ID", help="everything stored for one run")
    action.add_argument("--delete", type=int, default=None, metavar="ID", help="delete one run and its files")
    p.set_defaults(func=run)


def run(args) -> dict:
    from analysis.evaluation.metrics import fid_text
    from analysis.evaluation.per_seed import per_seed_text
    from analysis.evaluation.store import Store

    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be at least 1, got {args.limit}")
    store = Store(args.data_dir)
    store.sweep_orphans()  # run folders of jobs killed before their row committed, older than an hour
    if args.show is not None:
        r = store.get(args.show)
        out = {**r.summary(), "config": r.config, "metrics": r.metrics, "timings": r.timings,
               "versions": r.versions, "files": {k: str(v) for k, v in r.files.items()}, "scheduler": r.scheduler}
        emit(args, out, "\n".join(f"{k}: {v}" for k, v in out.items()))
        return out
    if args.delete is not None:
        if not store.delete(args.delete):
            raise CLIError(f"no stored run with id {args.delete}")
        out = {"deleted": args.delete}
        emit(args, out, f"deleted run {args.delete}")
        return out
    rows = [r.summary() for r in store.list(model=args.model, method=args.method, w_bits=args.w_bits,
                                            a_bits=args.a_bits, limit=args.limit)]
    skipped = [{"run_id": i, "why": why} for i, why in store.skipped]
    out = {"data_dir": str(store.data_dir), "count": len(rows), "runs": rows, "skipped": skipped}
    lines = [f"{len(rows)} run(s) in {store.data_dir}"]
    lines += [f"skipped run #{s['run_id']}, which cannot be read ({s['why']}); delete it with "
              f"`dqlab runs --delete {s['run_id']}`" for s in skipped]
    for r in rows:
        floor = "" if r["fid_floor"] is None else f" (floor {r['fid_floor']:.2f})"
        lines.append(f"#{r['run_id']:<4} {r['created']}  {r['model']}  {r['label']:<24} N={r['num_samples']:<6} "
                     f"FID {fid_text(r['fid'], r['fid_interval'])}{floor}  "
                     f"vs FP {fid_text(r['fid_vs_fp'], r['fid_vs_fp_interval'])}  {r['seconds'] or 0:.1f}s"
                     + ("" if r.get("ssim_vs_fp") is None else f"  per seed: {per_seed_text(r)}"))
    emit(args, out, "\n".join(lines))
    return out
