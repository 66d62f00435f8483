"""Unitary scalarization and fixed weights as methods."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mtopt
from _asserts import assert_weights_shape_finite
from mtopt import MethodInput, Need


def _inputs(losses, step: int = 0) -> MethodInput:
    t = torch.as_tensor(losses, dtype=torch.float64)
    return MethodInput(t, tuple(f"t{i}" for i in range(len(t))), step=step)


_losses = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=9)


@settings(max_examples=50, deadline=None)
@given(losses=_losses, steps=st.lists(st.integers(0, 10_000), min_size=1, max_size=4))
def test_unitary_weights(losses, steps):
    k = len(losses)
    total = mtopt.make("unitary")
    mean = mtopt.make("unitary", reduction="mean")
    for step in steps:  # constant over steps and independent of the loss values
        inputs = _inputs(losses, step)
        w_sum = total.aggregate(inputs).weights
        w_mean = mean.aggregate(inputs).weights
        assert_weights_shape_finite(w_sum, k)
        assert w_sum.dtype == torch.float64
        torch.testing.assert_close(w_sum, torch.ones(k, dtype=torch.float64), rtol=0, atol=0)
        torch.testing.assert_close(w_mean, torch.full((k,), 1.0 / k, dtype=torch.float64))
        assert float(w_mean.sum()) == pytest.approx(1.0, abs=1e-15)


def test_loss_only_methods_declare_only_losses():
    assert mtopt.make("unitary").needs == Need.LOSSES
    assert mtopt.make("fixed", weights=[1.0]).needs == Need.LOSSES
    assert mtopt.make("unitary").head_policy == "weighted"
    assert mtopt.make("fixed", weights=[1.0]).head_policy == "weighted"


def test_unitary_rejects_unknown_reduction():
    with pytest.raises(ValueError, match=r"^unitary: reduction must be 'sum' or 'mean'"):
        mtopt.make("unitary", reduction="max")


@settings(max_examples=50, deadline=None)
@given(
    weights=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=8),
    step=st.integers(0, 100),
)
def test_fixed_weights_are_returned_verbatim(weights, step):
    assume(any(weights))  # all zero is refused (no step would move)
    method = mtopt.make("fixed", weights=weights)
    for s in (0, step):
        w = method.aggregate(_inputs([1.0] * len(weights), s)).weights
        assert w.tolist() == [float(x) for x in weights]
        assert w.dtype == torch.float64


@pytest.mark.parametrize("k", [1, 3, 5])
def test_fixed_weights_length_is_checked_at_aggregate_time(k):
    method = mtopt.make("fixed", weights=[0.5, 0.5])  # fine until it meets K tasks
    assert method.aggregate(_inputs([1.0, 1.0])).weights.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match=rf"weights has 2 values for {k} tasks"):
        method.aggregate(_inputs([1.0] * k))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_fixed_weights_must_be_finite(bad):
    with pytest.raises(ValueError, match="finite"):
        mtopt.make("fixed", weights=[1.0, bad])


def test_fixed_weights_must_not_be_empty():
    with pytest.raises(ValueError, match="empty"):
        mtopt.make("fixed", weights=[])


def test_negative_fixed_weight_warns_but_is_used():
    with pytest.warns(UserWarning, match="negative"):
        method = mtopt.make("fixed", weights=[1.0, -0.5])
    assert method.aggregate(_inputs([1.0, 2.0])).weights.tolist() == [1.0, -0.5]


def test_non_negative_fixed_weights_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mtopt.make("fixed", weights=[0.0, 2.0])
