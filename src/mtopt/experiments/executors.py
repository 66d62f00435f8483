"""Sweeps on a Ray cluster: :class:`RayExecutor` (``mtopt sweep --executor ray``).

Each run of a sweep is a Ray task that only trains (:func:`mtopt.experiments.runner.train_job`,
the function every executor trains through, so a run gives the same record on Ray as in a local
pool) and returns its record. The run store never leaves the *driver*, the process that runs the
sweep: for each run it claims the run in the store (``RunDatabase.claim``: the claim's heartbeat
is renewed by the driver while the task trains), submits the task, and writes the record the task
returns (``RunDatabase.put``, which ends the claim). So the store's guarantees hold as for the
local pool: a stored run is never trained again, two drivers on one store never both train a
run, and a driver that is killed leaves its claims to the next one (at once on the same machine,
after the lease elsewhere), which finishes the sweep.

A task asks Ray for the run's resources (:func:`run_resources`): ``threads`` CPUs (the torch
threads it trains with) and one GPU for a run on CUDA. The driver claims and submits no more runs
at once than the cluster has room for, so runs it has not reached stay free for another driver.

Ray is an optional dependency (``pip install 'mtopt[ray]'``), imported only when an executor
starts; ``mtopt`` imports without it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from mtopt.errors import ConfigError
from mtopt.experiments import checkpoint as checkpoints
from mtopt.experiments.database import BUSY, CLAIMED, ClaimLostError, RunDatabase
from mtopt.experiments.runner import Job, train_job
from mtopt.experiments.train import RunConfig, run_key

logger = logging.getLogger("mtopt")

#: the one line a missing Ray gives
RAY_MISSING = "the ray executor needs Ray: pip install 'mtopt[ray]' (or 'ray>=2.9')"
#: seconds to wait for a TCP answer from the cluster's address before calling it unreachable
PROBE_SECONDS = 5.0
#: the port an address without one means: the head node's GCS (``ray start --head``), or the
#: Ray Client server for a ``ray://`` address
_DEFAULT_PORTS = {"": 6379, "ray": 10001}


def run_resources(config: RunConfig, threads: int) -> dict[str, float]:
    """What one run's task asks Ray for: ``threads`` CPUs, and one GPU when the run's
    ``device`` is CUDA.

    >>> from mtopt.experiments.train import RunConfig
    >>> run_resources(RunConfig(problem="multi_mnist/cl_rr"), 2)
    {'num_cpus': 2.0, 'num_gpus': 0.0}
    >>> run_resources(RunConfig(problem="multi_mnist/cl_rr", device="cuda:0"), 1)
    {'num_cpus': 1.0, 'num_gpus': 1.0}
    """
    gpus = 1.0 if config.device.startswith("cuda") else 0.0
    return {"num_cpus": float(threads), "num_gpus": gpus}


def probe_address(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Raise :class:`~mtopt.errors.ConfigError` (one line) when nothing answers at a Ray
    ``address`` (``HOST:PORT``, ``HOST``, ``ray://HOST:PORT``; ``auto`` is not probed): Ray itself
    retries an unreachable address for many minutes before it gives up.

    >>> probe_address("no port:here")
    Traceback (most recent call last):
    ...
    mtopt.errors.ConfigError: Ray address 'no port:here': use HOST:PORT (the head node's, e.g. 10.0.0.1:6379), ray://HOST:PORT or auto
    """  # noqa: E501 - a doctest's expected line
    if address == "auto":
        return
    scheme, sep, where = address.partition("://")
    if not sep:
        scheme, where = "", address
    host, sep, port_text = where.rpartition(":")
    if not sep:
        host, port_text = where, str(_DEFAULT_PORTS.get(scheme, 6379))
    host = host.strip("[]")  # an IPv6 literal, [::1]:6379
    if not host or not port_text.isdigit() or " " in host or scheme not in _DEFAULT_PORTS:
        raise ConfigError(
            f"Ray address {address!r}: use HOST:PORT (the head node's, e.g. 10.0.0.1:6379), "
            "ray://HOST:PORT or auto"
        )
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(
            f"no Ray cluster answers at {address} ({reason}); start one with `ray start --head` "
            "or check the head node's address and port"
        ) from None


class RayExecutor:
    """Trains a sweep's runs as Ray tasks (the module doc); pass it to
    :func:`~mtopt.experiments.sweep.run_sweep` as ``executor``.

    ``address``: the cluster to attach to (``ray.init(address=...)``: the head's ``HOST:PORT``,
    or ``auto`` on a node of a running cluster); ``None`` starts a local instance, or attaches to
    the one ``RAY_ADDRESS`` or a local ``ray start`` names, unless Ray is already initialised in
    this process: then that connection is used (and left open). ``threads``: torch threads, and
    CPUs asked for, per run. ``max_in_flight``: at most that many runs claimed and submitted at
    once (default: as many as the cluster's CPUs hold).

    Use as a context manager (or :meth:`start` / :meth:`close`); :meth:`start` fails in one line
    (:class:`~mtopt.errors.ConfigError`) when Ray is not installed or the cluster cannot be
    reached, before any run is claimed.
    """

    def __init__(
        self, address: str | None = None, threads: int = 1, max_in_flight: int | None = None
    ) -> None:
        if threads < 1:
            raise ConfigError(f"threads per run must be ≥ 1, got {threads}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ConfigError(f"runs in flight must be ≥ 1, got {max_in_flight}")
        self.address = address
        self.threads = threads
        self.max_in_flight = max_in_flight
        self._ray: Any = None
        self._task: Any = None
        self._owns = False

    # -- the connection ----------------------------------------------------------------------
    def start(self) -> RayExecutor:
        """Start or attach to Ray (once) and check that a run fits on a node."""
        if self._ray is not None:
            return self
        try:
            import ray
        except ImportError:
            raise ConfigError(RAY_MISSING) from None
        if self.address is not None or not ray.is_initialized():
            if self.address is not None:
                probe_address(self.address)
            options: dict[str, Any] = {"logging_level": logging.WARNING}
            if self.address is None:
                options["include_dashboard"] = False  # a sweep needs none; it starts faster
            try:
                ray.init(address=self.address, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.address or "(local)"
                message = " ".join(str(exc).split()) or type(exc).__name__
                raise ConfigError(f"cannot start or reach Ray at {where}: {message}") from None
            self._owns = True
        self._ray = ray
        self._task = ray.remote(train_job)
        largest = max(
            (n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0
        )
        if self.threads > largest:
            self.close()
            raise ConfigError(
                f"each run asks for {self.threads} CPUs (--threads) and no node of the Ray "
                f"cluster has more than {largest:g}"
            )
        return self

    def close(self) -> None:
        """Disconnect from Ray (shutting a local instance down) if :meth:`start` connected."""
        if self._ray is not None and self._owns:
            self._ray.shutdown()
        self._ray, self._task, self._owns = None, None, False

    def __enter__(self) -> RayExecutor:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the runs ----------------------------------------------------------------------------
    def _room(self) -> int:
        """How many runs to keep claimed and submitted at once."""
        cpus = float(self._ray.cluster_resources().get("CPU", 0.0))
        room = max(1, int(cpus // self.threads))
        return room if self.max_in_flight is None else min(room, self.max_in_flight)

    def run(self, db: RunDatabase, jobs: Sequence[Job]) -> dict[str, str]:
        """Train ``jobs`` on the cluster: each run key → ``"ran"``, ``"done"`` (stored
        already) or ``"busy"`` (another process holds it). Claims and records go through
        ``db`` in this process only; on any error or interrupt the runs still in flight are
        cancelled and their claims released."""
        self.start()
        ray = self._ray
        room = self._room()
        out: dict[str, str] = {}
        queue = list(jobs)
        queue.reverse()  # popped from the end: the batch's order
        flying: dict[Any, str] = {}  # task's result → run key
        try:
            while queue or flying:
                while queue and len(flying) < room:
                    config, references = queue.pop()
                    key = run_key(config, references)
                    status = db.claim(key)
                    if status != CLAIMED:
                        out[key] = status
                        continue
                    resources = run_resources(config, self.threads)
                    if resources["num_gpus"] and not ray.cluster_resources().get("GPU"):
                        db.release(key)
                        raise ConfigError(f"run {key} trains on CUDA and the cluster has no GPU")
                    task = self._task.options(**resources)
                    checkpoint = str(db.checkpoint_path(key))  # resumable on a shared folder
                    flying[task.remote(config, references, self.threads, checkpoint)] = key
                if not flying:
                    continue
                ready, _ = ray.wait(list(flying), num_returns=1, timeout=max(db.lease / 4, 1.0))
                for ref, key in list(flying.items()):
                    if ref not in ready and not db.holds(key):  # taken over: theirs to finish
                        logger.warning("run %s: this driver lost its claim; cancelling it", key)
                        with contextlib.suppress(Exception):
                            ray.cancel(ref, force=True)
                        out[flying.pop(ref)] = BUSY
                for ref in ready:
                    record = _result(ray, ref)
                    if record.get("key") != flying[ref]:
                        raise RuntimeError(f"run {flying[ref]} came back as {record.get('key')}")
                    try:  # the record lands and the claim ends, in one transaction
                        db.put(record)
                    except ClaimLostError as exc:  # the driver stalled past the lease: theirs now
                        logger.warning("%s", exc)
                        out[flying.pop(ref)] = BUSY
                        continue
                    checkpoints.remove(db.checkpoint_path(record["key"]))
                    out[flying.pop(ref)] = "ran"
        except BaseException:
            for key in flying.values():
                db.release(key)
            for ref in flying:
                with contextlib.suppress(Exception):  # finished already, or Ray is gone
                    ray.cancel(ref, force=True)
            raise
        return out


def _result(ray: Any, ref: Any) -> dict[str, Any]:
    """A task's record. What the task raised (the data missing on its node, say) is raised
    here as itself, Ray's wrapper with the remote traceback as its cause: a user's mistake is
    then one line, as from the local executor."""
    try:
        record: dict[str, Any] = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from exc
        raise
    return record
