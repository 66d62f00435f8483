r"""IMTL-L, the loss-balancing half of Impartial Multi-Task Learning (Liu et al., "Towards
Impartial Multi-task Learning", ICLR 2021; no official code).

A learned scale per task (:class:`~mtopt.core.learned_scales.LearnedScales`, which says how the
scalars are trained): :math:`J=\sum_k e^{s_k}\ell_k-s_k`, weights :math:`e^{s_k}`, stationary at
:math:`e^{s_k}\ell_k=1`, so every scaled loss is driven to 1. Initial value 0, learning rate
0.025. Needs non-negative losses. Heads: weighted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtopt.core.learned_scales import LearnedScales, exp_all
from mtopt.core.method import MethodInput
from mtopt.core.registry import register


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
