"""The thread policy (analysis.threads): decided from CPUs, load and the user's choices, applied before torch
makes its pool, reported in the CLI's JSON; and the contention benchmark's busy load always stops."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis import threads
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_automatic_count_is_one_thread_per_usable_cpu_and_small_jobs_take_fewer():
    assert threads.automatic_threads(8, 0.2)[0] == 8
    assert threads.automatic_threads(2, 7.5)[0] == 2  # sleeping workers: each thread is a share of a busy CPU
    assert threads.automatic_threads(4, None)[0] == 4
    assert 1 <= threads.usable_cpus() <= os.cpu_count()

    class DiT:  # a diffusers DiT config's fields
        num_attention_heads, attention_head_dim, sample_size, patch_size = 2, 64, 16, 2
    assert threads.dit_macs_per_matmul(DiT, 2) == 2 * 64 * 128 * 128
    assert threads.dit_macs_per_matmul(object(), 2) is None


def test_user_choices_win_over_the_automatic_one():
    env = {"OMP_NUM_THREADS": "3"}
    p = threads.decide(environ=env, others=2.0)
    assert (p.threads, p.source, p.wait, p.wait_source) == (3, "environment", "PASSIVE", "automatic")
    p = threads.decide(environ={"OMP_WAIT_POLICY": "active", "OMP_NUM_THREADS": "4,2"})
    assert (p.threads, p.wait, p.wait_source) == (4, "ACTIVE", "environment")
    p = threads.decide(threads=2, environ=env)
    assert (p.threads, p.source) == (2, "--threads")
    p = threads.decide(environ={})
    assert p.source == "automatic" and p.wait in ("PASSIVE", "BRIEF") and 1 <= p.threads <= p.cpus <= os.cpu_count()
    p = threads.decide(environ={"GOMP_SPINCOUNT": "1000"})
    assert (p.wait, p.wait_source, p.others) == ("BRIEF", "environment", None)
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        threads.decide(environ={"OMP_NUM_THREADS": "many"})


def test_wait_policy_follows_what_other_processes_use_and_a_server_sleeps():
    assert threads.decide(environ={}, others=0.1).wait == "BRIEF"  # quiet: bounded spin, OpenMP's quiet speed
    busy = threads.decide(environ={}, others=1.6)
    assert busy.wait == "PASSIVE" and "others busy on 1.6" in busy.reason
    assert threads.decide(environ={}, others=None).wait == "PASSIVE"  # unmeasurable: the safe choice
    server = threads.decide(environ={}, others=0.0, server=True)
    assert (server.wait, server.others) == ("PASSIVE", None) and "server" in server.reason
    assert threads.decide(environ={"OMP_WAIT_POLICY": "active"}, server=True).wait == "ACTIVE"  # the user wins
    assert "spin briefly" in threads.decide(environ={}, others=0.0).describe()


def test_other_processes_cpu_use_is_measured_without_counting_our_own():
    from analysis.evaluation.contention import BusyLoad

    with BusyLoad(1, limit=30):
        beside_one = threads.others_busy(window=0.3)
    if beside_one is None:
        pytest.skip("no /proc/stat here")
    assert beside_one >= 0.5  # the spinning process holds about one CPU


def test_threads_flag_is_read_before_the_parser():
    assert threads.threads_arg(["sample", "--threads", "3"]) == "3"
    assert threads.threads_arg(["sample", "--threads=1", "--json"]) == "1"
    assert threads.threads_arg(["sample", "--json"]) is None


def test_cli_json_reports_the_policy_and_takes_threads(capsys):
    import torch

    before = torch.get_num_threads()
    try:
        code, out, _ = run_cli(capsys, "models", "--threads", "1", "--json")
        assert code == 0
        policy = json.loads(out)["thread_policy"]
        assert policy["threads"] == 1 == torch.get_num_threads() and policy["source"] == "--threads"
    finally:
        torch.set_num_threads(before)
    code, _, err = run_cli(capsys, "models", "--threads", "0")
    assert code == 2 and "--threads" in err and len(err.strip().splitlines()) == 1


def test_a_fresh_process_sets_the_policy_before_torch_makes_its_pool():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "analysis.cli", "models", "--json"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    policy = json.loads(done.stdout)["thread_policy"]
    assert policy["before_torch"] and policy["source"] == "automatic"
    assert policy["wait"] == ("PASSIVE" if policy["others"] >= threads.BUSY_CPUS else "BRIEF")
    assert 1 <= policy["threads"] <= policy["cpus"]


def test_busy_load_processes_are_stopped_also_on_error():
    from analysis.evaluation.contention import BusyLoad

    pids = []
    with pytest.raises(RuntimeError):
        with BusyLoad(2, limit=60) as load:
            pids = [p.pid for p in load.procs]
            assert all(p.poll() is None for p in load.procs)  # spinning
            raise RuntimeError("a job failed")
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped: gone


def test_policy_environments_differ_only_in_the_openmp_variables():
    from analysis.evaluation.contention import policy_env

    assert "OMP_NUM_THREADS" not in policy_env("default", 4) and "OMP_WAIT_POLICY" not in policy_env("lab", 4)
    assert policy_env("1 thread", 4)["OMP_NUM_THREADS"] == "1"
    env = policy_env("N threads + PASSIVE", 4)
    assert (env["OMP_NUM_THREADS"], env["OMP_WAIT_POLICY"]) == ("4", "PASSIVE")
