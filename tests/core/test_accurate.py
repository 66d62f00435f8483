"""Correctly rounded sums (``mtopt.core.accurate``) against exact rational arithmetic."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mtopt.core import accurate

_FLOATS = st.floats(-1e100, 1e100, allow_nan=False, allow_subnormal=False)


def _exact_dot(x, y) -> float:
    return float(sum(Fraction(a) * Fraction(b) for a, b in zip(x, y, strict=True)))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 12).flatmap(
        lambda n: st.tuples(
            arrays(np.float64, n, elements=_FLOATS), arrays(np.float64, n, elements=_FLOATS)
        )
    )
)
def test_dot_is_correctly_rounded(xy):
    x, y = xy
    assert accurate.dot(x, y) == _exact_dot(x, y)


def test_cancellation_that_defeats_the_naive_sum():
    x = np.array([1e16, 1.0, -1e16])
    y = np.array([1.0, 1.0, 1.0])
    # (a naive left-to-right sum loses the 1; what numpy returns depends on the BLAS kernel)
    assert accurate.dot(x, y) == 1.0
    M = np.array([[1e8, 1e8 + 1], [1e8 + 1, 1e8 + 2]])
    w = np.array([1.0, -1.0])  # wᵀMw = 1e8 − 2(1e8+1) + 1e8 + 2 = 0 exactly
    assert accurate.quad(M, w) == 0.0
    np.testing.assert_array_equal(accurate.matvec(M, w), [-1.0, -1.0])


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_matvec_entries_are_correctly_rounded(k, seed):
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(k, k)) * 10.0 ** rng.uniform(-20, 20, size=(k, k))
    x = rng.normal(size=k)
    got = accurate.matvec(M, x)
    for i in range(k):
        assert got[i] == _exact_dot(M[i], x)
