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

    # subclasses: the objective, differentiable in both arguments
    def objective(self, s: Tensor, losses: Tensor, inputs: MethodInput) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _ensure(self, k: int) -> None:
        self._vector.ensure(k)

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        scales = self._vector.ensure(inputs.num_tasks)
        losses = inputs.losses.detach().to(torch.float64).cpu().requires_grad_(True)
        with torch.enable_grad():
            value = self.objective(scales, losses, inputs)
            weights, grad_s = torch.autograd.grad(value, [losses, scales])
        self._vector.step(grad_s)
        return Aggregation(
            weights.to(inputs.losses.dtype),
            extras={"scales": scales.detach().tolist(), "objective": float(value.detach())},
        )

    def _get_state(self) -> dict[str, Any]:
        return self._vector.state()

    def _set_state(self, state: dict[str, Any]) -> None:
        self._vector.load(state)


@register
class UncertaintyWeighting(LearnedScales):
    """UW (Kendall et al. 2018): learned homoscedastic noise; ``common`` or ``typed`` form."""

    name = "uw"

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

    def _typed_constants(self, inputs: MethodInput) -> tuple[Tensor, Tensor]:
        types = self.loss_types or inputs.loss_types
        if types is None:
            raise ValueError(
                "uw: variant='typed' needs each task's loss type (regression, classification, "
                "l1): pass loss_types=... or MultiTaskOptimizer(..., loss_types=...)"
            )
        if len(types) != inputs.num_tasks:
            raise ValueError(f"uw: {len(types)} loss types for {inputs.num_tasks} tasks")
        for t in types:
            check_choice(self.name, "loss type", t, tuple(UW_TYPED_CONSTANTS))
        p, f = zip(*(UW_TYPED_CONSTANTS[t] for t in types), strict=True)
        return torch.tensor(p, dtype=torch.float64), torch.tensor(f, dtype=torch.float64)

    def objective(self, s: Tensor, losses: Tensor, inputs: MethodInput) -> Tensor:
        why = "UW (its scales diverge for negative losses)"
        require_positive_losses(self.name, losses.detach(), inputs.task_names, why, allow_zero=True)
        if self.variant == "common":
            return 0.5 * (torch.exp(-s) * losses + s).sum()
        p, f = self._typed_constants(inputs)
        return (s + losses * torch.exp(-p * s) / f).sum()


@register
class IMTLL(LearnedScales):
    """IMTL-L (Liu et al. 2021): learned loss scales ``e^{s}ℓ − s`` (scaled losses → 1)."""

    name = "imtl_l"

    def objective(self, s: Tensor, losses: Tensor, inputs: MethodInput) -> Tensor:
        why = "the scale e^{s}ℓ"
        require_positive_losses(self.name, losses.detach(), inputs.task_names, why, allow_zero=True)
        return (torch.exp(s) * losses - s).sum()
