"""What every contender is: its own deep copy of the workload's initial model, its own
``Adam(lr=LR)``, and one full training step per call (forward, gradients, update), which
:mod:`mtopt.bench.measure` times."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mtopt.bench.results import ContenderResult
from mtopt.bench.workloads import Batch, BenchModel

__all__ = ["LR", "Contender", "SolverSamples", "StepOutcome"]

#: every contender's Adam learning rate
LR = 1e-3


@dataclass
class StepOutcome:
    """What a step reports beyond its time (read from ``StepInfo``'s typed fields; empty for
    the contenders that are not mtopt methods).

    Attributes:
        times: seconds per phase (``StepInfo.times``).
        updates: optimizer updates made in the step (``StepInfo.updates``), for a method that
            updates the model several times per batch (``StepInfo.sequential`` set); ``None``
            otherwise.
        solver_failed: the inner solver did not converge (``StepInfo.solver``).
    """

    times: dict[str, float] = field(default_factory=dict)
    updates: int | None = None
    solver_failed: bool = False


@dataclass
class SolverSamples:
    """The Gramians an mtopt contender recorded (untimed) for the solver-alone comparison."""

    method: str
    gramians: list[Tensor]


class Contender(ABC):
    """A model copy, its optimizer, and one full step per :meth:`step` call."""

    def __init__(self, result: ContenderResult, model: BenchModel) -> None:
        self.result = result
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    @abstractmethod
    def step(self, batch: Batch) -> StepOutcome:
        """One training step on ``batch`` (timed)."""

    def observe(self, batch: Batch) -> None:  # noqa: B027 - an optional hook
        """Called untimed before each measured step (default: nothing)."""

    def solver_samples(self) -> SolverSamples | None:
        """The Gramians recorded for the solver comparison (default: none)."""
        return None
