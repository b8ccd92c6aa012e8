"""How many CPU threads torch uses and how its idle OpenMP workers wait: decided once per process, at each entry
point (the CLI's main, the app's script, the benchmark scripts, the test suite), before torch makes its pool.

Why: OpenMP workers spin while they wait for the next parallel region. When another process holds a core, a
spinning worker that is descheduled makes every small operator wait for it: on a 2-core machine with one other
busy process, sampling the bundled DiT took 18x longer with torch's default pool than with one thread or with
idle workers that sleep (OMP_WAIT_POLICY=PASSIVE). The wait policy is read once, when the pool is created (at
`import torch`'s first parallel operator), so it has to be in the environment before then; the thread count
can change later (torch.set_num_threads).

The policy, unless the user chose (OMP_NUM_THREADS / OMP_WAIT_POLICY in the environment, or `--threads`):
    wait      from what other processes use right now (`others_busy`: their time on this process's CPUs
              over a tenth of a second, read from /proc/stat before torch loads): beside a busy process,
              PASSIVE (a worker with nothing to do sleeps instead of holding a core); on a quiet machine,
              BRIEF: workers spin for a bounded while (GOMP_SPINCOUNT=SPIN_COUNT) and then sleep, which keeps
              the quiet speed of OpenMP's spinning default (sleeping workers cost the bundled model's jobs
              1.2-2.2x there: each small operator waits for them to wake). A load that arrives later still
              costs a spinning pool dearly (sampling 4-11x beside two busy processes), so a server, whose
              sessions run side by side in one process and whose users' browsers share its CPUs, always takes
              PASSIVE (`configure(server=True)`: the app)
    threads   the CPUs this process may use (its affinity mask, capped by a cgroup CPU quota); then, once the
              job is known, no more threads than its matmuls can feed (`fit_to_job`). The 1-minute load average
              is recorded with the decision but takes no thread away (see automatic_threads: measured)
Nothing here imports torch: importing this module is safe before the decision.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys

THREADS_ENV = "OMP_NUM_THREADS"
WAIT_ENV = "OMP_WAIT_POLICY"
SPIN_ENV = "GOMP_SPINCOUNT"  # GNU OpenMP (torch's Linux wheels): busy-wait iterations before a worker sleeps
SPIN_COUNT = 100_000  # quiet: as fast as OpenMP's default (300000) on the bundled model's jobs, measured
BUSY_CPUS = 0.5  # other processes using at least this many CPUs make the machine "busy" for the wait policy
# One thread per this many multiply-adds in a job's typical matmul: below it a parallel region's wake-up and
# barrier cost more than the second thread saves (the bundled model's width-128 layers at one image sit below).
MACS_PER_THREAD = 2_000_000


@dataclasses.dataclass(frozen=True)
class ThreadPolicy:
    threads: int  # torch's intra-op threads
    wait: str  # how idle OpenMP workers wait: PASSIVE (sleep), BRIEF (spin SPIN_COUNT, then sleep) or ACTIVE
    source: str  # who chose the count: "--threads", "environment" or "automatic"
    wait_source: str  # who chose the wait policy: "environment" or "automatic"
    cpus: int  # CPUs this process may use (affinity, quota)
    load: float | None  # 1-minute load average seen at the decision (None where unreadable)
    reason: str  # one sentence: why this count
    before_torch: bool = True  # False when torch was imported before the decision (the wait policy is torch's)
    others: float | None = None  # CPUs other processes used at the decision (None: not measured)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        wait = {"PASSIVE": "idle workers sleep", "ACTIVE": "idle workers spin",
                "BRIEF": "idle workers spin briefly, then sleep"}.get(self.wait, f"wait {self.wait}")
        return f"{self.threads} CPU thread{'s' if self.threads != 1 else ''}, {wait} ({self.reason})"


_first: ThreadPolicy | None = None  # the process's decision, made once
_policy: ThreadPolicy | None = None  # what runs now (a later --threads, or fit_to_job, may change the count)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_times() -> tuple[int, int, int] | None:
    """(busy, total, cpus) jiffies of the CPUs this process may run on, summed, from /proc/stat's per-CPU lines
    (on a shared host, other tenants' cores are not ours to count); None where unreadable."""
    try:
        mine = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        mine = None
    busy = total = cpus = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *values = line.split()
                if mine is not None and int(name[3:]) not in mine:
                    continue
                fields = [int(v) for v in values]
                idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
                t = sum(fields[:8])  # guest time is already counted in user
                busy, total, cpus = busy + t - idle, total + t, cpus + 1
    except (OSError, ValueError):
        return None
    return (busy, total, cpus) if cpus else None


def others_busy(window: float = 0.1) -> float | None:
    """CPUs (of those this process may use) that other processes keep busy now: their busy time over `window`
    seconds, less this process's own, in CPUs (None where /proc/stat is unreadable). This process sleeps
    meanwhile."""
    import time

    before, own0, t0 = _cpu_times(), time.process_time(), time.monotonic()
    if before is None:
        return None
    time.sleep(window)
    after, own1, t1 = _cpu_times(), time.process_time(), time.monotonic()
    if after is None or after[1] <= before[1] or after[2] != before[2]:
        return None
    busy_share = (after[0] - before[0]) / (after[1] - before[1])  # of our CPUs
    return max(0.0, busy_share * after[2] - (own1 - own0) / max(t1 - t0, 1e-6))


def automatic_wait(others: float | None) -> str:
    """PASSIVE beside a busy process, BRIEF on a quiet machine (see the module's docstring: measured)."""
    return "PASSIVE" if others is None or others >= BUSY_CPUS else "BRIEF"


def automatic_threads(cpus: int, load: float | None) -> tuple[int, str]:
    """(threads, why): one per usable CPU. The load is read and reported but takes no thread away: Linux
    shares a busy CPU per thread, so with sleeping (PASSIVE) workers each thread is one more share of it. On 2
    cores with ~14 other runnable processes, sampling took 2.7 s with 2 PASSIVE threads and 8.0 s with 1
    (`dqlab bench --contention`); a count cut by the load lost that."""
    seen = "load unknown" if load is None else f"load {load:.1f}"
    return cpus, f"{cpus} usable CPUs, {seen}"


def _parse_threads(text: str | None, where: str) -> int | None:
    if text is None or not str(text).strip():
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{where} must be a whole number of threads, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{where} must be at least 1, got {value}")
    return value


def decide(threads: int | None = None, environ=None, others: float | None | str = "measure",
           server: bool = False) -> ThreadPolicy:
    """The policy for this process, without applying it: `threads` (the --threads flag) first, then the
    environment's OMP_NUM_THREADS / OMP_WAIT_POLICY / GOMP_SPINCOUNT, then the automatic choice. `others`: the
    CPUs other processes use ("measure": measured now, only when the wait policy is not the user's and this is
    no server)."""
    env = os.environ if environ is None else environ
    cpus, load = usable_cpus(), load_average()
    user_wait = env.get(WAIT_ENV, "").strip().upper()
    if user_wait or env.get(SPIN_ENV, "").strip():
        wait, wait_source, others = (user_wait or "BRIEF"), "environment", None
    elif server:
        wait, wait_source, others = "PASSIVE", "automatic", None
    else:
        others = others_busy() if others == "measure" else others
        wait, wait_source = automatic_wait(others), "automatic"
    policy = dict(wait=wait, wait_source=wait_source, cpus=cpus, load=load, others=others)
    if threads is not None:
        n = _parse_threads(threads, "--threads")
        return ThreadPolicy(n, source="--threads", reason="set by --threads", **policy)
    # OpenMP also takes a list for nested levels ("4,2"): the first is torch's
    from_env = _parse_threads((env.get(THREADS_ENV) or "").split(",")[0], THREADS_ENV)
    if from_env is not None:
        return ThreadPolicy(from_env, source="environment", reason=f"{THREADS_ENV}={from_env}", **policy)
    n, why = automatic_threads(cpus, load)
    if others is not None:
        why += f", others busy on {others:.1f}"
    elif server and wait_source == "automatic":
        why += ", a server's workers sleep"
    return ThreadPolicy(n, source="automatic", reason=why, **policy)


def configure(threads: int | None = None, server: bool = False) -> ThreadPolicy:
    """Decide and apply the policy for this process; call first thing at an entry point. Later calls (the CLI
    run in-process again) keep the first decision's wait policy and take a new count only from `threads`."""
    global _first, _policy
    if _first is None:
        _first = decide(threads, server=server)
        # read by OpenMP when torch creates its pool; child processes (torchrun ranks, subprocesses) inherit them
        os.environ[THREADS_ENV] = str(_first.threads)
        if _first.wait == "BRIEF":  # OpenMP's default wait, with the spin bounded
            os.environ.setdefault(SPIN_ENV, str(SPIN_COUNT))
        else:
            os.environ[WAIT_ENV] = _first.wait
        if "torch" in sys.modules:  # too late for the wait policy: the pool may exist
            _first = dataclasses.replace(_first, before_torch=False)
        policy = _first
    elif threads is not None:
        policy = dataclasses.replace(_first, threads=_parse_threads(threads, "--threads"), source="--threads",
                                     reason="set by --threads")
    else:
        policy = _first
    if "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != policy.threads:
            torch.set_num_threads(policy.threads)
    _policy = policy
    return policy


def current() -> ThreadPolicy:
    """The policy this process runs with (deciding it now if no entry point did)."""
    return _policy or configure()


def fit_to_job(macs_per_matmul: float) -> ThreadPolicy:
    """Lower the thread count for a job whose typical matmul (rows x in x out multiply-adds) cannot feed
    more threads (see MACS_PER_THREAD); never above the policy's count, and not when the user chose."""
    global _policy
    policy = current()
    if policy.source != "automatic":
        return policy
    n = max(1, min(policy.threads, int(macs_per_matmul // MACS_PER_THREAD)))
    if n != policy.threads:
        import torch

        torch.set_num_threads(n)
        _policy = dataclasses.replace(policy, threads=n, reason=f"{policy.reason}; a job this small feeds {n}")
    return _policy


def dit_macs_per_matmul(config, rows_per_forward: int) -> float | None:
    """rows x width x width of a DiT's attention projections for `rows_per_forward` images (latents) per
    forward, from a diffusers DiT config; None for other models (their count stays as decided)."""
    try:
        width = config.num_attention_heads * config.attention_head_dim
        size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        tokens = (size // config.patch_size) ** 2
    except (AttributeError, TypeError):
        return None
    return float(rows_per_forward * tokens * width * width)


def fit_to_model(config, rows_per_forward: int) -> ThreadPolicy:
    """fit_to_job for a DiT run on `rows_per_forward` latents per forward (other models: unchanged)."""
    macs = dit_macs_per_matmul(config, rows_per_forward)
    return current() if macs is None else fit_to_job(macs)


def threads_arg(argv: list[str]) -> str | None:
    """The value of --threads in a command line, read before the parser (which imports torch) exists."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return None
