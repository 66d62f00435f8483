r"""EDM — Equiangular Direction Method (Katrutsa, Merkulov, Tursynbek & Oseledets,
arXiv 2007.06937).

The min-norm point of the convex hull of the *unit* task gradients :math:`u_i=g_i/\|g_i\|`,
:math:`w=\arg\min_{w\in\Delta}\|\sum_iw_iu_i\|`, is equiangular (same cosine with every
:math:`g_i` when interior). It is rescaled by :math:`\gamma=(\sum_iw_i/\|g_i\|)^{-1}`:
:math:`d=\gamma\sum_iw_iu_i`, i.e. raw-gradient weights :math:`\lambda_i=\gamma w_i/\|g_i\|`, which
sum to 1. With two tasks :math:`d=(g_1\|g_2\|+g_2\|g_1\|)/(\|g_1\|+\|g_2\|)`.

Solver: the exact min-norm solver of :mod:`mtopt.core.min_norm` (``wolfe``) by default, with its
KKT certificate in ``StepInfo.solver``; ``fw`` reproduces Gama & Grassi's Frank-Wolfe and ``pgd``
Sener's projected gradient, judged by the same certificate. The problem is on the cosine matrix
(unit gradients), so it is as well conditioned as the gradients' directions allow, whatever their
norms. A zero task gradient makes the direction undefined: the shared update is zero for that
step, as in Gama & Grassi, and ``StepInfo.solver`` says so (status ``zero_gradient``). Duplicate
gradients act as one (their split of the weight does not change ``d``); two exactly opposite
gradients put 0 in the hull of the unit gradients, so ``d = 0``.
Heads: raw.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from mtopt.core.hparams import NonNegativeInt, Positive
from mtopt.core.method import Aggregation, Method, MethodInput, SolverReport, as_weights
from mtopt.core.min_norm import KKT_RTOL, min_norm_weights
from mtopt.core.registry import register


@register
class EDM(Method):
    """EDM (Katrutsa et al. 2020): min-norm point of the unit gradients, rescaled."""

    gramian_only = True
    name = "edm"
    levels = ("param",)
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        solver: Literal["wolfe", "pgd", "fw"] = "wolfe",
        max_iter: NonNegativeInt = 250,
        tol: Positive = 1e-5,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.solver = solver
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self._support: list[int] = []  # the exact solver's warm start

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        gram = inputs.gramian().detach().to(torch.float64).cpu().numpy()
        sq = np.diag(gram)
        zero = sq <= 0.0
        if zero.any():
            names = [t for t, z in zip(inputs.task_names, zero, strict=True) if z]
            message = f"zero gradient for {names}: no equiangular direction, shared update is 0"
            report = SolverReport(
                f"min_norm/{self.solver}", True, 0, "zero_gradient", message, 0.0, KKT_RTOL
            )
            weights = as_weights(torch.zeros(inputs.num_tasks), inputs)
            return Aggregation(weights, solver=report)
        norms = np.sqrt(sq)
        result = min_norm_weights(
            gram / np.outer(norms, norms),
            self.solver,
            self.max_iter,
            self.tol,
            support=self._support,
        )
        w = result.weights
        self._support = [int(i) for i in np.flatnonzero(w > 0)]
        gamma = 1.0 / float(np.sum(w / norms))
        raw = gamma * w / norms
        report = SolverReport(
            f"min_norm/{self.solver}",
            result.converged,
            result.iterations,
            result.status,
            "" if result.converged else "the min-norm KKT certificate fails (see residual)",
            result.residual,
            KKT_RTOL,
        )
        return Aggregation(
            as_weights(raw, inputs),
            solver=report,
            extras={"edm_simplex_weights": w.tolist()},
        )

    def _get_state(self) -> dict[str, Any]:
        return {"support": list(self._support)}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._support = [int(i) for i in state.get("support", [])]
