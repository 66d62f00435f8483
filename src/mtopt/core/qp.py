r"""Small dense quadratic programs, in float64.

The problem is :math:`\min_v v^\top Mv` subject to :math:`v\ge l` (element-wise) for a symmetric
positive-(semi)definite ``K × K`` matrix :math:`M`. With :math:`x=v-l` and :math:`q=Ml` it is the
linear complementarity problem (LCP)

.. math:: x\ge0,\qquad y=Mx+q\ge0,\qquad x^\top y=0,

whose solutions are exactly the minimisers (the KKT conditions of a convex QP; :math:`2y` is the
gradient). For a positive-definite :math:`M` (a P-matrix) the solution is unique. If :math:`F`
is the set of *free* indices (:math:`x_F` may be positive) and :math:`G` its complement, a
candidate is :math:`x_G=0`, :math:`M_{FF}x_F=-q_F`, so :math:`y_F=0`; it solves the LCP iff
:math:`x_F\ge0` and :math:`y_G\ge0`.

Two exact solvers, both working on that candidate:

* :func:`box_lower_qp_batch` — *block principal pivoting* (Júdice & Pires 1994; the form of
  Kim & Park 2011 for non-negative least squares with many right-hand sides), for ``B`` problems
  that share :math:`M` and differ in :math:`l`. Start from :math:`F=\{j: q_j<0\}`, the indices
  whose gradient is negative at :math:`x=0`. Each iteration computes every problem's candidate
  with one stacked solve (problem ``b``'s system is :math:`M_{FF}` bordered by the identity on
  :math:`G`; a finished problem keeps its :math:`F`) and flips *all* infeasible indices of each
  problem (:math:`j\in F` with :math:`x_j<0` leave :math:`F`, :math:`j\in G` with :math:`y_j<0`
  enter).
  Block exchanges need not converge, so each problem counts its infeasible indices: when the
  count fails to drop below its best for more than 3 exchanges in a row (Júdice & Pires'
  :math:`\bar p=3`; a drop resets the allowance) the problem leaves the batch and is finished by
  the sequential active-set method below (where Júdice & Pires switch to Murty's single-pivot
  rule). The first count is at most ``K``, each drop buys at most 4 more iterations and the last
  run of non-drops at most 4, so the batched phase ends after at most :math:`4K+5` iterations.
  A problem whose candidate is not finite (NaN counts as infeasible) also goes to the sequential
  method, and so does every unfinished problem when a stacked system is singular (only possible
  for a singular :math:`M`).
* :func:`box_lower_qp_active_set` — the Lawson–Hanson active-set method (primal feasible: it
  adds the index with the most negative gradient, then moves toward the candidate until every
  free variable is positive); finite termination, one problem at a time.

Both accept a candidate only when the KKT conditions hold to the tolerance
:math:`\tau=10^{-12}\max(1,\max|M|)`: :math:`x_F\ge-\tau`, :math:`y_G\ge-\tau` and the
stationarity residual :math:`|y_F|` within rounding of the solve. The returned :math:`x` is
clipped at 0, so :math:`v\ge l` holds exactly. A problem that ends without meeting them is
reported as not converged; nothing is silently replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Relative KKT tolerance: τ = KKT_RTOL · max(1, max|M|).
KKT_RTOL = 1e-12
#: Stationarity residual allowed on the free set, relative to max(1, max|M|) · max(1, max|x|).
RESIDUAL_RTOL = 1e-9
#: Block exchanges allowed without a drop of the infeasibility count (Júdice & Pires' p̄).
_EXCHANGE_ALLOWANCE = 3


@dataclass(frozen=True)
class BoxQPResult:
    """Solutions of ``B`` problems ``min vᵀMv s.t. v ≥ lowers[b]`` sharing ``M``.

    Attributes:
        solutions: ``(B, K)``; row ``b`` is the minimiser for ``lowers[b]``.
        converged: ``(B,)`` bool; whether each solution met the KKT conditions.
        iterations: batched block-pivoting iterations plus the outer iterations of the
            sequential method on the problems handed to it.
        sequential: how many problems the sequential active-set method finished.
        residual: the largest KKT violation over the problems, ``max_j (−y_j)₊`` and ``|y_j|``
            where ``x_j > 0`` (``y = Mx + q``, recomputed after the solve), relative to
            ``max(1, max|M|) · max(1, max|x|)``; ``inf`` for a non-finite answer. A converged
            problem has it below ``RESIDUAL_RTOL``.
    """

    solutions: np.ndarray
    converged: np.ndarray
    iterations: int
    sequential: int
    residual: float = 0.0

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


def kkt_tolerance(M: np.ndarray) -> float:
    """The absolute tolerance τ of the KKT checks for the matrix ``M``."""
    return KKT_RTOL * max(1.0, float(np.abs(M).max(initial=0.0)))


def box_lower_qp_batch(M: np.ndarray, lowers: np.ndarray, max_iter: int = 500) -> BoxQPResult:
    """``argmin vᵀMv`` s.t. ``v ≥ lowers[b]`` for every row ``b``, by block principal pivoting.

    ``M`` is ``K × K`` symmetric PSD (PD for a unique answer), ``lowers`` is ``(B, K)``.
    ``max_iter`` bounds the sequential method's outer iterations on each problem handed to it.
    """
    M = np.asarray(M, dtype=np.float64)
    L = np.atleast_2d(np.asarray(lowers, dtype=np.float64))
    n, k = L.shape
    if M.shape != (k, k):
        raise ValueError(f"box_lower_qp: M is {M.shape}, lower bounds have {k} entries")
    tol = kkt_tolerance(M)
    neg_q = -(L @ M)  # row b: -q_b = -M l_b (M is symmetric)
    eye = np.eye(k)
    F = neg_q > tol  # the free sets
    moving = np.ones(n, dtype=bool)  # problems whose F changed in the last exchange
    sequential = np.zeros(n, dtype=bool)  # problems handed to the sequential method
    best = allowance = None
    x, y = np.zeros((n, k)), -neg_q
    iterations = 0
    # Every problem is re-solved at each iteration (a finished one keeps its F, hence its x): for
    # K ≈ 10 a stacked solve of all of them costs about what indexing the unfinished out would.
    while True:
        iterations += 1
        try:
            x = np.linalg.solve(np.where(F[:, :, None] & F[:, None, :], M, eye),
                                np.where(F, neg_q, 0.0)[:, :, None])[:, :, 0]  # fmt: skip
        except np.linalg.LinAlgError:  # some M_FF is singular (M only PSD): x, y are the last
            sequential |= moving  # iteration's, valid for the problems that did not move
            break
        y = x @ M - neg_q
        infeasible = ~(np.where(F, x, y) >= -tol)  # NaN counts as infeasible
        if not infeasible.any():
            break
        count = infeasible.sum(axis=1)
        if best is None:
            best, allowance = count, np.full(n, _EXCHANGE_ALLOWANCE)
        else:
            assert allowance is not None  # set together with best
            allowance = np.where(count < best, _EXCHANGE_ALLOWANCE, allowance - 1)
            best = np.minimum(best, count)
        sequential |= (count > 0) & (allowance < 0)
        moving = (count > 0) & ~sequential
        if not moving.any():
            break
        F ^= infeasible & moving[:, None]
    X = np.maximum(x, 0.0)  # x_G is exactly 0 (identity rows of the stacked system)
    # The stationarity residual y_F of the accepted candidates: at rounding level unless a
    # non-finite value (or a near-singular M_FF) spoiled the solve. One check for the batch,
    # problem by problem only when it fails (the comparisons are False for NaN).
    residual = np.abs(np.where(F, y, 0.0))
    rtol = RESIDUAL_RTOL / KKT_RTOL * tol
    if not residual.max() <= rtol * max(1.0, float(np.abs(x).max())):
        limit = rtol * np.maximum(1.0, np.abs(x).max(axis=1))
        sequential |= ~(residual.max(axis=1) <= limit)
    converged = ~sequential
    for b in np.flatnonzero(sequential):
        X[b], converged[b], its = _lawson_hanson(M, -neg_q[b], tol, max_iter)
        iterations += its
    return BoxQPResult(
        L + X, converged, iterations, int(sequential.sum()), kkt_residual(M, neg_q, X)
    )


def kkt_residual(M: np.ndarray, neg_q: np.ndarray, X: np.ndarray) -> float:
    """The certificate of :class:`BoxQPResult`: the largest KKT violation of the solutions
    ``X`` (rows, ``x ≥ 0``) of ``x ≥ 0, y = Mx + q ≥ 0, xᵀy = 0``, relative to
    ``max(1, max|M|) · max(1, max|x|)``."""
    y = X @ M - neg_q
    violation = np.maximum(np.maximum(-y, 0.0), np.where(X > 0, np.abs(y), 0.0))
    scale = max(1.0, float(np.abs(M).max(initial=0.0))) * max(1.0, float(np.abs(X).max()))
    value = float(violation.max(initial=0.0)) / scale
    return value if np.isfinite(value) and np.all(np.isfinite(X)) else float("inf")


def box_lower_qp(M: np.ndarray, lower: np.ndarray, max_iter: int = 500) -> tuple[np.ndarray, bool]:
    """``argmin vᵀMv`` s.t. ``v ≥ lower``; returns ``(v, converged)`` (block principal pivoting,
    see :func:`box_lower_qp_batch`)."""
    res = box_lower_qp_batch(M, np.asarray(lower, dtype=np.float64)[None, :], max_iter)
    return res.solutions[0], bool(res.converged[0])


def box_lower_qp_active_set(
    M: np.ndarray, lower: np.ndarray, max_iter: int = 500
) -> tuple[np.ndarray, bool]:
    """``argmin vᵀMv`` s.t. ``v ≥ lower`` by the sequential Lawson–Hanson method; returns
    ``(v, converged)``."""
    M = np.asarray(M, dtype=np.float64)
    lower = np.asarray(lower, dtype=np.float64)
    x, ok, _ = _lawson_hanson(M, M @ lower, kkt_tolerance(M), max_iter)
    return lower + x, ok


def _lawson_hanson(
    M: np.ndarray, q: np.ndarray, tol: float, max_iter: int
) -> tuple[np.ndarray, bool, int]:
    """Lawson–Hanson on ``min xᵀMx + 2qᵀx, x ≥ 0``; returns ``(x, converged, iterations)``."""
    k = M.shape[0]
    x = np.zeros(k)
    free = np.zeros(k, dtype=bool)
    for it in range(max_iter):
        grad = M @ x + q
        candidates = np.where(~free & (grad < -tol))[0]
        if candidates.size == 0:  # KKT holds, unless NaN made every comparison False
            return x, bool(np.isfinite(grad).all()), it
        free[candidates[np.argmin(grad[candidates])]] = True
        for _ in range(k + 1):
            idx = np.where(free)[0]
            z = np.zeros(k)
            try:
                z[idx] = np.linalg.solve(M[np.ix_(idx, idx)], -q[idx])
            except np.linalg.LinAlgError:
                return x, False, it + 1
            if np.all(z[idx] > 0):
                x = z
                break
            bad = idx[z[idx] <= 0]
            alpha = float(np.min(x[bad] / (x[bad] - z[bad])))
            x = x + alpha * (z - x)
            free &= x > tol
            x[~free] = 0.0
    return x, False, max_iter
