r"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).

The weights :math:`\alpha\in\mathbb R^K_{>0}` solve the bargaining condition
:math:`\alpha_i\,g_i^\top d=1` for :math:`d=G^\top\alpha`, i.e. :math:`M\alpha=1/\alpha`
element-wise.

The reference solves it by a CCCP sequence of convex problems with cvxpy/ECOS (≤ ``optim_niter``
= 20 solves per step). The condition is exactly the stationarity condition of the strictly convex
function :math:`F(\alpha)=\tfrac12\alpha^\top\hat M\alpha-\sum_i\log\alpha_i` on :math:`\alpha>0`
(with :math:`\hat M=M/\|M\|_F`, then :math:`\alpha=\hat\alpha/\sqrt{\|M\|_F}`), so we minimise
:math:`F` by damped Newton steps in float64 (Hessian :math:`\hat M+\mathrm{diag}(1/\alpha^2)`,
backtracking that keeps :math:`\alpha>0`), warm-started from the previous :math:`\alpha`, for at
most ``optim_niter`` iterations, until :math:`\|\hat M\alpha-1/\alpha\|_\infty<` ``tol``.
When the Gram matrix is singular the condition may have no solution (:math:`F` is unbounded
below): the solver then reports ``converged=False`` in ``StepInfo.solver`` and the engine logs
it; the previous weights are *not* silently reused (a known failure of the reference code).
A test runs the reference's CCCP with cvxpy (extra ``mtopt[cvxpy]``): where it solves, the two
agree to ~2e-6; on 5 of 24 random Gram matrices with conflicting gradients its linearised
subproblem is unbounded below and the reference would keep stale weights, while Newton on
:math:`F` converges on all 24.

``update_weights_every``: solve every n-th step and reuse :math:`\alpha` in between (reference).
``max_norm`` (default 1, 0 disables): the reference clips the shared-parameter gradient norm to it;
here the shared weights are scaled so that :math:`\|G^\top\alpha\|\le` ``max_norm`` (the same thing
for the shared parameters), while the heads keep the unscaled :math:`\alpha` (head policy
``weighted``, as in the reference).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mtopt.core.method import Aggregation, Method, MethodInput, Need, SolverReport, as_weights
from mtopt.core.registry import register


def nash_weights(
    gram: np.ndarray, start: np.ndarray | None = None, max_iter: int = 20, tol: float = 1e-9
) -> tuple[np.ndarray, int, bool]:
    """Solve ``M α = 1/α`` (α > 0) by damped Newton on ``½αᵀM̂α − Σ log α``."""
    k = gram.shape[0]
    scale = float(np.linalg.norm(gram))
    if not scale > 0:
        return np.zeros(k), 0, False
    m = gram / scale
    alpha = np.ones(k) if start is None else np.asarray(start, dtype=np.float64) * np.sqrt(scale)
    if not np.all(np.isfinite(alpha)) or np.any(alpha <= 0):
        alpha = np.ones(k)
    curvature = float(alpha @ m @ alpha)
    if curvature > 0:  # best multiple of the start: min_t ½t²αᵀM̂α − K log t
        alpha = alpha * np.sqrt(k / curvature)

    def f(a: np.ndarray) -> float:
        return float(0.5 * a @ m @ a - np.log(a).sum())

    for it in range(1, max_iter + 1):
        residual = m @ alpha - 1.0 / alpha
        if np.abs(residual).max() < tol:
            return alpha / np.sqrt(scale), it - 1, True
        hessian = m + np.diag(1.0 / alpha**2)
        step = -np.linalg.solve(hessian, residual)
        t, value, r_norm = 1.0, f(alpha), float(np.linalg.norm(residual))
        while t > 1e-12:
            candidate = alpha + t * step
            if np.all(candidate > 0):
                # Armijo on F, or (near the solution, where F is flat to rounding) on ‖∇F‖
                if f(candidate) <= value + 1e-4 * t * float(residual @ step):
                    break
                r_new = float(np.linalg.norm(m @ candidate - 1.0 / candidate))
                if r_new <= (1.0 - 1e-4 * t) * r_norm:
                    break
            t *= 0.5
        alpha = alpha + t * step
    residual = m @ alpha - 1.0 / alpha
    return alpha / np.sqrt(scale), max_iter, bool(np.abs(residual).max() < tol)


@register
class NashMTL(Method):
    """Nash-MTL (Navon et al. 2022): the bargaining solution αᵢ gᵢᵀd = 1."""

    gramian_only = True
    name = "nash_mtl"
    needs = Need.PARAM_GRADS
    default_head_policy = "weighted"

    def __init__(
        self,
        *,
        optim_niter: int = 20,
        update_weights_every: int = 1,
        max_norm: float = 1.0,
        tol: float = 1e-9,
        head_policy: str | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        if int(optim_niter) < 1 or int(update_weights_every) < 1:
            raise ValueError("nash_mtl: optim_niter and update_weights_every must be ≥ 1")
        if not max_norm >= 0:
            raise ValueError(f"nash_mtl: max_norm must be ≥ 0 (0 disables), got {max_norm}")
        self.optim_niter = int(optim_niter)
        self.update_weights_every = int(update_weights_every)
        self.max_norm = float(max_norm)
        self.tol = float(tol)
        self._alpha: np.ndarray | None = None
        self._steps = 0

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        gram = inputs.gramian().detach().to(torch.float64).cpu().numpy()
        report = None
        if self._alpha is None or self._steps % self.update_weights_every == 0:
            alpha, iterations, ok = nash_weights(gram, self._alpha, self.optim_niter, self.tol)
            message = (
                "" if ok else "no bargaining solution reached (singular Gram or too few iterations)"
            )
            report = SolverReport(
                "nash_mtl/newton", ok, iterations, "converged" if ok else "max_iter", message
            )
            self._alpha = alpha
        self._steps += 1
        alpha = self._alpha
        shared = alpha
        norm = float(np.sqrt(max(alpha @ gram @ alpha, 0.0)))
        if self.max_norm > 0 and norm > self.max_norm:
            shared = alpha * (self.max_norm / norm)
        return Aggregation(
            as_weights(shared, inputs),
            solver=report,
            head_weights=torch.from_numpy(alpha).to(dtype=inputs.losses.dtype),
            extras={"nash_alpha": alpha.tolist()},
        )

    def _get_state(self) -> dict[str, Any]:
        return {
            "alpha": None if self._alpha is None else self._alpha.tolist(),
            "steps": self._steps,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._alpha = None if state.get("alpha") is None else np.array(state["alpha"])
        self._steps = int(state.get("steps", 0))
