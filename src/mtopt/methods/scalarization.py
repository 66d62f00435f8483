r"""Loss-only linear scalarizations: unitary scalarization (§1) and fixed weights (§2).

Both back-propagate :math:`L = \sum_k w_k \ell_k` once.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from mtopt.core.hparams import Reals
from mtopt.core.method import Aggregation, Method, MethodInput, Need
from mtopt.core.registry import register

REDUCTIONS = ("sum", "mean")


@register
class UnitaryScalarization(Method):
    r"""Unitary scalarization ("equal weighting", EW/LS; Kurin et al. 2022; Gama & Grassi 2025).

    :math:`L = \sum_k w_k \ell_k` with :math:`w_k = 1` (``reduction="sum"``, the default of
    Kurin, LibMTL and nash-mtl) or :math:`w_k = 1/K` (``reduction="mean"``, Gama & Grassi's
    default: use it to reproduce their numbers). With Adam the factor is nearly irrelevant.
    Heads: weighted (identical to raw up to the constant).
    """

    name = "unitary"
    needs = Need.LOSSES

    def __init__(
        self,
        *,
        reduction: Literal["sum", "mean"] = "sum",
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.reduction = reduction

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        k = inputs.num_tasks
        value = 1.0 if self.reduction == "sum" else 1.0 / k
        return Aggregation(torch.full((k,), value, dtype=inputs.losses.dtype))


@register
class FixedWeights(Method):
    r"""Fixed (static) weights :math:`L = \sum_k c_k \ell_k` with user constants ``weights``.

    Seed 002 (Gama & Grassi) trains with weights extracted from an SMTO (they sum to 1, §26.4).
    ``weights`` is required; its length must equal the number of tasks, entries must be finite;
    a negative entry is allowed but warned about (it *ascends* that task's loss).
    """

    name = "fixed"
    needs = Need.LOSSES

    def __init__(
        self, *, weights: Reals, head_policy: Literal["raw", "weighted"] | None = None
    ) -> None:
        super().__init__(head_policy=head_policy)
        values = [float(w) for w in weights]
        if not values:
            raise ValueError(f"fixed: weights must not be empty (got {list(weights)!r})")
        if any(w < 0 for w in values):
            # stacklevel 5: past the validation wrappers (pydantic's two frames, hparams'), at
            # the constructor's caller
            warnings.warn(f"fixed: negative weights {values} ascend those tasks", stacklevel=5)
        self.weights = tuple(values)

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        if len(self.weights) != inputs.num_tasks:
            raise ValueError(
                f"fixed: {len(self.weights)} weights given for {inputs.num_tasks} tasks "
                f"{list(inputs.task_names)}"
            )
        return Aggregation(torch.tensor(self.weights, dtype=inputs.losses.dtype))
