"""The record of one step, :class:`StepInfo`."""

from __future__ import annotations

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

    def weight_dict(self) -> dict[str, float] | None:
        if self.weights is None:
            return None
        return dict(zip(self.task_names, self.weights.tolist(), strict=True))
