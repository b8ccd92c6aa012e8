"""Run the hostile-input suite (tests/hostile_cases.py) and the fuzz pass, and print the outcome table by surface
(the closing note's table), then every case that did not end cleanly and the fuzz counts.

    python scripts/hostile_report.py [--json] [--fuzz-count 400] [--fuzz-seconds 120]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


HUGE_CASES = ["num_layers 100000", "attention_head_dim 10^6", "sample_size 10^5",
              "width x depth past the parameter bound", "num_layers 100000 in transformer_config",
              "a huge latent shape"]
# VmHWM (peak resident set of this process image; unlike ru_maxrss it is not inherited across exec), in KiB
CHILD = """
import sys
sys.path.insert(0, {root!r})
from analysis.cli import main
rc = main({argv!r})
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")]
print("RSS", hwm[0] if hwm else "nan", "RC", rc)
"""


def peak_memory(ctx, cases) -> list[dict]:
    """Peak resident memory of a fresh process running each huge-config case, beside a process that loads the
    same (undamaged) model: the bound is checked before anything large is allocated."""
    import subprocess

    from tests.hostile_cases import Context, sample_argv  # noqa: F401

    root = str(Path(__file__).resolve().parents[1])
    rows = []

    def rss(argv) -> tuple[float, str]:
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=root, argv=argv)], capture_output=True,
                             text=True, timeout=600)
        line = [x for x in out.stdout.splitlines() if x.startswith("RSS")]
        return (float(line[0].split()[1]) / 1024 if line else float("nan")), out.stderr.strip().splitlines()[-1:]

    base_mib, _ = rss(["sample", "--model", str(ctx.dit), "--classes", "0", "--seeds", "0", "--steps", "1",
                       "--device", "cpu", "--out", str(ctx.base / "base.png")])
    rows.append({"case": "control: the bundled DiT, undamaged (loads and samples)", "peak_mib": round(base_mib)})
    for i, case in enumerate(cases):
        d = ctx.base / "memory" / str(i)
        d.mkdir(parents=True)
        argv = [str(a) for a in case.make(ctx, d)]
        mib, err = rss(argv)
        rows.append({"case": f"{case.surface}: {case.name}", "peak_mib": round(mib), "error": err[0][:160] if err else ""})
    return rows


def main() -> int:
    from tests.hostile_cases import ALL_CASES, OUTCOMES, SURFACES, Context, fuzz_configs, fuzz_saved, run_case, table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--fuzz-count", type=int, default=400)
    p.add_argument("--fuzz-seconds", type=float, default=120.0)
    p.add_argument("--memory", action="store_true", help="only the peak memory of the huge-config cases")
    args = p.parse_args()
    if args.memory:
        with tempfile.TemporaryDirectory(prefix="dqlab-hostile-") as base:
            ctx = Context(Path(base))
            rows = peak_memory(ctx, [c for c in ALL_CASES if c.name in HUGE_CASES])
        print(json.dumps(rows, indent=2) if args.json else
              "\n".join(f"{r['peak_mib']:>6} MiB  {r['case']}  {r.get('error', '')}" for r in rows))
        return 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dqlab-hostile-") as base:
        ctx = Context(Path(base))
        results = [run_case(ctx, case, i) for i, case in enumerate(ALL_CASES)]
        saved = fuzz_saved(ctx, count=args.fuzz_count, seconds=args.fuzz_seconds)
    configs = fuzz_configs(count=10 * args.fuzz_count, seconds=args.fuzz_seconds / 4)
    bad = [r for r in results if r.outcome != "clean"]
    if args.json:
        counts = {s: {o: sum(r.outcome == o for r in results if r.case.surface == s) for o in OUTCOMES}
                  for s in SURFACES}
        print(json.dumps({"table": counts, "cases": len(results), "fuzz_saved": saved, "fuzz_configs": configs,
                          "not_clean": [{"surface": r.case.surface, "case": r.case.name, "outcome": r.outcome,
                                         "why": r.why} for r in bad],
                          "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    else:
        print(table(results))
        for r in bad:
            print(f"{r.outcome}: {r.case.surface}: {r.case.name}: {r.why}")
        for name, f in (("saved folders", saved), ("configs", configs)):
            print(f"fuzz {name}: " + ", ".join(f"{k} {v}" for k, v in f.items() if k != "examples"))
            for e in f["examples"]:
                print("   ", e)
        print(f"{time.perf_counter() - start:.0f}s")
    return 1 if bad or saved["traceback"] or saved["silent-wrong"] or configs["traceback"] or configs["silent-wrong"] \
        else 0


if __name__ == "__main__":
    sys.exit(main())
