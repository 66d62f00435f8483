r"""UW, uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty
to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

A learned log-variance per task (:class:`~mtopt.core.learned_scales.LearnedScales`, which says how
the scalars are trained):

* ``variant="common"`` (nash-mtl, LibMTL, Auto-Lambda): :math:`s=\log\sigma^2`,
  :math:`J=\sum_k\frac12(e^{-s_k}\ell_k+s_k)`, weights :math:`\frac12e^{-s_k}`, stationary at
  :math:`s_k^*=\log\ell_k`;
* ``variant="typed"`` (Gama & Grassi): :math:`\eta=\log\sigma`,
  :math:`J=\sum_k\eta_k+\ell_ke^{-p_k\eta_k}/f_k` with :math:`(p,f)=(2,2)` for regression/MSE,
  :math:`(2,1)` for classification/CE and :math:`(1,1)` for L1 (Laplace) tasks; stationary at
  :math:`e^{p\eta}=p\ell/f`.

SamsungLabs' form :math:`e^{-s}\ell+\frac12s` is not offered. Initial value 0 (nash-mtl,
SamsungLabs, Gama; LibMTL −0.5, Auto-Lambda −0.7), learning rate 0.025 (nash-mtl's separate
parameter group). Needs non-negative losses. Heads: weighted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from mtopt.core.checks import check_choice
from mtopt.core.hparams import Positive, Real
from mtopt.core.learned_scales import LearnedScales, exp_all
from mtopt.core.method import MethodInput
from mtopt.core.registry import register

UW_VARIANTS = ("common", "typed")
#: (p, f) of the typed UW term η + ℓ e^{-pη} / f, by loss type.
UW_TYPED_CONSTANTS = {"regression": (2.0, 2.0), "classification": (2.0, 1.0), "l1": (1.0, 1.0)}


@register
class UW(LearnedScales):
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

    def per_task(self) -> Mapping[str, tuple[str, ...]]:
        return {} if self.loss_types is None else {"loss_types": self.loss_types}

    def _typed_constants(self, inputs: MethodInput) -> tuple[list[float], list[float]]:
        """``(p, f)`` of each task's loss type, rebuilt only when the types change."""
        self.check_tasks(inputs.num_tasks)
        types = self.loss_types or inputs.loss_types
        if self._typed is not None and types == self._typed[0]:
            return self._typed[1], self._typed[2]
        if types is None:
            raise ValueError(
                "uw: variant='typed' needs each task's loss type (regression, classification, "
                "l1): pass loss_types=... or MultiTaskOptimizer(..., loss_types=...)"
            )
        if len(types) != inputs.num_tasks:  # the optimizer's loss_types (its own: check_tasks)
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
