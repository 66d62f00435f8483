r"""IMTL-G, the gradient-balancing half of Impartial Multi-Task Learning (Liu et al., "Towards
Impartial Multi-task Learning", ICLR 2021).

IMTL-G finds weights :math:`w` with :math:`\sum_iw_i=1` such that :math:`d=G^\top w` has the same
projection on every unit gradient :math:`u_i=g_i/\|g_i\|` (no sign constraint on :math:`w`). The
solver, its certificate and its degenerate cases are documented in
:mod:`mtopt.core.equal_projection`: ``solver="pinv"`` (default; TorchJD's generalisation, equal to
the paper's closed form whenever that exists) or ``"closed_form"`` (the paper's). ``weight_bound``
(off by default) scales the weights down to ``max|w_i| ≤ b`` without changing the direction.

``level``: ``param`` (the shared parameters' gradients, as in nash-mtl and LibMTL; default) or
``rep`` (the representation's). Heads: raw.
"""

from __future__ import annotations

from typing import Literal

import torch

from mtopt.core.equal_projection import imtl_g_solve
from mtopt.core.hparams import Positive
from mtopt.core.method import Aggregation, Method, MethodInput, as_weights
from mtopt.core.registry import register


@register
class IMTLG(Method):
    """IMTL-G (Liu et al. 2021): weights giving equal projections on all unit gradients."""

    name = "imtl_g"
    levels = ("param", "rep")
    gramian_only = True
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        level: Literal["param", "rep"] | None = None,
        solver: Literal["pinv", "closed_form"] = "pinv",
        weight_bound: Positive | None = None,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        if level is not None:
            self.level = level
        self.solver = solver
        self.weight_bound = None if weight_bound is None else float(weight_bound)

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        gram = inputs.gramian().detach().to(torch.float64).cpu()
        w, report = imtl_g_solve(gram, self.solver, self.weight_bound)
        return Aggregation(as_weights(w, inputs), solver=report)
