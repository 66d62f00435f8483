r"""UPGrad — Unconflicting Projection of Gradients (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", arXiv 2406.16232).

Each task gradient, weighted by a preference :math:`p_i` (default :math:`1/K`), is projected onto
the dual cone :math:`\{x: Gx\ge0\}` of the task gradients, and the projections are summed. In weight
space, with :math:`\hat M=M/\mathrm{tr}(M)` (0 if the trace is below ``norm_eps``) and
:math:`\tilde M=\hat M+\varepsilon I` (``reg_eps``):

.. math:: v^{(i)}=\arg\min_v v^\top\tilde Mv\ \ \text{s.t.}\ v\ge p_ie_i,\qquad w=\sum_iv^{(i)},
   \qquad d=G^\top w.

Every QP is solved exactly by our own active-set routine (:func:`mtopt.core.qp.box_lower_qp`;
TorchJD uses quadprog). Properties: :math:`Gd\ge0` up to the regularisation, :math:`w\ge p`,
no conflict ⇒ :math:`w=p`, :math:`d(cG)=c\,d(G)`. Heads: raw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mtopt.core.method import Aggregation, Method, MethodInput, Need, SolverReport, as_weights
from mtopt.core.qp import box_lower_qp
from mtopt.core.registry import register


def upgrad_weights(
    gram: np.ndarray, pref: np.ndarray, norm_eps: float = 1e-4, reg_eps: float = 1e-4
) -> tuple[np.ndarray, bool]:
    k = gram.shape[0]
    trace = float(np.trace(gram))
    normalised = gram / trace if trace >= norm_eps else np.zeros_like(gram)
    regularised = normalised + reg_eps * np.eye(k)
    total = np.zeros(k)
    ok = True
    for i in range(k):
        lower = np.zeros(k)
        lower[i] = pref[i]
        v, converged = box_lower_qp(regularised, lower)
        ok &= converged
        total += v
    return total, ok


@register
class UPGrad(Method):
    """UPGrad (Quinton & Rey 2024): sum of the task gradients projected onto the dual cone."""

    gramian_only = True
    name = "upgrad"
    needs = Need.PARAM_GRADS
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        pref_vector: Sequence[float] | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
        head_policy: str | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        if not norm_eps >= 0 or not reg_eps >= 0:
            raise ValueError("upgrad: norm_eps and reg_eps must be ≥ 0")
        self.pref_vector = None if pref_vector is None else tuple(float(p) for p in pref_vector)
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        k = inputs.num_tasks
        pref = np.full(k, 1.0 / k) if self.pref_vector is None else np.array(self.pref_vector)
        if pref.shape != (k,):
            raise ValueError(f"upgrad: pref_vector has {pref.size} entries for {k} tasks")
        gram = inputs.gramian().detach().to(torch.float64).cpu().numpy()
        w, ok = upgrad_weights(gram, pref, self.norm_eps, self.reg_eps)
        report = SolverReport(
            "upgrad/active_set", ok, k, "converged" if ok else "max_iter",
            "" if ok else "an UPGrad projection hit its iteration bound",
        )  # fmt: skip
        return Aggregation(as_weights(w, inputs), solver=report)
