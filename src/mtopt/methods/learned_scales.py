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

No autograd graph is built: each step evaluates :math:`J`, :math:`\partial J/\partial\ell` and
:math:`\partial J/\partial s` from their closed forms (:meth:`LearnedScales.derivatives`, written
out per method below) in float64, in the same order of operations as back-propagating
:meth:`LearnedScales.objective` would, so the values are those of autograd bit for bit.

The scalars and their optimizer state are part of ``state_dict``. Heads: weighted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtopt.core.checks import require_positive_losses
from mtopt.core.method import Aggregation, Method, MethodInput, Need, check_choice
from mtopt.core.registry import register
from mtopt.core.task_vector import TaskVector, VectorAdam, VectorSGD

OPTIMIZERS = ("adam", "sgd")
UW_VARIANTS = ("common", "typed")
#: (p, f) of the typed UW term η + ℓ e^{-pη} / f, by loss type.
UW_TYPED_CONSTANTS = {"regression": (2.0, 2.0), "classification": (2.0, 1.0), "l1": (1.0, 1.0)}


class LearnedScales(Method):
    """Base class: scalars ``s`` (one per task) trained on an objective ``J(s, ℓ)``."""

    needs = Need.LOSSES

    def __init__(
        self,
        *,
        init: float = 0.0,
        lr: float = 0.025,
        optimizer: str = "adam",
        head_policy: str | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        check_choice(self.name, "optimizer", optimizer, OPTIMIZERS)
        if not lr > 0:
            raise ValueError(f"{self.name}: lr must be > 0, got {lr}")
        self.init = float(init)
        self.lr = float(lr)
        self.optimizer = optimizer
        cls = VectorAdam if optimizer == "adam" else VectorSGD
        self._vector = TaskVector(self.name, self.init, lambda ps: cls(ps, lr=self.lr))

    @property
    def scales(self) -> Tensor | None:
        """The learned scalars ``s`` (``None`` before the first step)."""
        return self._vector.value

    #: why the method needs non-negative losses (for the error message)
    positive_losses_why: str = ""

    # subclasses: the objective, differentiable in both arguments (its definition; the step uses
    # the closed form of derivatives(), which a test checks against autograd on this)
    def objective(self, s: Tensor, losses: Tensor, inputs: MethodInput) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    # subclasses: J and its two gradients in closed form
    def derivatives(
        self, s: Tensor, losses: Tensor, inputs: MethodInput
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(J, ∂J/∂ℓ, ∂J/∂s)`` at ``s`` and ``ℓ`` (float64 CPU tensors, no autograd graph)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _ensure(self, k: int) -> None:
        self._vector.ensure(k)

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        scales = self._vector.ensure(inputs.num_tasks).detach()  # an alias: sees the step below
        losses = inputs.losses.detach().to(device="cpu", dtype=torch.float64)
        require_positive_losses(
            self.name, losses, inputs.task_names, self.positive_losses_why, allow_zero=True
        )
        value, weights, grad_s = self.derivatives(scales, losses, inputs)
        self._vector.step(grad_s)
        return Aggregation(
            weights.to(inputs.losses.dtype),
            extras={"scales": scales.tolist(), "objective": float(value)},
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
        variant: str = "common",
        loss_types: Sequence[str] | None = None,
        init: float = 0.0,
        lr: float = 0.025,
        optimizer: str = "adam",
        head_policy: str | None = None,
    ) -> None:
        super().__init__(init=init, lr=lr, optimizer=optimizer, head_policy=head_policy)
        check_choice(self.name, "variant", variant, UW_VARIANTS)
        if loss_types is not None:
            loss_types = tuple(loss_types)
            for t in loss_types:
                check_choice(self.name, "loss type", t, tuple(UW_TYPED_CONSTANTS))
        self.variant = variant
        self.loss_types = loss_types
        # the loss types of the last step and their (p, f, -p, 1/f)
        self._typed: tuple[tuple[str, ...], tuple[Tensor, Tensor, Tensor, Tensor]] | None = None

    def _typed_constants(self, inputs: MethodInput) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(p, f, -p, 1/f)`` of each task's loss type (float64), rebuilt when the types change."""
        types = self.loss_types or inputs.loss_types
        if self._typed is not None and types == self._typed[0]:
            return self._typed[1]
        if types is None:
            raise ValueError(
                "uw: variant='typed' needs each task's loss type (regression, classification, "
                "l1): pass loss_types=... or MultiTaskOptimizer(..., loss_types=...)"
            )
        if len(types) != inputs.num_tasks:
            raise ValueError(f"uw: {len(types)} loss types for {inputs.num_tasks} tasks")
        for t in types:
            check_choice(self.name, "loss type", t, tuple(UW_TYPED_CONSTANTS))
        p_values, f_values = zip(*(UW_TYPED_CONSTANTS[t] for t in types), strict=True)
        p = torch.tensor(p_values, dtype=torch.float64)
        f = torch.tensor(f_values, dtype=torch.float64)
        constants = (p, f, -p, torch.ones_like(f) / f)
        self._typed = (tuple(types), constants)
        return constants

    def objective(self, s: Tensor, losses: Tensor, inputs: MethodInput) -> Tensor:
        if self.variant == "common":
            return 0.5 * (torch.exp(-s) * losses + s).sum()
        p, f, _, _ = self._typed_constants(inputs)
        return (s + losses * torch.exp(-p * s) / f).sum()

    def derivatives(
        self, s: Tensor, losses: Tensor, inputs: MethodInput
    ) -> tuple[Tensor, Tensor, Tensor]:
        r"""Common: :math:`\partial J/\partial\ell_k=\frac12e^{-s_k}`,
        :math:`\partial J/\partial s_k=\frac12-\frac12\ell_ke^{-s_k}`. Typed:
        :math:`\partial J/\partial\ell_k=e^{-p_k\eta_k}/f_k`,
        :math:`\partial J/\partial\eta_k=1-p_k\ell_ke^{-p_k\eta_k}/f_k` (products grouped as
        back-propagation groups them)."""
        if self.variant == "common":
            e = torch.exp(-s)
            value = 0.5 * (e * losses + s).sum()
            return value, e * 0.5, 0.5 - 0.5 * losses * e
        _, f, neg_p, inv_f = self._typed_constants(inputs)
        e = torch.exp(neg_p * s)
        value = (s + losses * e / f).sum()
        return value, inv_f * e, inv_f * losses * e * neg_p + 1.0


@register
class IMTLL(LearnedScales):
    """IMTL-L (Liu et al. 2021): learned loss scales ``e^{s}ℓ − s`` (scaled losses → 1)."""

    name = "imtl_l"
    positive_losses_why = "the scale e^{s}ℓ"

    def objective(self, s: Tensor, losses: Tensor, inputs: MethodInput) -> Tensor:
        return (torch.exp(s) * losses - s).sum()

    def derivatives(
        self, s: Tensor, losses: Tensor, inputs: MethodInput
    ) -> tuple[Tensor, Tensor, Tensor]:
        r""":math:`\partial J/\partial\ell_k=e^{s_k}`,
        :math:`\partial J/\partial s_k=e^{s_k}\ell_k-1`."""
        e = torch.exp(s)
        scaled = e * losses
        return (scaled - s).sum(), e, scaled - 1.0
