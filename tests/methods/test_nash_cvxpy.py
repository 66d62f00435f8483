"""Nash-MTL against the reference algorithm: the authors' CCCP sequence of convex problems,
written with cvxpy (optional extra) exactly as their ``solve_optimization`` poses it."""

from __future__ import annotations

import numpy as np
import pytest

from mtopt.methods.nash_mtl import nash_weights

cp = pytest.importorskip("cvxpy")


def reference_cccp(gram: np.ndarray, iterations: int = 30) -> np.ndarray | None:
    """Each CCCP problem linearises the concave part at the previous α: minimise
    ``Σ(M̂α) + φ'(α_prev)ᵀ(α − α_prev)/n`` subject to ``−log(α_i n) − log((M̂α)_i) ≤ 0``, with
    ``M̂ = M/n``, ``n = ‖M‖_F`` and ``φ' = 1/α_prev + (1/(M̂α_prev))ᵀM̂`` (reference code).
    ``None`` when a step has no solution: with conflicting gradients the linearised objective can
    be unbounded below on the feasible set (the reference then silently keeps its old α)."""
    k = gram.shape[0]
    norm = float(np.linalg.norm(gram))
    m_hat = gram / norm
    alpha = cp.Variable(k, nonneg=True)
    previous = np.ones(k)
    for _ in range(iterations):
        slope = 1.0 / previous + (1.0 / (m_hat @ previous)) @ m_hat
        m_alpha = m_hat @ alpha
        constraints = [-cp.log(alpha[i] * norm) - cp.log(m_alpha[i]) <= 0 for i in range(k)]
        objective = cp.Minimize(cp.sum(m_alpha) + slope @ (alpha - previous) / norm)
        problem = cp.Problem(objective, constraints)
        problem.solve(solver=cp.CLARABEL)
        if alpha.value is None:
            return None
        new = np.asarray(alpha.value, dtype=np.float64)
        if np.linalg.norm(new - previous) < 1e-9 * np.linalg.norm(new):
            return new
        previous = new
    return previous


def test_matches_the_reference_cccp_wherever_it_solves():
    rng = np.random.default_rng(2022)
    compared = failed = 0
    for _ in range(24):
        k = int(rng.integers(2, 6))
        g = rng.normal(size=(k, k + 3)) * np.exp(rng.normal(0, 0.7, size=(k, 1)))
        gram = g @ g.T
        result = nash_weights(gram, max_iter=100, tol=1e-12)
        ours = result.alpha
        assert result.converged
        assert result.residual <= 1e-12
        np.testing.assert_allclose(ours * (gram @ ours), np.ones(k), rtol=1e-9)
        ref = reference_cccp(gram)
        if ref is None:
            failed += 1
            continue
        compared += 1
        np.testing.assert_allclose(ref * (gram @ ref), np.ones(k), rtol=1e-5)  # it converged
        np.testing.assert_allclose(ours, ref, rtol=1e-5)
    assert compared >= 12, f"the reference solved only {compared} of 24 problems"
