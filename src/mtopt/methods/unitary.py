r"""Unitary scalarization ("equal weighting"): back-propagate :math:`L = \sum_k w_k \ell_k`
with every :math:`w_k` equal (Kurin et al., "In Defense of the Unitary Scalarization for Deep
Multi-Task Learning", NeurIPS 2022; Gama & Grassi's baseline).
"""

from __future__ import annotations

from typing import Literal

import torch

from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import register


@register
class Unitary(Method):
    r"""Unitary scalarization ("equal weighting", EW/LS; Kurin et al. 2022; Gama & Grassi 2025).

    :math:`L = \sum_k w_k \ell_k` with :math:`w_k = 1` (``reduction="sum"``, the default of
    Kurin, LibMTL and nash-mtl) or :math:`w_k = 1/K` (``reduction="mean"``, Gama & Grassi's
    default: use it to reproduce their numbers). With Adam the factor is nearly irrelevant.
    Heads: weighted (identical to raw up to the constant).
    """

    name = "unitary"
    levels = ("loss",)

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
