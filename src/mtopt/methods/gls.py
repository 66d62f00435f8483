r"""GLS, the Geometric Loss Strategy (Chennupati et al., "MultiNet++", CVPR Workshops 2019):
:math:`L=(\prod_k\ell_k)^{1/K}`.

Computed as :math:`\exp(\frac1K\sum\log\ell_k)`; the effective weights are
:math:`w_k = L/(K\ell_k)` (LibMTL logs :math:`\ell_k/(K\prod\ell)`, which are not the effective
weights). Rescaling the losses multiplies the gradient by :math:`(\prod a_k)^{1/K}` without
changing its direction. Needs positive losses. Back-propagates :math:`\sum_k w_k\ell_k`, which
has exactly the gradient of :math:`L`; heads are weighted.
"""

from __future__ import annotations

import torch

from mtopt.core.checks import require_positive_losses
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import register


@register
class GLS(Method):
    """GLS (Chennupati et al. 2019): ``(Π ℓ_k)^{1/K}``; weights ``L / (K ℓ_k)``."""

    name = "gls"
    levels = ("loss",)

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        losses = inputs.losses.detach()
        require_positive_losses(self.name, losses, inputs.task_names, "the geometric mean")
        geometric = torch.exp(torch.log(losses).mean())
        return Aggregation(
            geometric / (inputs.num_tasks * losses), extras={"gls_loss": float(geometric)}
        )
