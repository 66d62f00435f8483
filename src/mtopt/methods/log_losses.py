r"""Scale-invariant loss combinations: SI (§6) and GLS (§7). Both need positive losses.

* **SI** (the scale-invariant baseline of Navon et al., ICML 2022): :math:`L=\sum_k c_k\log\ell_k`
  with :math:`c_k = 1` (``reduction="sum"``, nash-mtl) or :math:`1/K` (``"mean"``, Gama & Grassi).
  Effective weights :math:`w_k = c_k/\ell_k`, so rescaling a task's loss by any :math:`a_k>0`
  leaves the gradient unchanged. ``eps`` (default 0, the references' exact form) uses
  :math:`\log(\ell_k+\varepsilon)`. SamsungLabs' ``log1p`` variant is *not* scale invariant and
  is not offered.
* **GLS** (Geometric Loss Strategy, Chennupati et al., CVPRW 2019): :math:`L=(\prod_k\ell_k)^{1/K}`,
  computed as :math:`\exp(\frac1K\sum\log\ell_k)`; effective weights :math:`w_k = L/(K\ell_k)`
  (LibMTL logs :math:`\ell_k/(K\prod\ell)`, which are not the effective weights). Rescaling the
  losses multiplies the gradient by :math:`(\prod a_k)^{1/K}` without changing its direction.

Both back-propagate :math:`\sum_k w_k\ell_k` (which has exactly the gradient of :math:`L`); heads
are weighted.
"""

from __future__ import annotations

from typing import Literal

import torch

from mtopt.core.checks import require_positive_losses
from mtopt.core.hparams import NonNegative
from mtopt.core.method import Aggregation, Method, MethodInput, Need
from mtopt.core.registry import register


@register
class ScaleInvariant(Method):
    """SI (Navon et al. 2022): ``Σ c_k log ℓ_k``; weights ``c_k / ℓ_k``."""

    name = "si"
    needs = Need.LOSSES

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


@register
class GeometricLoss(Method):
    """GLS (Chennupati et al. 2019): ``(Π ℓ_k)^{1/K}``; weights ``L / (K ℓ_k)``."""

    name = "gls"
    needs = Need.LOSSES

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        losses = inputs.losses.detach()
        require_positive_losses(self.name, losses, inputs.task_names, "the geometric mean")
        geometric = torch.exp(torch.log(losses).mean())
        return Aggregation(
            geometric / (inputs.num_tasks * losses), extras={"gls_loss": float(geometric)}
        )
