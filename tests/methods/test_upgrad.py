"""UPGrad's batched dual-cone projections (``mtopt.methods.upgrad``) against a one-QP-at-a-time
reference (the sequential Lawson–Hanson routine) and against TorchJD's quadprog projector."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtopt
from _asserts import make_jacobian
from mtopt.core import qp
from mtopt.core.method import MethodInput
from mtopt.core.qp import box_lower_qp_active_set
from mtopt.methods.upgrad import upgrad_solve, upgrad_weights

KINDS = ("generic", "duplicate", "collinear", "rank_deficient", "wide", "aligned", "stationary")


def reference_weights(
    gram: np.ndarray, pref: np.ndarray, reg_eps: float = 1e-4, norm_eps: float = 1e-4
) -> np.ndarray:
    """The definition, one QP per task: ``Σ_i argmin_{v ≥ p_i e_i} vᵀ(M/tr M + εI)v``, with
    ``M/tr M`` taken as 0 when ``tr M < norm_eps`` (TorchJD's rule)."""
    k = gram.shape[0]
    trace = np.trace(gram)
    M = (np.zeros_like(gram) if trace < norm_eps else gram / trace) + reg_eps * np.eye(k)
    total = np.zeros(k)
    for i in range(k):
        v, ok = box_lower_qp_active_set(M, pref[i] * np.eye(k)[i])
        assert ok
        total += v
    return total


@st.composite
def gramians(draw, max_k: int = 12):
    k = draw(st.integers(2, max_k))
    G = make_jacobian(
        draw(st.sampled_from(KINDS)), k, draw(st.integers(1, 40)), draw(st.integers(0, 2**32 - 1))
    )
    return G @ G.T


@settings(max_examples=150, deadline=None)
@given(gramians(), st.booleans())
def test_weights_match_one_qp_at_a_time(gram, uniform):
    k = gram.shape[0]
    pref = np.full(k, 1.0 / k) if uniform else np.random.default_rng(k).dirichlet(np.ones(k))
    w, ok = upgrad_weights(gram, pref)
    assert ok
    np.testing.assert_allclose(w, reference_weights(gram, pref), rtol=0, atol=1e-8)
    assert np.all(w >= pref)


@settings(max_examples=60, deadline=None)
@given(gramians())
def test_weights_match_torchjd_up_to_twelve_tasks(gram):
    tjd = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    k = gram.shape[0]
    theirs = tjd.UPGradWeighting()(torch.from_numpy(gram)).numpy()
    ours, ok = upgrad_weights(gram, np.full(k, 1.0 / k))
    assert ok
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-8)


@settings(max_examples=60, deadline=None)
@given(gramians(max_k=8))
def test_singular_gramian_without_regularisation(gram):
    # reg_eps = 0: the projections are still exact minimisers (KKT), w ≥ p, Gd ≥ 0.
    k = gram.shape[0]
    w, result = upgrad_solve(gram, np.full(k, 1.0 / k), reg_eps=0.0)
    assert result.all_converged
    assert np.all(w >= 1.0 / k)
    scale = float(np.trace(gram))
    assert np.all(gram @ w >= -1e-9 * scale)


def test_method_reports_iterations_and_converges():
    G = torch.from_numpy(make_jacobian("generic", 11, 300, 4))
    names = tuple(f"t{i}" for i in range(11))
    out = mtopt.make("upgrad").aggregate(MethodInput(torch.ones(11, dtype=torch.float64), names, G))
    assert out.solver.converged
    assert out.solver.status == "converged"
    assert 1 <= out.solver.iterations <= 4 * 11 + 5
    assert out.solver.message == ""


def test_method_reports_non_convergence(monkeypatch):
    # No block exchange and no sequential iteration allowed: the report must say so.
    monkeypatch.setattr(qp, "_EXCHANGE_ALLOWANCE", -1)
    original = qp.box_lower_qp_batch
    monkeypatch.setattr(
        sys.modules[upgrad_solve.__module__],
        "box_lower_qp_batch",
        lambda M, lowers: original(M, lowers, max_iter=0),
    )
    G = torch.from_numpy(make_jacobian("generic", 6, 4, 5))
    names = tuple(f"t{i}" for i in range(6))
    out = mtopt.make("upgrad").aggregate(MethodInput(torch.ones(6, dtype=torch.float64), names, G))
    assert not out.solver.converged
    assert out.solver.status == "max_iter"
    assert "did not meet the KKT conditions" in out.solver.message
    assert any(f"'t{i}'" in out.solver.message for i in range(6))


def test_method_reports_a_non_finite_gramian():
    G = torch.from_numpy(make_jacobian("generic", 3, 5, 0))
    G[1, 2] = float("nan")
    names = ("a", "b", "c")
    out = mtopt.make("upgrad").aggregate(MethodInput(torch.ones(3, dtype=torch.float64), names, G))
    assert not out.solver.converged
    assert "non-finite Gramian" in out.solver.message
