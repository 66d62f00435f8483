r"""CAGrad — conflict-averse gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021).

Within the ball :math:`\|d-g_0\|\le c\|g_0\|` around the average gradient
:math:`g_0=\frac1K\sum_ig_i`, CAGrad picks the direction that maximises the worst task's first-order
improvement :math:`\min_ig_i^\top d`. Its dual is a problem on the simplex,

.. math:: w^*=\arg\min_{w\in\Delta}\ g_w^\top g_0+\sqrt\phi\,\|g_w\|,
   \qquad g_w=G^\top w,\ \sqrt\phi=c\|g_0\|,

and :math:`d=g_0+\frac{\sqrt\phi}{\|g_{w^*}\|}g_{w^*}`, all computable from the Gram matrix
(:math:`g_w^\top g_0=w^\top M\mathbf 1/K`, :math:`\|g_0\|^2=\mathrm{mean}(M)`). Then ``rescale``:
1 ⇒ :math:`d/(1+c^2)` (default), 2 ⇒ :math:`d/(1+c)`, 0 ⇒ none; and the reference codes multiply by
:math:`K` to match the summed loss (``sum_scale=True``, default; TorchJD omits both factors).

With two tasks the dual is one-dimensional and convex: it is solved exactly by bisection on its
derivative. Otherwise our own float64 projected-gradient method with Armijo backtracking on the
simplex runs (the references call scipy's SLSQP every step) for at most ``max_iter`` iterations,
stopping when the iterate stops moving or the objective stops decreasing at float64 precision;
with nearly cancelling gradients it can end short of the optimum, which the step's solver report
says. Safeguards as the references: :math:`\|g_0\|=\sqrt{\mathrm{mean}(M)+
10^{-8}}`, :math:`\sqrt{w^\top Mw+10^{-8}}` in the objective, :math:`\sqrt\phi/(\|g_w\|+10^{-8})`.
Defaults: ``c=0.5`` (LibMTL, Gama & Grassi; the CAGrad repo runs 0.4; seed 002's grid
{0.2, 0.5, 0.8}). Heads: raw.
"""

from __future__ import annotations

import numpy as np
import torch

from mtopt.core.method import Aggregation, Method, MethodInput, Need, SolverReport, as_weights
from mtopt.core.min_norm import project_onto_simplex
from mtopt.core.registry import register

RESCALES = (0, 1, 2)


def cagrad_dual(
    gram: np.ndarray, c: float, max_iter: int = 500, tol: float = 1e-12
) -> tuple[np.ndarray, int, bool]:
    """Minimise ``wᵀM1/K + c‖g0‖ √(wᵀMw + 1e-8)`` over the simplex.

    Returns ``(w, iterations, converged)``.
    """
    k = gram.shape[0]
    b = gram.sum(axis=1) / k
    sqrt_phi = c * np.sqrt(gram.mean() + 1e-8)
    if k == 2:
        return _two_task_dual(gram, b, sqrt_phi), 0, True

    def f(w: np.ndarray) -> float:
        return float(w @ b + sqrt_phi * np.sqrt(w @ gram @ w + 1e-8))

    w = np.full(k, 1.0 / k)
    value = f(w)
    step = 1.0 / max(float(np.abs(gram).max()), 1e-300)
    for it in range(1, max_iter + 1):
        grad = b + sqrt_phi * (gram @ w) / np.sqrt(w @ gram @ w + 1e-8)
        while True:
            candidate = project_onto_simplex(w - step * grad)
            new_value = f(candidate)
            if new_value <= value - 1e-4 * float(grad @ (w - candidate)) or step < 1e-300:
                break
            step *= 0.5
        change = float(np.abs(candidate - w).sum())
        gain = value - new_value
        w, value = candidate, new_value
        step *= 2.0
        # stop when the iterate stops moving, or when the objective can no longer decrease in
        # float64 (near-cancelling gradients make the dual very flat but badly conditioned)
        if change < tol or gain <= 1e-15 * max(1.0, abs(value)):
            return w, it, True
    return w, max_iter, False


def _two_task_dual(gram: np.ndarray, b: np.ndarray, sqrt_phi: float) -> np.ndarray:
    """Exact K = 2 dual: bisection on the monotone derivative of the convex F(x, 1 - x)."""

    def slope(x: float) -> float:
        q = x * x * gram[0, 0] + 2 * x * (1 - x) * gram[0, 1] + (1 - x) ** 2 * gram[1, 1] + 1e-8
        dq = 2 * x * gram[0, 0] + 2 * (1 - 2 * x) * gram[0, 1] - 2 * (1 - x) * gram[1, 1]
        return float(b[0] - b[1] + sqrt_phi * dq / (2 * np.sqrt(q)))

    if slope(0.0) >= 0:
        x = 0.0
    elif slope(1.0) <= 0:
        x = 1.0
    else:
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if slope(mid) > 0:
                hi = mid
            else:
                lo = mid
            if hi - lo < 1e-15:
                break
        x = 0.5 * (lo + hi)
    return np.array([x, 1.0 - x])


@register
class CAGrad(Method):
    """CAGrad (Liu et al. 2021): best worst-task gain in a ball around the mean gradient."""

    gramian_only = True
    name = "cagrad"
    needs = Need.PARAM_GRADS
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        c: float = 0.5,
        rescale: int = 1,
        sum_scale: bool = True,
        max_iter: int = 500,
        head_policy: str | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        if not 0.0 <= c < 1.0:
            raise ValueError(f"cagrad: c must be in [0, 1), got {c}")
        if rescale not in RESCALES:
            raise ValueError(f"cagrad: rescale must be one of {RESCALES}, got {rescale!r}")
        self.c = float(c)
        self.rescale = int(rescale)
        self.sum_scale = bool(sum_scale)
        self.max_iter = int(max_iter)

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        gram = inputs.gramian().detach().to(torch.float64).cpu().numpy()
        k = inputs.num_tasks
        w, iterations, converged = cagrad_dual(gram, self.c, self.max_iter)
        sqrt_phi = self.c * np.sqrt(gram.mean() + 1e-8)
        gw_norm = float(np.sqrt(max(w @ gram @ w, 0.0)))
        lam = sqrt_phi / (gw_norm + 1e-8)
        raw = 1.0 / k + lam * w
        raw = raw / {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        if self.sum_scale:
            raw = raw * k
        status = "converged" if converged else "max_iter"
        message = "" if converged else "CAGrad dual hit max_iter; weights are approximate"
        return Aggregation(
            as_weights(raw, inputs),
            solver=SolverReport("cagrad_dual/pgd", converged, iterations, status, message),
            extras={"cagrad_dual_weights": w.tolist()},
        )
