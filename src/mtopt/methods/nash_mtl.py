r"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).

The weights :math:`\alpha\in\mathbb R^K_{>0}` solve the bargaining condition
:math:`\alpha_i\,g_i^\top d=1` for :math:`d=G^\top\alpha`, i.e. :math:`M\alpha=1/\alpha`
element-wise.

The reference solves it by a CCCP sequence of convex problems with cvxpy/ECOS (≤ ``optim_niter``
= 20 solves per step). The condition is exactly the stationarity condition of the strictly convex
:math:`F(\alpha)=\tfrac12\alpha^\top M\alpha-\sum_i\log\alpha_i` on :math:`\alpha>0`. Writing
:math:`\alpha_i=\beta_i/\|g_i\|` turns it into :math:`C\beta=1/\beta` with :math:`C` the cosine
matrix of the gradients (unit diagonal): the solution depends on the gradients' directions only,
and their norms (which may spread over many orders of magnitude) enter in closed form. We
minimise :math:`\tfrac12\beta^\top C\beta-\sum\log\beta_i` by damped Newton steps in float64
(Hessian :math:`C+\mathrm{diag}(1/\beta^2)`, backtracking that keeps :math:`\beta>0`),
warm-started from the previous step, for at most ``optim_niter`` iterations.

**Certificate.** ``converged`` means :math:`\max_i|\alpha_i(M\alpha)_i-1|\le` ``tol`` (1e-9; the
defining equations, dimensionless, the products correctly rounded), checked after the solve;
the report carries that residual.

**When there is no bargaining solution.** By Gordan's theorem a solution exists iff some
direction improves every task (:math:`Gd>0`), i.e. iff 0 is not in the convex hull of the
gradients; otherwise :math:`F` is unbounded below and the reference's weights blow up (and its
solver may raise). Defined behaviour here:

* a task whose shared gradient is exactly zero takes no part in the bargaining (no direction
  changes its loss): its shared weight is 0 and its head weight 1 (its head trains as under
  equal weighting); the others bargain among themselves;
* if 0 lies in the hull of the remaining gradients (exactly opposite tasks, duplicates of
  opposite sign, any Pareto-stationary point), certified by the exact min-norm solver, no
  direction improves every task: the shared update is 0 (status ``stationary``, converged) and
  every head weight is 1;
* linearly dependent gradients whose hull avoids 0 (duplicates, rank-deficient Gram matrices)
  have a solution and need nothing special.

No :math:`\alpha` is ever reused silently: a Newton solve that ends without the certificate is
reported ``max_iter`` with its residual (the reference keeps stale weights).

``update_weights_every``: solve every n-th step and reuse :math:`\alpha` in between (reference).
``max_norm`` (default 1, 0 disables): the reference clips the shared-parameter gradient norm to
it; here the shared weights are scaled so that :math:`\|G^\top\alpha\|\le` ``max_norm`` (the same
thing for the shared parameters), while the heads keep the unscaled :math:`\alpha` (head policy
``weighted``, as in the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from mtopt.core import accurate
from mtopt.core.hparams import NonNegative, Positive, PositiveInt
from mtopt.core.method import Aggregation, Method, MethodInput, SolverReport, as_weights
from mtopt.core.min_norm import min_norm_weights
from mtopt.core.registry import register


@dataclass(frozen=True)
class NashResult:
    """``alpha`` (0 for zero-gradient tasks), Newton iterations, status (``converged``,
    ``stationary``, ``max_iter``), which tasks bargained, and the certificate: for
    ``converged`` and ``max_iter`` the residual ``max_i |α_i (Mα)_i − 1|`` over the bargaining
    tasks against ``tol``; for ``stationary`` the relative norm ``‖Σ w_i u_i‖ / Σ w_i`` of the
    min-norm point of the unit gradients against the precision a float64 Gram matrix determines
    it to, ``√((K + 2) u)``."""

    alpha: np.ndarray
    iterations: int
    status: str
    residual: float
    active: np.ndarray
    tolerance: float = 0.0

    @property
    def converged(self) -> bool:
        return self.status in ("converged", "stationary")


def nash_weights(
    gram: np.ndarray, start: np.ndarray | None = None, max_iter: int = 20, tol: float = 1e-9
) -> NashResult:
    """Solve ``M α = 1/α`` (α > 0) on the tasks with a non-zero gradient (module doc)."""
    gram = np.asarray(gram, dtype=np.float64)
    k = gram.shape[0]
    if not np.all(np.isfinite(gram)):
        raise ValueError("nash_mtl got a Gram matrix with NaN or inf entries")
    active = np.diagonal(gram) > 0
    alpha = np.zeros(k)
    if not active.any():
        return NashResult(alpha, 0, "stationary", 0.0, active, tol)
    sub = gram[np.ix_(active, active)]
    norms = np.sqrt(np.diagonal(sub))
    cos = sub / np.outer(norms, norms)
    beta = None
    if start is not None and start.shape == (k,):
        candidate = start[active] * norms
        if np.all(np.isfinite(candidate)) and np.all(candidate > 0):
            beta = candidate
    beta, iterations = _newton(cos, beta, max_iter)
    alpha[active] = beta / norms
    residual = _residual(gram, alpha, active)
    if residual <= tol:
        return NashResult(alpha, iterations, "converged", residual, active, tol)
    # no solution reached: is 0 in the hull of the bargaining gradients (none exists)?
    hull = min_norm_weights(cos)
    floor = math.sqrt((cos.shape[0] + 2) * 2.0**-53)
    norm = math.sqrt(max(accurate.quad(cos, hull.weights), 0.0)) / float(hull.weights.sum())
    if hull.converged and _in_hull(cos, hull.weights):
        return NashResult(np.zeros(k), iterations, "stationary", norm, active, floor)
    return NashResult(alpha, iterations, "max_iter", residual, active, tol)


def _newton(cos: np.ndarray, beta: np.ndarray | None, max_iter: int) -> tuple[np.ndarray, int]:
    """Damped Newton on ``½βᵀCβ − Σ log β`` from ``beta`` (or the best multiple of 1)."""
    k = cos.shape[0]
    if beta is None:
        beta = np.ones(k)
    curvature = float(beta @ cos @ beta)
    if curvature > 0:  # best multiple of the start: min_t ½t²βᵀCβ − K log t
        beta = beta * math.sqrt(k / curvature)

    def f(b: np.ndarray) -> float:
        return float(0.5 * b @ cos @ b - np.log(b).sum())

    for it in range(1, max_iter + 1):
        gradient = cos @ beta - 1.0 / beta
        if np.abs(gradient * beta).max() < 1e-15:
            return beta, it - 1
        hessian = cos + np.diag(1.0 / beta**2)
        try:
            step = -np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            return beta, it
        t, value, g_norm = 1.0, f(beta), float(np.linalg.norm(gradient))
        while t > 1e-12:
            candidate = beta + t * step
            if np.all(candidate > 0):
                # Armijo on F, or (near the solution, where F is flat to rounding) on ‖∇F‖
                if f(candidate) <= value + 1e-4 * t * float(gradient @ step):
                    break
                new_norm = float(np.linalg.norm(cos @ candidate - 1.0 / candidate))
                if new_norm <= (1.0 - 1e-4 * t) * g_norm:
                    break
            t *= 0.5
        beta = beta + t * step
    return beta, max_iter


def _residual(gram: np.ndarray, alpha: np.ndarray, active: np.ndarray) -> float:
    """``max_i |α_i (Mα)_i − 1|`` over the active tasks, ``(Mα)_i`` correctly rounded."""
    m_alpha = accurate.matvec(gram, alpha)
    value = float(np.abs(alpha[active] * m_alpha[active] - 1.0).max())
    return value if math.isfinite(value) else math.inf


def _in_hull(cos: np.ndarray, w: np.ndarray) -> bool:
    """Whether the min-norm point ``Cᵀw`` of the unit gradients is 0 to the precision a
    float64 Gram matrix determines: ``wᵀCw ≤ (K + 2) u |w|ᵀ|C||w|``."""
    absw = np.abs(w)
    floor = (cos.shape[0] + 2) * 2.0**-53 * float(absw @ np.abs(cos) @ absw)
    return accurate.quad(cos, w) <= floor


@register
class NashMTL(Method):
    """Nash-MTL (Navon et al. 2022): the bargaining solution αᵢ gᵢᵀd = 1."""

    gramian_only = True
    name = "nash_mtl"
    levels = ("param",)
    default_head_policy = "weighted"

    def __init__(
        self,
        *,
        optim_niter: PositiveInt = 20,
        update_weights_every: PositiveInt = 1,
        max_norm: NonNegative = 1.0,
        tol: Positive = 1e-9,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.optim_niter = int(optim_niter)
        self.update_weights_every = int(update_weights_every)
        self.max_norm = float(max_norm)
        self.tol = float(tol)
        self._alpha: np.ndarray | None = None
        self._heads: np.ndarray | None = None
        self._steps = 0

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        gram = inputs.gramian().detach().cpu().double().numpy()
        k = inputs.num_tasks
        report = None
        if self._alpha is None or self._steps % self.update_weights_every == 0:
            result = nash_weights(gram, self._alpha, self.optim_niter, self.tol)
            message = {
                "converged": "",
                "stationary": "0 is in the hull of the gradients: no direction improves every "
                "task, shared update 0",
                "max_iter": "the bargaining condition αᵢ gᵢᵀd = 1 is not met (see residual)",
            }[result.status]
            report = SolverReport(
                "nash_mtl/newton",
                result.converged,
                result.iterations,
                result.status,
                message,
                result.residual,
                result.tolerance,
            )
            self._alpha = result.alpha
            # heads: α on the bargaining tasks, 1 on the others and at a stationary point
            active_heads = np.where(result.active, result.alpha, 1.0)
            self._heads = np.ones(k) if result.status == "stationary" else active_heads
        self._steps += 1
        alpha, heads = self._alpha, self._heads
        assert alpha is not None and heads is not None
        shared = alpha
        norm = math.sqrt(max(accurate.quad(gram, alpha), 0.0))
        if self.max_norm > 0 and norm > self.max_norm:
            shared = alpha * (self.max_norm / norm)
        return Aggregation(
            as_weights(shared, inputs),
            solver=report,
            head_weights=torch.from_numpy(heads).to(dtype=inputs.losses.dtype),
            extras={"nash_alpha": alpha.tolist()},
        )

    def _get_state(self) -> dict[str, Any]:
        return {
            "alpha": None if self._alpha is None else self._alpha.tolist(),
            "heads": None if self._heads is None else self._heads.tolist(),
            "steps": self._steps,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._alpha = None if state.get("alpha") is None else np.array(state["alpha"])
        heads = state.get("heads")
        if heads is None and self._alpha is not None:
            heads = self._alpha
        self._heads = None if heads is None else np.array(heads)
        self._steps = int(state.get("steps", 0))
