"""The exact CAGrad dual (``mtopt.core.ball_maxmin``): duality-gap certificates on hard
families (K up to 64, condition numbers up to 1e12, rank-deficient, duplicate, opposite and zero
gradients, c from 0 to 2), agreement with an interior-point solver, homogeneity, warm starts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtopt.core.ball_maxmin import GAP_RTOL, ball_maxmin


def _family(kind: str, k: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(k, d)) * np.exp(rng.uniform(-3, 3, size=(k, 1)))
    if kind == "ill_conditioned":  # singular values 1..1e-6: cond(M) = 1e12
        r = min(k, d)
        U, _ = np.linalg.qr(rng.normal(size=(d, r)))
        V, _ = np.linalg.qr(rng.normal(size=(k, r)))
        G = (V * np.logspace(0, -6, r)) @ U.T
    elif kind == "rank_deficient":
        G = rng.normal(size=(k, 3)) @ rng.normal(size=(3, d))
    elif kind == "duplicate":
        G[1] = G[0]
    elif kind == "opposite":
        G[1] = -G[0]
    elif kind == "zero":
        G[0] = 0.0
    return G


def _check(G: np.ndarray, c: float):
    M = G @ G.T
    res = ball_maxmin(M, c)
    assert res.converged, (res.status, res.gap)
    assert res.gap <= GAP_RTOL, (res.status, res.gap)
    g0 = G.mean(0)
    s = c * np.linalg.norm(g0)
    d = G.T @ res.weights
    scale = np.sqrt(M.diagonal().max()) * (np.linalg.norm(g0) + s)
    # The solver sees M, which fixes ‖Gᵀx‖² only to ±(K + 2)ε(Σ|x_i|‖g_i‖)² (its own rounding):
    # near stationarity (large weights) the radius measured on G may differ by that much.
    k = G.shape[0]
    spread = float(np.abs(res.weights - 1.0 / k) @ np.sqrt(M.diagonal()))
    rounding = (k + 2) * 2.0**-53 * spread**2 / max(s, 1e-300) + 1e-14 * spread
    assert np.linalg.norm(d - g0) <= s * (1 + 1e-9) + 1e-12 * scale + rounding
    assert np.isclose(res.dual.sum(), 1.0)
    assert (res.dual >= 0).all()
    return res, d, s, scale


KINDS = ["generic", "ill_conditioned", "rank_deficient", "duplicate", "opposite", "zero"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 3, 11, 32, 64])
def test_certified_on_hard_families(kind, k):
    for seed, c in enumerate([0.2, 0.5, 0.8, 1.0, 2.0]):
        _check(_family(kind, k, 40, 100 * k + seed), c)


def test_agrees_with_an_interior_point_solver():
    cp = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(7)
    for trial in range(8):
        k = int(rng.choice([3, 5, 11]))
        G = _family("generic", k, 20, trial)
        c = float(rng.choice([0.2, 0.5, 0.8]))
        _, d, s, scale = _check(G, c)
        x, t = cp.Variable(G.shape[1]), cp.Variable()
        problem = cp.Problem(cp.Maximize(t), [G @ x >= t, cp.norm(x - G.mean(0)) <= s])
        problem.solve(solver=cp.CLARABEL)
        # ours is certified to 1e-10; the interior-point answer to its own ~1e-8
        assert (G @ d).min() >= problem.value - 1e-7 * scale


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**31 - 1), st.floats(0.0, 2.0), st.integers(-40, 40))
def test_weights_are_homogeneous_of_degree_zero(k, seed, c, exponent):
    # d is homogeneous of degree 1 in G, so v does not change when every loss is scaled
    G = _family("generic", k, 12, seed)
    a = ball_maxmin(G @ G.T, c)
    b = ball_maxmin((2.0**exponent * G) @ (2.0**exponent * G).T, c)
    np.testing.assert_allclose(b.weights, a.weights, rtol=1e-7, atol=1e-9 * np.abs(a.weights).max())


def test_c_zero_and_zero_mean_give_the_mean():
    G = _family("generic", 4, 10, 1)
    res = ball_maxmin(G @ G.T, 0.0)
    assert res.status == "trivial"
    assert res.converged
    np.testing.assert_array_equal(res.weights, np.full(4, 0.25))
    G = np.array([[1.0, 0.0], [-1.0, 0.0]])  # g0 = 0: the ball is {0}
    res = ball_maxmin(G @ G.T, 0.5)
    assert res.status == "trivial"
    assert np.allclose(res.weights @ G, 0.0)


def test_stationary_cases_project_the_mean_onto_the_dual_cone():
    # exactly opposite tasks: only d ⟂ both gains nothing and loses nothing; here that is d = 0
    G = np.array([[1.0, 2.0], [-1.0, -2.0], [0.5, 1.0]])
    res = ball_maxmin(G @ G.T, 2.0)
    assert res.status == "stationary"
    assert res.converged
    d = G.T @ res.weights
    assert (G @ d >= -1e-12).all()
    assert np.linalg.norm(d) <= 1e-12
    # a zero gradient: its weight is 1/K (it cannot change d)
    G = np.array([[1.0, 0.2, 0.0], [0.0, 0.0, 0.0], [0.3, 1.0, 0.1]])
    res = ball_maxmin(G @ G.T, 0.5)
    assert res.converged
    assert res.weights[1] == pytest.approx(1 / 3)


def test_warm_start_gives_the_same_answer():
    G = _family("generic", 11, 40, 3)
    M = G @ G.T
    cold = ball_maxmin(M, 0.5)
    warm = ball_maxmin(M, 0.5, support=cold.support)
    np.testing.assert_allclose(warm.weights, cold.weights, rtol=1e-10)
    assert warm.iterations <= cold.iterations
