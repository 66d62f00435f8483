r"""Small dense quadratic programs, in float64.

:func:`box_lower_qp` solves :math:`\min_v v^\top Mv` subject to :math:`v\ge l` (element-wise) for a
positive-definite :math:`M` by the Lawson–Hanson active-set method on :math:`x=v-l\ge0`:
:math:`\min_x x^\top Mx+2(Ml)^\top x`. Finite termination; the KKT conditions
(:math:`x\ge0`, :math:`\nabla\ge0`, :math:`x_j\nabla_j=0`) hold to rounding at the end.
"""

from __future__ import annotations

import numpy as np


def box_lower_qp(M: np.ndarray, lower: np.ndarray, max_iter: int = 500) -> tuple[np.ndarray, bool]:
    """``argmin vᵀMv`` s.t. ``v ≥ lower``; returns ``(v, converged)``."""
    M = np.asarray(M, dtype=np.float64)
    lower = np.asarray(lower, dtype=np.float64)
    k = M.shape[0]
    q = M @ lower
    x = np.zeros(k)
    free = np.zeros(k, dtype=bool)
    tol = 1e-12 * max(1.0, float(np.abs(M).max()))
    for _ in range(max_iter):
        grad = M @ x + q
        candidates = np.where(~free & (grad < -tol))[0]
        if candidates.size == 0:
            return lower + x, True
        free[candidates[np.argmin(grad[candidates])]] = True
        for _ in range(k + 1):
            idx = np.where(free)[0]
            z = np.zeros(k)
            z[idx] = np.linalg.solve(M[np.ix_(idx, idx)], -q[idx])
            if np.all(z[idx] > 0):
                x = z
                break
            bad = idx[z[idx] <= 0]
            alpha = float(np.min(x[bad] / (x[bad] - z[bad])))
            x = x + alpha * (z - x)
            free &= x > tol
            x[~free] = 0.0
    return lower + x, False
