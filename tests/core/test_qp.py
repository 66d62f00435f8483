"""The box-constrained QP solvers of ``mtopt.core.qp``: ``min vᵀMv s.t. v ≥ l``.

The batched block-principal-pivoting solver is checked against the KKT conditions (necessary and
sufficient for this convex QP), against the sequential Lawson–Hanson routine and, where it is
installed, against quadprog (a test-only dependency, via TorchJD's extra).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _asserts import make_jacobian
from mtopt.core import qp
from mtopt.core.qp import (
    box_lower_qp,
    box_lower_qp_active_set,
    box_lower_qp_batch,
    kkt_tolerance,
)

MANY = settings(max_examples=150, deadline=None)
#: Agreement of two exact solvers on a PD problem with λ_min(M) ≥ 1e-4 (see the first test).
_CLASSIFICATION_ATOL = 1e-7
FAST = settings(max_examples=50, deadline=None)
KINDS = ("generic", "duplicate", "collinear", "rank_deficient", "wide", "aligned", "stationary")


@st.composite
def problems(draw, max_k: int = 12, reg: tuple[float, ...] = (1e-4, 1e-2, 1.0)):
    """A PSD matrix ``M`` (a Gram matrix, trace-normalised as UPGrad does, plus ``reg·I``) and a
    ``(B, K)`` array of lower bounds: UPGrad's ``p_i e_i`` rows or random ones."""
    k = draw(st.integers(1, max_k))
    d = draw(st.integers(1, 16))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    eps = draw(st.sampled_from(reg))
    G = make_jacobian(kind, k, d, seed)
    M = G @ G.T
    M = M / np.trace(M) + eps * np.eye(k)
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        lowers = np.diag(rng.dirichlet(np.ones(k)))
    else:
        lowers = rng.normal(size=(int(rng.integers(1, 6)), k)) * (rng.random(k) < 0.7)
    return M, lowers


def assert_kkt(M: np.ndarray, lower: np.ndarray, v: np.ndarray, atol: float) -> None:
    """``v ≥ l``, ``Mv ≥ 0`` and ``(v − l)ᵀ Mv = 0`` (componentwise), to ``atol``."""
    y = M @ v
    assert np.all(v >= lower), (v, lower)  # the solvers clip: exactly feasible
    assert np.all(y >= -atol), y
    assert np.all(np.abs((v - lower) * y) <= atol * (1.0 + np.abs(v - lower))), (v, y)


def _quadprog(M: np.ndarray, lower: np.ndarray) -> np.ndarray:
    quadprog = pytest.importorskip("quadprog")
    k = M.shape[0]
    return quadprog.solve_qp(M, np.zeros(k), np.eye(k), lower)[0]


@MANY
@given(problems())
def test_batch_meets_kkt_and_matches_the_sequential_routine(problem):
    M, lowers = problem
    res = box_lower_qp_batch(M, lowers)
    assert res.all_converged
    assert res.solutions.shape == lowers.shape
    for lower, v in zip(lowers, res.solutions, strict=True):
        assert_kkt(M, lower, v, atol=1e-10)
        ref, ok = box_lower_qp_active_set(M, lower)
        assert ok
        # M is positive definite (reg ≥ 1e-4 after normalisation): the minimiser is unique, but
        # both solvers accept y_j ≥ −τ (τ = 1e-12) as "not infeasible"; an index so classified
        # moves the answer by up to ~τ·K/λ_min(M) ≈ 1e-7 (1.7e-8 seen in 10⁵ problems).
        np.testing.assert_allclose(v, ref, rtol=0, atol=_CLASSIFICATION_ATOL)
        assert v @ M @ v == pytest.approx(ref @ M @ ref, rel=1e-12, abs=1e-13)


@MANY
@given(problems(reg=(1e-4,)))
def test_batch_matches_quadprog(problem):
    M, lowers = problem
    res = box_lower_qp_batch(M, lowers)
    for lower, v in zip(lowers, res.solutions, strict=True):
        # cond(M) ≤ ~1e4 here; quadprog has its own tolerances (see above).
        np.testing.assert_allclose(v, _quadprog(M, lower), rtol=0, atol=_CLASSIFICATION_ATOL)


@FAST
@given(problems(reg=(0.0,)))
def test_singular_psd_matrices_reach_the_minimum(problem):
    # reg = 0: M may be singular and the minimiser not unique; the minimum value is.
    M, lowers = problem
    res = box_lower_qp_batch(M, lowers)
    for lower, v, ok in zip(lowers, res.solutions, res.converged, strict=True):
        ref, ref_ok = box_lower_qp_active_set(M, lower)
        if ok:
            assert_kkt(M, lower, v, atol=1e-9)
        if ok and ref_ok:
            assert v @ M @ v == pytest.approx(ref @ M @ ref, abs=1e-10)


@FAST
@given(problems())
def test_single_problem_api_matches_the_batch(problem):
    M, lowers = problem
    batch = box_lower_qp_batch(M, lowers).solutions
    for lower, v in zip(lowers, batch, strict=True):
        single, ok = box_lower_qp(M, lower)
        assert ok
        # (stacked and single products may round differently: cond(M) is up to ~1e4)
        np.testing.assert_allclose(single, v, rtol=0, atol=1e-10)


@FAST
@given(problems())
def test_problems_are_independent_of_their_batch(problem):
    # Solving the rows together, one by one or in reverse order gives the same answers.
    M, lowers = problem
    together = box_lower_qp_batch(M, lowers).solutions
    reverse = box_lower_qp_batch(M, lowers[::-1]).solutions[::-1]
    np.testing.assert_allclose(reverse, together, rtol=0, atol=1e-10)


def test_batched_phase_is_short_on_a_conflicting_gramian():
    G = make_jacobian("generic", 11, 200, 3)
    M = G @ G.T
    M = M / np.trace(M) + 1e-4 * np.eye(11)
    res = box_lower_qp_batch(M, np.eye(11) / 11)
    assert res.all_converged
    assert res.sequential == 0
    assert res.iterations <= 4 * 11 + 5


def test_no_conflict_needs_one_iteration():
    M = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.1], [0.0, 0.1, 3.0]])
    res = box_lower_qp_batch(M, np.eye(3))
    assert res.iterations == 1
    assert res.all_converged
    np.testing.assert_array_equal(res.solutions, np.eye(3))


def test_handing_over_to_the_sequential_method(monkeypatch):
    # No block exchange allowed: every problem not solved by the first candidate is finished by
    # Lawson–Hanson, with the same answer.
    G = make_jacobian("generic", 8, 5, 11)
    M = G @ G.T + 1e-3 * np.eye(8)
    lowers = np.eye(8)
    expected = box_lower_qp_batch(M, lowers).solutions
    monkeypatch.setattr(qp, "_EXCHANGE_ALLOWANCE", -1)
    res = box_lower_qp_batch(M, lowers)
    assert res.all_converged
    assert res.sequential > 0
    np.testing.assert_allclose(res.solutions, expected, rtol=0, atol=1e-12)


def test_singular_stacked_system_goes_to_the_sequential_method():
    # F = {0, 1} at the start and M_FF = [[1, 1], [1, 1]] is singular.
    M = np.ones((2, 2))
    v, ok = box_lower_qp(M, np.array([-1.0, -1.0]))
    assert ok
    assert v @ M @ v == pytest.approx(0.0, abs=1e-15)
    assert np.all(v >= -1.0)
    # A singular stacked solve hands the whole unfinished batch over.
    res = box_lower_qp_batch(M, np.array([[-1.0, -1.0], [1.0, 0.0]]))
    assert res.sequential == 2
    assert res.all_converged
    np.testing.assert_allclose(res.solutions[1], [1.0, 0.0], atol=1e-15)


def test_non_convergence_is_reported(monkeypatch):
    G = make_jacobian("generic", 6, 4, 5)
    M = G @ G.T + 1e-3 * np.eye(6)
    monkeypatch.setattr(qp, "_EXCHANGE_ALLOWANCE", -1)
    res = box_lower_qp_batch(M, np.eye(6), max_iter=0)
    assert not res.all_converged
    assert res.sequential == int((~res.converged).sum()) > 0


def test_kkt_tolerance_and_shapes():
    assert kkt_tolerance(np.eye(2)) == 1e-12
    assert kkt_tolerance(np.zeros((2, 2))) == 1e-12
    assert kkt_tolerance(5.0 * np.eye(2)) == 5e-12
    with pytest.raises(ValueError, match="lower bounds"):
        box_lower_qp_batch(np.eye(3), np.ones((2, 2)))
    v, ok = box_lower_qp(np.zeros((3, 3)), np.array([1.0, -2.0, 0.0]))
    assert ok
    np.testing.assert_array_equal(v, [1.0, -2.0, 0.0])


def test_non_finite_matrix_is_not_converged():
    M = np.array([[1.0, np.nan], [np.nan, 1.0]])
    res = box_lower_qp_batch(M, np.eye(2))
    assert not res.converged.any()
    _, ok = box_lower_qp_active_set(M, np.array([1.0, 0.0]))
    assert not ok
