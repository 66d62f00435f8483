r"""UPGrad — Unconflicting Projection of Gradients (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", arXiv 2406.16232).

Each task gradient, weighted by a preference :math:`p_i` (default :math:`1/K`), is projected onto
the dual cone :math:`\{x: Gx\ge0\}` of the task gradients, and the projections are summed. In weight
space, with :math:`\hat M=M/\mathrm{tr}(M)` (0 if the trace is below ``norm_eps``) and
:math:`\tilde M=\hat M+\varepsilon I` (``reg_eps``):

.. math:: v^{(i)}=\arg\min_v v^\top\tilde Mv\ \ \text{s.t.}\ v\ge p_ie_i,\qquad w=\sum_iv^{(i)},
   \qquad d=G^\top w.

The K QPs share :math:`\tilde M` and are solved exactly, together, by block principal pivoting
(:func:`mtopt.core.qp.box_lower_qp_batch`: one stacked solve per iteration for all K problems;
TorchJD solves them one by one with quadprog). Properties: :math:`Gd\ge0` up to the
regularisation, :math:`w\ge p`, no conflict ⇒ :math:`w=p`, and :math:`d(cG)=c\,d(G)` as long as
:math:`c^2\mathrm{tr}(M)\ge` ``norm_eps``. ``norm_eps`` is an absolute threshold (1e-4, TorchJD's,
kept so that the two agree): below it :math:`\hat M=0`, every QP is solved by
:math:`v^{(i)}=p_ie_i`, and :math:`w=p` (the preference-weighted sum of the gradients);
``norm_eps=0`` makes UPGrad homogeneous at every scale. Heads: raw.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from mtopt.core.hparams import NonNegative, NonNegatives
from mtopt.core.method import Aggregation, Method, MethodInput, SolverReport, as_weights
from mtopt.core.qp import RESIDUAL_RTOL, BoxQPResult, box_lower_qp_batch
from mtopt.core.registry import register


def upgrad_weights(
    gram: np.ndarray, pref: np.ndarray, norm_eps: float = 1e-4, reg_eps: float = 1e-4
) -> tuple[np.ndarray, bool]:
    """UPGrad's weights ``w = Σ_i v⁽ⁱ⁾`` for the Gramian ``gram``; returns ``(w, converged)``."""
    w, result = upgrad_solve(gram, pref, norm_eps, reg_eps)
    return w, result.all_converged


def upgrad_solve(
    gram: np.ndarray, pref: np.ndarray, norm_eps: float = 1e-4, reg_eps: float = 1e-4
) -> tuple[np.ndarray, BoxQPResult]:
    """UPGrad's weights and the solver's result (row ``i``: :math:`v^{(i)}`)."""
    gram = np.asarray(gram, dtype=np.float64)
    pref = np.asarray(pref, dtype=np.float64)
    k = gram.shape[0]
    trace = float(np.trace(gram))
    # (as TorchJD: 0 only when tr M < norm_eps, so that a NaN Gramian stays NaN and is reported)
    regularised = np.zeros_like(gram) if trace < norm_eps else gram / trace
    regularised.flat[:: k + 1] += reg_eps
    result = box_lower_qp_batch(regularised, np.diag(pref))
    return result.solutions.sum(axis=0), result


@register
class UPGrad(Method):
    """UPGrad (Quinton & Rey 2024): sum of the task gradients projected onto the dual cone."""

    gramian_only = True
    name = "upgrad"
    levels = ("param",)
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        pref_vector: NonNegatives | None = None,
        norm_eps: NonNegative = 1e-4,
        reg_eps: NonNegative = 1e-4,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        if pref_vector is not None and not any(p > 0 for p in pref_vector):
            raise ValueError(
                "upgrad: pref_vector must have an entry > 0, or every projection is 0 "
                f"(got {list(pref_vector)!r})"
            )
        self.pref_vector = None if pref_vector is None else tuple(float(p) for p in pref_vector)
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)

    def per_task(self) -> Mapping[str, tuple[float, ...]]:
        return {} if self.pref_vector is None else {"pref_vector": self.pref_vector}

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        k = inputs.num_tasks
        self.check_tasks(k)
        pref = np.full(k, 1.0 / k) if self.pref_vector is None else np.array(self.pref_vector)
        gram = inputs.gramian().detach().cpu().double().numpy()
        w, result = upgrad_solve(gram, pref, self.norm_eps, self.reg_eps)
        ok = result.all_converged
        message = ""
        if not ok:
            failed = [inputs.task_names[i] for i in np.flatnonzero(~result.converged)]
            message = (
                f"the UPGrad projections of tasks {failed} did not meet the KKT conditions "
                "(non-finite Gramian, singular Gramian with reg_eps=0, or the iteration bound)"
            )
        status = "converged" if ok else "max_iter"
        report = SolverReport(
            "upgrad/active_set",
            ok,
            result.iterations,
            status,
            message,
            result.residual,
            RESIDUAL_RTOL,
        )
        return Aggregation(as_weights(w, inputs), solver=report)
