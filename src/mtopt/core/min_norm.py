r"""Min-norm point of the convex hull of K vectors, given their Gram matrix, with a certificate.

Solves :math:`w^* = \arg\min_{w\in\Delta^K} w^\top M w` with :math:`M = G G^\top`, so that
:math:`d = G^\top w^*` is the min-norm element of :math:`\mathrm{conv}\{g_1..g_K\}`
(Désidéri 2012; Sener & Koltun 2018). Everything runs in float64 on the ``K × K`` matrix.

**The certificate.** Whatever solver ran, the answer is judged afterwards by the KKT conditions of
this convex QP, necessary and sufficient: :math:`w\in\Delta`, :math:`g_i^\top d=(Mw)_i\ge\|d\|^2`
for every :math:`i`, with equality where :math:`w_i>0`. Each violation is measured relative to
the scale at which it can be computed, :math:`s_i=\|g_i\|\,n_w+n_w^2` with
:math:`n_w=\sum_jw_j\|g_j\|\ge\|d\|` (so the check means the same for gradients of any size and
spread), and the report carries :math:`\rho=\max_i\mathrm{violation}_i/s_i`
(:func:`min_norm_residual`). The status is ``converged`` only if :math:`\rho\le` ``KKT_RTOL``
(1e-10); a solver that stopped by its own rule short of that is ``stalled``, one that ran out of
iterations ``max_iter``. Nothing is replaced by a fallback.

**Solvers.**

* ``wolfe`` (default of every mtopt method) — exact: Wolfe's (1976) nearest-point-in-polytope
  active-set algorithm written on the Gram matrix. It keeps an affinely independent support,
  solves the affine min-norm problem on it in closed form (a bordered KKT system, diagonally
  scaled by the gradient norms so that norms spread over many orders of magnitude do not spoil
  it) and drops points whose weight would turn negative. It ends in finitely many steps at a
  point meeting the KKT conditions to rounding. :func:`shifted_min_norm` is the same algorithm
  for the translated points :math:`g_i+\tau g_0` (CAGrad's inner problem), without forming
  their Gram matrix.
* ``pgd`` — reproduces Sener & Koltun's training script: from their best pair, move along the
  centred negative gradient ``r̃ = -Mw + mean(Mw)`` to the nearest simplex face, project onto the
  simplex, then their two-point line search between the old and new point.
* ``fw`` — Frank-Wolfe (the paper-level solver of Sener & Koltun, which Gama & Grassi use for EDM
  and CDTT): toward the vertex ``e_t``, ``t = argmin_i (Mw)_i``, two-point line search.

``pgd`` and ``fw`` stop when ``‖w_new − w‖₁ < tol`` or after ``max_iter`` iterations (the
reference code never incremented its counter; here the bound always holds); Sener's two-point
rule clamps the mixing coefficient to ``[clamp, 1 − clamp]`` (0.001/0.999). Both are first-order
methods: on ill-conditioned Gram matrices they stop short of the optimum, and the certificate
says so (``stalled``). Their K-element logic runs on Python floats, operation for operation as
the array formulation (bit-identical iterates, cheaper at small K).

A task whose gradient is exactly zero (``M_ii = 0``) puts the origin in the hull: the answer is
``w = e_i``, ``d = 0`` (status ``zero_gradient``, a certified optimum). Tiny but non-zero
gradients are gradients: nothing is thresholded relative to the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SOLVERS = ("wolfe", "pgd", "fw")
#: Relative KKT residual (see :func:`min_norm_residual`) below which a solution is certified.
KKT_RTOL = 1e-10
#: Wolfe's own stopping slack, relative to the same scale (well below ``KKT_RTOL``).
_WOLFE_RTOL = 1e-13
#: Boundary-hitting step ratios at or below this are ignored (Sener's 1e-7).
_MIN_STEP = 1e-7


@dataclass(frozen=True)
class MinNormResult:
    r"""Solver outcome: simplex weights, iterations used, how it ended, and the certificate.

    ``status``: ``converged`` (the KKT certificate holds), ``zero_gradient`` (some ``g_i = 0``,
    so ``d = 0``, the weight shared equally by the zero gradients; certified), ``stalled`` (the
    solver's own stopping rule fired but the certificate fails), ``max_iter`` (iteration bound
    reached, certificate fails).
    ``residual`` is the relative KKT residual :math:`\rho` of :func:`min_norm_residual`.
    """

    weights: np.ndarray
    iterations: int
    status: str
    cost: float
    residual: float = 0.0

    @property
    def converged(self) -> bool:
        return self.status in ("converged", "zero_gradient")


def min_norm_residual(M: np.ndarray, w: np.ndarray) -> float:
    r"""Relative KKT residual :math:`\rho` of ``w`` for :math:`\min_{w\in\Delta}w^\top Mw`.

    :math:`\rho=\max\big(|\sum_iw_i-1|,\ \max_i(-w_i)_+,\ \max_iv_i/s_i\big)` with
    :math:`v_i=(\|d\|^2-(Mw)_i)_+`, plus :math:`|(Mw)_i-\|d\|^2|` where :math:`w_i>0`, and
    :math:`s_i=\|g_i\|n_w+n_w^2`, :math:`n_w=\sum_jw_j\|g_j\|` (0/0 counts as 0). NaN gives
    ``inf``."""
    M = np.asarray(M, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    norms = np.sqrt(np.maximum(np.diagonal(M), 0.0))
    Mw = M @ w
    dd = float(w @ Mw)
    n_w = float(np.abs(w) @ norms)
    scale = norms * n_w + n_w * n_w
    gap = dd - Mw
    viol = np.where(w > 0, np.abs(gap), np.maximum(gap, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(viol > 0, viol / scale, 0.0)
    feas = max(abs(float(w.sum()) - 1.0), float(np.maximum(-w, 0.0).max(initial=0.0)))
    rho = max(feas, float(rel.max(initial=0.0)))
    return rho if math.isfinite(rho) else math.inf


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
    solver: str = "wolfe",
    max_iter: int = 250,
    tol: float = 1e-5,
    clamp: float = 1e-3,
    support: list[int] | None = None,
) -> MinNormResult:
    """Weights on the simplex minimising ``wᵀMw`` for a PSD Gram matrix ``M``, certified.

    ``max_iter`` bounds the iterations of ``pgd``/``fw`` and the major cycles of ``wolfe``
    (which needs at most a few times ``K``); ``tol`` and ``clamp`` are Sener's stopping rule and
    pair clamp (``pgd``/``fw`` only; the exact solver uses no clamp). ``support`` warm-starts
    ``wolfe`` from a previous step's support (the optimum is the same; it is usually reached in
    one major cycle).

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
    zero = np.diagonal(M) <= 0.0
    if zero.any():  # d = 0, the weight shared by the zero gradients (whatever their order)
        w = zero / float(zero.sum())
        return MinNormResult(w, 0, "zero_gradient", 0.0, min_norm_residual(M, w))
    if k == 1:
        w = np.ones(1)
        return MinNormResult(w, 0, "converged", float(M[0, 0]), 0.0)
    if solver == "wolfe":
        w, it, finished = shifted_min_norm(M, support=support, max_iter=max_iter)
        stop = "stalled" if finished else "max_iter"
    elif k == 2:
        w, it, stop = _best_pair(M, clamp), 0, "stalled"
    else:
        run = _pgd if solver == "pgd" else _frank_wolfe
        w, it, finished = run(M, _best_pair(M, clamp), max_iter, tol, clamp)
        stop = "stalled" if finished else "max_iter"
    rho = min_norm_residual(M, w)
    if solver == "wolfe" and rho <= KKT_RTOL:
        # a tie of the problem, resolved without regard to the order of the tasks
        split = split_ties(M, w)
        rho_split = min_norm_residual(M, split)
        if rho_split <= KKT_RTOL:
            w, rho = split, rho_split
    status = "converged" if rho <= KKT_RTOL else stop
    return MinNormResult(w, it, status, float(w @ M @ w), rho)


#: Two gradients count as the same when ``‖g_i − g_j‖² ≤ SAME_RTOL · max(‖g_i‖², ‖g_j‖²)``.
SAME_RTOL = 2.0**-40


def split_ties(M: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``w`` with the total weight of each group of identical gradients (rows of ``G`` equal to
    ``SAME_RTOL``, read from ``M``; groups closed transitively) shared equally among its members.

    With identical gradients the min-norm problem has a set of solutions: every split of their
    weight gives the same ``d``. The solver keeps one member, so the split, and with it the
    update of a method that applies the weights to other vectors (MGDA on the raw gradients,
    EDM's rescaling), would depend on the order of the tasks; the equal split does not. The
    caller keeps the result only if it is still certified."""
    diag = np.diagonal(M)
    sq_dist = diag[:, None] + diag[None, :] - 2.0 * M
    same = sq_dist <= SAME_RTOL * np.maximum.outer(diag, diag)
    out = np.asarray(w, dtype=np.float64).copy()
    seen = np.zeros(len(out), dtype=bool)
    for start in range(len(out)):
        if seen[start]:
            continue
        group, frontier = {start}, [start]
        while frontier:  # the connected component of ``start`` in the "same" graph
            i = frontier.pop()
            for j in np.flatnonzero(same[i]).tolist():
                if j not in group:
                    group.add(j)
                    frontier.append(j)
        members = sorted(group)
        seen[members] = True
        if len(members) > 1:
            out[members] = math.fsum(out[members].tolist()) / len(members)
    return out


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


def shifted_min_norm(
    M: np.ndarray,
    b: np.ndarray | None = None,
    tau: float = 0.0,
    norm0: float = 0.0,
    support: list[int] | None = None,
    max_iter: int = 250,
) -> tuple[np.ndarray, int, bool]:
    r"""Wolfe's algorithm for the min-norm point of :math:`\mathrm{conv}\{g_i+\tau g_0\}`.

    Given :math:`M=GG^\top`, :math:`b=Gg_0` and :math:`\|g_0\|` (``norm0``), it minimises
    :math:`\|G^\top w+\tau g_0\|^2=w^\top Mw+2\tau b^\top w+\tau^2\|g_0\|^2` over the simplex
    without forming the translated Gram matrix (whose entries would cancel): the optimality
    test is :math:`(Mw)_j+\tau b_j\ge w^\top Mw+\tau b^\top w` and the affine subproblem on a
    support :math:`S` is :math:`M_{SS}\mu+\tau b_S=\lambda\mathbf 1`, :math:`\mathbf 1^\top\mu=1`.
    ``tau = 0`` is the plain min-norm problem. ``support`` warm-starts from a previous support.

    Returns ``(w, major iterations, finished)``; ``finished`` is False only when ``max_iter``
    major cycles did not end. The caller certifies the result.
    """
    k = M.shape[0]
    if b is None:
        b = np.zeros(k)
    shift = tau * b
    # upper bounds of ‖g_i + τ g0‖: the diagonal scaling of the affine subproblems and the scale
    # of the optimality test
    radii = np.sqrt(np.maximum(np.diagonal(M), 0.0)) + abs(tau) * norm0
    radii = np.where(radii > 0, radii, 1.0)
    if support:
        support = sorted({int(i) for i in support if 0 <= int(i) < k})
        w = _affine_weights(M, shift, radii, support) if support else None
        if w is None or not (w[support] > 0).all():
            support = None
    if not support:
        start = int(np.argmin(0.5 * np.diagonal(M) + shift))
        support = [start]
        w = np.zeros(k)
        w[start] = 1.0
    assert w is not None  # the warm start's weights (kept only if valid) or the vertex e_start
    for it in range(1, max_iter + 1):
        g = M @ w + shift
        level = float(w @ g)
        n_x = float(w @ radii)
        slack = _WOLFE_RTOL * (radii * n_x + n_x * n_x)
        j = int(np.argmin(g + slack))
        if g[j] + slack[j] >= level or j in support:
            return w, it - 1, True
        support = [*support, j]
        for _ in range(k + 1):  # minor cycle: each pass drops ≥ 1 point or ends
            mu = _affine_weights(M, shift, radii, support)
            if mu is None:  # singular subproblem: drop the newest point and stop here
                support = support[:-1]
                return w, it, True
            if (mu[support] > 0).all():
                w = mu
                break
            idx = np.array(support)
            lam, new = w[idx], mu[idx]
            neg = np.flatnonzero(new <= 0)
            ratios = lam[neg] / (lam[neg] - new[neg])
            first = int(np.argmin(ratios))
            lam = lam + float(ratios[first]) * (new - lam)
            lam[neg[first]] = 0.0  # the blocking point leaves exactly
            keep = lam > 0
            w = np.zeros(k)
            w[idx[keep]] = lam[keep] / lam[keep].sum()
            support = [int(i) for i in idx[keep]]
    return w, max_iter, False


def _affine_weights(
    M: np.ndarray, shift: np.ndarray, radii: np.ndarray, support: list[int], refine: int = 0
) -> np.ndarray | None:
    """The affine minimiser on ``support`` (``M_SS μ + shift_S = λ1``, ``Σμ = 1``), embedded in
    ``K`` entries; ``None`` if the bordered system is singular."""
    idx = np.asarray(support)
    sol = affine_solve(M, idx, radii[idx], -shift[idx][:, None], np.ones(1), refine)
    if sol is None:
        return None
    out = np.zeros(M.shape[0])
    out[idx] = sol[0][:, 0]
    return out


def affine_solve(
    M: np.ndarray,
    idx: np.ndarray,
    scales: np.ndarray,
    top: np.ndarray,
    total: np.ndarray,
    refine: int = 0,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Solve ``M_SS μ − λ1 = top`` and ``1ᵀμ = total`` (``S = idx``; one column per right-hand
    side) for ``(μ, λ)``; ``None`` if singular or not finite.

    The bordered system is solved in the variables ``ν = Dμ``, ``D = diag(scales)`` (the
    gradient norms, so that norms spread over orders of magnitude leave it well scaled), with the
    border scaled to unit norm. ``refine`` steps of iterative refinement recompute the residual
    of the original equations correctly rounded (:mod:`mtopt.core.accurate`) and solve for a
    correction, which recovers full float64 accuracy on ill-conditioned supports."""
    from mtopt.core import accurate

    n = idx.size
    d = np.where(scales > 0, scales, 1.0)
    border = 1.0 / d
    kappa = float(np.linalg.norm(border))
    system = np.empty((n + 1, n + 1))
    sub = M[idx[:, None], idx]
    system[:n, :n] = sub / np.outer(d, d)
    system[:n, n] = system[n, :n] = border / kappa
    system[n, n] = 0.0

    def solve(rhs_top: np.ndarray, rhs_total: np.ndarray) -> np.ndarray:
        rhs = np.vstack([rhs_top / d[:, None], rhs_total[None, :] / kappa])
        return np.linalg.solve(system, rhs)

    try:
        sol = solve(top, total)
        mu, lam = sol[:n] / d[:, None], -sol[n] / kappa
        for _ in range(refine):
            res_top = np.empty_like(top)
            res_total = np.empty_like(total)
            for j in range(top.shape[1]):
                res_top[:, j] = top[:, j] - accurate.matvec(sub, mu[:, j]) + lam[j]
                res_total[j] = total[j] - math.fsum(mu[:, j].tolist())
            corr = solve(res_top, res_total)
            mu = mu + corr[:n] / d[:, None]
            lam = lam - corr[n] / kappa
    except np.linalg.LinAlgError:
        return None
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(lam))):
        return None
    return mu, lam
