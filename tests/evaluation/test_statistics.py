"""Confidence intervals, differences to a baseline, verdicts, rank correlation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtopt.evaluation.statistics import (
    difference_interval,
    mean_interval,
    rank_correlation,
    verdict,
)


def test_a_known_t_interval():
    one = mean_interval([1.0, 2.0, 3.0])
    # t(0.975, 2) = 4.302653; s = 1
    assert one.mean == 2.0
    assert one.std == 1.0
    assert one.n == 3
    assert one.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(mean_interval([5.0]).lo)
    with pytest.raises(ValueError, match="level"):
        mean_interval([1.0, 2.0], level=1.0)


def test_intervals_cover_at_their_level():
    """Over 4000 normal samples of 3, the 95 % interval covers the true mean 95 % ± 1.5 %."""
    rng = np.random.default_rng(0)
    covered = 0
    trials = 4000
    for _ in range(trials):
        x = rng.normal(1.5, 2.0, size=3).tolist()
        one = mean_interval(x)
        covered += one.lo <= 1.5 <= one.hi
    assert abs(covered / trials - 0.95) < 0.015


def test_paired_by_seed_when_the_seeds_match_else_welch():
    base = {1: -8.0, 2: -9.0, 3: -7.5}
    shifted = {s: v + 2.0 + 0.01 * s for s, v in base.items()}  # same noise, +2
    paired = difference_interval(shifted, base)
    assert paired.kind == "paired"
    assert paired.mean == pytest.approx(2.02)
    assert paired.lo > 1.9
    assert verdict(paired) == "better"
    other_seeds = {4: -6.0, 5: -7.0, 6: -5.5}
    welch = difference_interval(other_seeds, base)
    assert welch.kind == "welch"
    assert welch.mean == pytest.approx(2.0)
    assert verdict(difference_interval(base, shifted)) == "worse"
    assert verdict(difference_interval({1: 0.0, 2: 1.0, 3: -1.0}, {1: 0.0, 2: 0.0, 3: 0.0})) == (
        "not distinguishable"
    )
    assert verdict(difference_interval({1: 3.0}, {1: 0.0})) == "one seed"


def test_paired_on_the_shared_seeds_when_two_or_more():
    base = {1: -8.0, 2: -9.0, 3: -7.5, 4: 10.0}  # seed 4: a run the method has not made yet
    method = {1: -7.9, 2: -8.9, 3: -7.4}  # +0.1 on every shared seed
    diff = difference_interval(method, base)
    assert diff.kind == "paired"
    assert diff.n == 3
    assert diff.mean == pytest.approx(0.1)
    assert verdict(diff) == "better"
    one_shared = difference_interval({1: -7.9, 5: -8.0}, base)
    assert one_shared.kind == "welch"


@given(
    st.lists(st.floats(-50, 50), min_size=2, max_size=6),
    st.floats(-10, 10),
)
def test_a_constant_shift_is_measured_exactly_when_paired(values, shift):
    base = dict(enumerate(values))
    moved = {s: v + shift for s, v in base.items()}
    diff = difference_interval(moved, base)
    assert diff.kind == "paired"
    assert diff.mean == pytest.approx(shift, abs=1e-9)
    assert diff.hi - diff.lo == pytest.approx(0.0, abs=1e-6)


def test_rank_correlation():
    ours = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    assert rank_correlation(ours, {"a": 10, "b": 20, "c": 30, "d": 40, "e": 0}) == (1.0, 4)
    assert rank_correlation(ours, {"a": 4, "b": 3, "c": 2, "d": 1})[0] == pytest.approx(-1.0)
    rho, n = rank_correlation(ours, {"a": 1, "x": 2})
    assert math.isnan(rho)
    assert n == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_value_that_is_not_finite_is_refused_not_averaged(bad):
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, bad, 2.0])
    with pytest.raises(ValueError, match="finite"):
        difference_interval({1: 1.0, 2: bad, 3: 2.0}, {1: 0.0, 2: 0.0, 3: 0.0})
    with pytest.raises(ValueError, match="finite"):
        difference_interval({1: 1.0, 2: 3.0}, {1: bad, 2: 0.0})


@given(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=12),
    st.sets(st.integers(0, 11), max_size=4),
    st.booleans(),
)
def test_a_nan_ranks_last_and_leaves_the_order_of_the_others(values, holes, lower):
    from mtopt.evaluation.metrics import average_ranks

    with_nan = [math.nan if i in holes else v for i, v in enumerate(values)]
    finite = [i for i, v in enumerate(with_nan) if not math.isnan(v)]
    ranks = average_ranks(with_nan, lower)
    alone = average_ranks([with_nan[i] for i in finite], lower)
    assert [ranks[i] for i in finite] == alone  # the numbers keep the ranks they have alone
    nans = [r for v, r in zip(with_nan, ranks, strict=True) if math.isnan(v)]
    if nans:  # tied behind every number
        assert nans == [len(finite) + (len(nans) + 1) / 2] * len(nans)


def test_a_cell_with_a_value_that_is_not_finite_has_no_spread_rather_than_a_crash():
    from mtopt.evaluation.statistics import sample_std

    assert sample_std([1.0]) == 0.0
    assert sample_std([1.0, 3.0]) == pytest.approx(math.sqrt(2))
    assert math.isnan(sample_std([1.0, math.nan]))
    assert math.isnan(sample_std([1.0, -math.inf]))
