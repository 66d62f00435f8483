"""The performance targets of ``mtopt bench``, evaluated on a run (reported met or missed with
the measured ratio, never a failure):

* loss-level methods (no closure re-run) ≤ 1.05× the plain step, on every workload;
* representation-level methods ≤ 1.5× plain on ``mlp11`` (K = 11);
* each mtopt method with a TorchJD counterpart ≤ 1.0× that counterpart (``n/a`` when the
  counterpart was set up but could not be measured);
* a method that updates the model several times per batch (one reporting
  ``StepInfo.updates`` through ``SequentialMethod``) ≤ (M + 0.1)× plain, M its measured number
  of updates per step: each measured step's time over the plain median minus that step's M,
  the median of that excess ≤ 0.1 (reported as median M + excess; the plain ratio when steps
  and update counts do not pair up);
* each compared inner solver ≥ 5× faster than its reference per solve (ratio ≤ 0.2).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtopt.bench.results import BenchResult, ContenderResult, WorkloadResult

__all__ = [
    "COUNTERPART_MAX",
    "GROUPS_SLACK",
    "LOSS_ONLY_MAX",
    "REP_MAX",
    "REP_TARGET_WORKLOAD",
    "SOLVER_MIN_SPEEDUP",
    "TargetCheck",
    "evaluate_targets",
    "target_summary",
]

LOSS_ONLY_MAX = 1.05
REP_MAX = 1.5
REP_TARGET_WORKLOAD = "mlp11"
COUNTERPART_MAX = 1.0
GROUPS_SLACK = 0.1
#: target: our solver at least this many times faster than the reference
SOLVER_MIN_SPEEDUP = 5.0


@dataclass(frozen=True)
class TargetCheck:
    """One performance target, evaluated on one contender.

    Attributes:
        target: what is required (e.g. ``loss-only ≤ 1.05× plain``).
        workload: the workload it was measured on.
        label: the contender.
        ratio: the measured ratio of medians (``None``: the reference could not be measured).
        limit: the largest ratio that meets the target.
        met: ``ratio ≤ limit`` (``None`` when ``ratio`` is).
        note: why a target could not be evaluated.
    """

    target: str
    workload: str
    label: str
    ratio: float | None
    limit: float
    met: bool | None
    note: str = ""

    @property
    def verdict(self) -> str:
        return "n/a" if self.met is None else ("met" if self.met else "MISSED")


def _check(
    target: str, w: WorkloadResult, label: str, ratio: float | None, limit: float, note: str
) -> list[TargetCheck]:
    """The check, or none when the ratio is unknown and nothing says why."""
    if ratio is not None:
        return [TargetCheck(target, w.name, label, ratio, limit, ratio <= limit)]
    if note:
        return [TargetCheck(target, w.name, label, None, limit, None, note)]
    return []


def _groups_ratio(w: WorkloadResult, c: ContenderResult, groups: float) -> float | None:
    """M varies from step to step: judge each step against its own M, i.e. the median excess
    ``t/plain − M`` over the steps, reported as ``M̃ + excess``."""
    base = w.plain_median
    if base and len(c.groups) == len(c.times):
        return groups + statistics.median(
            t / base - g for t, g in zip(c.times, c.groups, strict=True)
        )
    return w.ratio_to_plain(c.label)


def _contender_checks(w: WorkloadResult, c: ContenderResult) -> list[TargetCheck]:
    """The targets that apply to one measured mtopt contender."""
    checks: list[TargetCheck] = []
    plain_ratio = w.ratio_to_plain(c.label)
    if c.category == "loss":
        target = f"loss-only ≤ {LOSS_ONLY_MAX}× plain"
        checks += _check(target, w, c.label, plain_ratio, LOSS_ONLY_MAX, "")
    if c.category == "rep" and w.name == REP_TARGET_WORKLOAD:
        target = f"rep-level ≤ {REP_MAX}× plain at K = {w.num_tasks}"
        checks += _check(target, w, c.label, plain_ratio, REP_MAX, "")
    if c.counterpart is not None and c.counterpart in w.contenders:
        target = f"≤ {COUNTERPART_MAX}× {c.counterpart}"
        note = w.contenders[c.counterpart].error or "not measured"
        ratio = w.ratio_to_torchjd(c.label)
        checks += _check(target, w, c.label, ratio, COUNTERPART_MAX, note)
    groups = c.median_groups
    if groups is not None:
        target = f"≤ (M + {GROUPS_SLACK})× plain, M = {groups:g}"
        ratio = _groups_ratio(w, c, groups)
        checks += _check(target, w, c.label, ratio, groups + GROUPS_SLACK, "")
    return checks


def evaluate_targets(result: BenchResult) -> list[TargetCheck]:
    """The targets (module doc), on every contender they apply to (nothing fails; see
    ``met``)."""
    checks: list[TargetCheck] = []
    for w in result.workloads:
        for c in w.contenders.values():
            if c.kind == "mtopt" and c.times:
                checks += _contender_checks(w, c)
        for solver in w.solvers:
            target = f"{solver.method} solver ≥ {SOLVER_MIN_SPEEDUP:g}× faster than the reference"
            note = solver.error or "not measured"
            checks += _check(target, w, solver.method, solver.ratio, 1.0 / SOLVER_MIN_SPEEDUP, note)
    return checks


def target_summary(checks: list[TargetCheck]) -> str:
    """``N met, M missed[, P not evaluable]``."""
    met = sum(t.met is True for t in checks)
    missed = sum(t.met is False for t in checks)
    unknown = len(checks) - met - missed
    return f"{met} met, {missed} missed" + (f", {unknown} not evaluable" if unknown else "")
