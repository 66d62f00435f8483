"""The reference of every ratio: ``opt.zero_grad(); sum(losses).backward(); opt.step()``."""

from __future__ import annotations

from typing import cast

from torch import Tensor

from mtopt.bench.contenders.base import Contender, StepOutcome
from mtopt.bench.labels import PLAIN
from mtopt.bench.results import ContenderResult
from mtopt.bench.workloads import Batch, BenchModel, Workload, forward

__all__ = ["PlainContender"]


class PlainContender(Contender):
    """The plain step: one backward pass of the summed losses."""

    def __init__(self, model: BenchModel, workload: Workload) -> None:
        super().__init__(ContenderResult(PLAIN, "plain", "plain"), model)
        self.workload = workload

    def step(self, batch: Batch) -> StepOutcome:
        self.optimizer.zero_grad()
        _, losses = forward(self.model, self.workload, batch)
        cast(Tensor, sum(losses)).backward()  # a sum of K ≥ 1 tensors
        self.optimizer.step()
        return StepOutcome()
