"""The run store: finished runs in one SQLite file, shared by ``train``, ``compare`` and ``sweep``.

One row per finished run, keyed by its config hash (:func:`mtopt.experiments.train.run_key`),
written in one transaction once the run has finished: a process killed at any moment (SIGKILL
included) leaves every finished run in place, and nothing half-written.

**Several processes on one store.** Before a process trains a run it *claims* it: a row in
``claims`` with its owner id (host, boot and process namespace, pid, a random tag) and a
heartbeat that a background thread renews every ``lease / 4`` seconds while the run trains. A run
claimed by a live owner is skipped by everyone else (their runner waits for it and reads its
record when it lands); a claim whose heartbeat is older than ``lease`` seconds (its owner died,
or its machine stopped) is taken over, at once if its owner was a process of this machine and
process namespace that no longer exists (a container with its own pids, or another machine of
the same host name, waits for the lease). Claiming is one ``BEGIN IMMEDIATE`` transaction, so two
processes never both win the same run; finished records have the key as primary key, so nothing
is ever stored twice.

**A claim taken over from a live owner** (one stalled past the lease: stopped, swapped out, a
network store that hung) is lost to it: its heartbeat finds the row gone or another owner's, or
:meth:`RunDatabase.holds` (asked after every epoch), finding no renewal for half a lease, asks
the store itself; from then on it answers ``False``, the training loop stops at its next epoch
without writing its checkpoint (:class:`ClaimLostError`; a Ray driver cancels the task), and
:meth:`RunDatabase.put` refuses the record of a run this process claimed and another has since
taken or stored, so the new owner's checkpoint and record are never overwritten. A record this
process never claimed (``train``'s, an import) is stored as before.

**Damage.** A record that does not parse is moved to ``quarantine`` (with the reason), logged
once with its key, and treated as not finished (the run is redone); everything else goes on. A
file that is not an SQLite database, a locked database, or a folder that cannot be written is
reported in one line naming the path (:class:`~mtopt.errors.StoreError`).

**Read-only use.** ``RunDatabase(path, readonly=True)`` (``mtopt report``) opens an existing
store read-only and never creates one; a store that exists but cannot be written (a read-only
run dir) opens read-only by itself, and only recording a new run then fails, naming the path.

**Checkpoints.** A run in progress saves its state after every epoch to
``<store>.checkpoints/<key>.pt`` (:meth:`RunDatabase.checkpoint_path`,
:mod:`mtopt.experiments.checkpoint`); whoever claims the run next resumes from there, and the file
is deleted once the record is stored. Only the claim's holder writes it.

Columns of ``runs``: ``key`` (the run key), ``problem``, ``method``, ``seed``, ``config`` (JSON),
``record`` (the whole run record as JSON: metrics per epoch, the selected epoch(s), per-epoch
mean weights, timings), ``best_epoch``, ``val_delta_m``, ``test_delta_m``, ``seconds``,
``step_seconds`` (median per step), ``code_version`` and ``finished_at``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from mtopt.errors import StoreError

logger = logging.getLogger("mtopt")

#: Seconds after which a claim whose heartbeat stopped is taken over (``MTOPT_LEASE_SECONDS``).
DEFAULT_LEASE = float(os.environ.get("MTOPT_LEASE_SECONDS", "120"))

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
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    heartbeat REAL NOT NULL,
    claimed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    key TEXT NOT NULL,
    record TEXT,
    reason TEXT NOT NULL,
    quarantined_at REAL NOT NULL
);
"""

CLAIMED, DONE, BUSY = "claimed", "done", "busy"


@lru_cache(maxsize=1)
def code_version() -> str:
    """``mtopt <version>`` plus the git commit when run from a checkout, and ``+dirty.<hash>``
    with a hash of the uncommitted changes to tracked files (two different edits of one commit
    read as two versions)."""
    from mtopt import __version__

    version = f"mtopt {__version__}"
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> bytes:
        run = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, timeout=10, check=True
        )
        return run.stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD").decode()
        diff = git("diff", "HEAD", "--no-ext-diff", "--binary")
    except (OSError, subprocess.SubprocessError):
        return version
    dirty = f"+dirty.{hashlib.blake2b(diff, digest_size=4).hexdigest()}" if diff else ""
    return f"{version} ({commit}{dirty})"


class ClaimLostError(RuntimeError):
    """This process no longer holds its claim on a run (another took it over after this one
    stalled past the lease, or the store could not renew it): the run stops and stores nothing,
    and the claim's holder finishes it."""


@lru_cache(maxsize=1)
def _machine() -> str:
    """Where a pid means this process table: the host name, the boot id and the pid
    namespace (Linux; the host name alone elsewhere). Two containers of one host, or two
    machines of one name, differ in it."""
    parts = [socket.gethostname().replace(":", "_")]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid").strip("pid:[]"))
    return "/".join(parts)


def _owner_id() -> str:
    return f"{_machine()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _dead_here(owner: str) -> bool:
    """Whether ``owner`` (``machine:pid:tag``) was a process of this machine and pid namespace
    that no longer exists: its claim need not wait for the lease (a restarted sweep takes its
    runs over at once). An owner id of an earlier version (the host name alone) cannot tell
    namespaces apart and waits for the lease."""
    machine, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if machine != _machine() or not pid_text.isdigit():
        return False
    return not pid_running(int(pid_text))


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running: it exists (another user's counts)
    and is not a zombie (one that has exited but has not been reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunDatabase:
    """The run store (module doc): ``get(key)`` / ``put(record)``, claims with a heartbeat."""

    def __init__(
        self, path: str | Path, readonly: bool = False, lease_seconds: float | None = None
    ) -> None:
        self.path = Path(path)
        self.lease = float(DEFAULT_LEASE if lease_seconds is None else lease_seconds)
        self.owner = _owner_id()
        self.readonly = readonly
        self._held: set[str] = set()
        self._lost: set[str] = set()  # claimed here, then taken over by another process
        self._storing: set[str] = set()  # being stored by put: its claim row goes any moment
        self._beats: dict[str, float] = {}  # when each held claim was last renewed
        self._lock = threading.Lock()
        self._beating: threading.Thread | None = None
        self._warned: set[str] = set()
        if readonly:
            if not self.path.is_file():
                raise StoreError(f"no run store at {self.path} (nothing to read)")
            self._check_readable()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = self._connect()
            try:
                db.executescript(_SCHEMA)
            finally:
                db.close()  # closed now, not when a reference cycle is collected
        except (sqlite3.OperationalError, PermissionError) as exc:
            if self.path.is_file() and not os.access(self.path.parent, os.W_OK):
                self.readonly = True  # reading works; recording a new run says why it cannot
                self._check_readable()
                return
            raise StoreError(
                f"cannot open the run store {self.path} for writing ({exc}); use a store in a "
                "folder you can write to (train, compare, sweep: --run-dir; sweep: --db)"
            ) from None
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from None

    # -- connections -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            if self.readonly:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                if not os.access(self.path.parent, os.W_OK):
                    uri += "&immutable=1"  # WAL needs a writable folder otherwise
                db = sqlite3.connect(uri, uri=True, timeout=60.0)
            else:
                db = sqlite3.connect(self.path, timeout=60.0)
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=60000")
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from None
        return db

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            yield db
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from None
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction (writers serialise on it), committed at exit."""
        if self.readonly:
            raise StoreError(
                f"the run store {self.path} is read-only here: cannot record runs; use a store "
                "in a folder you can write to (train, compare, sweep: --run-dir; sweep: --db)"
            )
        db = self._connect()
        try:
            db.isolation_level = None
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"cannot write the run store {self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from None
        finally:
            db.close()

    def _corrupt(self, exc: Exception) -> StoreError:
        return StoreError(
            f"{self.path} is not a usable run store ({exc}); move it aside (the runs in it "
            "are lost to this command) or use another store (train, compare, sweep: --run-dir; "
            "sweep: --db; report: the sweep result's database)"
        )

    def _check_readable(self) -> None:
        with self._read() as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        if "runs" not in tables:
            raise StoreError(f"{self.path} is not an mtopt run store (no runs table)")

    # -- records -----------------------------------------------------------------------------
    def checkpoint_path(self, key: str) -> Path:
        """Where run ``key`` keeps its epoch checkpoint while it trains (module doc)."""
        return self.path.with_name(self.path.name + ".checkpoints") / f"{key}.pt"

    def get(self, key: str) -> dict[str, Any] | None:
        """The finished record of ``key``, or ``None`` (also for a record that does not parse:
        it is quarantined and the run counts as not finished)."""
        with self._read() as db:
            row = db.execute("SELECT record FROM runs WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return self._parse(key, row[0])

    def _parse(self, key: str, blob: str) -> dict[str, Any] | None:
        try:
            record = json.loads(blob)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            return record
        except (ValueError, TypeError) as exc:
            self.quarantine(key, blob, f"record does not parse: {exc}")
            return None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def quarantine(self, key: str, blob: str | None, reason: str) -> None:
        """Move a damaged record out of ``runs`` (kept in ``quarantine``), logged once."""
        if key not in self._warned:
            self._warned.add(key)
            where = "left in place (read-only here)" if self.readonly else "set aside"
            logger.warning("run %s in %s is damaged and %s: %s", key, self.path, where, reason)
        if self.readonly:
            return
        with self._write() as db:
            db.execute(
                "INSERT INTO quarantine VALUES (?, ?, ?, ?)", (key, blob, reason, time.time())
            )
            db.execute("DELETE FROM runs WHERE key = ?", (key,))

    def put(self, record: dict[str, Any]) -> None:
        """Store a finished run (one transaction) and release its claim. Refused
        (:class:`ClaimLostError`, nothing written) when this process claimed the run and another
        has since taken the claim over or stored the run; a record this process never claimed is
        stored whatever the claims say."""
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
        key = record["key"]
        with self._lock:
            claimed_here = key in self._held or key in self._lost
            self._storing.add(key)
        try:
            with self._write() as db:
                holder = db.execute("SELECT owner FROM claims WHERE key = ?", (key,)).fetchone()
                stored = db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone()
                # a record this process never claimed (``train``, an import) is stored as before
                if claimed_here and (
                    (holder is not None and holder[0] != self.owner)
                    or (holder is None and stored is not None)
                ):
                    self._drop(key, lost=True)
                    raise ClaimLostError(
                        f"run {key}: another process took it over (this one stalled past the "
                        f"{self.lease:g} s lease) and "
                        + ("holds it" if holder is not None else "stored it")
                        + "; this record is not stored"
                    )
                db.execute(f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * len(row))})", row)
                db.execute("DELETE FROM claims WHERE key = ?", (key,))
            self._drop(key)
        finally:
            with self._lock:
                self._storing.discard(key)

    def _drop(self, key: str, lost: bool = False) -> None:
        with self._lock:
            self._held.discard(key)
            self._beats.pop(key, None)
            if lost:
                self._lost.add(key)
            else:
                self._lost.discard(key)

    def holds(self, key: str) -> bool:
        """Whether this process still holds its claim on ``key``: as of the last heartbeat
        when that renewed the claims less than half a lease ago, else asked of the store now
        (and renewed if it is still ours): a process that was stopped, or whose heartbeat could
        not write, does not go on as if nothing happened. ``False`` when the store cannot
        answer."""
        with self._lock:
            if key not in self._held or key in self._lost:
                return False
            fresh = time.time() - self._beats.get(key, 0.0) < self.lease / 2
        if fresh:
            return True
        try:
            with self._write() as db:
                ours = self._renew(db, key)
        except StoreError:
            return False
        with self._lock:
            if ours:
                self._beats[key] = time.time()
            else:
                self._lost.add(key)
        return ours

    def records(self, problem: str | None = None) -> Iterator[dict[str, Any]]:
        """Every finished run record (optionally of one problem), oldest first; damaged ones
        are quarantined and skipped."""
        query = "SELECT key, record FROM runs"
        args: tuple[Any, ...] = ()
        if problem is not None:
            query += " WHERE problem = ?"
            args = (problem,)
        with self._read() as db:
            rows = db.execute(query + " ORDER BY finished_at", args).fetchall()
        for key, blob in rows:
            record = self._parse(key, blob)
            if record is not None:
                yield record

    def count(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def unfinished(self) -> list[str]:
        """Keys of runs that started but never finished (killed or crashed)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT key FROM started WHERE key NOT IN (SELECT key FROM runs)"
            ).fetchall()
        return [r[0] for r in rows]

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` (``"ok"`` for a sound file)."""
        with self._read() as db:
            return str(db.execute("PRAGMA integrity_check").fetchone()[0])

    # -- claims ------------------------------------------------------------------------------
    def claim(self, key: str) -> str:
        """Try to take ``key`` for this process: ``"claimed"`` (train it now, the heartbeat
        runs), ``"done"`` (already stored) or ``"busy"`` (a live owner has it)."""
        now = time.time()
        with self._write() as db:
            if db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone():
                return DONE
            row = db.execute("SELECT owner, heartbeat FROM claims WHERE key = ?", (key,)).fetchone()
            if (
                row is not None
                and row[0] != self.owner
                and now - row[1] < self.lease
                and not _dead_here(row[0])
            ):
                return BUSY
            db.execute(
                "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?)", (key, self.owner, now, now)
            )
            db.execute(  # the first start's version and time stay (a resume adds none)
                "INSERT OR IGNORE INTO started VALUES (?, ?, ?)", (key, code_version(), now)
            )
        with self._lock:
            self._held.add(key)
            self._lost.discard(key)
            self._beats[key] = now
        self._start_heartbeat()
        return CLAIMED

    def release(self, key: str) -> None:
        """Give a claim up without a record (the run failed to start or was interrupted)."""
        self._drop(key)
        if self.readonly:
            return
        with self._write() as db:
            db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, self.owner))

    def mark_started(self, key: str) -> None:
        """Record that a run began (for the report of unfinished runs)."""
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO started VALUES (?, ?, ?)",
                (key, code_version(), time.time()),
            )

    def _renew(self, db: sqlite3.Connection, key: str) -> bool:
        """Renew this process's claim on ``key`` in the transaction ``db``; ``False`` when the
        row is gone or another owner's (the claim was lost)."""
        beat = db.execute(
            "UPDATE claims SET heartbeat = ? WHERE key = ? AND owner = ?",
            (time.time(), key, self.owner),
        )
        return beat.rowcount == 1

    def _start_heartbeat(self) -> None:
        if self._beating is not None and self._beating.is_alive():
            return
        self._beating = threading.Thread(target=self._beat, name="mtopt-lease", daemon=True)
        self._beating.start()

    def _beat(self) -> None:
        interval = max(self.lease / 4.0, 0.05)
        while True:
            time.sleep(interval)
            with self._lock:
                held = sorted(self._held - self._lost - self._storing)
            if not held:
                continue
            started = time.time()
            try:
                with self._write() as db:
                    lost = [key for key in held if not self._renew(db, key)]
            except StoreError:  # a busy moment: the next beat comes well within the lease
                continue
            with self._lock:
                lost = [k for k in lost if k in self._held and k not in self._storing]
                self._lost.update(lost)
                for key in held:
                    if key in self._held and key not in self._lost:
                        self._beats[key] = started
            for key in lost:
                logger.warning(
                    "run %s: another process took its claim over (this one stalled past the "
                    "%g s lease); this process stops it at its next epoch",
                    key,
                    self.lease,
                )

    # -- legacy JSON run folders -------------------------------------------------------------
    def import_json_runs(self, folder: str | Path) -> int:
        """Import ``folder/*.json`` records (the JSON store of earlier versions) that are not in
        the database yet; a file that does not parse is renamed ``*.corrupt`` and reported.
        Returns how many were imported."""
        folder = Path(folder)
        if not folder.is_dir() or self.readonly:
            return 0
        imported = 0
        for path in sorted(folder.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                if not isinstance(record, dict) or "key" not in record or "config" not in record:
                    raise ValueError("not a run record")
            except (OSError, ValueError) as exc:
                logger.warning("run file %s is damaged and set aside: %s", path, exc)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".json.corrupt"))
                continue
            if self.get(record["key"]) is None:
                self.put(record)
                imported += 1
        return imported
