r"""MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS
2018): MGDA's min-norm solve on the per-task gradients of the shared *representation*.

With :math:`r_k = \nabla_z \ell_k` (flattened over batch and features), the weights are the
min-norm element of the hull of the (normalised) :math:`r_k`; the step then back-propagates
:math:`\sum_k w_k \ell_k` through the encoder once. Since
:math:`\|\sum_k w_k g_k\| \le \|\partial z/\partial\theta\|\,\|\sum_k w_k r_k\|`, minimising the
second norm minimises an upper bound of MGDA's objective, at the cost of K backward passes
through the heads only instead of the whole network.

Everything else (normalisers, solvers and their certificate, ``apply_to``, degenerate inputs)
is MGDA's (:mod:`mtopt.methods.mgda`); ``level="param"`` turns it into MGDA. Heads: weighted.
"""

from __future__ import annotations

from mtopt.core.registry import register
from mtopt.methods.mgda import MGDA


@register
class MGDAUB(MGDA):
    """MGDA-UB (Sener & Koltun 2018): the min-norm weights of the representation gradients."""

    name = "mgda_ub"
    levels = ("rep", "param")
