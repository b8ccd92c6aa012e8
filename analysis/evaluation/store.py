"""The run store: every finished evaluation, kept in SQLite with its image grids beside it.

Layout under the data directory (default ~/.dqlab; override with an argument or $DQLAB_HOME):
    runs.sqlite            one row per finished run
    runs/<uid>/*.png       the run's image files (grids)
    fidelity_cache/        reference features cached by analysis.evaluation.metrics (read back with weights_only=True)

Crash safety, in order: (1) the run's files are written into a hidden temporary folder, which is then renamed
to runs/<uid> in one atomic step; (2) the row is inserted in one SQLite transaction. A job killed before (2)
commits leaves at most a folder no row points to (ignored, and swept later); SQLite's journal rolls back a
transaction that never committed, so there is never a half-written row, and a committed row always finds
its files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import re
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
from quant.guards import UntrustedFileError, inside, loads_json

DATA_ENV = "DQLAB_HOME"
DB_NAME = "runs.sqlite"
SCHEMA_VERSION = 2  # 2: the recipe column (source + QuantConfig + calibration spec)
ORPHAN_MIN_AGE_S = 3600.0  # a folder without a row may belong to a job still committing: sweep only old ones
MAX_FIELD_BYTES = 4 * 2 ** 20  # one JSON column of one row; the lab writes kilobytes


class StoreError(ValueError):
    """The run store cannot be used as it is (damaged, not a dqlab store, unreadable); the message names the file
    and how to move it aside. A damaged store is never replaced silently: its runs may still be recoverable."""

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
_COLUMNS = set(re.findall(r"^    (\w+) ", _SCHEMA.split("(", 1)[1], flags=re.M))


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
                "label_agreement": self.label_agreement,
                **{k: self.metrics.get(k) for k in ("same_digit_vs_fp", "same_digit_vs_fp_interval", "psnr_vs_fp",
                                                    "psnr_vs_fp_interval", "ssim_vs_fp", "ssim_vs_fp_interval")},
                "seconds": self.timings.get("total"),
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
        self.skipped: list[tuple[int, str]] = []  # (run id, why) of rows the last list() could not read
        try:
            (self.data_dir / "runs").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create the data directory {self.data_dir}: {exc.strerror or exc}; "
                             f"pass another one or set {DATA_ENV}") from None
        self.db_path = self.data_dir / DB_NAME
        if self.db_path.exists() and not self.db_path.is_file():
            raise self._damaged("it is not a file")
        with self._db() as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "runs" in tables:
                columns = {r["name"] for r in conn.execute("PRAGMA table_info(runs)")}
                missing = _COLUMNS - columns - {"recipe"}
                if missing:
                    raise self._damaged(f"its runs table lacks the column(s) {', '.join(sorted(missing))}; it was "
                                        "made by another program")
            conn.executescript(_SCHEMA)
            columns = {r["name"] for r in conn.execute("PRAGMA table_info(runs)")}
            if "recipe" not in columns:  # a store made by schema 1: its runs keep recipe NULL
                conn.execute("ALTER TABLE runs ADD COLUMN recipe TEXT")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _damaged(self, why: str) -> StoreError:
        return StoreError(f"the run store {self.db_path} cannot be used: {why}. Move it aside (mv {self.db_path} "
                          f"{self.db_path}.damaged) and run again to start an empty store, or pass another "
                          f"--data-dir / {DATA_ENV}")

    @contextlib.contextmanager
    def _db(self):
        """A connection whose SQLite errors become one StoreError naming the file (closed on exit)."""
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise self._damaged(f"{exc}") from None
        try:
            yield conn
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise self._damaged(f"{exc}") from None
        finally:
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
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            shutil.rmtree(final_dir, ignore_errors=True)
            raise self._damaged(f"{exc}") from None
        try:
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                               list(row.values()))
            run_id = int(cur.lastrowid)
            if _before_commit is not None:
                _before_commit()
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            shutil.rmtree(final_dir, ignore_errors=True)
            if isinstance(exc, sqlite3.Error):
                raise self._damaged(f"{exc}") from None
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
        """Remove a run: the row first (in a transaction), then its folder, which must be a plain name inside
        runs/ (a row whose stored uid points elsewhere loses its row; nothing outside the store is touched).
        False if there was no such run."""
        with self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            got = conn.execute("SELECT uid FROM runs WHERE id = ?", (int(run_id),)).fetchone()
            if got is None:
                conn.execute("ROLLBACK")
                return False
            conn.execute("DELETE FROM runs WHERE id = ?", (int(run_id),))
            conn.execute("COMMIT")
        try:
            folder = self._run_folder(got["uid"])
        except UntrustedFileError:
            return True
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
        return True

    def _run_folder(self, uid) -> Path:
        """runs/<uid>, with the stored uid proven to be a plain name inside runs/."""
        if not isinstance(uid, str) or uid.startswith("."):
            raise UntrustedFileError(f"the stored run folder name {uid!r} is not a plain name inside "
                                     f"{self.data_dir / 'runs'}")
        return inside(self.data_dir / "runs", uid)

    def sweep_orphans(self, min_age_s: float = ORPHAN_MIN_AGE_S) -> list[str]:
        """Delete run folders that no row points to (left by jobs killed before committing), if older than
        `min_age_s` (a younger one may belong to a job that is committing right now). Returns their names."""
        with self._db() as conn:
            known = {r["uid"] for r in conn.execute("SELECT uid FROM runs")}
        removed, now = [], time.time()
        for path in (self.data_dir / "runs").iterdir():
            uid = path.name.removeprefix(".tmp-")
            if uid in known or path.is_symlink() or not path.is_dir():
                continue
            if now - path.stat().st_mtime >= min_age_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed

    # ---- reading ------------------------------------------------------------------------------------

    def get(self, run_id: int) -> Run:
        with self._db() as conn:
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (int(run_id),)).fetchone()
        if row is None:
            raise ValueError(f"no stored run with id {run_id} in {self.db_path}; list them with `dqlab runs`")
        try:
            return self._to_run(row)
        except (UntrustedFileError, ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"run {run_id} in {self.db_path} is damaged ({exc}); delete it with "
                             f"`dqlab runs --delete {run_id}`") from None

    def list(self, model: str | None = None, method: str | None = None, w_bits: int | None = None,
             a_bits: int | None = None, limit: int | None = None) -> list[Run]:
        """Stored runs, newest first, filtered by whichever arguments are given. A row that cannot be read is
        left out and named in `self.skipped` ((id, why)), so one damaged row never hides the others."""
        where, args = [], []
        for col, value in (("model", model), ("method", method), ("w_bits", w_bits), ("a_bits", a_bits)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._db() as conn:
            rows = conn.execute(sql, args).fetchall()
        runs, self.skipped = [], []
        for r in rows:
            try:
                runs.append(self._to_run(r))
            except (UntrustedFileError, ValueError, TypeError, KeyError) as exc:
                self.skipped.append((r["id"], str(exc)))
        return runs

    def count(self) -> int:
        with self._db() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def integrity_ok(self) -> bool:
        with self._db() as conn:
            return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def _to_run(self, row: sqlite3.Row) -> Run:
        """A row as a Run; every stored string is checked (JSON bounded and of the right shape, file names plain
        names inside the run's folder). Raises UntrustedFileError naming the column."""
        where = f"run {row['id']}"
        folder = self._run_folder(row["uid"])

        def js(column: str, kind: type, optional: bool = False):
            text = row[column]
            if text is None and optional:
                return None
            if not isinstance(text, str):
                raise UntrustedFileError(f"{where}: column {column} is not JSON text")
            return loads_json(text, f"{where}'s {column}", kind, MAX_FIELD_BYTES, allow_nan=True)

        seeds, labels, files = js("seeds", list), js("labels", list), js("files", list)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in seeds + labels):
            raise UntrustedFileError(f"{where}: seeds and labels must be lists of integers")
        paths = {}
        for name in files:
            if not isinstance(name, str) or name.startswith(".") or Path(name).name != name:
                raise UntrustedFileError(f"{where}: stored file name {name!r} is not a plain file name")
            paths[name] = inside(folder, name)
        for column, kind in (("num_samples", int), ("w_bits", int), ("a_bits", int), ("steps", int)):
            if row[column] is not None and not isinstance(row[column], kind):
                raise UntrustedFileError(f"{where}: column {column} holds {row[column]!r}, not a number")
        return Run(id=row["id"], uid=row["uid"], created=str(row["created"]), model=str(row["model"]),
                   method=str(row["method"]), label=str(row["label"]), w_bits=row["w_bits"], a_bits=row["a_bits"],
                   config=js("config", dict), num_samples=row["num_samples"], steps=row["steps"],
                   guidance=row["guidance"], scheduler=row["scheduler"], seeds=seeds, labels=labels,
                   feature_extractor=row["feature_extractor"], fid=row["fid"], fid_vs_fp=row["fid_vs_fp"],
                   label_agreement=row["label_agreement"], metrics=js("metrics", dict), timings=js("timings", dict),
                   versions=js("versions", dict), files=paths, note=row["note"],
                   recipe=js("recipe", dict, optional=True) if row["recipe"] else None)


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
