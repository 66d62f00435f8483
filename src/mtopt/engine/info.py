"""The record of one step, :class:`StepInfo`, and the log of uncertified solves."""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from mtopt.core.capabilities import UpdateReport
from mtopt.core.method import SolverReport


@dataclass
class StepInfo:
    """The record of one step.

    Attributes:
        step: 0-based index of the step.
        losses: task name → loss value before the update.
        weights: the method's effective weights (``d = Σ w_k g_k``), or ``None``.
        task_names: names in the order of ``weights``.
        solver: the inner solver's report (``None`` if the method has no solver).
        times: seconds per phase: ``forward``, ``gradients``, ``method``, ``backward``,
            ``optimizer`` (``after_step`` for closure methods), ``total``.
        extras: method-specific values worth logging (read by no part of mtopt).
        gradient_engine: how the per-task gradients were obtained: ``"jacobian"`` or
            ``"batched"`` (of the shared parameters), ``"gramian"`` (their Gramian only),
            ``"representation"``, or ``None`` (the method works on the losses only).
        updates: optimizer updates made in this step (1, or what a sequential method made).
        sequential: a sequential method's report (its groups, their number, the affinity).
        communicated_bytes: in a process group, the payload this rank contributed to the
            step's collectives (0 in one process).
        skipped: under a ``GradScaler``, the step found an inf or NaN gradient and did not
            update the parameters (the scaler lowered its scale), as ``GradScaler.step`` does.
    """

    step: int
    losses: dict[str, float]
    weights: Tensor | None
    task_names: tuple[str, ...]
    solver: SolverReport | None
    times: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)
    gradient_engine: str | None = None
    updates: int = 1
    sequential: UpdateReport | None = None
    communicated_bytes: int = 0
    skipped: bool = False

    def weight_dict(self) -> dict[str, float] | None:
        if self.weights is None:
            return None
        return dict(zip(self.task_names, self.weights.tolist(), strict=True))


logger = logging.getLogger("mtopt")


class UncertifiedLog:
    """Uncertified solves so far, by (solver name, status): the first of each kind is logged
    with its details at WARNING, later ones at DEBUG (``logging.getLogger("mtopt")`` at DEBUG,
    or ``mtopt --verbose``, shows every one)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def record(self, step: int, method: str, report: SolverReport) -> None:
        kind = (report.name, report.status)
        self.counts[kind] += 1
        first = self.counts[kind] == 1
        residual = "" if report.residual is None else f", residual {report.residual:.3g}"
        tolerance = "" if report.tolerance is None else f" > {report.tolerance:.3g}"
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "step %d: %s solver %s not certified (%s after %d iterations%s%s): %s%s",
            step,
            method,
            report.name,
            report.status,
            report.iterations,
            residual,
            tolerance,
            report.message,
            "; further steps like this are counted, not logged (--verbose logs them)"
            if first
            else "",
        )


class PhaseClock:
    """Seconds per phase of a step (``StepInfo.times``)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.start = self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[phase] = now - self.last
        self.last = now

    def done(self) -> dict[str, float]:
        self.times["total"] = time.perf_counter() - self.start
        return self.times
