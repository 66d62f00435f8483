"""Running a batch of configurations against the run store: a process pool of workers (or
another :class:`Executor`, e.g. Ray), each run claimed in the store before it trains, trained
through :func:`train_job` wherever it runs, and its record stored by the claiming process. Runs
stored already are skipped; runs another process holds are waited for (and taken over if its
claim goes stale). A run resumes from its epoch checkpoint (:mod:`mtopt.experiments.checkpoint`)
kept beside the store. :func:`mtopt.experiments.sweep.run_sweep` drives it phase by phase.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Protocol

from mtopt.errors import MtoptError
from mtopt.experiments import checkpoint as checkpoints
from mtopt.experiments.database import BUSY, CLAIMED, ClaimLostError, RunDatabase, code_version
from mtopt.experiments.train import References, RunConfig, run_key, train_run
from mtopt.specs import format_spec

#: a progress line's sink (``mtopt sweep`` prints them)
Progress = Callable[[str], None]

logger = logging.getLogger("mtopt")

_PROBLEMS: dict[str, Any] = {}
_STORES: dict[tuple[str, float | None], RunDatabase] = {}
#: runs of a phase not yet stored because another process holds them are re-checked this often
WAIT_SECONDS = 2.0


def _store(db_path: str, lease: float | None) -> RunDatabase:
    """One store object per process (one owner id, one heartbeat thread)."""
    key = (db_path, lease)
    if key not in _STORES:
        _STORES[key] = RunDatabase(db_path, lease_seconds=lease)
    return _STORES[key]


def train_job(
    config: RunConfig,
    references: References | None,
    threads: int,
    checkpoint: str | None = None,
    holds: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train one configuration in this process and return its record, ready to store (with the
    ``code_version`` that trained it). A configuration that diverges gives a failed record
    (:func:`failed_record`); a user's mistake (:class:`~mtopt.errors.MtoptError`: the data
    missing here, say) is raised, so that the run is trained again once it is fixed, and so is
    an error of the machine rather than of the configuration (out of memory, a failed collective
    of ``torch.distributed``): a failed record is final and would mark the configuration as
    diverged, so that the selection could depend on the device it met. ``threads`` > 0 sets
    torch's intra-op threads first. Every executor (a pool worker, the sweep's own process, a
    Ray task) trains through this function, so a configuration gives the same record wherever
    it ran. ``checkpoint``: the run's epoch checkpoint file
    (:meth:`~mtopt.experiments.database.RunDatabase.checkpoint_path`), resumed from if present;
    the caller removes it once the record is stored."""
    import torch

    from mtopt.problems import get_problem

    if threads:
        torch.set_num_threads(threads)
    if config.problem not in _PROBLEMS:
        _PROBLEMS[config.problem] = get_problem(config.problem)
    started = time.perf_counter()
    try:
        record = train_run(
            config,
            references=references,
            problem=_PROBLEMS[config.problem],
            checkpoint=checkpoint,
            holds=holds,
        )
    except MtoptError:
        raise  # the user's to fix (data missing on this machine, a device it lacks): no result
    except (torch.OutOfMemoryError, torch.distributed.DistError, ClaimLostError):
        raise  # the machine's, not the configuration's: nothing stored, the run is redone
    except (ValueError, FloatingPointError, RuntimeError) as exc:
        if out_of_memory(exc):
            raise  # the CPU allocator's out-of-memory is a plain RuntimeError
        # a diverging configuration (non-finite loss, solver blow-up) is a result, not a
        # crash: stored as failed, it scores -inf in the selection and is not run again
        record = failed_record(config, references, exc)
        # its cost (the study's): this process's time, before the error (not a resumed run's
        # earlier sessions, which its checkpoint held)
        record["seconds"] = time.perf_counter() - started
    record["code_version"] = code_version()
    return record


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed for want of memory: torch's CPU allocator
    raises a plain ``RuntimeError`` for it (``DefaultCPUAllocator: can't allocate memory``), and
    some CUDA paths one that names it; the run is then the machine's to redo, not a result."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def _execute(
    db_path: str,
    config: RunConfig,
    references: References | None,
    threads: int,
    lease: float | None = None,
) -> str:
    """Claim and run one configuration (in a worker or in-process): ``"ran"``, or ``"done"``
    (stored already) or ``"busy"`` (another process holds it, or took it over from this one
    while it trained: :class:`~mtopt.experiments.database.ClaimLostError`; the run is then left to
    that process, its checkpoint included)."""
    db = _store(db_path, lease)
    key = run_key(config, references)
    status = db.claim(key)
    if status != CLAIMED:
        return status
    checkpoint = db.checkpoint_path(key)
    try:
        record = train_job(config, references, threads, str(checkpoint), lambda: db.holds(key))
        db.put(record)
    except ClaimLostError as exc:
        logger.warning("%s", exc)
        db.release(key)  # nothing to delete: the claim is the other process's
        return BUSY
    except BaseException:
        db.release(key)
        raise
    checkpoints.remove(checkpoint)
    return "ran"


def failed_record(config: RunConfig, references: References | None, exc: Exception) -> dict:
    """The stored record of a run that raised: its key and config, and the error."""
    return {
        "key": run_key(config, references),
        "config": config.to_dict(),
        "failed": f"{type(exc).__name__}: {exc}",
        "selection": {},
    }


def _die_with_parent(parent: int) -> None:
    """Pool worker initializer: end when the process that started the pool dies, SIGKILL
    included (Linux: the kernel's parent-death signal; elsewhere a thread watching the parent
    pid), so that no orphan keeps training."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="mtopt-parent-watch", daemon=True).start()


#: one run of a batch: its configuration and the references that select its epoch
Job = tuple[RunConfig, References | None]


class Executor(Protocol):
    """Trains a batch of runs somewhere else than the local pool (:class:`Runner`).

    :meth:`run` must keep the store's contract: claim each run in ``db`` before it trains
    (``db.claim``: skip it when that answers ``"done"`` or ``"busy"``), store its record with
    ``db.put`` from this process, and release (``db.release``) the claims of runs it gives up."""

    def run(self, db: RunDatabase, jobs: Sequence[Job]) -> dict[str, str]:
        """Each job's run key → ``"ran"``, ``"done"`` (stored already) or ``"busy"`` (another
        process holds it)."""
        ...


def _run_label(c: RunConfig) -> str:
    """A run in words: the method spec with its hyperparameters (or ``single-task TASK``), the
    base optimizer when not Adam, the learning rate and the seed."""
    run = f"single-task {'/'.join(c.tasks)}" if c.tasks else format_spec(c.method, c.hparams)
    if c.optimizer != "adam" or c.apt:
        run += "@" + ("apt" if c.optimizer == "adam" else c.optimizer + ("+apt" if c.apt else ""))
    return f"{run} at lr {c.lr:g}, seed {c.seed}"


class Runner:
    """Runs batches of configurations, skipping stored ones, on a process pool (or on
    ``executor``); runs another process holds are waited for (and taken over if its claim goes
    stale). ``threads``: torch threads per run (default: one in a pool worker, torch's choice
    when ``workers`` is 1)."""

    def __init__(
        self,
        db: RunDatabase,
        workers: int | None = None,
        progress: Progress | None = None,
        executor: Executor | None = None,
        threads: int | None = None,
        stored_only: bool = False,
    ):
        self.db = db
        self.stored_only = stored_only
        self.workers = workers if workers is not None else max(1, os.cpu_count() or 1)
        self.progress = progress or (lambda message: None)
        self.executor = executor
        self.threads = threads
        self.executed = 0
        #: ``stored_only``: runs not stored yet whose epoch checkpoint exists → "method seed s,
        #: epoch e of n" (a run in flight, or cut short and resumable)
        self.in_flight: dict[str, str] = {}
        #: (problem, train subset, eval subset) → data digest → a run key trained on it
        self._digests: dict[tuple[Any, ...], dict[str, str]] = {}
        #: what the stored runs cost, by the phase (label) that first asked for each run:
        #: label → ``{"runs": n, "seconds": sum of the runs' wall times}``
        self.cost: dict[str, dict[str, float]] = {}
        self._costed: set[str] = set()

    def _count(self, records: Mapping[str, Mapping[str, Any] | None], label: str) -> None:
        """Add the stored runs of ``records`` not counted yet to ``label``'s cost (a run two
        phases share, such as a grid point's first seed, counts once, for the first)."""
        for key, record in records.items():
            if record is None or key in self._costed:
                continue
            self._costed.add(key)
            phase = self.cost.setdefault(label, {"runs": 0, "seconds": 0.0})
            phase["runs"] += 1
            phase["seconds"] += float(record.get("seconds") or 0.0)  # older failed runs: none

    def _check_data(self, records: Mapping[str, Mapping[str, Any] | None]) -> None:
        """Warn (once per pair) when stored runs of one problem and subset sizes were trained
        on different data (their records' ``data_digest``: another data folder, a changed
        download), since a study would then mix them: single-task references of one data set
        against methods of another. Records of earlier versions carry no digest."""
        for key, record in records.items():
            digest = None if record is None else record.get("data_digest")
            if digest is None:
                continue
            c = record["config"]  # type: ignore[index]
            seen = self._digests.setdefault(
                (c["problem"], c.get("train_subset"), c.get("eval_subset")), {}
            )
            if digest not in seen:
                if seen:
                    other, first = next(iter(seen.items()))
                    logger.warning(
                        "runs %s and %s of %s were trained on different data (digests %s, %s): "
                        "a study would mix them; keep one store (run dir) per data set",
                        first,
                        key,
                        c["problem"],
                        other,
                        digest,
                    )
                seen[digest] = key

    def run(
        self, jobs: Sequence[tuple[RunConfig, References | None]], label: str
    ) -> list[dict[str, Any]]:
        """The records of ``jobs``, training those not stored yet."""
        records = self.stored(jobs, label)
        assert all(r is not None for r in records)
        return records  # type: ignore[return-value]

    def stored(
        self, jobs: Sequence[tuple[RunConfig, References | None]], label: str
    ) -> list[dict[str, Any] | None]:
        """The records of ``jobs``: trained where missing, or, ``stored_only``, ``None`` for
        each run not stored yet."""
        keys = [run_key(c, r) for c, r in jobs]
        by_key = dict(zip(keys, jobs, strict=True))
        found = {k: self.db.get(k) for k in by_key}  # each record read (and parsed) once
        self._check_data(found)
        todo = [k for k, record in found.items() if record is None]
        done = len(found) - len(todo)
        if self.stored_only:
            self._count(found, label)
            self.progress(f"{label}: {len(found)} runs, {done} stored, {len(todo)} not yet")
            for k, record in found.items():
                epochs = None if record else checkpoints.epochs_done(self.db.checkpoint_path(k), k)
                if epochs is None:
                    self.in_flight.pop(k, None)  # stored since, or no checkpoint
                else:
                    self.in_flight[k] = f"{_run_label(by_key[k][0])}: epoch {epochs} of "
                    self.in_flight[k] += str(by_key[k][0].epochs)
            return [found[k] for k in keys]
        self.progress(f"{label}: {len(jobs)} runs, {done} already stored, {len(todo)} to run")
        finished = done
        waited = False
        while todo:
            outcomes = self._execute_all([by_key[k] for k in todo])
            for status in outcomes.values():
                if status == "ran":
                    self.executed += 1
            finished += sum(status != "busy" for status in outcomes.values())
            self.progress(f"{label}: {finished}/{len(set(keys))} done")
            todo = [k for k in todo if self.db.get(k) is None]
            if todo:
                if not waited:
                    self.progress(
                        f"{label}: {len(todo)} run(s) held by another process; waiting for them"
                    )
                    waited = True
                time.sleep(WAIT_SECONDS)
        trained = {k: self.db.get(k) for k in by_key}
        self._check_data(trained)
        self._count(trained, label)
        return [trained[k] for k in keys]

    def _execute_all(self, jobs: Sequence[tuple[RunConfig, References | None]]) -> dict[str, str]:
        if self.executor is not None:
            return self.executor.run(self.db, jobs)
        lease = self.db.lease
        path = str(self.db.path)
        out: dict[str, str] = {}
        if jobs and self.workers > 1:
            threads = self.threads or 1
            with ProcessPoolExecutor(
                max_workers=self.workers, initializer=_die_with_parent, initargs=(os.getpid(),)
            ) as pool:
                futures = {
                    pool.submit(_execute, path, c, r, threads, lease): run_key(c, r)
                    for c, r in jobs
                }
                for future in as_completed(futures):
                    out[futures[future]] = future.result()
        else:
            for c, r in jobs:
                out[run_key(c, r)] = _execute(path, c, r, self.threads or 0, lease)
        return out
