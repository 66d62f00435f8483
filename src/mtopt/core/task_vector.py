"""A per-task float64 vector trained by its own optimizer.

UW / IMTL-L scales, FAMO logits and Auto-Lambda weights are all such vectors: created lazily once
the number of tasks is known, stepped from a gradient the method computes, and saved with the
method's ``state_dict`` (values and optimizer state, deep-copied).

:meth:`TaskVector.step` hands the gradient straight to :meth:`VectorAdam.update` /
:meth:`VectorSGD.update`, which update a detached alias of the vector in place: no ``.grad``
round trip and no ``torch.no_grad()`` context per step (the learned-scale methods step once per
training step, where a few microseconds matter). The arithmetic is the same as ``step()``'s.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

OptimizerFactory = Callable[[list[Tensor]], "torch.optim.Optimizer | VectorAdam | VectorSGD"]


class VectorAdam:
    """``torch.optim.Adam``'s update (single-tensor form, L2 ``weight_decay`` added to the
    gradient, bias-corrected moments), written out for one small vector.

    The K task scalars of UW, IMTL-L, FAMO and Auto-Lambda step once per training step; on a
    model whose step takes a few milliseconds, ``torch.optim.Adam``'s per-call machinery costs
    several percent of it. This class does the same arithmetic in the same order (a test checks
    bit-for-bit equality with ``torch.optim.Adam``) with a fraction of the overhead, and keeps a
    ``state_dict`` of plain numbers.
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if len(params) != 1:
            raise ValueError("VectorAdam steps exactly one tensor")
        self.param = params[0]
        # shares storage and version counter with ``param``; needs no grad mode to update in place
        self._data = self.param.detach()
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), betas, eps, weight_decay
        self.step_count = 0
        self.exp_avg = torch.zeros_like(self.param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(self.param, memory_format=torch.preserve_format)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One step from ``param.grad`` (nothing when it is ``None``), like ``torch.optim``."""
        if self.param.grad is not None:
            self.update(self.param.grad)

    def update(self, grad: Tensor) -> None:
        """One step from ``grad`` (same dtype as the parameter), without touching ``.grad``."""
        grad = grad.detach()
        beta1, beta2 = self.betas
        if self.weight_decay != 0:
            grad = grad.add(self._data, alpha=self.weight_decay)
        self.step_count += 1
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2 = 1 - beta2**self.step_count
        step_size = self.lr / bias_correction1
        denom = (self.exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
        self._data.addcdiv_(self.exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "adam",
            "step": self.step_count,
            "exp_avg": self.exp_avg.tolist(),
            "exp_avg_sq": self.exp_avg_sq.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "adam":
            raise ValueError(f"not a VectorAdam state: {sorted(state)}")
        self.step_count = int(state["step"])
        self.exp_avg = torch.tensor(state["exp_avg"], dtype=self.param.dtype)
        self.exp_avg_sq = torch.tensor(state["exp_avg_sq"], dtype=self.param.dtype)


class VectorSGD:
    """Plain SGD (``p ← p − lr·g``) on one small vector, like ``torch.optim.SGD(lr=lr)``."""

    def __init__(self, params: list[Tensor], lr: float) -> None:
        if len(params) != 1:
            raise ValueError("VectorSGD steps exactly one tensor")
        self.param, self.lr = params[0], float(lr)
        self._data = self.param.detach()  # see VectorAdam

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if self.param.grad is not None:
            self.update(self.param.grad)

    def update(self, grad: Tensor) -> None:
        """One step from ``grad`` (same dtype as the parameter), without touching ``.grad``."""
        self._data.add_(grad.detach(), alpha=-self.lr)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sgd"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "sgd":
            raise ValueError(f"not a VectorSGD state: {sorted(state)}")


class TaskVector:
    def __init__(self, owner: str, init: float, make_optimizer: OptimizerFactory) -> None:
        self.owner = owner
        self.init = float(init)
        self.make_optimizer = make_optimizer
        self.value: Tensor | None = None
        self.optimizer: Any = None

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
        grad = grad.detach().to(self.value.dtype)
        if isinstance(self.optimizer, (VectorAdam, VectorSGD)):
            self.optimizer.update(grad)
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.value.grad = grad
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
