r"""Fixed (static) weights: back-propagate :math:`L = \sum_k c_k \ell_k` with constants the
user gives (Gama & Grassi train with weights extracted from an SMTO's run, summing to 1).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Literal

import torch

from mtopt.core.hparams import Reals
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import register


@register
class Fixed(Method):
    r"""Fixed (static) weights :math:`L = \sum_k c_k \ell_k` with user constants ``weights``.

    Gama & Grassi train with weights extracted from an SMTO's run (the mean of its weights, which
    sum to 1; see ``docs/protocol.md``).
    ``weights`` is required; its length must equal the number of tasks (checked when the
    optimizer is built with its ``tasks``, else at the first step), entries must be finite;
    a negative entry is allowed but warned about (it *ascends* that task's loss); all zero is
    refused (no step would move).
    """

    name = "fixed"
    levels = ("loss",)

    def __init__(
        self, *, weights: Reals, head_policy: Literal["raw", "weighted"] | None = None
    ) -> None:
        super().__init__(head_policy=head_policy)
        values = [float(w) for w in weights]
        if not values:
            raise ValueError(f"fixed: weights must not be empty (got {list(weights)!r})")
        if not any(values):
            raise ValueError(f"fixed: weights are all 0 (got {values}): no step would move")
        if any(w < 0 for w in values):
            # stacklevel 5: past the validation wrappers (pydantic's two frames, hparams'), at
            # the constructor's caller
            warnings.warn(f"fixed: negative weights {values} ascend those tasks", stacklevel=5)
        self.weights = tuple(values)

    def per_task(self) -> Mapping[str, tuple[float, ...]]:
        return {"weights": self.weights}

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        self.check_tasks(inputs.num_tasks)
        return Aggregation(torch.tensor(self.weights, dtype=inputs.losses.dtype))
