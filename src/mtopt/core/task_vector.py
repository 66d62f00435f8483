"""A per-task float64 vector trained by its own optimizer.

UW / IMTL-L scales, FAMO logits and Auto-Lambda weights are all such vectors: created lazily once
the number of tasks is known, stepped from a gradient the method computes, and saved with the
method's ``state_dict`` (values and optimizer state, deep-copied).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


class TaskVector:
    def __init__(self, owner: str, init: float, make_optimizer: OptimizerFactory) -> None:
        self.owner = owner
        self.init = float(init)
        self.make_optimizer = make_optimizer
        self.value: Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def ensure(self, k: int) -> Tensor:
        """The vector, created at ``init`` for ``k`` tasks on first use."""
        if self.value is None:
            self.value = torch.full((k,), self.init, dtype=torch.float64, requires_grad=True)
            self.optimizer = self.make_optimizer([self.value])
        elif self.value.numel() != k:
            raise ValueError(f"{self.owner}: built for {self.value.numel()} tasks, got {k}")
        return self.value

    def step(self, grad: Tensor) -> None:
        """One optimizer step from ``grad``."""
        assert self.value is not None and self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        self.value.grad = grad.detach().to(self.value.dtype)
        self.optimizer.step()
        self.value.grad = None

    def state(self) -> dict[str, Any]:
        if self.value is None:
            return {}
        assert self.optimizer is not None
        return {
            "value": self.value.detach().tolist(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def load(self, state: dict[str, Any]) -> None:
        if not state:
            self.value, self.optimizer = None, None
            return
        self.value, self.optimizer = None, None
        value = self.ensure(len(state["value"]))
        assert self.optimizer is not None
        with torch.no_grad():
            value.copy_(torch.tensor(state["value"], dtype=torch.float64))
        self.optimizer.load_state_dict(state["optimizer"])
