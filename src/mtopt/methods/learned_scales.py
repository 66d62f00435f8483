r"""Methods that learn one scalar per task from the loss values: UW (§3) and IMTL-L (§12).

Both minimise a per-task objective :math:`J(s, \ell)` in the scalars :math:`s\in\mathbb R^K`
jointly with the model: each step the model gets the effective weights
:math:`w_k=\partial J/\partial\ell_k` at the current :math:`s`, then :math:`s` takes one step of its
own optimizer (Adam by default) on :math:`\partial J/\partial s` at the same loss values, which is
what back-propagating :math:`J` through model and scalars together does.

* **UW** (Kendall, Gal & Cipolla, CVPR 2018), ``variant="common"`` (nash-mtl, LibMTL,
  Auto-Lambda): :math:`s=\log\sigma^2`, :math:`J=\sum_k\frac12(e^{-s_k}\ell_k+s_k)`, weights
  :math:`\frac12e^{-s_k}`, stationary at :math:`s_k^*=\log\ell_k`. ``variant="typed"`` (Gama &
  Grassi): :math:`\eta=\log\sigma`, :math:`J=\sum_k\eta_k+\ell_ke^{-p_k\eta_k}/f_k` with
  :math:`(p,f)=(2,2)` for regression/MSE, :math:`(2,1)` for classification/CE and :math:`(1,1)`
  for L1 (Laplace) tasks; stationary at :math:`e^{p\eta}=p\ell/f`. SamsungLabs' form
  :math:`e^{-s}\ell+\frac12s` is not offered. Initial value 0 (nash-mtl, SamsungLabs, Gama; LibMTL
  −0.5, Auto-Lambda −0.7), learning rate 0.025 (nash-mtl's separate parameter group).
* **IMTL-L** (Liu et al., ICLR 2021; no official code): :math:`J=\sum_k e^{s_k}\ell_k-s_k`,
  weights :math:`e^{s_k}`, stationary at :math:`e^{s_k}\ell_k=1`, so every scaled loss is driven to
  1. Same defaults as UW.

No autograd graph is built and no tensor kernel runs per task: each step evaluates :math:`J`,
:math:`w=\partial J/\partial\ell` and :math:`\partial J/\partial s` from their closed forms
(:meth:`LearnedScales.derivatives`, written out per method below; a test checks them against
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
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mtopt.core.checks import require_positive_losses
from mtopt.core.hparams import Positive, Real
from mtopt.core.method import Aggregation, Method, MethodInput, Need, check_choice
from mtopt.core.registry import register
from mtopt.core.task_vector import ScalarAdam, ScalarSGD, TaskVector, floats_to_tensor

OPTIMIZERS = ("adam", "sgd")
UW_VARIANTS = ("common", "typed")
#: (p, f) of the typed UW term η + ℓ e^{-pη} / f, by loss type.
UW_TYPED_CONSTANTS = {"regression": (2.0, 2.0), "classification": (2.0, 1.0), "l1": (1.0, 1.0)}


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

    needs = Need.LOSSES
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


@register
class UncertaintyWeighting(LearnedScales):
    """UW (Kendall et al. 2018): learned homoscedastic noise; ``common`` or ``typed`` form."""

    name = "uw"
    positive_losses_why = "UW (its scales diverge for negative losses)"

    def __init__(
        self,
        *,
        variant: Literal["common", "typed"] = "common",
        loss_types: Sequence[Literal["regression", "classification", "l1"]] | None = None,
        init: Real = 0.0,
        lr: Positive = 0.025,
        optimizer: Literal["adam", "sgd"] = "adam",
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(init=init, lr=lr, optimizer=optimizer, head_policy=head_policy)
        self.variant = variant
        self.loss_types = None if loss_types is None else tuple(loss_types)
        # the loss types of the last step and their (p, f)
        self._typed: tuple[tuple[str, ...], list[float], list[float]] | None = None

    def _typed_constants(self, inputs: MethodInput) -> tuple[list[float], list[float]]:
        """``(p, f)`` of each task's loss type, rebuilt only when the types change."""
        types = self.loss_types or inputs.loss_types
        if self._typed is not None and types == self._typed[0]:
            return self._typed[1], self._typed[2]
        if types is None:
            raise ValueError(
                "uw: variant='typed' needs each task's loss type (regression, classification, "
                "l1): pass loss_types=... or MultiTaskOptimizer(..., loss_types=...)"
            )
        if len(types) != inputs.num_tasks:
            raise ValueError(f"uw: {len(types)} loss types for {inputs.num_tasks} tasks")
        for t in types:
            check_choice(self.name, "loss type", t, tuple(UW_TYPED_CONSTANTS))
        p = [UW_TYPED_CONSTANTS[t][0] for t in types]
        f = [UW_TYPED_CONSTANTS[t][1] for t in types]
        self._typed = (tuple(types), p, f)
        return p, f

    def objective(self, s: Tensor, losses: Tensor, inputs: MethodInput) -> Tensor:
        if self.variant == "common":
            return 0.5 * (torch.exp(-s) * losses + s).sum()
        p, f = (torch.tensor(c, dtype=torch.float64) for c in self._typed_constants(inputs))
        return (s + losses * torch.exp(-p * s) / f).sum()

    def derivatives(
        self, s: list[float], losses: list[float], inputs: MethodInput
    ) -> tuple[float, list[float], list[float]]:
        r"""Common: :math:`\partial J/\partial\ell_k=\frac12e^{-s_k}`,
        :math:`\partial J/\partial s_k=\frac12-\frac12\ell_ke^{-s_k}`. Typed:
        :math:`\partial J/\partial\ell_k=e^{-p_k\eta_k}/f_k`,
        :math:`\partial J/\partial\eta_k=1-p_k\ell_ke^{-p_k\eta_k}/f_k`."""
        if self.variant == "common":
            e = exp_all(-x for x in s)
            value = 0.5 * sum([a * ell + x for a, ell, x in zip(e, losses, s, strict=True)])
            weights = [0.5 * a for a in e]
            return value, weights, [0.5 - 0.5 * ell * a for a, ell in zip(e, losses, strict=True)]
        p, f = self._typed_constants(inputs)
        e = exp_all(-pk * x for pk, x in zip(p, s, strict=True))
        scaled = [ell * a / fk for ell, a, fk in zip(losses, e, f, strict=True)]  # ℓe^{-pη}/f
        value = sum([x + t for x, t in zip(s, scaled, strict=True)])
        weights = [a / fk for a, fk in zip(e, f, strict=True)]
        return value, weights, [1.0 - pk * t for pk, t in zip(p, scaled, strict=True)]


@register
class IMTLL(LearnedScales):
    """IMTL-L (Liu et al. 2021): learned loss scales ``e^{s}ℓ − s`` (scaled losses → 1)."""

    name = "imtl_l"
    positive_losses_why = "the scale e^{s}ℓ"

    def objective(self, s: Tensor, losses: Tensor, inputs: MethodInput) -> Tensor:
        return (torch.exp(s) * losses - s).sum()

    def derivatives(
        self, s: list[float], losses: list[float], inputs: MethodInput
    ) -> tuple[float, list[float], list[float]]:
        r""":math:`\partial J/\partial\ell_k=e^{s_k}`,
        :math:`\partial J/\partial s_k=e^{s_k}\ell_k-1`."""
        e = exp_all(s)
        scaled = [a * ell for a, ell in zip(e, losses, strict=True)]
        value = sum([t - x for t, x in zip(scaled, s, strict=True)])
        return value, e, [t - 1.0 for t in scaled]
