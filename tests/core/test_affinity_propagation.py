"""Our Affinity Propagation against scikit-learn's, and its documented special cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtopt.core.affinity_propagation import affinity_propagation


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 9), st.integers(0, 2**31 - 1), st.booleans())
def test_matches_scikit_learn(n, seed, blocky):
    cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n))
    x = (x + x.T) / 2
    if blocky:
        blocks = rng.integers(0, 3, size=n)
        x = np.where(blocks[:, None] == blocks[None, :], 1.0, -1.0) + 0.1 * x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cluster.AffinityPropagation(
            affinity="precomputed", convergence_iter=50, random_state=0
        ).fit(x)
    ours = affinity_propagation(x, convergence_iter=50, seed=0)
    if ours is None:
        assert len(ref.cluster_centers_indices_) == 0
    else:
        np.testing.assert_array_equal(ours.labels, ref.labels_)
        np.testing.assert_array_equal(ours.exemplars, ref.cluster_centers_indices_)


def test_two_points_follow_the_preference_rule():
    same = affinity_propagation(np.array([[1.0, 1.0], [1.0, 1.0]]))
    assert same.labels.tolist() == [0, 0]  # median 1 does not beat the similarity 1
    apart = affinity_propagation(np.array([[1.0, 0.2], [0.2, 1.0]]))
    assert apart.labels.tolist() == [0, 1]  # median 0.6 > 0.2


def test_bad_similarities_are_refused():
    with pytest.raises(ValueError, match="square"):
        affinity_propagation(np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        affinity_propagation(np.array([[1.0, np.nan], [np.nan, 1.0]]))
