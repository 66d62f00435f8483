"""Reusable assertions and hypothesis strategies for the math tests.

Tolerances of the min-norm checks are relative to ``max_i ‖g_i‖²`` (the scale of every entry of
the Gram matrix), so that the same ``rtol`` works for gradients of any magnitude.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

JACOBIAN_KINDS = (
    "generic",
    "duplicate",  # two identical rows
    "collinear",  # one row a positive multiple of another
    "rank_deficient",  # rank r < min(K, D)
    "wide",  # D < K (so the rows are linearly dependent)
    "stationary",  # 0 lies in the convex hull: the min-norm point is 0
    "aligned",  # all pairwise inner products positive (no conflict)
)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def assert_on_simplex(w, atol: float = 1e-12) -> None:
    """``w ≥ -atol`` entrywise and ``|Σw - 1| ≤ atol``."""
    w = _np(w)
    assert w.ndim == 1, f"weights must be a vector, got shape {w.shape}"
    assert np.all(np.isfinite(w)), f"non-finite weights {w}"
    assert w.min() >= -atol, f"negative weight {w.min()} in {w}"
    assert abs(w.sum() - 1.0) <= atol, f"weights sum to {w.sum()!r}, not 1: {w}"


def assert_weights_shape_finite(w, k: int) -> None:
    """A weight vector of shape ``(k,)`` with finite entries."""
    assert w is not None, "no weights"
    w = _np(w)
    assert w.shape == (k,), f"weights have shape {w.shape}, expected {(k,)}"
    assert np.all(np.isfinite(w)), f"non-finite weights {w}"


def assert_min_norm_kkt_gram(M, w, rtol: float, support_atol: float = 0.0) -> None:
    """KKT conditions of ``min_{w ∈ Δ} wᵀMw`` for a Gram matrix ``M = G Gᵀ``.

    With ``d = Gᵀw``: ``g_iᵀd = (Mw)_i ≥ ‖d‖² = wᵀMw`` for every i, with equality for every i in
    the support ``w_i > support_atol``; violations up to ``rtol · max_i M_ii`` are accepted.
    """
    M, w = _np(M), _np(w)
    assert_on_simplex(w, atol=max(rtol, 1e-12))
    scale = float(np.max(np.diag(M)))
    tol = rtol * scale
    Mw = M @ w
    dd = float(w @ Mw)
    worst = float((Mw - dd).min())
    assert worst >= -tol, (
        f"descent violated: min_i g_iᵀd - ‖d‖² = {worst:.3e} < -{tol:.3e}; "
        f"w={w}, Mw={Mw}, ‖d‖²={dd}"
    )
    support = w > support_atol
    if support.any():
        gap = float(np.abs(Mw[support] - dd).max())
        assert gap <= tol, (
            f"complementary slackness violated on the support: max |g_iᵀd - ‖d‖²| = {gap:.3e} "
            f"> {tol:.3e}; w={w}, Mw={Mw}, ‖d‖²={dd}"
        )


def assert_min_norm_kkt(G, w, rtol: float, support_atol: float = 0.0) -> None:
    """KKT of the min-norm point ``d = Gᵀw`` of the convex hull of the rows ``g_i`` of ``G``."""
    G = _np(G)
    assert_min_norm_kkt_gram(G @ G.T, w, rtol, support_atol)


def min_norm_cost(M, w) -> float:
    """``wᵀMw``, the squared norm of ``d = Gᵀw``."""
    M, w = _np(M), _np(w)
    return float(w @ M @ w)


def exact_pair_costs(M) -> list[float]:
    """Exact ``min_γ ‖γ g_i + (1-γ) g_j‖²`` for every pair ``i < j``, by the textbook formula."""
    M = _np(M)
    out = []
    k = M.shape[0]
    for i in range(k):
        for j in range(i + 1, k):
            aa, ab, bb = M[i, i], M[i, j], M[j, j]
            denom = aa + bb - 2.0 * ab
            gamma = 1.0 if denom <= 0 else float(np.clip((bb - ab) / denom, 0.0, 1.0))
            out.append(float(gamma**2 * aa + 2 * gamma * (1 - gamma) * ab + (1 - gamma) ** 2 * bb))
    return out


def make_jacobian(kind: str, k: int, d: int, seed: int) -> np.ndarray:
    """A float64 ``K × D`` Jacobian of the given kind, rows scaled by ``exp(N(0, 1.5))``."""
    rng = np.random.default_rng(seed)
    if kind == "wide":
        d = max(1, min(d, k - 1))
    if kind == "rank_deficient" and min(k, d) >= 2:
        r = int(rng.integers(1, min(k, d)))
        G = rng.normal(size=(k, r)) @ rng.normal(size=(r, d))
    elif kind == "aligned":
        G = np.abs(rng.normal(size=(k, d))) + 0.1
    else:
        G = rng.normal(size=(k, d))
    G = G * np.exp(rng.normal(0.0, 1.5, size=(k, 1)))
    if k >= 2:
        i, j = rng.choice(k, size=2, replace=False)
        if kind == "duplicate":
            G[j] = G[i]
        elif kind == "collinear":
            G[j] = G[i] * np.exp(rng.normal(0.0, 1.5))
        elif kind == "stationary":
            a = rng.uniform(0.1, 1.0, size=k - 1)
            others = [m for m in range(k) if m != j]
            G[j] = -(a @ G[others])
    return G


@st.composite
def jacobians(draw, min_k: int = 2, max_k: int = 6, min_d: int = 1, max_d: int = 12):
    """Random float64 ``K × D`` Jacobians with varied row scales and degenerate cases.

    Rows are generated from a drawn seed (so hypothesis can replay them) and one of
    :data:`JACOBIAN_KINDS`; no row is zero.
    """
    k = draw(st.integers(min_k, max_k))
    d = draw(st.integers(min_d, max_d))
    kinds = [kd for kd in JACOBIAN_KINDS if kd != "wide" or k >= 2]
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_jacobian(kind, k, d, seed)
