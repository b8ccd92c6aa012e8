"""The run store: round trip, filters, and consistency when a job dies mid-write."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from analysis.evaluation.store import DATA_ENV, RunRecord, Store, default_data_dir


def _record(method="ptq4dit", w=4, a=8, fid=12.5, model="bundled:dit-mnist") -> RunRecord:
    return RunRecord(model=model, method=method, label=f"{method} W{w}A{a}",
                     config={"method": method, "w_bits": w, "a_bits": a, "alpha": 0.5},
                     num_samples=64, seeds=list(range(64)), labels=[i % 10 for i in range(64)],
                     metrics={"fid": fid, "fid_vs_fp": 3.25, "label_agreement": 0.5, "feature_extractor": "dqlab-digits",
                              "num_samples": 64, "warning": "small N"},
                     timings={"total": 9.5, "sampling": 4.0}, steps=50, guidance=4.0, scheduler="ddim", note="hi")


def test_round_trip_with_files_and_filters(tmp_path):
    store = Store(tmp_path)
    grid = Image.new("RGB", (8, 4), (255, 0, 0))
    rid = store.add(_record(), files={"grid.png": grid, "raw.bin": b"\x00\x01"})
    store.add(_record(method="baseline", fid=30.0))
    store.add(_record(method="baseline", w=8, a=8, fid=14.0, model="other"))
    run = store.get(rid)
    assert (run.model, run.method, run.label, run.w_bits, run.a_bits) == ("bundled:dit-mnist", "ptq4dit",
                                                                          "ptq4dit W4A8", 4, 8)
    assert run.config == {"method": "ptq4dit", "w_bits": 4, "a_bits": 8, "alpha": 0.5}
    assert run.seeds == list(range(64)) and run.labels[:3] == [0, 1, 2]
    assert (run.fid, run.fid_vs_fp, run.label_agreement) == (12.5, 3.25, 0.5)
    assert run.metrics["warning"] == "small N" and run.timings["total"] == 9.5
    assert run.versions["torch"] and run.steps == 50 and run.guidance == 4.0 and run.note == "hi"
    with Image.open(run.files["grid.png"]) as img:
        assert img.size == (8, 4) and img.getpixel((0, 0)) == (255, 0, 0)
    assert run.files["raw.bin"].read_bytes() == b"\x00\x01"
    assert run.summary()["seeds"] == "0-63"
    # newest first, filters combine
    assert [r.method for r in store.list()] == ["baseline", "baseline", "ptq4dit"]
    assert [r.fid for r in store.list(method="baseline", model="bundled:dit-mnist")] == [30.0]
    assert [r.fid for r in store.list(w_bits=8, a_bits=8)] == [14.0]
    assert len(store.list(limit=1)) == 1
    # a second Store on the same folder (another process, a restart) sees the same runs
    assert Store(tmp_path).count() == 3
    assert store.delete(rid) and not run.files["grid.png"].exists() and store.count() == 2
    assert not store.delete(rid)
    with pytest.raises(ValueError, match="no stored run with id"):
        store.get(rid)


def test_bad_file_names_are_refused_before_anything_is_written(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="plain file name"):
        store.add(_record(), files={"../escape.png": b"x"})
    assert store.count() == 0 and list((tmp_path / "runs").iterdir()) == []


def test_exception_inside_the_transaction_leaves_no_row_and_no_files(tmp_path):
    store = Store(tmp_path)
    keep = store.add(_record(fid=1.0), files={"grid.png": b"png"})

    def fail():
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        store.add(_record(fid=2.0), files={"grid.png": b"png"}, _before_commit=fail)
    assert [r.id for r in store.list()] == [keep]
    assert store.integrity_ok()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [store.get(keep).uid]
    # ids keep increasing: the failed insert was rolled back, the next run commits normally
    assert store.add(_record(fid=3.0)) > keep


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from analysis.evaluation.store import RunRecord, Store
    store = Store(sys.argv[1])
    rec = RunRecord(model="m", method="baseline", config={"method": "baseline"}, num_samples=2, seeds=[0, 1],
                    labels=[0, 1], metrics={"fid": 9.0}, timings={})
    # Files are written, the INSERT ran, the transaction is open: die without any cleanup.
    store.add(rec, files={"grid.png": b"x" * 1000}, _before_commit=lambda: os.kill(os.getpid(), signal.SIGKILL))
    print("unreachable")
""")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_job_killed_between_writing_files_and_committing_leaves_the_store_consistent(tmp_path):
    store = Store(tmp_path)
    first = store.add(_record(fid=1.0), files={"grid.png": b"png"})
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "unreachable" not in proc.stdout
    reopened = Store(tmp_path)
    assert reopened.integrity_ok()
    assert [r.id for r in reopened.list()] == [first]  # the half-finished run left no row
    assert reopened.get(first).files["grid.png"].read_bytes() == b"png"
    # its files are an orphan folder that nothing lists; a sweep removes it, and the store keeps working
    orphans = [p.name for p in (tmp_path / "runs").iterdir() if p.name != reopened.get(first).uid]
    assert len(orphans) == 1
    assert reopened.sweep_orphans(min_age_s=3600) == []  # too young: might belong to a job still committing
    assert reopened.sweep_orphans(min_age_s=0) == orphans
    assert reopened.add(_record(fid=5.0)) > first and reopened.count() == 2


def test_data_dir_default_and_env_override(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert default_data_dir() == Path.home() / ".dqlab"
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "elsewhere"))
    store = Store()
    assert store.data_dir == tmp_path / "elsewhere" and store.db_path.exists()
    assert Store(tmp_path / "arg").data_dir == tmp_path / "arg"  # an argument beats the environment


def test_a_store_made_before_recipes_opens_and_gains_the_recipe_column(tmp_path):
    import sqlite3

    from analysis.evaluation import store as store_module
    old_schema = store_module._SCHEMA.replace(",\n    recipe TEXT", "")
    assert "recipe" not in old_schema
    with sqlite3.connect(tmp_path / store_module.DB_NAME) as conn:
        conn.executescript(old_schema)
    store = Store(tmp_path)
    old = store.get(store.add(_record()))
    assert old.recipe is None
    recipe = {"source": "bundled:dit-mnist", "config": {"method": "baseline"}, "calibration": {"seed": 1000000}}
    new = store.get(store.add(dataclasses.replace(_record(), recipe=recipe)))
    assert new.recipe == recipe
