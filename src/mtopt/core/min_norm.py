r"""Min-norm point of the convex hull of K vectors, given their Gram matrix.

Solves :math:`w^* = \arg\min_{w\in\Delta^K} w^\top M w` with :math:`M = G G^\top`, so that
:math:`d = G^\top w^*` is the min-norm element of :math:`\mathrm{conv}\{g_1..g_K\}`
(Désidéri 2012; Sener & Koltun 2018). The solvers run in float64 on the ``K × K`` matrix (callers
convert it; the Gramian itself is accumulated in the gradients' dtype), with a hard iteration
bound, and report how they ended.

Two solvers, both started from Sener & Koltun's best pair:

* ``pgd`` — the projected-gradient scheme of Sener & Koltun's training script: move along the
  centred negative gradient ``r̃ = -Mw + mean(Mw)`` to the nearest simplex face, project onto the
  simplex, then an exact two-point line search between the old and new point.
* ``fw`` — Frank-Wolfe: toward the vertex ``e_t``, ``t = argmin_i (Mw)_i``, exact line search.

Both stop when ``‖w_new − w‖₁ < tol`` or after ``max_iter`` iterations (the reference code never
incremented its counter; here the bound always holds). Sener's two-point rule clamps the mixing
coefficient to ``[clamp, 1 − clamp]`` (0.001/0.999); ``clamp=0`` gives the exact segment minimiser.
Both are first-order methods: on ill-conditioned Gram matrices they stop short of the optimum
(KKT residuals of 1e-3..1e-2 of ``max‖g_i‖²`` are typical at the default settings).

For the small ``K`` of multi-task learning their per-iteration cost is call overhead, not
arithmetic. The products with ``M`` (``Mw``, ``cᵀMw``, ``cᵀMc``, ``wᵀMw``) and the sums are numpy
calls on float64 arrays; the ``K``-element logic of ``pgd`` (step ratios, simplex projection,
convex combination) runs on Python floats. Every element-wise operation is that of the array
formulation, in the same order, so the iterates are bit for bit those of the array code.

A third solver is exact:

* ``wolfe`` — Wolfe's (1976) nearest-point-in-polytope active-set algorithm, written on the Gram
  matrix. It keeps an affinely independent support, solves the affine min-norm problem on it in
  closed form and drops points whose weight would turn negative. It terminates in finitely many
  steps at a point meeting the KKT conditions ``(Mw)_i ≥ wᵀMw`` (equality on the support) to
  rounding; ``max_iter`` bounds its major iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SOLVERS = ("pgd", "fw", "wolfe")
#: Relative optimality slack of the exact solver (fraction of ``max_i M_ii``).
WOLFE_RTOL = 1e-12
#: Squared norms below this fraction of the largest squared norm count as zero gradients.
ZERO_GRADIENT_RTOL = 1e-20
#: Boundary-hitting step ratios at or below this are ignored (Sener's 1e-7).
_MIN_STEP = 1e-7


@dataclass(frozen=True)
class MinNormResult:
    """Solver outcome: simplex weights, iterations used, and how it stopped.

    ``status`` is one of ``exact`` (K ≤ 2: the pair rule is the answer), ``converged``,
    ``max_iter`` (bound reached before the tolerance), ``zero_gradient`` (some ``g_i = 0``, so
    ``d = 0``: ``w = e_i``).
    """

    weights: np.ndarray
    iterations: int
    status: str
    cost: float

    @property
    def converged(self) -> bool:
        return self.status != "max_iter"


def zero_gradient_mask(sq_norms: np.ndarray) -> np.ndarray:
    """Which squared gradient norms count as zero (relative to the largest, see
    ``ZERO_GRADIENT_RTOL``)."""
    return sq_norms <= ZERO_GRADIENT_RTOL * max(float(sq_norms.max()), 0.0)


def project_onto_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``v`` onto ``{w ≥ 0, Σw = 1}`` (sort-based, O(K log K))."""
    # The projection commutes with adding a constant to every entry; shifting so that max(v) = 0
    # keeps the test below exact for the largest entry (for |v| ≳ 1e16 it failed by cancellation).
    v = np.asarray(v, dtype=np.float64)
    v = v - v.max()
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    ks = np.arange(1, v.size + 1)
    rho = np.nonzero(u - css / ks > 0)[0][-1]
    theta = css[rho] / (rho + 1.0)
    return np.maximum(v - theta, 0.0)


def two_point_min_norm(aa: float, ab: float, bb: float, clamp: float = 1e-3) -> tuple[float, float]:
    r"""Minimise :math:`\|\gamma a + (1-\gamma) b\|^2` over :math:`\gamma\in[0,1]`.

    Takes ``aᵀa, aᵀb, bᵀb``; returns ``(γ, cost)``. At the ends ``γ`` is clamped to
    ``1 − clamp`` / ``clamp`` as in Sener & Koltun (the cost reported is the vertex's).
    """
    if ab >= aa:
        return 1.0 - clamp, aa
    if ab >= bb:
        return clamp, bb
    gamma = (bb - ab) / (aa + bb - 2.0 * ab)
    return gamma, bb + gamma * (ab - bb)


def _best_pair(M: np.ndarray, clamp: float) -> np.ndarray:
    """Sener & Koltun's start: the best of the ``K(K−1)/2`` two-point problems (first in
    ``(i, j)`` order among equal costs)."""
    k = M.shape[0]
    rows = M.tolist()  # Python floats: ~10× cheaper to index than numpy scalars
    diag = [rows[i][i] for i in range(k)]
    best_cost, best = np.inf, None
    for i in range(k):
        aa, row = diag[i], rows[i]
        for j in range(i + 1, k):
            gamma, cost = two_point_min_norm(aa, row[j], diag[j], clamp)
            if cost < best_cost:
                best_cost, best = cost, (i, j, gamma)
    assert best is not None
    i, j, gamma = best
    w = np.zeros(k)
    w[i], w[j] = gamma, 1.0 - gamma
    return w


def _project_floats(y: list[float]) -> list[float]:
    """:func:`project_onto_simplex` on Python floats, operation for operation (the running sum is
    ``np.cumsum``'s sequential one)."""
    top = max(y)
    v = [a - top for a in y]
    theta, acc = 0.0, 0.0
    for j, u in enumerate(sorted(v, reverse=True)):
        acc = u if j == 0 else acc + u
        css = acc - 1.0
        if u - css / (j + 1) > 0:  # keep the last such index, as the array code does
            theta = css / (j + 1.0)
    return [max(a - theta, 0.0) for a in v]


def _pgd_candidate(w: list[float], Mw: list[float], mean: float) -> list[float]:
    """Sener's candidate: from ``w`` along ``r̃ = −Mw + mean(Mw)`` to the nearest simplex face,
    projected onto the simplex. ``mean`` is ``sum(Mw) / K`` (numpy's sum)."""
    # Sener's rule: the nearest boundary, 1 only when no coordinate heads to 0 (not capped at 1:
    # a cap makes the step, hence the ‖Δw‖₁ stop, depend on the scale of M). Ratios at or below
    # _MIN_STEP are ignored.
    r_tilde = []
    to_zero: float | None = None
    to_one = np.inf
    for wi, m in zip(w, Mw, strict=True):
        # r = −Mw, r̃ = r − mean(r) = mean(Mw) − Mw exactly (negation commutes with rounding)
        ri = mean - m
        r_tilde.append(ri)
        if ri < 0:
            ratio = -wi / ri
            if ratio > _MIN_STEP and (to_zero is None or ratio < to_zero):
                to_zero = ratio
        elif ri > 0:
            ratio = (1.0 - wi) / ri
            if _MIN_STEP < ratio < to_one:
                to_one = ratio
    t = min(1.0 if to_zero is None else to_zero, to_one)
    return _project_floats([wi + t * ri for wi, ri in zip(w, r_tilde, strict=True)])


def min_norm_weights(
    M: np.ndarray,
    solver: str = "pgd",
    max_iter: int = 250,
    tol: float = 1e-5,
    clamp: float = 1e-3,
) -> MinNormResult:
    """Weights on the simplex minimising ``wᵀMw`` for a PSD Gram matrix ``M``.

    Raises:
        ValueError: ``M`` not square, not finite, or an unknown solver.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"min-norm solver needs a non-empty square Gram matrix, got {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError("min-norm solver got a Gram matrix with NaN or inf entries")
    if solver not in SOLVERS:
        raise ValueError(f"min-norm solver must be one of {SOLVERS}, got {solver!r}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be ≥ 0, got {max_iter}")
    k = M.shape[0]
    sq_norms = np.diag(M)
    zero = zero_gradient_mask(sq_norms)
    if zero.any():
        w = np.zeros(k)
        w[int(np.argmax(zero))] = 1.0
        return MinNormResult(w, 0, "zero_gradient", 0.0)
    if k == 1:
        return MinNormResult(np.ones(1), 0, "exact", float(M[0, 0]))
    if solver == "wolfe":
        return _wolfe(M, max_iter)
    w = _best_pair(M, clamp)
    if k == 2:
        return MinNormResult(w, 0, "exact", float(w @ M @ w))
    run = _pgd if solver == "pgd" else _frank_wolfe
    w, it, converged = run(M, w, max_iter, tol, clamp)
    return MinNormResult(w, it, "converged" if converged else "max_iter", float(w @ M @ w))


def _pgd(
    M: np.ndarray, w: np.ndarray, max_iter: int, tol: float, clamp: float
) -> tuple[np.ndarray, int, bool]:
    """Sener's projected gradient: ``w ← γw + (1−γ)c`` with ``c`` from :func:`_pgd_candidate`
    and ``γ`` the two-point rule on ``(wᵀMw, cᵀMw, cᵀMc)``; stop at ``‖Δw‖₁ < tol``."""
    k = M.shape[0]
    wl = w.tolist()
    for it in range(1, max_iter + 1):
        Mw = M @ w
        c = np.array(_pgd_candidate(wl, Mw.tolist(), float(Mw.sum()) / k))
        gamma, _ = two_point_min_norm(float(w @ Mw), float(c @ Mw), float(c @ M @ c), clamp)
        rest = 1.0 - gamma
        wl = [gamma * a + rest * b for a, b in zip(wl, c.tolist(), strict=True)]
        new = np.array(wl)
        change = float(np.abs(new - w).sum())
        w = new
        if change < tol:
            return w, it, True
    return w, max_iter, False


def _frank_wolfe(
    M: np.ndarray, w: np.ndarray, max_iter: int, tol: float, clamp: float
) -> tuple[np.ndarray, int, bool]:
    """Frank-Wolfe: ``w ← γw + (1−γ)e_t``, ``t = argmin_i (Mw)_i``, ``γ`` the two-point rule on
    ``(wᵀMw, (Mw)_t, M_tt)``; stop at ``‖Δw‖₁ < tol``."""
    diag = np.diag(M).tolist()
    for it in range(1, max_iter + 1):
        Mw = M @ w
        t = int(Mw.argmin())
        gamma, _ = two_point_min_norm(float(w @ Mw), float(Mw[t]), diag[t], clamp)
        new = gamma * w  # γw + (1−γ)e_t: the other entries get + (1−γ)·0 = + 0.0
        new[t] += 1.0 - gamma
        change = float(np.abs(new - w).sum())
        w = new
        if change < tol:
            return w, it, True
    return w, max_iter, False


def _affine_min_norm(M: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``argmin μᵀAμ`` subject to ``Σμ = 1`` (no sign constraint) for ``A = M[idx, idx]``, via
    the KKT system ``[[A, 1], [1ᵀ, 0]] (μ, λ) = (0, 1)``."""
    n = idx.size
    kkt = np.ones((n + 1, n + 1))
    kkt[:n, :n] = M[idx[:, None], idx]
    kkt[n, n] = 0.0
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0
    try:
        sol = np.linalg.solve(kkt, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return sol[:n]


def _wolfe(M: np.ndarray, max_iter: int) -> MinNormResult:
    k = M.shape[0]
    diag = np.diag(M)
    slack = WOLFE_RTOL * float(diag.max())
    start = int(diag.argmin())
    support = [start]
    w = np.zeros(k)
    w[start] = 1.0
    for it in range(1, max_iter + 1):
        Mw = M @ w
        j = int(Mw.argmin())
        if Mw[j] >= float(w @ Mw) - slack or j in support:
            return MinNormResult(w, it - 1, "converged", float(w @ Mw))
        support.append(j)
        for _ in range(k + 1):  # minor cycle: each pass drops ≥ 1 point or ends
            idx = np.array(support)
            mu = _affine_min_norm(M, idx)
            if (mu > 0).all():
                w = np.zeros(k)
                w[idx] = mu
                break
            lam = w[idx]
            neg = mu <= 0
            theta = float(np.min(lam[neg] / (lam[neg] - mu[neg])))
            lam = lam + theta * (mu - lam)
            lam[lam <= 1e-15] = 0.0
            keep = lam > 0
            w = np.zeros(k)
            w[idx[keep]] = lam[keep] / lam[keep].sum()
            support = [int(i) for i in idx[keep]]
    return MinNormResult(w, max_iter, "max_iter", float(w @ M @ w))
