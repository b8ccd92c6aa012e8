"""The contention benchmark (`dqlab bench --contention`): the lab's jobs quiet and beside a busy load, per
thread policy, every figure a ratio of timings taken in this one run.

A thread pool's wait policy is fixed when the pool is created, so each policy runs in its own process
(`python -m analysis.evaluation.contention JOB,...`), which loads the bundled model, runs each job once untimed (warm-up)
and then `repeats` timed runs, and prints one JSON line. Each policy runs twice: quiet (no load of ours) and
busy, beside one CPU-bound process per usable CPU that this module starts and always stops (they also end by
themselves after `busy_limit` seconds, so a killed benchmark leaves nothing behind for long). "Quiet" means
only that: other processes on the machine still run, which is why the load average is recorded with each run.

Jobs (small on purpose, so that one policy's pair takes seconds): sampling (10 digits), salience collection,
calibrate + quantize (FP calibration sampling and PTQ4DiT W8A8), and a short BKD (block-wise distillation).
Goals: busy / quiet <= 2.5 for each job under the lab's policy (one busy process
per core halves the CPU, so about 2 is the floor), and the lab's quiet time within 5% of the best policy's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

JOBS = ("sampling", "salience", "quantize", "bkd")
# The app's first answers at its default settings (Home: 10 digits x 2 seeds, 20 steps; Salience: 16 samples,
# 50 steps, error at 4 and 8 bits): not in the default set, they take longer
APP_JOBS = ("app-first-grid", "app-salience")
POLICIES = ("default", "1 thread", "N threads + PASSIVE", "lab")
GOALS = {"busy_vs_quiet": 2.5, "quiet_vs_best": 1.05}
_OMP = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


@dataclasses.dataclass
class ContentionOptions:
    jobs: tuple[str, ...] = JOBS
    policies: tuple[str, ...] = POLICIES
    steps: int = 10  # DDIM steps of sampling, salience and calibration
    repeats: int = 1  # timed runs per job and setting, median kept
    busy_limit: float = 900.0  # seconds a busy process lives at most, whatever happens to this one
    job_timeout: float = 300.0  # seconds one policy's process may take before it is stopped and marked

    def validate(self) -> "ContentionOptions":
        bad = [j for j in self.jobs if j not in JOBS + APP_JOBS] + [p for p in self.policies if p not in POLICIES]
        if bad or not self.jobs or not self.policies:
            raise ValueError(f"unknown contention job or policy {bad[0] if bad else '(none)'}; jobs: "
                             f"{', '.join(JOBS + APP_JOBS)}; policies: {', '.join(POLICIES)}")
        if self.steps < 1 or self.repeats < 1:
            raise ValueError("contention steps and repeats must be at least 1")
        return self


def policy_env(policy: str, cpus: int) -> dict:
    """The environment of a policy's process: the OpenMP variables removed, then the policy's own."""
    env = {k: v for k, v in os.environ.items() if k not in _OMP}
    if policy == "1 thread":
        env["OMP_NUM_THREADS"] = "1"
    elif policy == "N threads + PASSIVE":
        env.update(OMP_NUM_THREADS=str(cpus), OMP_WAIT_POLICY="PASSIVE")
    # "default": torch's own pool (one thread per CPU, OpenMP's default wait); "lab": analysis.threads decides
    return env


class BusyLoad:
    """One CPU-bound process per CPU, each ending by itself after `limit` seconds; stopped on exit."""

    def __init__(self, processes: int, limit: float):
        self.processes, self.limit, self.procs = processes, limit, []

    def __enter__(self):
        spin = f"import time\nend = time.monotonic() + {self.limit}\nwhile time.monotonic() < end:\n    pass\n"
        try:
            for _ in range(self.processes):
                self.procs.append(subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        except BaseException:
            self.__exit__()
            raise
        time.sleep(0.5)  # let them start spinning before the clock does
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def _run_policy(policy: str, opts: ContentionOptions, cpus: int) -> dict:
    cmd = [sys.executable, "-m", "analysis.evaluation.contention", ",".join(opts.jobs), "--steps", str(opts.steps),
           "--repeats", str(opts.repeats)] + (["--lab"] if policy == "lab" else [])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        done = subprocess.run(cmd, env=policy_env(policy, cpus), capture_output=True, text=True,
                              timeout=opts.job_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {opts.job_timeout:.0f} s", "load_before": load}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}", "load_before": load}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load}


def run_contention(opts: ContentionOptions, on_stage=None) -> dict:
    """Every policy quiet then busy (interleaved, so slow drift of the machine's own load hits both), with
    ratios: busy / quiet per job and policy, and each policy's quiet time / the best policy's."""
    from analysis.threads import usable_cpus

    opts.validate()
    say = on_stage or (lambda text: None)
    cpus = usable_cpus()
    runs: dict[str, dict] = {}
    for policy in opts.policies:
        say(f"contention: {policy}, quiet")
        quiet = _run_policy(policy, opts, cpus)
        say(f"contention: {policy}, beside {cpus} busy processes")
        with BusyLoad(cpus, opts.busy_limit):
            busy = _run_policy(policy, opts, cpus)
        runs[policy] = {"quiet": quiet, "busy": busy}
        say(f"contention: {policy}: quiet {quiet.get('seconds') or quiet.get('error')}, "
            f"busy {busy.get('seconds') or busy.get('error')}")
    table = []
    for job in opts.jobs:
        quiet_times = {p: r["quiet"].get("seconds", {}).get(job) for p, r in runs.items()}
        best = min((t for t in quiet_times.values() if t), default=None)
        for policy, r in runs.items():
            q, b = quiet_times[policy], r["busy"].get("seconds", {}).get(job)
            table.append({"job": job, "policy": policy, "threads": r["quiet"].get("threads"),
                          "busy_threads": r["busy"].get("threads"), "quiet_s": q, "busy_s": b,
                          "busy_vs_quiet": round(b / q, 2) if q and b else None,
                          "quiet_vs_best": round(q / best, 3) if q and best else None})
    lab = [row for row in table if row["policy"] == "lab"]
    goals = [{"goal": f"{row['job']}: busy / quiet, lab policy", "value": row["busy_vs_quiet"],
              "bound": f"<= {GOALS['busy_vs_quiet']}",
              "met": row["busy_vs_quiet"] is not None and row["busy_vs_quiet"] <= GOALS["busy_vs_quiet"]}
             for row in lab]
    goals += [{"goal": f"{row['job']}: quiet / best policy's quiet, lab policy", "value": row["quiet_vs_best"],
               "bound": f"<= {GOALS['quiet_vs_best']}",
               "met": row["quiet_vs_best"] is not None and row["quiet_vs_best"] <= GOALS["quiet_vs_best"]}
              for row in lab]
    return {"cpus": cpus, "busy_processes": cpus, "steps": opts.steps, "repeats": opts.repeats,
            "runs": runs, "table": table, "goals": goals}


def markdown(result: dict) -> str:
    lines = [f"Contention: each job quiet and beside {result['busy_processes']} busy processes (one per usable CPU), "
             f"{result['steps']} steps, median of {result['repeats']}; \"quiet\" = no load of this benchmark's own "
             "(the load average before each run is in the JSON).", "",
             "| job | policy | threads | quiet s | busy s | busy / quiet | quiet / best |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for row in result["table"]:
        lines.append(f"| {row['job']} | {row['policy']} | {row['threads']} | {fmt(row['quiet_s'], '.2f')} | "
                     f"{fmt(row['busy_s'], '.2f')} | {fmt(row['busy_vs_quiet'], '.2f')}x | "
                     f"{fmt(row['quiet_vs_best'], '.2f')}x |")
    errors = [f"{p} {side}: {r[side]['error']}" for p, r in result["runs"].items() for side in ("quiet", "busy")
              if "error" in r[side]]
    if errors:
        lines += ["", "Failed: " + "; ".join(errors)]
    lines += ["", "| goal | measured | bound | met |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['value']} | {g['bound']} | {'yes' if g['met'] else 'no'} |" for g in result["goals"]]
    return "\n".join(lines)


# ---- the per-policy process -------------------------------------------------------------------------------

def _jobs(bundle, steps: int) -> dict:
    """name -> a callable running that job once on the bundled model."""
    from analysis.quantization.calibration import calibration_for
    from analysis.salience.collect import SalienceConfig, collect
    from analysis.models.sampling import sample
    from quant.api import quantize
    from quant.config import QuantConfig

    digits = list(range(10))
    cal = calibration_for(bundle, steps=steps, num_samples=4)
    batches = list(cal.batches(64))
    bkd = QuantConfig(method="baseline", w_bits=4, a_bits=8, tpq=True, recon="bkd", recon_iters=4, recon_rows=32,
                      recon_batch=16)

    def quantize_job():
        data = calibration_for(bundle, steps=steps, num_samples=4)
        quantize(bundle.denoiser, QuantConfig(method="ptq4dit", w_bits=8, a_bits=8), list(data.batches(64)))

    return {"sampling": lambda: sample(bundle, digits, [0] * 10, steps=steps, decode=False),
            "salience": lambda: collect(bundle, SalienceConfig(steps=steps, samples=4)),
            "quantize": quantize_job,
            "bkd": lambda: quantize(bundle.denoiser, bkd, batches),
            "app-first-grid": lambda: sample(bundle, digits * 2, [0] * 10 + [1] * 10, steps=20),
            "app-salience": lambda: collect(bundle, SalienceConfig(steps=50, samples=16, mse_bits=(4, 8)))}


def _child(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m analysis.evaluation.contention")
    p.add_argument("jobs")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--lab", action="store_true", help="apply the lab's thread policy (analysis.threads)")
    args = p.parse_args(argv)
    policy = None
    if args.lab:
        from analysis.threads import configure

        policy = configure().to_dict()
    import torch

    from analysis.models.loading import load
    from analysis.quiet import configure_logging

    configure_logging()
    bundle = load("bundled:dit-mnist", device="cpu")
    jobs = _jobs(bundle, args.steps)  # its calibration sampling is the warm-up (allocator, kernel choice)
    seconds = {}
    for name in args.jobs.split(","):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jobs[name]()
            times.append(time.perf_counter() - t0)
        seconds[name] = round(sorted(times)[len(times) // 2], 3)
    print(json.dumps({"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                      "policy": policy, "seconds": seconds}))


if __name__ == "__main__":
    _child(sys.argv[1:])
