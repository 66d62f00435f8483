r"""The best worst-case gain in a ball, solved exactly from the Gram matrix, with a duality gap.

Given task gradients :math:`g_i` (rows of :math:`G`, Gram matrix :math:`M=GG^\top`), their mean
:math:`g_0=\frac1K\sum_ig_i` and a radius :math:`s=c\|g_0\|`, find

.. math:: d^*=\arg\max_{\|d-g_0\|\le s}\ \min_i g_i^\top d ,

the direction of CAGrad (Liu et al., NeurIPS 2021). By minimax duality the value equals
:math:`\min_{w\in\Delta}F(w)`, :math:`F(w)=g_0^\top u_w+s\|u_w\|` with :math:`u_w=G^\top w`
(the dual of the CAGrad paper), and :math:`d^*=g_0+s\,u_{w^*}/\|u_{w^*}\|`.

**How it is solved exactly.** Writing :math:`\sqrt x=\min_{\rho>0}x/(2\rho)+\rho/2` turns the dual
into a one-parameter family of simplex QPs: for :math:`\tau=\rho/s`, the inner minimiser is the
min-norm point of the *translated* hull :math:`\mathrm{conv}\{g_i+\tau g_0\}`, i.e.
:math:`u(\tau)=\Pi_P(-\tau g_0)` is the projection of :math:`-\tau g_0` onto
:math:`P=\mathrm{conv}\{g_i\}`, and the optimum is the :math:`\tau^*` with
:math:`\|u(\tau^*)\|=s\tau^*` (the ratio :math:`\|u(\tau)\|/(s\tau)` is non-increasing, so there
is one crossing, bracketed by :math:`0` and :math:`\max_i\|g_i\|/s`). For a fixed support of the
QP, :math:`u(\tau)` is affine in :math:`\tau`, so on each piece the crossing is the root of a
quadratic. The solver alternates an exact QP solve at the current :math:`\tau` (Wolfe's
algorithm on the translated points, :func:`mtopt.core.min_norm.shifted_min_norm`, warm-started)
with that piece's root, keeps a bisection bracket, and stops when the root lies on the piece it
came from (its weights are non-negative and no other task violates the QP's optimality test):
then :math:`w^*` is exact up to rounding. The answer in weights is
:math:`d^*=G^\top v`, :math:`v=\mathbf 1/K+w^*/\tau^*` (since :math:`u^*/\tau^*` has norm
:math:`s`), with no division by a computed norm.

**Degenerate cases.**

* :math:`s=0` (``c = 0`` or :math:`g_0=0`): the ball is the point :math:`g_0`: :math:`v=\mathbf
  1/K` (status ``trivial``). So is ``c`` below :math:`2^{-52}`, which cannot move :math:`d`
  away from :math:`g_0` in float64.
* :math:`\tau^*=0`: the dual optimum is :math:`u^*=0`, i.e. 0 lies in the hull of the gradients
  and the best worst-case gain is 0. Every :math:`d` in the ball with :math:`Gd\ge0` is then
  optimal; we take the one closest to the centre, the projection of :math:`g_0` onto the cone
  :math:`\{d:Gd\ge0\}`, which is UPGrad's QP :math:`\min v^\top Mv` s.t. :math:`v\ge\mathbf 1/K`
  (:func:`mtopt.core.qp.box_lower_qp`; status ``stationary``). When the cone is :math:`\{0\}`
  this is :math:`d=0`, the Pareto-stationary point the CAGrad paper describes for ``c ≥ 1``; the
  weights 0 are then reported (also when only they pass the certificate), never by a comparison
  of rounding errors, which would make the answer depend on the order of the tasks.
* A task whose gradient is exactly zero cannot change :math:`d`; its weight is reported as
  :math:`1/K` (its weight in :math:`g_0`), whatever the dual put on it.

**The certificate.** With gains :math:`r=Mv` (:math:`r_i=g_i^\top d`) the primal value is
:math:`p=\min_ir_i` and the dual value :math:`F(w^*)`; the *relative duality gap*

.. math:: \frac{F(w^*)-p}{\max_i\|g_i\|\,(\|g_0\|+s)}
   \quad\text{and the ball excess}\quad \frac{(\|d-g_0\|-s)_+}{s}

(both :math:`\ge0` up to rounding, 0 exactly at the optimum; the denominator bounds
:math:`|g_i^\top d|` over the ball) must be at most ``GAP_RTOL`` = 1e-10 for ``converged``.
In the stationary case the dual value is :math:`F` at the min-norm weights of the hull. Products
and sums are correctly rounded (:mod:`mtopt.core.accurate`), and a norm
:math:`\|G^\top w\|=\sqrt{w^\top Mw}` is taken as small as the float64 representation of
:math:`M` allows (:func:`_norm`): the certificate is exact for a Gram matrix within rounding of
:math:`M`, which matters only when 0 is (nearly) in the hull, where :math:`\sqrt{\cdot}` turns
rounding of order :math:`u` into norms of order :math:`\sqrt u`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mtopt.core import accurate
from mtopt.core.min_norm import _affine_weights, affine_solve, shifted_min_norm
from mtopt.core.qp import box_lower_qp

#: Relative duality gap at or below which the solution is certified.
GAP_RTOL = 1e-10


@dataclass(frozen=True)
class BallMaxMinResult:
    """Outcome of :func:`ball_maxmin`.

    Attributes:
        weights: ``v`` with ``d* = Gᵀv`` (before any rescaling by the caller).
        dual: the dual weights ``w*`` on the simplex (``u* = Gᵀw*``).
        tau: ``τ*`` (0 in the stationary and trivial cases).
        iterations: exact QP solves (plus the stationary projection).
        status: ``converged``, ``stationary``, ``trivial``; or, when the certificate fails,
            ``max_iter`` (the search ran out of QP solves) or ``inaccurate`` (it ended, but the
            gap exceeds ``GAP_RTOL``: seen only for singular Gram matrices whose hull has 0 on
            a face, where large weights carry ``M``'s own rounding into the gains, ~1e-9).
        gap: the certificate: the larger of the relative duality gap and the ball excess.
        support: the QP support at ``τ*`` (a warm start for the next call).
    """

    weights: np.ndarray
    dual: np.ndarray
    tau: float
    iterations: int
    status: str
    gap: float
    support: tuple[int, ...] = ()

    @property
    def converged(self) -> bool:
        return self.gap <= GAP_RTOL


def ball_maxmin(
    M: np.ndarray, c: float, support: tuple[int, ...] = (), max_iter: int = 100
) -> BallMaxMinResult:
    """``d* = argmax_{‖d − g0‖ ≤ c‖g0‖} min_i g_iᵀd`` as weights ``v`` (``d* = Gᵀv``), from
    the Gram matrix ``M`` (float64, PSD), exactly (module doc). ``support`` warm-starts the QP
    solves; ``max_iter`` bounds them."""
    M = np.asarray(M, dtype=np.float64)
    k = M.shape[0]
    if not np.all(np.isfinite(M)):
        raise ValueError("ball_maxmin got a Gram matrix with NaN or inf entries")
    b = accurate.matvec(M, np.ones(k)) / k  # G g0
    n0 = math.sqrt(max(math.fsum(b.tolist()) / k, 0.0))  # ‖g0‖
    norms = np.sqrt(np.maximum(np.diagonal(M), 0.0))
    gmax = float(norms.max())
    s = c * n0
    uniform = np.full(k, 1.0 / k)
    # a radius below float64's resolution of g0 (c < 2⁻⁵²) cannot move d away from g0
    if not c > 2.0**-52 or not s > 0 or gmax == 0:
        # the ball is the point g0; the dual optimum min_w bᵀw is at the vertex of min b
        vertex = np.eye(k)[int(np.argmin(b))]
        gap = _gap(M, b, n0, s, uniform, vertex)
        return BallMaxMinResult(uniform, vertex, 0.0, 0, "trivial", gap)

    # 0 in the hull (to the precision M determines it) and c ≥ 1: ‖Π_P(−τg0)‖ ≤ τ‖g0‖ ≤ sτ for
    # every τ, so τ* = 0 without a search (a search would find a spurious crossing at the
    # rounding level of the hull's min-norm point)
    if c >= 1.0:
        w0 = _hull_weights(M, norms)
        if _norm(M, w0) == 0.0:
            return _stationary(M, b, n0, s, norms, 0, w0)

    lo, hi = 0.0, gmax / s * (1.0 + 1e-12)
    tau = hi / 2
    iterations = 0
    found: tuple[float, np.ndarray] | None = None
    warm = list(support) if support and max(support) < k else None
    while iterations < max_iter:
        w, _, _ = shifted_min_norm(M, b, tau, n0, support=warm, max_iter=4 * k + 10)
        iterations += 1
        warm = [int(i) for i in np.flatnonzero(w > 0)]
        phi = math.sqrt(max(float(w @ M @ w), 0.0))
        if phi >= s * tau:
            lo = tau
        else:
            hi = tau
        piece = _piece_root(M, b, n0, s, warm, lo, hi)
        if piece is not None:
            root, w_root = piece
            if _on_piece(M, b, n0, root, w_root, warm):
                found = (root, w_root)
                break
            if lo < root < hi:
                tau = root
                continue
        if hi - lo <= 1e-15 * hi:  # the crossing sits on a kink between pieces
            found = (hi, w) if lo == 0.0 else (lo, w)
            break
        if lo == 0.0 and hi < 1e-9 * gmax / s:
            break  # the crossing is (numerically) at τ = 0: 0 lies in the hull
        tau = 0.5 * (lo + hi)
    candidates = []
    if found is not None:
        tau_star, w_star = found
        w_star = np.maximum(w_star, 0.0)
        w_star = w_star / w_star.sum()
        # τ* consistent with these weights: ‖Gᵀw*‖ = s τ*, i.e. d exactly on the ball's surface
        phi2 = accurate.quad(M, w_star)
        if phi2 > 0:
            tau_star = math.sqrt(phi2) / s
        v = uniform + w_star / tau_star
        v = np.where(norms > 0, v, uniform)  # a zero gradient: neutral weight (d unchanged)
        gap = _gap(M, b, n0, s, v, w_star)
        candidates.append(
            BallMaxMinResult(
                v, w_star, tau_star, iterations, "converged", gap, tuple(np.flatnonzero(w_star > 0))
            )
        )
        if candidates[0].converged:
            return candidates[0]
    # τ* = 0, or the regular answer failed its certificate next to it: project g0 onto the cone
    # {d : Gd ≥ 0}; the dual value is F at the min-norm weights of the hull (0 if 0 ∈ hull)
    candidates.append(_stationary(M, b, n0, s, norms, iterations))
    best = min(candidates, key=lambda r: r.gap)
    if best.converged:
        return best
    status = "max_iter" if iterations >= max_iter else "inaccurate"
    return BallMaxMinResult(
        best.weights, best.dual, best.tau, best.iterations, status, best.gap, best.support
    )


def _hull_weights(M: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """The min-norm weights of the hull of the gradients, refined on their support (near 0 the
    dual value ``s‖Gᵀw0‖`` is all rounding otherwise)."""
    k = M.shape[0]
    w0, _, _ = shifted_min_norm(M, max_iter=4 * k + 10)
    radii = np.where(norms > 0, norms, 1.0)
    refined = _affine_weights(M, np.zeros(k), radii, list(np.flatnonzero(w0 > 0)), refine=2)
    if refined is not None and (refined >= 0).all() and refined.sum() > 0:
        w0 = refined / refined.sum()
    return w0


def _stationary(
    M: np.ndarray,
    b: np.ndarray,
    n0: float,
    s: float,
    norms: np.ndarray,
    iterations: int,
    w0: np.ndarray | None = None,
) -> BallMaxMinResult:
    k = M.shape[0]
    uniform = np.full(k, 1.0 / k)
    if w0 is None:
        w0 = _hull_weights(M, norms)
    top = float(np.diagonal(M).max())
    # scaled to unit diagonal (the QP's KKT tolerance is relative to max(1, max|M|)), with a
    # ridge of 1e-13 that keeps its subproblems definite when M is singular (0 inside the hull
    # makes it so); the certificate below is evaluated on M itself
    scaled = M / top if top > 0 else M.copy()
    scaled.flat[:: k + 1] += 1e-13
    v, ok = box_lower_qp(scaled, uniform)
    v = _polish(M, v, uniform) if ok else v
    v = np.where(norms > 0, v, uniform)
    gap = _gap(M, b, n0, s, v, w0) if ok else math.inf
    if s >= n0 and gap > 0:
        # the ball contains d = 0. When the projection is 0 up to what M determines, the weights
        # 0 state it exactly (large v of a singular M would carry M's rounding into the gains);
        # so do they when only they pass the certificate. Otherwise the projection stands: the
        # choice must not hang on rounding, or it would depend on the order of the tasks.
        zero = np.where(norms > 0, 0.0, uniform)  # d = 0; a zero gradient keeps its 1/K
        zero_gap = _gap(M, b, n0, s, zero, w0)
        if _norm(M, v) == 0.0 or (gap > GAP_RTOL >= zero_gap):
            v, gap = zero, zero_gap
    return BallMaxMinResult(v, w0, 0.0, iterations + 2, "stationary", gap)


def _polish(M: np.ndarray, v: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Remove the ridge's trace from the projection: on the free set ``F`` (``v > lower``) the
    gains ``(Mv)_F`` vanish at the optimum; two least-squares corrections ``M_FF δ = −(Mv)_F``
    (residuals correctly rounded; ``M_FF`` may be singular) restore that for ``M`` itself.
    Kept only if ``v`` stays feasible."""
    free = np.flatnonzero(v > lower)
    if free.size == 0:
        return v
    sub = M[np.ix_(free, free)]
    out = v.copy()
    for _ in range(2):
        residual = -accurate.matvec(M, out)[free]
        step = np.linalg.lstsq(sub, residual, rcond=None)[0]
        trial = out.copy()
        trial[free] += step
        if not (trial[free] >= lower[free]).all():
            break
        out = trial
    return out


def _piece_root(
    M: np.ndarray, b: np.ndarray, n0: float, s: float, support: list[int], lo: float, hi: float
) -> tuple[float, np.ndarray] | None:
    """On the QP piece with this support, ``w(t) = μ0 + t μ1``: the crossing
    ``‖Gᵀw(t)‖ = s t`` inside ``[lo, hi]`` where the sign goes from + to −, and ``w`` there."""
    idx = np.asarray(support)
    n = idx.size
    if n == 0:
        return None
    sub = M[idx[:, None], idx]
    scales = np.sqrt(np.maximum(np.diagonal(sub), 0.0)) + 0.5 * (lo + hi) * n0
    top = np.zeros((n, 2))
    top[:, 1] = -b[idx]
    sol = affine_solve(M, idx, scales, top, np.array([1.0, 0.0]), refine=2)
    if sol is None:
        return None
    mu0, mu1 = sol[0][:, 0], sol[0][:, 1]
    # correctly rounded: ‖u‖² is a small difference of large terms near a stationary point;
    # terms below the precision M determines them to are 0 (else a rounding-level ‖u(0)‖² < 0
    # makes a spurious crossing next to τ = 0)
    a2 = accurate.quad(sub, mu1) - s * s
    a1 = _clean(accurate.quad(sub, mu0, mu1), sub, mu0, mu1)
    a0 = _clean(accurate.quad(sub, mu0), sub, mu0, mu0)
    roots = _quadratic_roots(a2, a1, a0)
    span = hi - lo
    best = None
    for t in roots:
        if not lo - 1e-9 * span <= t <= hi + 1e-9 * span or t <= 0:
            continue
        if a2 * t + a1 <= 0 or (a2 * t + a1 == 0 and a2 <= 0):  # q decreasing through t
            best = t if best is None else min(best, t)
    if best is None:
        return None
    w = np.zeros(M.shape[0])
    w[idx] = mu0 + best * mu1
    return best, w


def _clean(value: float, M: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """``value`` (``xᵀMy``), or 0 when it is within ``(n + 2) u |x|ᵀ|M||y|`` of 0."""
    floor = (M.shape[0] + 2) * 2.0**-53 * float(np.abs(x) @ np.abs(M) @ np.abs(y))
    return 0.0 if abs(value) <= floor else value


def _quadratic_roots(a2: float, a1: float, a0: float) -> list[float]:
    """Real roots of ``a2 t² + 2 a1 t + a0`` (cancellation-free form)."""
    if a2 == 0.0:
        return [] if a1 == 0.0 else [-a0 / (2.0 * a1)]
    disc = a1 * a1 - a2 * a0
    if disc < 0:
        return []
    q = -(a1 + math.copysign(math.sqrt(disc), a1))
    roots = [q / a2]
    if q != 0.0:
        roots.append(a0 / q)
    return roots


def _on_piece(
    M: np.ndarray, b: np.ndarray, n0: float, t: float, w: np.ndarray, support: list[int]
) -> bool:
    """Whether ``w`` (affine minimiser on ``support`` at ``τ = t``) is the QP's minimiser there:
    non-negative on the support, and no other task below the level (scale-aware slack)."""
    idx = np.asarray(support)
    if not (w[idx] >= -1e-14 * np.abs(w[idx]).max()).all():
        return False
    w = np.maximum(w, 0.0)
    total = w.sum()
    if not total > 0:
        return False
    w = w / total
    g = M @ w + t * b
    level = float(w @ g)
    radii = np.sqrt(np.maximum(np.diagonal(M), 0.0)) + t * n0
    n_x = float(w @ radii)
    slack = 1e-12 * (radii * n_x + n_x * n_x)
    return bool((g + slack >= level).all())


def _gap(M: np.ndarray, b: np.ndarray, n0: float, s: float, v: np.ndarray, w: np.ndarray) -> float:
    """The certificate of the module doc: the larger of the relative duality gap between the
    dual value ``F(w)`` and the primal value of ``d = Gᵀv``, and the ball excess of ``d``."""
    gains = accurate.matvec(M, v)
    primal = float(gains.min())
    gmax = math.sqrt(max(float(np.diagonal(M).max()), 0.0))
    scale = gmax * (n0 + s)
    if scale == 0:
        return 0.0
    k = M.shape[0]
    # Gᵀw indistinguishable from 0 in M: for a Gram matrix within rounding of M it is 0, and so
    # is its gain g0ᵀGᵀw = bᵀw
    u_norm = _norm(M, w)
    dual = (accurate.dot(b, w) if u_norm > 0 else 0.0) + s * u_norm
    radius = _norm(M, v - 1.0 / k)
    excess = max(radius - s, 0.0) / s if s > 0 else radius / scale
    gap = max((dual - primal) / scale, excess, 0.0)
    return gap if math.isfinite(gap) else math.inf


def _norm(M: np.ndarray, w: np.ndarray) -> float:
    """``‖Gᵀw‖`` from ``M`` as exactly as ``M`` determines it: ``wᵀMw`` correctly rounded, less
    ``δ = (K + 2) u |w|ᵀ|M||w|`` (``u = 2⁻⁵³``), the uncertainty a float64 Gram matrix carries
    about ``wᵀGGᵀw``. Near 0 (0 in the hull) the square root would otherwise turn rounding of
    the order of ``u`` into a norm of the order of ``√u``."""
    absw = np.abs(w)
    delta = (M.shape[0] + 2) * 2.0**-53 * float(absw @ np.abs(M) @ absw)
    return math.sqrt(max(accurate.quad(M, w) - delta, 0.0))
