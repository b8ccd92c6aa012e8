"""Shared work of the app: computed once per key for every session, safely under concurrency; results keyed
by what produced them."""
from __future__ import annotations

import threading
import time

import pytest

from analysis.app_state import SharedWork, model_key, owned_variants, produced_by


def test_thirty_sessions_asking_together_compute_once():
    work = SharedWork("test", log=lambda line: None)
    calls, waited = [], []
    start = threading.Barrier(30)

    def compute():
        calls.append(1)
        time.sleep(0.2)  # long enough that every other thread arrives while it runs
        return object()

    results = [None] * 30

    def session(i):
        start.wait()
        results[i] = work.get(("grid", "float32"), compute, on_wait=lambda: waited.append(i)).value

    threads = [threading.Thread(target=session, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and work.computed[("grid", "float32")] == 1
    assert all(r is results[0] for r in results)  # one object for everyone
    assert len(waited) >= 1  # the others were told someone else is computing


def test_keys_are_separate_and_a_failure_stores_nothing():
    lines = []
    work = SharedWork("test", max_entries=2, log=lines.append)
    a = work.get(("m", "cpu", "float32"), lambda: "fp32 grid")
    b = work.get(("m", "cpu", "float16"), lambda: "fp16 grid")
    assert (a.value, b.value) == ("fp32 grid", "fp16 grid")  # a precision switch never sees the other's result
    with pytest.raises(RuntimeError):
        work.get("broken", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert work.peek("broken") is None and work.get("broken", lambda: "ok").value == "ok"
    assert work.peek(("m", "cpu", "float32")) is None  # the oldest entry left beyond max_entries
    assert len(lines) == 3 and "computed test" in lines[0]


def test_results_are_keyed_by_source_device_and_precision(bundled):
    key = model_key(bundled)
    assert key == ("bundled:dit-mnist", "cpu", "float32")
    assert produced_by(key) == "bundled:dit-mnist on cpu, float32"
    origins = {"W8A8 from fp32": key, "W8A8 from fp16": ("bundled:dit-mnist", "cpu", "float16")}
    variants = dict.fromkeys(origins)
    assert owned_variants(variants, origins, key) == ["W8A8 from fp32"]
    assert owned_variants(variants, origins, ("bundled:dit-mnist", "cpu", "float16")) == ["W8A8 from fp16"]
