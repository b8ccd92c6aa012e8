"""The run store: every finished evaluation, kept in SQLite with its image grids beside it.

Layout under the data directory (default ~/.dqlab; override with an argument or $DQLAB_HOME):
    runs.sqlite            one row per finished run
    runs/<uid>/*.png       the run's image files (grids)
    fidelity_cache/        torch-fidelity's cached reference features

Crash safety, in order: (1) the run's files are written into a hidden temporary folder, which is then renamed
to runs/<uid> in one atomic step; (2) the row is inserted in one SQLite transaction. A job killed before (2)
commits leaves at most a folder no row points to (ignored, and swept later); SQLite's journal rolls back a
transaction that never committed, so there is never a half-written row, and a committed row always finds
its files.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import shutil
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Callable

from quant.config import quantizes

DATA_ENV = "DQLAB_HOME"
DB_NAME = "runs.sqlite"
SCHEMA_VERSION = 2  # 2: the recipe column (source + QuantConfig + calibration spec)
ORPHAN_MIN_AGE_S = 3600.0  # a folder without a row may belong to a job still committing: sweep only old ones

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT UNIQUE NOT NULL,
    created TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    label TEXT NOT NULL,
    w_bits INTEGER,
    a_bits INTEGER,
    config TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    steps INTEGER,
    guidance REAL,
    scheduler TEXT,
    seeds TEXT NOT NULL,
    labels TEXT NOT NULL,
    feature_extractor TEXT,
    fid REAL,
    fid_vs_fp REAL,
    label_agreement REAL,
    metrics TEXT NOT NULL,
    timings TEXT NOT NULL,
    versions TEXT NOT NULL,
    files TEXT NOT NULL,
    note TEXT,
    recipe TEXT
);
CREATE INDEX IF NOT EXISTS runs_model_method ON runs (model, method);
"""


def default_data_dir() -> Path:
    """$DQLAB_HOME if set, else ~/.dqlab."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".dqlab").expanduser()


def versions() -> dict:
    """Library versions that can change a result, recorded with every run."""
    import platform

    out = {"python": platform.python_version()}
    for mod in ("torch", "diffusers", "torch_fidelity", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing optional library is recorded as absent, not fatal
            out[mod] = None
    try:
        from importlib.metadata import version

        out["dqlab"] = version("dqlab")
    except Exception:
        out["dqlab"] = None
    return out


@dataclasses.dataclass
class RunRecord:
    """What an evaluation hands to the store. metrics/timings are flat JSON-able dicts."""

    model: str
    method: str
    config: dict
    num_samples: int
    seeds: list[int]
    labels: list[int]
    metrics: dict
    timings: dict
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    label: str | None = None
    note: str | None = None
    recipe: dict | None = None  # analysis.quantization.recipe.Recipe.to_dict(): what rebuilds the scored model


@dataclasses.dataclass
class Run:
    """A stored run, as read back."""

    id: int
    uid: str
    created: str
    model: str
    method: str
    label: str
    w_bits: int | None
    a_bits: int | None
    config: dict
    num_samples: int
    steps: int | None
    guidance: float | None
    scheduler: str | None
    seeds: list[int]
    labels: list[int]
    feature_extractor: str | None
    fid: float | None
    fid_vs_fp: float | None
    label_agreement: float | None
    metrics: dict
    timings: dict
    versions: dict
    files: dict[str, Path]  # name -> absolute path
    note: str | None
    recipe: dict | None = None  # None for FP runs and runs stored before recipes were

    def summary(self) -> dict:
        """One flat row for tables and `dqlab runs` (seeds and labels summarised, not listed)."""
        return {"run_id": self.id, "created": self.created, "model": self.model, "method": self.method,
                "label": self.label, "w_bits": self.w_bits, "a_bits": self.a_bits,
                "num_samples": self.num_samples, "steps": self.steps, "guidance": self.guidance,
                "feature_extractor": self.feature_extractor, "fid": self.fid,
                "fid_interval": self.metrics.get("fid_interval"), "fid_floor": self.metrics.get("fid_floor"),
                "fid_vs_fp": self.fid_vs_fp, "fid_vs_fp_interval": self.metrics.get("fid_vs_fp_interval"),
                "label_agreement": self.label_agreement, "seconds": self.timings.get("total"),
                "seeds": _range_text(self.seeds), "note": self.note}


def _range_text(values: list[int]) -> str:
    if not values:
        return ""
    if values == list(range(values[0], values[0] + len(values))):
        return f"{values[0]}-{values[-1]}" if len(values) > 1 else str(values[0])
    return f"{len(values)} seeds"


class Store:
    """SQLite run history under `data_dir` (see module docstring). Safe to open from several processes."""

    def __init__(self, data_dir: str | os.PathLike | None = None):
        self.data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
        try:
            (self.data_dir / "runs").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create the data directory {self.data_dir}: {exc.strerror or exc}; "
                             f"pass another one or set {DATA_ENV}") from None
        self.db_path = self.data_dir / DB_NAME
        with self._connect() as conn:
            conn.executescript(_SCHEMA)
            columns = {r["name"] for r in conn.execute("PRAGMA table_info(runs)")}
            if "recipe" not in columns:  # a store made by schema 1: its runs keep recipe NULL
                conn.execute("ALTER TABLE runs ADD COLUMN recipe TEXT")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.close()

    @property
    def cache_dir(self) -> Path:
        """Where torch-fidelity keeps cached reference features for this store."""
        return self.data_dir / "fidelity_cache"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)  # explicit BEGIN/COMMIT
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")  # readers (the app) never block the writer (a CLI job)
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    # ---- writing ------------------------------------------------------------------------------------

    def add(self, record: RunRecord, files: dict[str, object] | None = None,
            _before_commit: Callable[[], None] | None = None) -> int:
        """Store one finished run with its files ({name: PIL image | bytes}, saved as runs/<uid>/<name>).
        Returns the new run id. Files go to disk first; the row commits last, in one transaction.
        `_before_commit` runs inside the open transaction after the INSERT (tests use it to kill the job)."""
        uid = uuid.uuid4().hex
        final_dir = self.data_dir / "runs" / uid
        written = self._write_files(uid, files or {})
        cfg = record.config or {}
        m = record.metrics or {}
        row = {
            "uid": uid, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": record.model, "method": record.method, "label": record.label or record.method,
            "w_bits": cfg.get("w_bits") if quantizes(record.method) else None,
            "a_bits": cfg.get("a_bits") if quantizes(record.method) else None,
            "config": json.dumps(cfg, sort_keys=True), "num_samples": int(record.num_samples),
            "steps": record.steps, "guidance": record.guidance, "scheduler": record.scheduler,
            "seeds": json.dumps([int(s) for s in record.seeds]),
            "labels": json.dumps([int(v) for v in record.labels]),
            "feature_extractor": m.get("feature_extractor"), "fid": m.get("fid"), "fid_vs_fp": m.get("fid_vs_fp"),
            "label_agreement": m.get("label_agreement"),
            "metrics": json.dumps(m, default=_json_default), "timings": json.dumps(record.timings or {}),
            "versions": json.dumps(versions()), "files": json.dumps(sorted(written)), "note": record.note,
            "recipe": None if record.recipe is None else json.dumps(record.recipe, sort_keys=True),
        }
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                               list(row.values()))
            run_id = int(cur.lastrowid)
            if _before_commit is not None:
                _before_commit()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            shutil.rmtree(final_dir, ignore_errors=True)
            raise
        finally:
            conn.close()
        return run_id

    def _write_files(self, uid: str, files: dict[str, object]) -> list[str]:
        runs = self.data_dir / "runs"
        tmp = runs / f".tmp-{uid}"
        tmp.mkdir(parents=True)
        names = []
        try:
            for name, content in files.items():
                if Path(name).name != name or name.startswith("."):
                    raise ValueError(f"run file name {name!r} must be a plain file name")
                data = content if isinstance(content, (bytes, bytearray)) else _png_bytes(content)
                with open(tmp / name, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                names.append(name)
            os.replace(tmp, runs / uid)  # atomic: the folder appears complete or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return names

    def delete(self, run_id: int) -> bool:
        """Remove a run: the row first (in a transaction), then its folder. False if there was no such run."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            got = conn.execute("SELECT uid FROM runs WHERE id = ?", (int(run_id),)).fetchone()
            if got is None:
                conn.execute("ROLLBACK")
                return False
            conn.execute("DELETE FROM runs WHERE id = ?", (int(run_id),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()
        shutil.rmtree(self.data_dir / "runs" / got["uid"], ignore_errors=True)
        return True

    def sweep_orphans(self, min_age_s: float = ORPHAN_MIN_AGE_S) -> list[str]:
        """Delete run folders that no row points to (left by jobs killed before committing), if older than
        `min_age_s` (a younger one may belong to a job that is committing right now). Returns their names."""
        conn = self._connect()
        try:
            known = {r["uid"] for r in conn.execute("SELECT uid FROM runs")}
        finally:
            conn.close()
        removed, now = [], time.time()
        for path in (self.data_dir / "runs").iterdir():
            uid = path.name.removeprefix(".tmp-")
            if uid in known or not path.is_dir():
                continue
            if now - path.stat().st_mtime >= min_age_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed

    # ---- reading ------------------------------------------------------------------------------------

    def get(self, run_id: int) -> Run:
        conn = self._connect()
        try:
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (int(run_id),)).fetchone()
        finally:
            conn.close()
        if row is None:
            raise ValueError(f"no stored run with id {run_id} in {self.db_path}; list them with `dqlab runs`")
        return self._to_run(row)

    def list(self, model: str | None = None, method: str | None = None, w_bits: int | None = None,
             a_bits: int | None = None, limit: int | None = None) -> list[Run]:
        """Stored runs, newest first, filtered by whichever arguments are given."""
        where, args = [], []
        for col, value in (("model", model), ("method", method), ("w_bits", w_bits), ("a_bits", a_bits)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        conn = self._connect()
        try:
            rows = conn.execute(sql, args).fetchall()
        finally:
            conn.close()
        return [self._to_run(r) for r in rows]

    def count(self) -> int:
        conn = self._connect()
        try:
            return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
        finally:
            conn.close()

    def integrity_ok(self) -> bool:
        conn = self._connect()
        try:
            return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()

    def _to_run(self, row: sqlite3.Row) -> Run:
        folder = self.data_dir / "runs" / row["uid"]
        return Run(id=row["id"], uid=row["uid"], created=row["created"], model=row["model"], method=row["method"],
                   label=row["label"], w_bits=row["w_bits"], a_bits=row["a_bits"], config=json.loads(row["config"]),
                   num_samples=row["num_samples"], steps=row["steps"], guidance=row["guidance"],
                   scheduler=row["scheduler"], seeds=json.loads(row["seeds"]), labels=json.loads(row["labels"]),
                   feature_extractor=row["feature_extractor"], fid=row["fid"], fid_vs_fp=row["fid_vs_fp"],
                   label_agreement=row["label_agreement"], metrics=json.loads(row["metrics"]),
                   timings=json.loads(row["timings"]), versions=json.loads(row["versions"]),
                   files={n: folder / n for n in json.loads(row["files"])}, note=row["note"],
                   recipe=json.loads(row["recipe"]) if row["recipe"] else None)


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
