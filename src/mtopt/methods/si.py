r"""SI, the scale-invariant loss (the baseline of Navon et al., "Multi-Task Learning as a
Bargaining Game", ICML 2022): :math:`L=\sum_k c_k\log\ell_k`.

:math:`c_k = 1` (``reduction="sum"``, nash-mtl) or :math:`1/K` (``"mean"``, Gama & Grassi). The
effective weights are :math:`w_k = c_k/\ell_k`, so rescaling a task's loss by any :math:`a_k>0`
leaves the gradient unchanged. ``eps`` (default 0, the references' exact form) uses
:math:`\log(\ell_k+\varepsilon)`. SamsungLabs' ``log1p`` variant is *not* scale invariant and is
not offered. Needs positive losses. Back-propagates :math:`\sum_k w_k\ell_k`, which has exactly
the gradient of :math:`L`; heads are weighted.
"""

from __future__ import annotations

from typing import Literal

from mtopt.core.checks import require_positive_losses
from mtopt.core.hparams import NonNegative
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import register


@register
class SI(Method):
    """SI (Navon et al. 2022): ``Σ c_k log ℓ_k``; weights ``c_k / ℓ_k``."""

    name = "si"
    levels = ("loss",)

    def __init__(
        self,
        *,
        reduction: Literal["sum", "mean"] = "sum",
        eps: NonNegative = 0.0,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.reduction = reduction
        self.eps = float(eps)

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        losses = inputs.losses.detach()
        require_positive_losses(self.name, losses, inputs.task_names, "log ℓ", self.eps)
        c = 1.0 if self.reduction == "sum" else 1.0 / inputs.num_tasks
        return Aggregation(c / (losses + self.eps))
