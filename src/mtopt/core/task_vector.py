"""A per-task float64 vector trained by its own optimizer.

UW / IMTL-L scales, FAMO logits and Auto-Lambda weights are all such vectors: created lazily once
the number of tasks is known, stepped from a gradient the method computes, and saved with the
method's ``state_dict`` (values and optimizer state, deep-copied).

:meth:`TaskVector.step` hands the gradient straight to :meth:`VectorAdam.update`, which
updates a detached alias of the vector in place: no ``.grad``
round trip and no ``torch.no_grad()`` context per step (FAMO, Auto-Lambda and hybrid IMTL step
once per training step, where a few microseconds matter). The arithmetic is the same as
``step()``'s.

:class:`ScalarAdam` / :class:`ScalarSGD` are the same updates in plain Python float arithmetic
(IEEE float64, like the tensors'), for methods that compute their gradient as Python floats (UW,
IMTL-L): :meth:`TaskVector.step_values` reads and writes the vector through a NumPy view of its
memory. For the handful of task scalars that is a few microseconds, where every tensor kernel
costs several of dispatch alone; the values agree with ``torch.optim.Adam``'s to rounding (its
kernels fuse some multiply-adds), and the ``state_dict`` format is the same as the tensor
optimizers', so either loads the other's state.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

OptimizerFactory = Callable[[list[Tensor]], "VectorAdam | ScalarAdam | ScalarSGD"]

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def floats_to_tensor(values: list[float], dtype: torch.dtype) -> Tensor:
    """A CPU tensor of ``dtype`` holding ``values`` (each rounded to ``dtype`` once, as
    ``torch.tensor(values, dtype=dtype)`` does), built through NumPy for float32 and float64:
    a few times cheaper than ``torch.tensor`` for a short list."""
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if np_dtype is None:
        return torch.tensor(values, dtype=dtype)
    return torch.from_numpy(np.array(values, dtype=np_dtype))


class VectorAdam:
    """``torch.optim.Adam``'s update (single-tensor form, L2 ``weight_decay`` added to the
    gradient, bias-corrected moments), written out for one small vector.

    The K task scalars of FAMO, Auto-Lambda and hybrid IMTL step once per training step; on a
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


class ScalarAdam:
    """Adam (``torch.optim.Adam``'s single-tensor formulas: ``m ← m + (1-β₁)(g-m)``,
    ``v ← β₂v + (1-β₂)g²``, ``p ← p - (lr/(1-β₁ᵗ)) m / (√v/√(1-β₂ᵗ) + ε)``) on Python floats.

    Built like the tensor optimizers (from ``[param]``, of which it only uses the size); stepped
    by :meth:`update_values`. No weight decay (the learned scales use none).
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if len(params) != 1:
            raise ValueError("ScalarAdam steps exactly one tensor")
        k = params[0].numel()
        self.lr, self.betas, self.eps = float(lr), betas, eps
        self.step_count = 0
        self.exp_avg = [0.0] * k
        self.exp_avg_sq = [0.0] * k

    def update_values(self, values: list[float], grad: list[float]) -> list[float]:
        """The values after one step from ``grad``."""
        beta1, beta2 = self.betas
        self.step_count += 1
        c1, c2 = 1 - beta1, 1 - beta2
        self.exp_avg = m = [a + c1 * (g - a) for a, g in zip(self.exp_avg, grad, strict=True)]
        self.exp_avg_sq = v = [
            b * beta2 + c2 * g * g for b, g in zip(self.exp_avg_sq, grad, strict=True)
        ]
        step_size = self.lr / (1 - beta1**self.step_count)
        root2 = (1 - beta2**self.step_count) ** 0.5
        eps, sqrt = self.eps, math.sqrt
        return [
            p - step_size * a / (sqrt(b) / root2 + eps)
            for p, a, b in zip(values, m, v, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "adam",
            "step": self.step_count,
            "exp_avg": list(self.exp_avg),
            "exp_avg_sq": list(self.exp_avg_sq),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "adam":
            raise ValueError(f"not an Adam state: {sorted(state)}")
        self.step_count = int(state["step"])
        self.exp_avg = [float(a) for a in state["exp_avg"]]
        self.exp_avg_sq = [float(b) for b in state["exp_avg_sq"]]


class ScalarSGD:
    """Plain SGD (``p ← p − lr·g``) on Python floats; see :class:`ScalarAdam`."""

    def __init__(self, params: list[Tensor], lr: float) -> None:
        if len(params) != 1:
            raise ValueError("ScalarSGD steps exactly one tensor")
        self.lr = float(lr)

    def update_values(self, values: list[float], grad: list[float]) -> list[float]:
        lr = self.lr
        return [p - lr * g for p, g in zip(values, grad, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sgd"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "sgd":
            raise ValueError(f"not an SGD state: {sorted(state)}")


class TaskVector:
    def __init__(self, owner: str, init: float, make_optimizer: OptimizerFactory) -> None:
        self.owner = owner
        self.init = float(init)
        self.make_optimizer = make_optimizer
        self.value: Tensor | None = None
        self.optimizer: Any = None
        self._view: np.ndarray | None = None  # the memory of ``value``, seen by NumPy

    def ensure(self, k: int) -> Tensor:
        """The vector, created at ``init`` for ``k`` tasks on first use."""
        if self.value is None:
            self.value = torch.full((k,), self.init, dtype=torch.float64, requires_grad=True)
            self._view = self.value.detach().numpy()
            self.optimizer = self.make_optimizer([self.value])
        elif self.value.numel() != k:
            raise ValueError(f"{self.owner}: built for {self.value.numel()} tasks, got {k}")
        return self.value

    def step(self, grad: Tensor) -> None:
        """One optimizer step from ``grad``."""
        assert self.value is not None and self.optimizer is not None
        if isinstance(self.optimizer, VectorAdam):
            self.optimizer.update(grad.detach().to(self.value.dtype))
        else:
            self.step_values(grad.detach().tolist())

    def values(self) -> list[float]:
        """The current values as Python floats (after :meth:`ensure`)."""
        assert self._view is not None
        return self._view.tolist()

    def step_values(self, grad: list[float]) -> list[float]:
        """One step of a :class:`ScalarAdam` / :class:`ScalarSGD` from ``grad`` (Python floats);
        returns the new values. They are written through the NumPy view, in place, without
        an autograd version bump: vectors stepped this way never enter a graph."""
        assert self._view is not None and self.optimizer is not None
        new = self.optimizer.update_values(self._view.tolist(), grad)
        self._view[:] = new
        return new

    def state(self) -> dict[str, Any]:
        if self.value is None:
            return {}
        assert self.optimizer is not None
        return {
            "value": self.value.detach().tolist(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.value, self.optimizer, self._view = None, None, None
        if not state:
            return
        value = self.ensure(len(state["value"]))
        assert self.optimizer is not None
        with torch.no_grad():
            value.copy_(torch.tensor(state["value"], dtype=torch.float64))
        self.optimizer.load_state_dict(state["optimizer"])
