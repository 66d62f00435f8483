"""Finished runs in an embedded SQLite database, one row per run keyed by its config hash.

A row is written in one transaction only once its run has finished, so a sweep that is killed
(even with SIGKILL) and started again skips every finished run and redoes the ones that were in
progress; ``started`` rows only record that a run began (and on which code version), for the
report. Several worker processes may write at once (WAL journal, busy timeout).

Columns: ``key`` (the run key), ``problem``, ``method``, ``seed``, ``config`` (JSON),
``record`` (the whole run record as JSON: metrics per epoch, the selected epoch(s), per-epoch mean
weights, timings), ``best_epoch``, ``val_delta_m``, ``test_delta_m``, ``seconds``,
``step_seconds`` (median per step), ``code_version`` and ``finished_at``.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    problem TEXT NOT NULL,
    method TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    record TEXT NOT NULL,
    best_epoch INTEGER,
    val_delta_m REAL,
    test_delta_m REAL,
    seconds REAL,
    step_seconds REAL,
    code_version TEXT,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS started (
    key TEXT PRIMARY KEY,
    code_version TEXT,
    started_at REAL
);
"""


@lru_cache(maxsize=1)
def code_version() -> str:
    """``mtopt <version>`` plus the git commit (and ``+dirty``) when run from a checkout."""
    from mtopt import __version__

    version = f"mtopt {__version__}"
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str:
        run = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=True
        )
        return run.stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version} ({commit}{'+dirty' if dirty else ''})"


class RunDatabase:
    """The run store of sweeps and comparisons: ``get(key)`` / ``put(record)`` like
    :class:`~mtopt.experiments.store.RunStore`, in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=60000")
        return db

    def get(self, key: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT record FROM runs WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def __contains__(self, key: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone() is not None

    def mark_started(self, key: str) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO started VALUES (?, ?, ?)",
                (key, code_version(), time.time()),
            )

    def put(self, record: dict[str, Any]) -> None:
        config = record["config"]
        selection = record.get("selection") or {}
        best = selection.get("delta_m", next(iter(selection.values()), {}))
        row = (
            record["key"],
            config["problem"],
            config["method"],
            int(config["seed"]),
            json.dumps(config, sort_keys=True),
            json.dumps(record),
            best.get("epoch"),
            best.get("val_score") if "delta_m" in selection else None,
            record.get("test_delta_m"),
            record.get("seconds"),
            record.get("step_seconds_median"),
            record.get("code_version", code_version()),
            time.time(),
        )
        with self._connect() as db:
            db.execute(f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * len(row))})", row)

    def records(self, problem: str | None = None) -> Iterator[dict[str, Any]]:
        """Every finished run record (optionally of one problem), oldest first."""
        query = "SELECT record FROM runs"
        args: tuple[Any, ...] = ()
        if problem is not None:
            query += " WHERE problem = ?"
            args = (problem,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY finished_at", args).fetchall()
        for (blob,) in rows:
            yield json.loads(blob)

    def count(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def unfinished(self) -> list[str]:
        """Keys of runs that started but never finished (killed or crashed)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT key FROM started WHERE key NOT IN (SELECT key FROM runs)"
            ).fetchall()
        return [r[0] for r in rows]
