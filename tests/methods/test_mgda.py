"""MGDA and MGDA-UB (Sener & Koltun 2018) through ``mtopt.make`` and the engine."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import mtopt
from _asserts import (
    assert_min_norm_kkt,
    assert_on_simplex,
    assert_weights_shape_finite,
    jacobians,
)
from mtopt import Losses, MethodInput, MultiTaskOptimizer, Need

NORMALIZATIONS = ("l2", "loss", "loss+", "none")
APPLY_TO = ("raw_losses", "normalized_grads")
FAST = settings(max_examples=40, deadline=None)


def _aggregate(G: np.ndarray, losses: np.ndarray, names=None, **hparams):
    k = G.shape[0]
    names = tuple(names or (f"t{i}" for i in range(k)))
    inputs = MethodInput(
        torch.as_tensor(losses, dtype=torch.float64), names, grads=torch.as_tensor(G)
    )
    return mtopt.make("mgda", **hparams).aggregate(inputs)


def _normalizers(kind: str, G: np.ndarray, losses: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(G, axis=1)
    return {"l2": norms, "loss": losses, "loss+": losses * norms, "none": np.ones(len(G))}[kind]


@st.composite
def _problems(draw, min_k=2, max_k=6):
    G = draw(jacobians(min_k=min_k, max_k=max_k, min_d=1, max_d=10))
    log_losses = draw(st.lists(st.floats(-3, 3), min_size=len(G), max_size=len(G)))
    return G, np.exp(np.array(log_losses))


# -- the min-norm property, for every normalisation and every way of applying w* -----------------
@pytest.mark.parametrize("apply_to", APPLY_TO)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@FAST
@given(problem=_problems())
def test_kkt_on_normalised_gradients(normalization, apply_to, problem):
    G, losses = problem
    k = len(G)
    agg = _aggregate(G, losses, normalization=normalization, apply_to=apply_to, solver="wolfe")
    w = agg.weights
    assert_weights_shape_finite(w, k)
    assert w.dtype == torch.float64
    w = w.numpy()
    n = _normalizers(normalization, G, losses)
    np.testing.assert_allclose(agg.extras["normalizers"], n, rtol=1e-12)
    Gn = G / n[:, None]
    simplex = np.array(agg.extras["simplex_weights"])
    # the simplex weights solve the min-norm problem on the normalised gradients g_i / n_i
    assert_min_norm_kkt(Gn, simplex, rtol=1e-9)
    if apply_to == "raw_losses":
        # w* weights the raw losses: d = Σ w*_k g_k
        np.testing.assert_array_equal(w, simplex)
    else:
        # d = Gᵀw = Σ (w_k n_k) ĝ_k is itself the min-norm point of conv{ĝ_k}: w·n ∈ Δ and KKT
        np.testing.assert_allclose(w * n, simplex, rtol=1e-12, atol=1e-15)
        d = w @ G
        assert_min_norm_kkt(Gn, w * n, rtol=1e-9)
        dn = simplex @ Gn
        np.testing.assert_allclose(d, dn, atol=1e-9 * np.abs(Gn).max())
    assert agg.solver is not None
    assert agg.solver.name == "min_norm/wolfe"
    assert agg.solver.converged
    assert agg.solver.status == "converged"


@pytest.mark.parametrize("solver", ["pgd", "fw"])
@FAST
@given(problem=_problems(min_k=3))
def test_first_order_solvers_are_on_simplex(solver, problem):
    G, losses = problem
    agg = _aggregate(G, losses, normalization="l2", solver=solver)
    assert_on_simplex(agg.extras["simplex_weights"], atol=1e-12)
    assert agg.solver.iterations <= 250
    assert agg.solver.name == f"min_norm/{solver}"


@pytest.mark.parametrize("normalization", ["l2", "none"])
@FAST
@given(problem=_problems())
def test_normalisation_free_of_loss_accepts_any_sign(normalization, problem):
    G, losses = problem
    signs = np.where(np.arange(len(G)) % 2 == 0, -1.0, 1.0)
    a = _aggregate(G, losses * signs, normalization=normalization, solver="wolfe")
    b = _aggregate(G, losses, normalization=normalization, solver="wolfe")
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)


@pytest.mark.parametrize("normalization", ["loss", "loss+"])
@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_loss_normalisation_needs_positive_losses(normalization, bad):
    G = np.random.default_rng(0).normal(size=(3, 4))
    with pytest.raises(ValueError, match=r"segmentation=") as exc:
        _aggregate(
            G,
            np.array([1.0, bad, 2.0]),
            names=("depth", "segmentation", "normal"),
            normalization=normalization,
        )
    assert "depth" not in str(exc.value)
    assert "normal=" not in str(exc.value)


@pytest.mark.parametrize("apply_to", APPLY_TO)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("solver", ["pgd", "fw", "wolfe"])
def test_zero_gradient_gives_zero_direction(normalization, apply_to, solver):
    G = np.random.default_rng(1).normal(size=(4, 6)) * np.array([[0.1], [1], [10], [1]])
    G[2] = 0.0
    agg = _aggregate(
        G,
        np.array([0.5, 1.0, 2.0, 3.0]),
        names=("a", "b", "c", "d"),
        normalization=normalization,
        apply_to=apply_to,
        solver=solver,
    )
    np.testing.assert_array_equal(agg.weights.numpy() @ G, np.zeros(6))
    assert agg.solver.status == "zero_gradient"
    assert agg.solver.converged
    assert "'c'" in agg.solver.message
    assert "zero gradient" in agg.solver.message
    assert agg.extras["simplex_weights"] == [0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("solver", ["pgd", "fw", "wolfe"])
@pytest.mark.parametrize(
    ("normalization", "apply_to"),
    [("none", "raw_losses"), ("none", "normalized_grads"), ("l2", "raw_losses")],
)
@FAST
@given(ab=jacobians(min_k=2, max_k=2, min_d=2, max_d=8), log_loss=st.floats(-2, 2))
def test_equal_norm_two_tasks_get_equal_weights(solver, normalization, apply_to, ab, log_loss):
    a, b = ab
    if normalization == "none":
        b = b * (np.linalg.norm(a) / np.linalg.norm(b))
    # (with l2 any two gradients have equal norm once normalised); γ is ill-posed near a = b
    assume(np.linalg.norm(a / np.linalg.norm(a) - b / np.linalg.norm(b)) > 1e-3)
    losses = np.exp(np.array([log_loss, -log_loss]))
    agg = _aggregate(
        np.stack([a, b]), losses, normalization=normalization, apply_to=apply_to, solver=solver
    )
    np.testing.assert_allclose(agg.weights.numpy(), [0.5, 0.5], atol=1e-9)


@pytest.mark.parametrize("solver", ["pgd", "fw", "wolfe"])
@FAST
@given(ab=jacobians(min_k=2, max_k=2, min_d=2, max_d=8))
def test_mgda_favours_the_smallest_gradient(solver, ab):
    norms = np.linalg.norm(ab, axis=1)
    assume(max(norms) > 1.01 * min(norms))
    small = int(np.argmin(norms))
    agg = _aggregate(ab, np.ones(2), normalization="none", solver=solver)
    assert agg.weights[small] > 0.5


@pytest.mark.parametrize("solver", ["pgd", "fw", "wolfe"])
def test_non_conflicting_gradients_of_different_norms(solver):
    g_small = np.array([0.1, 0.05, 0.0])
    g_big = np.array([1.0, -1.5, 2.0])  # g_smallᵀg_big > 0, both far from collinear
    assert g_small @ g_big > 0
    agg = _aggregate(np.stack([g_small, g_big]), np.ones(2), normalization="none", solver=solver)
    w = agg.weights.numpy()
    assert w[0] > 0.5
    # here g_smallᵀg_big ≥ ‖g_small‖²: the exact answer is the small vertex, Sener clamps to 0.999
    expected = [1.0, 0.0] if solver == "wolfe" else [0.999, 0.001]
    np.testing.assert_allclose(w, expected, atol=1e-12)


def test_defaults_follow_the_spec():
    assert mtopt.make("mgda").hparams == {
        "level": "param",
        "normalization": "loss+",
        "solver": "wolfe",
        "apply_to": "raw_losses",
        "max_iter": 250,
        "tol": 1e-5,
        "pair_clamp": 1e-3,
        "head_policy": "weighted",
    }
    assert mtopt.make("mgda").needs == Need.PARAM_GRADS
    assert mtopt.make("mgda_ub").needs == Need.REP_GRADS
    # MGDA-UB is MGDA at the representation level: the same method, another default level
    assert mtopt.make("mgda_ub").hparams == {**mtopt.make("mgda").hparams, "level": "rep"}
    assert mtopt.make("mgda", level="rep").level == mtopt.make("mgda_ub").level == "rep"


@pytest.mark.parametrize("name", ["mgda", "mgda_ub"])
@pytest.mark.parametrize(
    ("hparams", "match"),
    [
        ({"normalization": "l1"}, "normalization"),
        ({"solver": "adam"}, "solver"),
        ({"apply_to": "heads"}, "apply_to"),
        ({"max_iter": -1}, "max_iter"),
        ({"tol": 0.0}, "tol"),
        ({"tol": -1e-5}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"pair_clamp": 0.5}, "pair_clamp"),
        ({"pair_clamp": -1e-3}, "pair_clamp"),
        ({"head_policy": "mean"}, "head_policy"),
    ],
)
def test_invalid_hyperparameters(name, hparams, match):
    with pytest.raises(ValueError, match=match):
        mtopt.make(name, **hparams)


def test_pair_clamp_zero_is_exact():
    G = np.array([[1.0, 0.0], [2.0, 0.5]])  # g1ᵀg2 = 2 ≥ ‖g1‖² = 1
    agg = _aggregate(G, np.ones(2), normalization="none", pair_clamp=0.0)
    np.testing.assert_array_equal(agg.weights.numpy(), [1.0, 0.0])


# -- MGDA-UB with an identity encoder equals MGDA --------------------------------------------------
class _IdentityEncoderModel(nn.Module):
    """The shared representation z *is* the shared parameter θ (an identity encoder)."""

    def __init__(self, d: int, k: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(d, generator=gen, dtype=torch.float64))
        self.heads = nn.ModuleList(nn.Linear(d, 2, dtype=torch.float64) for _ in range(k))
        with torch.no_grad():
            for h in self.heads:
                h.weight.copy_(torch.randn(2, d, generator=gen, dtype=torch.float64))
                h.bias.copy_(torch.randn(2, generator=gen, dtype=torch.float64))
        self.targets = torch.randn(k, 2, generator=gen, dtype=torch.float64)
        self.scales = torch.exp(2 * torch.randn(k, generator=gen, dtype=torch.float64))

    def closure(self) -> Losses:
        z = self.theta
        losses = {
            f"task{k}": self.scales[k] * ((torch.tanh(h(z)) - self.targets[k]) ** 2).mean()
            for k, h in enumerate(self.heads)
        }
        return Losses(losses, features=z)


def _one_step(model: _IdentityEncoderModel, method: str, **hparams):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mto = MultiTaskOptimizer(opt, method, shared=[model.theta], **hparams)
    info = mto.step(model.closure)
    return info, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("solver", ["pgd", "wolfe"])
@pytest.mark.parametrize(
    ("normalization", "apply_to"),
    [
        ("loss+", "raw_losses"),
        ("l2", "normalized_grads"),
        ("none", "raw_losses"),
        ("loss", "normalized_grads"),
    ],
)
@pytest.mark.parametrize("head_policy", ["raw", "weighted"])
def test_mgda_ub_with_identity_encoder_equals_mgda(k, solver, normalization, apply_to, head_policy):
    base = _IdentityEncoderModel(d=5, k=k, seed=k)
    hp = {
        "solver": solver,
        "normalization": normalization,
        "apply_to": apply_to,
        "head_policy": head_policy,
    }
    info_p, grads_p = _one_step(copy.deepcopy(base), "mgda", **hp)
    info_r, grads_r = _one_step(copy.deepcopy(base), "mgda_ub", **hp)
    torch.testing.assert_close(info_r.weights, info_p.weights, rtol=0, atol=1e-10)
    assert info_r.solver.status == info_p.solver.status
    for gr, gp in zip(grads_r, grads_p, strict=True):
        torch.testing.assert_close(gr, gp, rtol=0, atol=1e-10)
    # and the shared gradient is the weighted sum of the per-task gradients
    model = copy.deepcopy(base)
    losses = list(model.closure().losses.values())
    rows = [torch.autograd.grad(loss, model.theta)[0] for loss in losses]
    expected = sum(w * g for w, g in zip(info_p.weights, rows, strict=True))
    torch.testing.assert_close(grads_p[0], expected, rtol=0, atol=1e-12)
    assert not torch.all(expected == 0)
