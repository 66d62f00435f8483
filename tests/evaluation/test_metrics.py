"""Δm (per-task and flat forms), average ranks with ties, mean rank (docs/protocol.md)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtopt.evaluation import average_ranks, delta_m, delta_m_flat, mean_rank

DIRECTIONS = {"S": {"miou": False, "pacc": False}, "D": {"abs": True}}
REFERENCE = {"S": {"miou": 0.5, "pacc": 0.8}, "D": {"abs": 2.0}}


def test_delta_m_per_task_form_by_hand():
    values = {"S": {"miou": 0.55, "pacc": 0.8}, "D": {"abs": 2.5}}
    # S: (+10% + 0%) / 2 = +5%; D: lower is better, 2.5 vs 2.0 = -25%; mean = -10%
    assert delta_m(values, REFERENCE, DIRECTIONS) == pytest.approx(-10.0)
    # flat: (+10 + 0 - 25) / 3
    assert delta_m_flat(values, REFERENCE, DIRECTIONS) == pytest.approx(-5.0)


def test_delta_m_of_the_reference_is_zero_and_improvements_are_positive():
    assert delta_m(REFERENCE, REFERENCE, DIRECTIONS) == 0.0
    better = {"S": {"miou": 0.6, "pacc": 0.9}, "D": {"abs": 1.0}}
    assert delta_m(better, REFERENCE, DIRECTIONS) > 0
    assert delta_m_flat(better, REFERENCE, DIRECTIONS) > 0


def test_delta_m_errors_are_clear():
    with pytest.raises(KeyError, match="'D'"):
        delta_m({"S": REFERENCE["S"]}, REFERENCE, DIRECTIONS)
    with pytest.raises(ZeroDivisionError, match="reference"):
        delta_m(REFERENCE, {"S": {"miou": 0.0, "pacc": 1.0}, "D": {"abs": 1.0}}, DIRECTIONS)


def test_average_ranks_with_ties():
    assert average_ranks([0.9, 0.8, 0.8, 0.7], lower_is_better=False) == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([0.9, 0.8, 0.8, 0.7], lower_is_better=True) == [4.0, 2.5, 2.5, 1.0]
    assert average_ranks([1.0, 1.0, 1.0], lower_is_better=True) == [2.0, 2.0, 2.0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=9), st.booleans())
def test_ranks_sum_and_order(values, lower):
    ranks = average_ranks([float(v) for v in values], lower)
    n = len(values)
    assert math.isclose(sum(ranks), n * (n + 1) / 2)
    for i in range(n):
        for j in range(n):
            better = values[i] < values[j] if lower else values[i] > values[j]
            if better:
                assert ranks[i] < ranks[j]
            if values[i] == values[j]:
                assert ranks[i] == ranks[j]


def test_mean_rank_averages_within_task_then_over_tasks():
    results = {
        "a": {"S": {"miou": 0.6, "pacc": 0.7}, "D": {"abs": 1.0}},
        "b": {"S": {"miou": 0.5, "pacc": 0.9}, "D": {"abs": 1.0}},
        "c": {"S": {"miou": 0.4, "pacc": 0.8}, "D": {"abs": 3.0}},
    }
    mr = mean_rank(results, DIRECTIONS)
    # S: a ranks (1, 3) -> 2; b (2, 1) -> 1.5; c (3, 2) -> 2.5. D: a, b tie at 1.5; c 3.
    assert mr == pytest.approx({"a": (2 + 1.5) / 2, "b": (1.5 + 1.5) / 2, "c": (2.5 + 3) / 2})
