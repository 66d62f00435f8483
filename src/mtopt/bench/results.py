"""What ``mtopt bench`` measured: per contender (:class:`ContenderResult`), per workload
(:class:`WorkloadResult`, with the ratios of medians every table shows) and per run
(:class:`BenchResult`, which round-trips through ``bench.json``).

A ratio is always a ratio of medians of the same run: a contender's median step time over the
plain step's (``× plain``), over its TorchJD counterpart's (``× TorchJD``) or its LibMTL
counterpart's.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtopt.bench.labels import PLAIN, libmtl_counterpart
from mtopt.bench.options import BenchOptions
from mtopt.bench.targets import evaluate_targets

__all__ = [
    "BenchResult",
    "ContenderResult",
    "SolverResult",
    "WorkloadResult",
    "result_from_dict",
]


@dataclass
class ContenderResult:
    """One contender's measurements on one workload.

    Attributes:
        label: ``plain``, the mtopt method spec, ``torchjd:<Aggregator>[:level=rep][#gramian]``
            or ``libmtl:<Weighting>`` (:mod:`mtopt.bench.labels`).
        kind: ``plain``, ``mtopt``, ``torchjd`` or ``libmtl``.
        category: ``plain``, ``loss`` (loss-only), ``rep`` (representation gradients),
            ``param`` (shared-parameter Jacobian) or ``closure`` (re-runs the forward) for an
            mtopt method; the kind for the others.
        counterpart: for an mtopt method, the label of its TorchJD counterpart (if any).
        times: seconds per measured step.
        peak_memory: bytes per measured step (``None`` where not measurable).
        phases: median seconds per phase of ``StepInfo.times`` (mtopt methods only).
        groups: optimizer updates per measured step, ``StepInfo.updates`` (methods that update
            the model several times per batch, ``SequentialMethod``, only).
        error: why the contender stopped (it is then left out of later rounds).
        solver_failures: measured steps whose inner solver did not converge (mtopt methods;
            the engine's warning for each is silenced during the bench).
    """

    label: str
    kind: str
    category: str
    counterpart: str | None = None
    times: list[float] = field(default_factory=list)
    peak_memory: list[int | None] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    groups: list[int] = field(default_factory=list)
    error: str | None = None
    solver_failures: int = 0

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def min(self) -> float | None:
        return min(self.times) if self.times else None

    @property
    def max(self) -> float | None:
        return max(self.times) if self.times else None

    @property
    def peak(self) -> int | None:
        """The largest measured peak (bytes), ``None`` if none was measurable."""
        values = [v for v in self.peak_memory if v is not None]
        return max(values) if values else None

    @property
    def median_groups(self) -> float | None:
        return statistics.median(self.groups) if self.groups else None


@dataclass
class SolverResult:
    """An inner solver against its reference implementation, on the same Gramians (those of the
    method's own measured steps, replayed in order so both keep their warm starts).

    Attributes:
        method: the mtopt method (a key of :data:`~mtopt.bench.labels.SOLVER_REFERENCES`).
        reference: what it is compared with.
        ours, theirs: seconds per solve.
        error: why the reference could not run (e.g. cvxpy/ECOS missing).
    """

    method: str
    reference: str
    ours: list[float] = field(default_factory=list)
    theirs: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        """Median of ours over median of theirs (< 1: ours is faster)."""
        if not self.ours or not self.theirs:
            return None
        return statistics.median(self.ours) / statistics.median(self.theirs)


@dataclass
class WorkloadResult:
    """Every contender on one workload, and the order they ran in.

    Attributes:
        name, description, num_tasks: the workload.
        contenders: label → measurements, in the order they were set up.
        order: the contender labels of each round, in the order they stepped (warm-up first).
        warmup: how many of ``order``'s rounds were not timed.
        seconds: wall time of the whole workload.
    """

    name: str
    description: str
    num_tasks: int
    contenders: dict[str, ContenderResult]
    order: list[list[str]] = field(default_factory=list)
    warmup: int = 0
    seconds: float = 0.0
    solvers: list[SolverResult] = field(default_factory=list)

    @property
    def plain_median(self) -> float | None:
        plain = self.contenders.get(PLAIN)
        return None if plain is None else plain.median

    def ratio_to_plain(self, label: str) -> float | None:
        """Median step time of ``label`` over the plain step's, both from this run; ``None``
        when either was not measured (a TorchJD counterpart under ``--no-torchjd``)."""
        contender = self.contenders.get(label)
        base, mine = self.plain_median, None if contender is None else contender.median
        if base is None or mine is None or base <= 0:
            return None
        return mine / base

    def ratio_to_libmtl(self, label: str) -> float | None:
        """Median step time of an mtopt method over its LibMTL counterpart's (if measured)."""
        theirs = libmtl_counterpart(label)
        if theirs is None or self.contenders[label].kind != "mtopt":
            return None
        other = self.contenders.get(theirs)
        mine = self.contenders[label].median
        if other is None or other.median is None or mine is None or other.median <= 0:
            return None
        return mine / other.median

    def ratio_to_torchjd(self, label: str) -> float | None:
        """Median step time of an mtopt method over its TorchJD counterpart's."""
        counterpart = self.contenders[label].counterpart
        if counterpart is None or counterpart not in self.contenders:
            return None
        theirs, mine = self.contenders[counterpart].median, self.contenders[label].median
        if theirs is None or mine is None or theirs <= 0:
            return None
        return mine / theirs


@dataclass
class BenchResult:
    """A whole ``mtopt bench`` run."""

    options: BenchOptions
    workloads: list[WorkloadResult]
    machine: dict[str, Any]
    memory: str
    command: str = ""
    #: lines for the reader, e.g. the registered methods left out of the default list
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (medians and ratios included)."""
        out: dict[str, Any] = {
            "options": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.options).items()
            },
            "machine": self.machine,
            "memory": self.memory,
            "command": self.command,
            "notes": self.notes,
            "workloads": [],
            "targets": [asdict(t) for t in evaluate_targets(self)],
        }
        for w in self.workloads:
            entry = {k: v for k, v in asdict(w).items() if k != "contenders"}
            for solver, data in zip(w.solvers, entry["solvers"], strict=True):
                data["ratio"] = solver.ratio
            entry["contenders"] = {}
            for label, c in w.contenders.items():
                entry["contenders"][label] = {
                    **asdict(c),
                    "median": c.median,
                    "min": c.min,
                    "max": c.max,
                    "ratio_to_plain": w.ratio_to_plain(label),
                    "ratio_to_torchjd": w.ratio_to_torchjd(label),
                }
            out["workloads"].append(entry)
        return out


_CONTENDER_FIELDS = (
    "label",
    "kind",
    "category",
    "counterpart",
    "times",
    "peak_memory",
    "phases",
    "groups",
    "error",
    "solver_failures",
)


def result_from_dict(data: dict[str, Any]) -> BenchResult:
    """A :class:`BenchResult` back from :meth:`BenchResult.to_dict` (``bench.json``), e.g. to
    re-render its report or chart."""
    opts = dict(data["options"])
    for key in ("workloads", "methods", "torchjd_aggregators"):
        if opts.get(key) is not None:
            opts[key] = tuple(opts[key])
    if opts.get("out_dir") is not None:
        opts["out_dir"] = Path(opts["out_dir"])
    workloads = []
    for w in data["workloads"]:
        contenders = {
            label: ContenderResult(**{k: c[k] for k in _CONTENDER_FIELDS if k in c})
            for label, c in w["contenders"].items()
        }
        workloads.append(
            WorkloadResult(
                w["name"],
                w["description"],
                w["num_tasks"],
                contenders,
                order=w["order"],
                warmup=w["warmup"],
                seconds=w["seconds"],
                solvers=[
                    SolverResult(**{k: v for k, v in s.items() if k != "ratio"})
                    for s in w.get("solvers", [])
                ],
            )
        )
    return BenchResult(
        BenchOptions(**opts),
        workloads,
        data["machine"],
        data["memory"],
        data.get("command", ""),
        list(data.get("notes", [])),
    )
