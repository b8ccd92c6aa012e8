"""dqlab eval: quantize (or not), sample FP and the variant at the same seeds, score with FID, store the run."""
from __future__ import annotations

import sys
from pathlib import Path

from analysis.cli import CLIError, add_common, add_guidance, emit
from analysis.cli.quantize import add_quant_options, check_excludes, config_from_args


def register(sub) -> None:
    p = sub.add_parser("eval", help="quantize, sample, and score one configuration (FID vs real and vs FP)")
    add_common(p)
    q = add_quant_options(p, default_method="fp")
    q.add_argument("--calib-samples", type=int, default=None, help="images sampled for calibration")
    s = p.add_argument_group("sampling and scoring")
    s.add_argument("--num-samples", type=int, default=2048, help="images per model (default: %(default)s)")
    s.add_argument("--steps", type=int, default=50)
    add_guidance(s, "the model's evaluation guidance, the FID protocol")
    s.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim")
    s.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed+i and class i mod K")
    s.add_argument("--batch-size", type=int, default=None, help="images per sampling batch (default: by device)")
    s.add_argument("--reference", type=Path, default=None,
                   help="folder of real images (default: the bundled digits for bundled:dit-mnist)")
    s.add_argument("--feature-extractor", default="auto", help="auto, digits or inception (default: %(default)s)")
    s.add_argument("--inception-weights", default=None,
                   help="torch-fidelity Inception weights file (or set DQLAB_INCEPTION_WEIGHTS)")
    s.add_argument("--isc", action="store_true", help="also Inception Score")
    s.add_argument("--kid", action="store_true", help="also KID")
    s.add_argument("--prc", action="store_true", help="also precision and recall")
    s.add_argument("--kid-subset-size", type=int, default=None, help="KID subset size (default: min(1000, N))")
    s.add_argument("--bootstrap", type=int, default=None, metavar="R",
                   help="bootstrap replicates per FID interval (default: 200, 25 for Inception; 0: no interval)")
    st = p.add_argument_group("run store")
    st.add_argument("--data-dir", default=None, help="run store folder (default: $DQLAB_HOME or ~/.dqlab)")
    st.add_argument("--no-store", action="store_true", help="do not record the run")
    st.add_argument("--no-fp-cache", action="store_true", help="sample FP even if cached")
    st.add_argument("--note", default=None, help="free text stored with the run")
    p.set_defaults(func=run)


def run(args) -> dict:
    from analysis.evaluation.distributed import init_from_env, local_device
    from analysis.evaluation.evaluate import PER_SEED_KEYS, EvalOptions, check_options, eval_guidance, evaluate
    from analysis.evaluation.metrics import fid_text
    from analysis.evaluation.per_seed import per_seed_text
    from analysis.evaluation.store import Store
    from analysis.models.loading import load

    config = config_from_args(args)
    if args.calib_samples is not None and args.calib_samples < 1:
        raise CLIError(f"--calib-samples must be at least 1, got {args.calib_samples}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    opts = EvalOptions(num_samples=args.num_samples, steps=args.steps, guidance=args.guidance,
                       scheduler=args.scheduler, seed=args.seed, reference=args.reference,
                       extractor=args.feature_extractor, isc=args.isc, kid=args.kid, prc=args.prc,
                       kid_subset_size=args.kid_subset_size, inception_weights=args.inception_weights,
                       batch_size=args.batch_size, cache_fp=not args.no_fp_cache, calib_samples=args.calib_samples,
                       bootstrap=args.bootstrap)
    rank, size = init_from_env()  # under torchrun: join the group, each rank samples a share of the images
    store = None if args.no_store or rank != 0 else Store(args.data_dir)
    if args.reference is not None and not args.reference.is_dir():
        raise CLIError(f"--reference {args.reference} is not a folder of images")
    device = args.device
    if size > 1 and device in ("auto", "cuda"):
        device = str(local_device())  # one GPU per rank
    bundle = load(args.model, device=device, dtype=args.dtype)
    check_excludes(bundle, config)
    check_options(bundle, opts)  # bad reference folder, missing Inception weights, KID sizes: before any work
    show = None
    if sys.stderr.isatty() and rank == 0:
        show = lambda stage, frac: print(f"\r[{frac:6.1%}] {stage[:70]:<70}", end="", file=sys.stderr)  # noqa: E731
    result = evaluate(bundle, config, opts, store=store, on_progress=show, note=args.note)
    if show:
        print(file=sys.stderr)
    if result is None:  # not rank 0: its images went to rank 0, which reports
        return {}
    m = result.metrics
    out = {"model": args.model, "method": config.method, "label": config.label, "run_id": result.run_id,
           "fid": m.get("fid"), "fid_interval": m.get("fid_interval"), "fid_floor": m.get("fid_floor"),
           "fid_vs_fp": m.get("fid_vs_fp"), "fid_vs_fp_interval": m.get("fid_vs_fp_interval"),
           "interval_level": m.get("interval_level"), "interval_method": m.get("interval_method"),
           "bootstrap_replicates": m.get("bootstrap_replicates"), "interval_estimand": m.get("interval_estimand"),
           "num_samples": m["num_samples"], "reference_size": m.get("reference_size"),
           "floor_sizes": m.get("floor_sizes"), "floor_definition": m.get("floor_definition"),
           **{k: m.get(k) for k in PER_SEED_KEYS}, "per_seed_methods": m.get("per_seed_methods"),
           "feature_extractor": m.get("feature_extractor"),
           "seconds": result.timings.get("total"), "steps": args.steps, "scheduler": args.scheduler,
           "guidance": eval_guidance(bundle, opts), "warning": m.get("warning"), "processes": size}
    if "label_agreement" in m:
        out["label_agreement"] = m["label_agreement"]
        out["label_agreement_interval"] = m.get("label_agreement_interval")
    for key in ("isc_mean", "isc_std", "kid_mean", "kid_std", "kid_subset_size", "precision", "recall", "f_score"):
        if key in m:
            out[key] = m[key]
    out["timings"] = result.timings
    out["config"] = config.to_dict()
    human = (f"{config.label}: FID vs real {fid_text(out['fid'], out['fid_interval'])}"
             + ("" if out["fid_floor"] is None else f" (real-vs-real floor {out['fid_floor']:.2f})")
             + f", FID vs FP {fid_text(out['fid_vs_fp'], out['fid_vs_fp_interval'])}"
             f" (N={out['num_samples']}, guidance {out['guidance']:g}, {out['feature_extractor']})"
             + (f", label agreement {out['label_agreement']:.1%} (N={out['num_samples']})" if "label_agreement" in out else "")
             + f", {out['seconds']:.1f}s" + (f", run {result.run_id}" if result.run_id else "")
             + f"\nper seed vs FP: {per_seed_text(out)}"
             + (f"\nwarning: {out['warning']}" if out["warning"] else ""))
    emit(args, out, human)
    return out

