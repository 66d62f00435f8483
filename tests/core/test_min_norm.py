"""The min-norm solvers of ``mtopt.core.min_norm`` checked against the math.

Optimality is certified by the KKT conditions of ``min_{w∈Δ} wᵀMw`` (necessary and sufficient for
this convex QP), by comparison with every vertex and pair, and by brute force where it is cheap.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from _asserts import (
    assert_min_norm_kkt,
    assert_min_norm_kkt_gram,
    assert_on_simplex,
    exact_pair_costs,
    jacobians,
    make_jacobian,
    min_norm_cost,
)
from mtopt.core.min_norm import (
    KKT_RTOL,
    SOLVERS,
    min_norm_residual,
    min_norm_weights,
    project_onto_simplex,
    two_point_min_norm,
)

FAST = settings(max_examples=60, deadline=None)
MANY = settings(max_examples=200, deadline=None)


def _scale(M: np.ndarray) -> float:
    return float(np.max(np.diag(M)))


def _vectors(min_size=1, max_size=10, bound=1e3):
    return arrays(
        np.float64,
        st.integers(min_size, max_size),
        elements=st.floats(-bound, bound, allow_nan=False, allow_subnormal=False),
    )


def _simplex_points(rng: np.random.Generator, k: int) -> list[np.ndarray]:
    """Vertices, the barycentre, random interior points and random points on faces."""
    pts = [*np.eye(k), np.full(k, 1.0 / k)]
    pts += list(rng.dirichlet(np.ones(k), size=10))
    for _ in range(5):
        q = rng.dirichlet(np.ones(k)) * (rng.random(k) < 0.5)
        if q.sum() > 0:
            pts.append(q / q.sum())
    return pts


# -- project_onto_simplex ----------------------------------------------------------------------
@MANY
@given(v=_vectors(), seed=st.integers(0, 2**32 - 1))
def test_projection_is_the_euclidean_projection(v, seed):
    p = project_onto_simplex(v)
    size = 1.0 + float(np.abs(v).max())
    assert p.shape == v.shape
    assert_on_simplex(p, atol=1e-12 * size)
    # Variational characterisation of the projection onto a convex set:
    # (v - p)ᵀ(q - p) ≤ 0 for every q in the simplex.
    rng = np.random.default_rng(seed)
    for q in _simplex_points(rng, v.size):
        assert (v - p) @ (q - p) <= 1e-10 * size**2, (v, p, q)


@MANY
@given(v=_vectors(max_size=8, bound=10.0), shift=st.floats(-50, 50))
def test_projection_is_invariant_to_adding_a_constant(v, shift):
    # ‖v + c·1 - q‖² = ‖v - q‖² + 2c(Σv - 1) - ... differs by a q-independent constant on Δ.
    np.testing.assert_allclose(
        project_onto_simplex(v + shift), project_onto_simplex(v), atol=1e-9 * (1 + abs(shift))
    )


@MANY
@given(k=st.integers(1, 10), seed=st.integers(0, 2**32 - 1))
def test_projection_is_identity_on_the_simplex(k, seed):
    rng = np.random.default_rng(seed)
    for q in _simplex_points(rng, k):
        np.testing.assert_allclose(project_onto_simplex(q), q, rtol=0, atol=1e-15)


@MANY
@given(v=_vectors(max_size=8, bound=1e300))
def test_projection_of_huge_vectors(v):
    p = project_onto_simplex(v)
    assert_on_simplex(p, atol=1e-12)
    top = np.sort(v)[::-1]
    if v.size == 1 or top[0] - top[1] >= 1.0:  # the projection is the vertex of the largest entry
        np.testing.assert_array_equal(p, np.eye(v.size)[np.argmax(v)])


def test_projection_known_values():
    np.testing.assert_allclose(project_onto_simplex(np.array([2.0, 0.0])), [1.0, 0.0])
    np.testing.assert_allclose(project_onto_simplex(np.array([0.5, 0.5, 3.0])), [0.0, 0.0, 1.0])
    np.testing.assert_allclose(project_onto_simplex(np.array([1.0, 1.0, 1.0])), [1 / 3] * 3)
    np.testing.assert_allclose(project_onto_simplex(np.array([0.6, 0.2, -1.0])), [0.7, 0.3, 0.0])


# -- two_point_min_norm ------------------------------------------------------------------------
def _segment_cost(a, b, gamma):
    x = gamma * a + (1.0 - gamma) * b
    return float(x @ x)


@MANY
@given(ab=jacobians(min_k=2, max_k=2, min_d=1, max_d=6))
def test_two_point_interior_matches_brute_force(ab):
    a, b = ab
    aa, abv, bb = float(a @ a), float(a @ b), float(b @ b)
    assume(abv < aa and abv < bb)  # interior branch
    scale = max(aa, bb)
    curvature = aa + bb - 2 * abv
    assume(curvature > 1e-6 * scale)
    gamma, cost = two_point_min_norm(aa, abv, bb)
    assert 0.0 < gamma < 1.0
    assert cost == pytest.approx(_segment_cost(a, b, gamma), abs=1e-12 * scale)
    grid = np.linspace(0.0, 1.0, 100_001)
    costs = grid**2 * aa + 2 * grid * (1 - grid) * abv + (1 - grid) ** 2 * bb
    assert cost <= costs.min() + 1e-12 * scale
    # the grid argmin is within a grid step of γ (the minimiser is unique: curvature > 0)
    assert abs(grid[np.argmin(costs)] - gamma) <= 2e-5 + 1e-9 * scale / curvature


def test_two_point_clamp_branches():
    rng = np.random.default_rng(0)
    a = rng.normal(size=5)
    perp = rng.normal(size=5)
    perp -= (perp @ a) / (a @ a) * a
    b = 2.0 * a + perp  # aᵀb = 2‖a‖² ≥ ‖a‖²: the segment minimum is the vertex a (γ = 1)
    aa, abv, bb = a @ a, a @ b, b @ b
    grid = np.linspace(0, 1, 1001)
    assert np.argmin([_segment_cost(a, b, g) for g in grid]) == len(grid) - 1

    assert two_point_min_norm(aa, abv, bb) == (pytest.approx(0.999, abs=1e-15), aa)
    assert two_point_min_norm(aa, abv, bb, clamp=0.0) == (1.0, aa)
    # roles swapped: the minimum is the vertex b (γ = 0)
    assert two_point_min_norm(bb, abv, aa) == (pytest.approx(0.001, abs=1e-15), aa)
    assert two_point_min_norm(bb, abv, aa, clamp=0.0) == (0.0, aa)
    # identical points: any γ is optimal, the cost is ‖a‖²
    g, c = two_point_min_norm(aa, aa, aa, clamp=0.0)
    assert g in (0.0, 1.0)
    assert c == aa


# -- min_norm_weights: the exact solver --------------------------------------------------------
@MANY
@given(G=jacobians(min_k=2, max_k=8, min_d=1, max_d=12))
def test_wolfe_is_optimal(G):
    M = G @ G.T
    s = _scale(M)
    res = min_norm_weights(M, solver="wolfe")
    assert res.status == "converged"
    assert res.converged
    assert_on_simplex(res.weights, atol=1e-12)
    assert_min_norm_kkt(G, res.weights, rtol=1e-9)
    assert res.cost == pytest.approx(min_norm_cost(M, res.weights), abs=1e-14 * s)
    # no vertex and no pair of gradients does better
    assert res.cost <= min(np.diag(M).min(), *exact_pair_costs(M)) + 1e-12 * s


@FAST
@given(G=jacobians(min_k=3, max_k=8, min_d=1, max_d=12))
def test_wolfe_is_no_worse_than_the_first_order_solvers(G):
    M = G @ G.T
    s = _scale(M)
    exact = min_norm_weights(M, solver="wolfe").cost
    for solver in ("pgd", "fw"):
        for clamp in (1e-3, 0.0):
            other = min_norm_weights(M, solver=solver, clamp=clamp)
            assert exact <= other.cost + 1e-12 * s, (solver, clamp, exact, other)


@FAST
@given(G=jacobians(min_k=2, max_k=7, min_d=1, max_d=10), seed=st.integers(0, 2**32 - 1))
def test_wolfe_direction_is_unique_under_row_permutation(G, seed):
    # The min-norm point d of a convex set is unique even when the weights are not.
    perm = np.random.default_rng(seed).permutation(G.shape[0])
    d1 = min_norm_weights(G @ G.T, solver="wolfe").weights @ G
    d2 = min_norm_weights(G[perm] @ G[perm].T, solver="wolfe").weights @ G[perm]
    scale = float(np.sqrt(_scale(G @ G.T)))
    np.testing.assert_allclose(d1, d2, rtol=0, atol=1e-6 * scale)


@FAST
@given(G=jacobians(min_k=2, max_k=6), log_c=st.floats(-20, 20))
def test_wolfe_weights_are_invariant_to_a_global_scale(G, log_c):
    c = float(np.exp(log_c))
    M = G @ G.T
    w = min_norm_weights(M, solver="wolfe").weights
    wc = min_norm_weights(c * M, solver="wolfe").weights
    assert_min_norm_kkt_gram(M, wc, rtol=1e-9)
    np.testing.assert_allclose(w @ G, wc @ G, atol=1e-6 * np.sqrt(_scale(M)))


@pytest.mark.parametrize("k", [3, 5, 8])
@pytest.mark.parametrize("seed", range(3))
def test_wolfe_reaches_zero_when_zero_is_in_the_hull(k, seed):
    G = make_jacobian("stationary", k, 6, seed)
    M = G @ G.T
    res = min_norm_weights(M, solver="wolfe")
    assert res.cost <= 1e-12 * _scale(M)
    assert np.linalg.norm(res.weights @ G) <= 1e-6 * np.sqrt(_scale(M))


@FAST
@given(G=jacobians(min_k=2, max_k=6), log_scale=st.floats(-150, 150))
def test_solvers_survive_extreme_scales(G, log_scale):
    M = G @ G.T * np.exp(log_scale)
    assume(np.all(np.isfinite(M)) and np.diag(M).min() > 1e-290)
    for solver in SOLVERS:
        res = min_norm_weights(M, solver=solver)
        assert_on_simplex(res.weights, atol=1e-12)
        if solver == "wolfe":
            assert_min_norm_kkt_gram(M, res.weights, rtol=1e-9)


# -- min_norm_weights: Sener's first-order solvers ---------------------------------------------
@FAST
@given(G=jacobians(min_k=2, max_k=8, min_d=1, max_d=12))
def test_first_order_solvers_default_accuracy(G):
    M = G @ G.T
    s = _scale(M)
    exact = min_norm_weights(M, solver="wolfe").cost
    # Sener's ‖Δw‖₁ < 1e-5 stop can fire after a tiny boundary step (t ≈ 1e-6) far from the
    # optimum; gaps up to 1.25e-2·max M_ii were seen for pgd in 20 000 random draws (1.5e-3 for
    # fw), so pgd gets 2e-2 and fw 1e-2.
    for solver, bound in (("pgd", 2e-2), ("fw", 1e-2)):
        res = min_norm_weights(M, solver=solver)
        assert_on_simplex(res.weights, atol=1e-12)
        assert res.iterations <= 250
        assert res.cost == pytest.approx(min_norm_cost(M, res.weights), abs=1e-13 * s)
        assert res.cost - exact <= bound * s, (solver, res)


_PGD_KINDS = ("generic", "duplicate", "collinear", "rank_deficient", "wide", "aligned")


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(_PGD_KINDS),
    k=st.integers(3, 5),
    d=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_pgd_without_clamp_reaches_kkt_when_converged(kind, k, d, seed):
    G = make_jacobian(kind, k, d, seed)
    res = min_norm_weights(G @ G.T, solver="pgd", clamp=0.0, tol=1e-13, max_iter=20000)
    assert res.iterations <= 20000
    assert_on_simplex(res.weights, atol=1e-12)
    # "converged" is the certificate, whatever stopped the iteration
    assert res.converged == (res.residual <= KKT_RTOL)
    assert res.residual == pytest.approx(min_norm_residual(G @ G.T, res.weights), rel=1e-12)
    if res.status == "converged":
        # pgd leaves round-off weights (~1e-17) on points off the optimal face: they decay
        # geometrically under the line search and never reach 0, hence support = w_i > 1e-9.
        assert_min_norm_kkt(G, res.weights, rtol=1e-5, support_atol=1e-9)
    else:
        assert res.status in ("stalled", "max_iter")


@MANY
@given(
    G=jacobians(min_k=2, max_k=8),
    solver=st.sampled_from(SOLVERS),
    max_iter=st.integers(0, 6),
    tol=st.sampled_from([1e-300, 1e-5]),
)
def test_iteration_bound_always_holds(G, solver, max_iter, tol):
    res = min_norm_weights(G @ G.T, solver=solver, max_iter=max_iter, tol=tol)
    assert 0 <= res.iterations <= max_iter
    assert_on_simplex(res.weights, atol=1e-12)
    assert res.status in ("converged", "stalled", "max_iter")
    assert res.converged == (res.status == "converged") == (res.residual <= KKT_RTOL)
    if res.status == "max_iter":
        assert res.iterations == max_iter


def _adversarial_jacobians() -> list[np.ndarray]:
    rng = np.random.default_rng(1234)
    u, V = rng.normal(size=8), rng.normal(size=(6, 8))
    nearly_collinear = np.logspace(-3, 3, 6)[:, None] * (u + 1e-4 * V)  # cond(M) ~ 1e20
    Q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    orthogonal = np.logspace(-1, 1, 5)[:, None] * Q[:5]  # interior optimum w_i ∝ 1/‖g_i‖²
    low_rank = rng.normal(size=(5, 3)) @ rng.normal(size=(3, 9))
    low_rank = low_rank * np.exp(rng.normal(0, 3, size=(5, 1))) + 1e-6 * rng.normal(size=(5, 9))
    return [nearly_collinear, orthogonal, low_rank]


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("solver", ["pgd", "fw"])
@pytest.mark.parametrize("max_iter", [1, 2, 5])
def test_tiny_budget_reports_max_iter_unless_certified(case, solver, max_iter):
    # tol = 1e-300: the stopping rule never fires, so the budget ends the run. Whether the
    # iterate happens to meet the KKT certificate by then depends on the last bits (BLAS kernel:
    # Frank-Wolfe lands exactly on the low-rank case's optimum within 5 iterations on some CPUs),
    # so the test asserts the contract, not the outcome: certified, or max_iter with its budget.
    G = _adversarial_jacobians()[case]
    M = G @ G.T
    res = min_norm_weights(M, solver=solver, max_iter=max_iter, tol=1e-300)
    assert res.status in ("converged", "max_iter")
    assert res.converged == (res.residual <= KKT_RTOL)
    assert res.residual == pytest.approx(min_norm_residual(M, res.weights), rel=1e-12)
    if res.status == "max_iter":
        assert res.iterations == max_iter
    assert_on_simplex(res.weights, atol=1e-12)


# -- closed-form cases -------------------------------------------------------------------------
@FAST
@given(ab=jacobians(min_k=2, max_k=2, min_d=2, max_d=8))
def test_equal_norm_pair_gives_half_half(ab):
    a, b = ab
    b = b * (np.linalg.norm(a) / np.linalg.norm(b))
    assume(np.linalg.norm(a - b) > 1e-3 * np.linalg.norm(a))  # γ is ill-posed near a = b
    M = np.stack([a, b]) @ np.stack([a, b]).T
    for solver in SOLVERS:
        for clamp in (1e-3, 0.0):
            w = min_norm_weights(M, solver=solver, clamp=clamp).weights
            np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-9, err_msg=f"{solver} {clamp}")


@FAST
@given(g1=_vectors(3, 3, 10.0), perp=_vectors(3, 3, 10.0), t=st.floats(1.0, 50.0))
def test_dominated_pair_gives_the_clamped_vertex(g1, perp, t):
    assume(g1 @ g1 > 1e-6)
    perp = perp - (perp @ g1) / (g1 @ g1) * g1
    g2 = t * g1 + perp  # g1ᵀg2 = t‖g1‖² ≥ ‖g1‖²: the exact answer is w = (1, 0)
    assume(g2 @ g2 > (g1 @ g1) * (1 + 1e-9))
    M = np.stack([g1, g2]) @ np.stack([g1, g2]).T
    assume(M[0, 1] >= M[0, 0])
    for solver in ("pgd", "fw"):
        res = min_norm_weights(M, solver=solver)
        np.testing.assert_allclose(res.weights, [0.999, 0.001], atol=1e-12)
        # Sener's clamp stops short of the vertex: the certificate says so (unless g1ᵀg2 ties
        # ‖g1‖², where the segment is flat at the vertex and the clamped point is optimal too)
        assert res.converged == (res.residual <= KKT_RTOL)
        if M[0, 1] - M[0, 0] > 1e-6 * M[0, 0]:
            assert res.status == "stalled"
            assert not res.converged
        exact = min_norm_weights(M, solver=solver, clamp=0)
        np.testing.assert_array_equal(exact.weights, [1, 0])
        assert exact.status == "converged"
        assert exact.residual <= KKT_RTOL
        # task order does not matter
        np.testing.assert_allclose(
            min_norm_weights(M[::-1, ::-1], solver=solver).weights, [0.001, 0.999], atol=1e-12
        )
    np.testing.assert_allclose(min_norm_weights(M, solver="wolfe").weights, [1, 0], atol=1e-12)


def test_single_task_is_exact():
    res = min_norm_weights(np.array([[4.0]]))
    assert res.status == "converged"
    assert res.weights.tolist() == [1.0]
    assert res.cost == 4.0
    assert res.residual == 0.0


@FAST
@given(
    G=jacobians(min_k=2, max_k=6),
    solver=st.sampled_from(SOLVERS),
    data=st.data(),
)
def test_zero_gradient(G, solver, data):
    k = G.shape[0]
    zeros = data.draw(st.sets(st.integers(0, k - 1), min_size=1, max_size=k))
    G = G.copy()
    G[sorted(zeros)] = 0.0
    res = min_norm_weights(G @ G.T, solver=solver)
    assert res.status == "zero_gradient"
    assert res.converged
    assert res.iterations == 0
    assert res.cost == 0.0
    expected = np.zeros(k)
    expected[sorted(zeros)] = 1.0 / len(zeros)  # shared by the zero gradients, order-free
    np.testing.assert_array_equal(res.weights, expected)
    assert np.all(res.weights @ G == 0.0)


@pytest.mark.parametrize(
    ("M", "kwargs", "match"),
    [
        (np.ones((2, 3)), {}, "square"),
        (np.ones(3), {}, "square"),
        (np.zeros((0, 0)), {}, "square"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), {}, "NaN"),
        (np.array([[1.0, 0.0], [0.0, np.inf]]), {}, "NaN or inf"),
        (np.eye(3), {"solver": "newton"}, "newton"),
        (np.eye(3), {"max_iter": -1}, "max_iter"),
    ],
)
def test_bad_inputs_raise(M, kwargs, match):
    with pytest.raises(ValueError, match=match):
        min_norm_weights(M, **kwargs)


# -- reproduction of Sener & Koltun's solvers ---------------------------------------------------
# An independent re-derivation of Sener & Koltun's min-norm algorithm (steps 1-3), with Sener's
# step rule: t is the smallest ratio above 1e-7 among the coordinates heading to 0, then capped
# by those heading to 1; t = 1 only when no coordinate heads to 0. (Sener's script returns the
# iterate *before* the last update when it stops; mtopt returns the last one, a difference below
# tol in ‖·‖₁, mirrored here.)
def _ref_two_point(aa, ab, bb, clamp):
    if ab >= aa:
        return 1.0 - clamp
    if ab >= bb:
        return clamp
    return -(ab - bb) / (aa + bb - 2.0 * ab)


def _ref_project(y):
    s = np.sort(y)[::-1]
    theta = (y.sum() - 1.0) / len(y)
    acc = 0.0
    for i in range(len(y) - 1):
        acc += s[i]
        if (acc - 1.0) / (i + 1.0) > s[i + 1]:
            theta = (acc - 1.0) / (i + 1.0)
            break
    return np.maximum(y - theta, 0.0)


def _ref_solver(M, solver, max_iter, tol, clamp=1e-3):
    k = len(M)
    best = None
    for i in range(k):
        for j in range(i + 1, k):
            g = _ref_two_point(M[i, i], M[i, j], M[j, j], clamp)
            cost = (
                M[i, i]
                if M[i, j] >= M[i, i]
                else M[j, j]
                if M[i, j] >= M[j, j]
                else (M[j, j] + g * (M[i, j] - M[j, j]))
            )
            if best is None or cost < best[0]:
                best = (cost, i, j, g)
    _, i, j, g = best
    w = np.zeros(k)
    w[i], w[j] = g, 1.0 - g
    if k == 2:
        return w, 0
    for it in range(1, max_iter + 1):
        Mw = M @ w
        if solver == "pgd":
            rt = -Mw - np.mean(-Mw)
            tm1 = -w[rt < 0] / rt[rt < 0]
            tm2 = (1.0 - w[rt > 0]) / rt[rt > 0]
            t = 1.0
            if np.any(tm1 > 1e-7):
                t = tm1[tm1 > 1e-7].min()
            if np.any(tm2 > 1e-7):
                t = min(t, tm2[tm2 > 1e-7].min())
            c = _ref_project(w + t * rt)
            g = _ref_two_point(w @ Mw, c @ Mw, c @ M @ c, clamp)
        else:
            c = np.eye(k)[np.argmin(Mw)]
            g = _ref_two_point(w @ Mw, c @ Mw, c @ M @ c, clamp)
        new = g * w + (1.0 - g) * c
        done = np.abs(new - w).sum() < tol
        w = new
        if done:
            return w, it
    return w, max_iter


@settings(max_examples=80, deadline=None)
@given(
    kind=st.sampled_from(["generic", "aligned", "wide", "rank_deficient"]),
    k=st.integers(2, 7),
    d=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.floats(-20, 4),
    solver=st.sampled_from(["pgd", "fw"]),
    max_iter=st.sampled_from([1, 2, 3]),
)
def test_first_order_solvers_reproduce_sener(kind, k, d, seed, log_scale, solver, max_iter):
    # A few iterations only: over hundreds, near-ties in the clamp branches let round-off send
    # two equivalent implementations down different paths. Scales above e^4 make the default
    # step t = 1 act on huge r̃, where the projection is dominated by cancellation.
    G = make_jacobian(kind, k, d, seed) * np.exp(log_scale)
    M = G @ G.T
    res = min_norm_weights(M, solver=solver, max_iter=max_iter)
    w_ref, it_ref = _ref_solver(M, solver, max_iter, tol=1e-5)
    np.testing.assert_allclose(res.weights, w_ref, rtol=0, atol=1e-9)
    assert res.iterations == it_ref


def test_pgd_step_does_not_depend_on_the_scale_of_the_gradients():
    # Sener's step goes to the nearest boundary, so t·r̃ (hence every iterate) is invariant to
    # M → cM when some coordinate heads to 0; a step capped at 1 stalls for small gradients.
    # (Only for c ≤ 1: scaling up moves step ratios below Sener's absolute 1e-7 skip threshold.)
    # Powers of two scale exactly, so the iterates agree bit for bit on any machine; other
    # factors would round differently and could tip a near-tie in the step rule.
    G = make_jacobian("generic", 5, 8, 1)
    ref = min_norm_weights(G @ G.T, solver="pgd")
    assert ref.iterations > 1
    for c in (2.0**-40, 2.0**-30, 2.0**-20, 2.0**-10):
        res = min_norm_weights(c * (G @ G.T), solver="pgd")
        np.testing.assert_allclose(res.weights, ref.weights, atol=1e-9, err_msg=str(c))
        assert res.iterations == ref.iterations


# -- the float-list implementation of pgd / fw against the array formulation --------------------
# mtopt runs the K-element logic of the first-order solvers on Python floats (numpy calls cost
# more than the arithmetic at K ≈ 10). These are the array formulations it replaced; every
# element-wise operation is the same, so the iterates must agree bit for bit.
def _array_pgd_candidate(M, w):
    r = -(M @ w)
    r_tilde = r - r.mean()
    neg, pos = r_tilde < 0, r_tilde > 0
    to_zero = -w[neg] / r_tilde[neg]
    to_one = (1.0 - w[pos]) / r_tilde[pos]
    to_zero, to_one = to_zero[to_zero > 1e-7], to_one[to_one > 1e-7]
    t = float(to_zero.min()) if to_zero.size else 1.0
    if to_one.size:
        t = min(t, float(to_one.min()))
    return project_onto_simplex(w + t * r_tilde)


def _array_solver(M, solver, max_iter, tol, clamp):
    k = len(M)
    best_cost, best = np.inf, None
    for i in range(k):
        for j in range(i + 1, k):
            gamma, cost = two_point_min_norm(M[i, i], M[i, j], M[j, j], clamp)
            if cost < best_cost:
                best_cost, best = cost, (i, j, gamma)
    i, j, gamma = best
    w = np.zeros(k)
    w[i], w[j] = gamma, 1.0 - gamma
    if k == 2:
        return w, 0
    for it in range(1, max_iter + 1):
        Mw = M @ w
        if solver == "pgd":
            c = _array_pgd_candidate(M, w)
            gamma, _ = two_point_min_norm(float(w @ Mw), float(c @ Mw), float(c @ M @ c), clamp)
        else:
            t = int(np.argmin(Mw))
            c = np.zeros(k)
            c[t] = 1.0
            gamma, _ = two_point_min_norm(float(w @ Mw), float(Mw[t]), float(M[t, t]), clamp)
        new = gamma * w + (1.0 - gamma) * c
        change = float(np.abs(new - w).sum())
        w = new
        if change < tol:
            return w, it
    return w, max_iter


@MANY
@given(
    kind=st.sampled_from((*_PGD_KINDS, "stationary")),
    k=st.integers(2, 12),
    d=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.floats(-20, 10),
    solver=st.sampled_from(["pgd", "fw"]),
    clamp=st.sampled_from([1e-3, 0.0]),
    tol=st.sampled_from([1e-5, 1e-9]),
)
def test_first_order_solvers_match_the_array_formulation(
    kind, k, d, seed, log_scale, solver, clamp, tol
):
    M = make_jacobian(kind, k, d, seed) * np.exp(log_scale)
    M = M @ M.T
    res = min_norm_weights(M, solver=solver, clamp=clamp, tol=tol)
    assume(res.status != "zero_gradient")
    w_ref, it_ref = _array_solver(M, solver, 250, tol, clamp)
    np.testing.assert_array_equal(res.weights, w_ref)
    assert res.iterations == it_ref


@MANY
@given(v=_vectors(max_size=16, bound=1e6))
def test_float_projection_is_the_array_projection(v):
    from mtopt.core.min_norm import _project_floats

    np.testing.assert_array_equal(np.array(_project_floats(v.tolist())), project_onto_simplex(v))
