r"""The shared machinery of methods that learn one scalar per task from the loss values
(:mod:`mtopt.methods.uw`, :mod:`mtopt.methods.imtl_l`).

Both minimise a per-task objective :math:`J(s, \ell)` in the scalars :math:`s\in\mathbb R^K`
jointly with the model: each step the model gets the effective weights
:math:`w_k=\partial J/\partial\ell_k` at the current :math:`s`, then :math:`s` takes one step of its
own optimizer (Adam by default) on :math:`\partial J/\partial s` at the same loss values, which is
what back-propagating :math:`J` through model and scalars together does.

The methods' objectives and defaults are documented with them.

No autograd graph is built and no tensor kernel runs per task: each step evaluates :math:`J`,
:math:`w=\partial J/\partial\ell` and :math:`\partial J/\partial s` from their closed forms
(:meth:`LearnedScales.derivatives`, written out by each method; a test checks them against
autograd on :meth:`LearnedScales.objective`) in Python float64 arithmetic, and :math:`s` takes its
step with :class:`~mtopt.core.task_vector.ScalarAdam` (``torch.optim.Adam``'s update on Python
floats) or :class:`~mtopt.core.task_vector.ScalarSGD`. For K scalars that costs a few
microseconds, where each tensor kernel would cost several of dispatch; the values agree with the
tensor computation to rounding (float64 either way).

The scalars (:attr:`LearnedScales.scales`, a float64 tensor updated in place) and their optimizer
state are part of ``state_dict``. Heads: weighted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

from torch import Tensor

from mtopt.core.checks import require_positive_losses
from mtopt.core.hparams import Positive, Real
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.task_vector import ScalarAdam, ScalarSGD, TaskVector, floats_to_tensor

OPTIMIZERS = ("adam", "sgd")


def exp_all(values: Iterable[float]) -> list[float]:
    """``math.exp`` of each value; an overflow gives ``inf`` (as ``torch.exp`` does) instead of
    raising, so diverging scales end in the engine's non-finite-weights error."""
    values = list(values)
    try:
        return [math.exp(x) for x in values]
    except OverflowError:
        return [math.exp(x) if x < 709.0 else math.inf for x in values]


class LearnedScales(Method):
    """Base class: scalars ``s`` (one per task) trained on an objective ``J(s, ℓ)``."""

    levels = ("loss",)
    #: why the method needs non-negative losses (for the error message)
    positive_losses_why: str = ""

    def __init__(
        self,
        *,
        init: Real = 0.0,
        lr: Positive = 0.025,
        optimizer: Literal["adam", "sgd"] = "adam",
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.init = float(init)
        self.lr = float(lr)
        self.optimizer = optimizer
        cls = ScalarAdam if optimizer == "adam" else ScalarSGD
        self._vector = TaskVector(self.name, self.init, lambda ps: cls(ps, lr=self.lr))

    @property
    def scales(self) -> Tensor | None:
        """The learned scalars ``s`` (``None`` before the first step), a float64 tensor that
        each step updates in place (writing into it sets the scales)."""
        return self._vector.value

    # subclasses: the objective, differentiable in both arguments. It is the definition; the
    # step uses the closed forms of derivatives(), which a test checks against autograd on it.
    def objective(self, s: Tensor, losses: Tensor, inputs: MethodInput) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    # subclasses: J and its two gradients in closed form
    def derivatives(
        self, s: list[float], losses: list[float], inputs: MethodInput
    ) -> tuple[float, list[float], list[float]]:
        """``(J, ∂J/∂ℓ, ∂J/∂s)`` at ``s`` and ``ℓ``, in Python float (float64) arithmetic."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _ensure(self, k: int) -> None:
        self._vector.ensure(k)

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        self._vector.ensure(inputs.num_tasks)
        losses = inputs.losses.detach().cpu().tolist()
        if not all(v >= 0 for v in losses):  # the error, naming the tasks (NaN fails too)
            why = self.positive_losses_why
            require_positive_losses(
                self.name, inputs.losses, inputs.task_names, why, allow_zero=True
            )
        value, weights, grad_s = self.derivatives(self._vector.values(), losses, inputs)
        scales = self._vector.step_values(grad_s)
        return Aggregation(
            floats_to_tensor(weights, inputs.losses.dtype),
            extras={"scales": scales, "objective": value},
        )

    def _get_state(self) -> dict[str, Any]:
        return self._vector.state()

    def _set_state(self, state: dict[str, Any]) -> None:
        self._vector.load(state)
