r"""CDTT — Central Direction with Task Tensioners (Nakamura, Grassi Jr & Wolf, Neurocomputing
511:43–53, 2022; arXiv 2204.06698), in the K-task form of Gama & Grassi.

1. :math:`d^*` = the EDM direction (:mod:`mtopt.methods.edm`), with raw weights :math:`\lambda`.
2. Task tensioners. A buffer keeps each task's last :math:`H=10` gradient norms; once it is full,
   :math:`S_i(t)=\sum_{h<H}\|g_i(t-h)\|`, and from the following step on
   :math:`\delta_i=S_i(t)/S_i(t-1)+\log_{10}\ell_i` and the tension
   :math:`c_i=\max\big(0,\ \alpha/(1+e^{-e\delta_i+e})+1-\alpha\big)` pull the direction towards the
   tasks whose gradients stop shrinking or whose loss is high:
   :math:`d_n=d^*+\sum_ic_i\,(g_i-d^*)/\|g_i-d^*\|`.
3. Direction check, one pass in task order (as the reference): if :math:`\angle(g_i,d_n)>90°`,
   with :math:`\hat u=g_i/\|g_i\|`, :math:`w=d_n-(d_n^\top\hat u)\hat u` and
   :math:`\beta=\pi-\angle(g_i,d_n-g_i)`, set :math:`d_n\leftarrow\tan\beta\,\|g_i\|\,w/\|w\|`.

Every vector above is a combination of the task gradients, so the whole method runs on the Gram
matrix and returns effective weights (``d_n = Gᵀω``; Gama & Grassi log the same re-expression as
``cdtt_weights``). During the first :math:`H` steps it equals EDM. A zero task gradient skips the
shared update (as Gama & Grassi), reported in ``StepInfo.solver``. Needs positive losses
(:math:`\log_{10}\ell`). Defaults: ``alpha=0.2`` (Gama & Grassi; the authors' config uses 0.3; seed
002's grid 0.2..1.0), ``history=10``. Heads: raw.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from mtopt.core import accurate
from mtopt.core.checks import require_positive_losses
from mtopt.core.hparams import PositiveInt, UnitInterval
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import register
from mtopt.methods.edm import EDM

_EPS = 1e-12


def tension(delta: np.ndarray, alpha: float) -> np.ndarray:
    """``max(0, α / (1 + exp(-e δ + e)) + 1 - α)``: a sigmoid centred at δ = 1, slope e."""
    return np.maximum(0.0, alpha / (1.0 + np.exp(-math.e * delta + math.e)) + 1.0 - alpha)


def direction_check(gram: np.ndarray, omega: np.ndarray) -> np.ndarray:
    r"""Step 3 in weight space: bend ``d = Gᵀω`` back within 90° of every task gradient.

    For :math:`g_i^\top d<0`, the paper's :math:`\tan\beta\,\|g_i\|\,w/\|w\|` with
    :math:`w=d-(d^\top\hat u)\hat u` and :math:`\beta=\pi-\angle(g_i,d-g_i)` is, since
    :math:`\tan\beta=\|w\|\,\|g_i\|/(\|g_i\|^2-g_i^\top d)`, exactly
    :math:`\frac{\|g_i\|^2}{\|g_i\|^2-g_i^\top d}\,w`: computed that way, without the arccos
    that loses half the digits near 0 and π. (When :math:`d` is exactly opposite to
    :math:`g_i`, :math:`w=0` and so is the bent direction: :math:`\beta=0`.)"""
    omega = omega.copy()
    for i in range(gram.shape[0]):
        m_ii = gram[i, i]
        if m_ii <= 0:
            continue
        g_d = float(accurate.dot(gram[i], omega))
        if g_d >= 0:
            continue
        w = omega.copy()
        w[i] -= g_d / m_ii  # d - (dᵀû)û
        omega = (m_ii / (m_ii - g_d)) * w
    return omega


@register
class CDTT(Method):
    """CDTT (Nakamura et al. 2022): EDM's central direction plus task tensioners."""

    gramian_only = True
    name = "cdtt"
    levels = ("param",)
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        alpha: UnitInterval = 0.2,
        history: PositiveInt = 10,
        solver: Literal["wolfe", "pgd", "fw"] = "wolfe",
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.alpha = float(alpha)
        self.history = int(history)
        self.solver = solver
        self._edm = EDM(solver=solver)
        self._norms: list[list[float]] = []
        self._previous_sum: np.ndarray | None = None

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        losses = inputs.losses.detach().to(torch.float64).cpu().numpy()
        require_positive_losses(self.name, inputs.losses.detach(), inputs.task_names, "log10 ℓ")
        central = self._edm.aggregate(inputs)
        like = central.weights
        assert like is not None  # EDM always gives weights
        gram = inputs.gramian().detach().to(torch.float64).cpu().numpy()
        norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        self._norms = [*self._norms, norms.tolist()][-self.history :]
        if central.solver is not None and central.solver.status == "zero_gradient":
            self._previous_sum = None
            return Aggregation(like, solver=central.solver)
        lam = like.detach().to(torch.float64).cpu().numpy()
        omega = lam.copy()
        extras: dict[str, Any] = {}
        if len(self._norms) == self.history:
            current = np.sum(self._norms, axis=0)
            if self._previous_sum is not None:
                delta = current / self._previous_sum + np.log10(losses)
                c = tension(delta, self.alpha)
                d_star_sq = float(lam @ gram @ lam)
                for i in range(len(lam)):
                    dist = math.sqrt(max(gram[i, i] - 2 * float(gram[i] @ lam) + d_star_sq, 0.0))
                    unit = -lam.copy()
                    unit[i] += 1.0
                    omega = omega + c[i] * unit / max(dist, _EPS)
                extras["cdtt_tension"] = c.tolist()
            self._previous_sum = current
        omega = direction_check(gram, omega)
        extras["cdtt_weights"] = omega.tolist()
        return Aggregation(
            torch.from_numpy(omega).to(dtype=like.dtype, device=like.device),
            solver=central.solver,
            extras=extras,
        )

    def _get_state(self) -> dict[str, Any]:
        previous = None if self._previous_sum is None else self._previous_sum.tolist()
        return {
            "norms": self._norms,
            "previous_sum": previous,
            "edm_support": self._edm._get_state()["support"],
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._norms = [list(n) for n in state.get("norms", [])]
        prev = state.get("previous_sum")
        self._previous_sum = None if prev is None else np.array(prev)
        self._edm._set_state({"support": state.get("edm_support", [])})
