"""Gradient-balancing methods : each one's documented properties on random Jacobians."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtopt
from mtopt.core.method import MethodInput
from mtopt.methods.pcgrad import pcgrad_weights


def jac(seed: int, k: int, d: int, scale: float = 1.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(k, d)) * np.exp(scale * rng.normal(size=(k, 1)))
    return torch.from_numpy(g)


def run(name: str, G: torch.Tensor, losses=None, **hp):
    losses = torch.ones(G.shape[0], dtype=torch.float64) if losses is None else losses
    names = tuple(f"t{i}" for i in range(G.shape[0]))
    out = mtopt.make(name, **hp).aggregate(MethodInput(losses, names, grads=G))
    return out, out.weights @ G


seeds = st.integers(0, 2**31 - 1)


# ------------------------------------------------------------------------------------------ PCGrad
def pcgrad_reference(G: torch.Tensor, orders) -> torch.Tensor:
    """PCGrad on the vectors themselves, for comparison with the Gram-form weights."""
    out = torch.zeros(G.shape[1], dtype=G.dtype)
    for i, order in enumerate(orders):
        g = G[i].clone()
        for j in order:
            dot = g @ G[j]
            if dot < 0:
                g = g - dot / (G[j] @ G[j]) * G[j]
        out += g
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5), st.integers(1, 8), seeds, st.randoms(use_true_random=False))
def test_pcgrad_gram_form_equals_vector_form(k, d, seed, rnd):
    G = jac(seed, k, d)
    orders = [rnd.sample([j for j in range(k) if j != i], k - 1) for i in range(k)]
    w = pcgrad_weights(G @ G.T, orders)
    torch.testing.assert_close(w @ G, pcgrad_reference(G, orders), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), seeds)
def test_pcgrad_two_conflicting_tasks_become_orthogonal(d, seed):
    G = jac(seed, 2, d)
    if G[0] @ G[1] >= 0:
        G[1] = G[1] - 2 * (G[1] @ G[0]) / (G[0] @ G[0]) * G[0]  # reflect to force a conflict
    _, direction = run("pcgrad", G)
    g1 = G[0] - (G[0] @ G[1]) / (G[1] @ G[1]) * G[1]
    g2 = G[1] - (G[1] @ G[0]) / (G[0] @ G[0]) * G[0]
    torch.testing.assert_close(direction, g1 + g2)
    assert abs(float(g1 @ G[1])) < 1e-9
    assert abs(float(g2 @ G[0])) < 1e-9


def test_pcgrad_without_conflict_is_the_plain_sum_and_mean_divides_by_k():
    G = torch.tensor([[1.0, 0.0, 1.0], [0.5, 2.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    out, _ = run("pcgrad", G)
    torch.testing.assert_close(out.weights, torch.ones(3, dtype=torch.float64))
    out, _ = run("pcgrad", G, reduction="mean")
    torch.testing.assert_close(out.weights, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_pcgrad_seeded_order_is_reproducible():
    G = jac(1, 4, 3)
    a = [run("pcgrad", G, seed=4)[0].weights for _ in range(2)]
    assert torch.equal(a[0], a[1])


# --------------------------------------------------------------------------------------------- EDM
@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5), seeds)
def test_edm_weights_sum_to_one_and_direction_is_equiangular(k, seed):
    G = jac(seed, k, k + 3)
    out, direction = run("edm", G, solver="wolfe")
    assert out.weights.sum().item() == pytest.approx(1.0)
    simplex = torch.tensor(out.extras["edm_simplex_weights"])
    cos = (G @ direction) / (G.norm(dim=1) * direction.norm())
    support = simplex > 1e-9
    if support.all():  # interior min-norm point ⇒ equal angles with every task gradient
        torch.testing.assert_close(cos, cos[0].expand_as(cos), rtol=1e-7, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), seeds, st.lists(st.floats(0.1, 10), min_size=4, max_size=4))
def test_edm_direction_invariant_to_gradient_rescaling(k, seed, scales):
    G = jac(seed, k, 6)
    a = torch.tensor(scales[:k], dtype=torch.float64)[:, None]
    _, d1 = run("edm", G, solver="wolfe")
    _, d2 = run("edm", a * G, solver="wolfe")
    torch.testing.assert_close(d1 / d1.norm(), d2 / d2.norm(), rtol=1e-7, atol=1e-9)


def test_edm_two_tasks_closed_form_and_zero_gradient():
    G = jac(3, 2, 5)
    n = G.norm(dim=1)
    _, direction = run("edm", G)
    torch.testing.assert_close(direction, (G[0] * n[1] + G[1] * n[0]) / (n[0] + n[1]))
    G[1] = 0
    out, direction = run("edm", G)
    assert out.solver.status == "zero_gradient"
    assert "t1" in out.solver.message
    assert torch.count_nonzero(direction) == 0


# ------------------------------------------------------------------------------------------ IMTL-G
@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5), seeds)
def test_imtl_g_equal_projections_on_unit_gradients(k, seed):
    G = jac(seed, k, k + 2)
    for solver in ("pinv", "closed_form"):
        out, direction = run("imtl_g", G, solver=solver)
        assert out.weights.sum().item() == pytest.approx(1.0)
        proj = (G / G.norm(dim=1, keepdim=True)) @ direction
        torch.testing.assert_close(proj, proj[0].expand_as(proj), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(
        run("imtl_g", G)[0].weights, run("imtl_g", G, solver="closed_form")[0].weights
    )


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), seeds, st.lists(st.floats(0.1, 10), min_size=4, max_size=4))
def test_imtl_g_direction_invariant_to_gradient_rescaling(k, seed, scales):
    G = jac(seed, k, 6)
    a = torch.tensor(scales[:k], dtype=torch.float64)[:, None]
    out1, d1 = run("imtl_g", G)
    out2, d2 = run("imtl_g", a * G)
    # the line of d is invariant; its sign is that of Σv, which rescaling can flip (see below)
    sign = 1.0 if (out1.solver.status == "ascent") == (out2.solver.status == "ascent") else -1.0
    torch.testing.assert_close(d1 / d1.norm(), sign * d2 / d2.norm(), rtol=1e-7, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5), seeds)
def test_imtl_g_flags_an_ascent_direction(k, seed):
    """With Σw = 1 the common projection is 1/Σv: when Σv < 0, d ascends every task's loss."""
    G = jac(seed, k, k + 1)
    out, d = run("imtl_g", G)
    proj = (G / G.norm(dim=1, keepdim=True)) @ d
    if out.solver.status == "ascent":
        assert torch.all(proj < 0)
        assert "ascends" in out.solver.message
    else:
        assert torch.all(proj > 0)


def test_imtl_g_weight_bound_and_singular_closed_form():
    G = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.1, 0.1]], dtype=torch.float64)
    unbounded = run("imtl_g", G)[0].weights
    bounded = run("imtl_g", G, weight_bound=0.33)[0].weights
    assert unbounded.abs().max() > 0.33
    torch.testing.assert_close(bounded, unbounded * 0.33 / unbounded.abs().max())
    assert bounded.abs().max().item() == pytest.approx(0.33)
    duplicate = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="singular"):
        run("imtl_g", duplicate, solver="closed_form")
    # pinv: duplicates are one constraint twice, the projections are equalised exactly
    out, d = run("imtl_g", duplicate)
    assert out.solver.status == "ok"
    assert out.solver.residual <= 1e-9
    proj = (duplicate / duplicate.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(proj, proj.mean().expand(3))
    # three directions in a plane (K > D): no direction has equal projections on all of them
    plane = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.1]], dtype=torch.float64)
    out, d = run("imtl_g", plane)
    assert out.solver.status == "degenerate"
    assert out.solver.converged
    assert torch.equal(out.weights, torch.zeros(3, dtype=torch.float64))


def test_hybrid_imtl_uses_scaled_gradients_and_raw_scaled_heads():
    G = jac(5, 2, 4)
    losses = torch.tensor([0.5, 2.0], dtype=torch.float64)
    method = mtopt.make("imtl", level="param", lr=0.1)
    out = method.aggregate(MethodInput(losses, ("a", "b"), grads=G))
    torch.testing.assert_close(out.head_weights, torch.ones(2, dtype=torch.float64))  # s = 0
    torch.testing.assert_close(out.weights, run("imtl_g", G)[0].weights)
    s = method.scales.detach().clone()
    assert torch.all(torch.sign(s) == torch.sign(1 - losses))  # Adam moves s against eˢℓ − 1
    out2 = method.aggregate(MethodInput(losses, ("a", "b"), grads=G))
    scaled = torch.exp(s)[:, None] * G
    expected = run("imtl_g", scaled)[0].weights * torch.exp(s)
    torch.testing.assert_close(out2.weights, expected)
    torch.testing.assert_close(out2.head_weights, torch.exp(s))


# ------------------------------------------------------------------------------------------ CAGrad
@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), seeds, st.floats(0.05, 0.95))
def test_cagrad_ball_and_worst_task_improvement(k, seed, c):
    G = jac(seed, k, k + 3)
    _, d = run("cagrad", G, c=c, rescale=0, sum_scale=False)
    g0 = G.mean(0)
    assert (d - g0).norm().item() == pytest.approx(c * g0.norm().item(), rel=1e-5)
    worst = (G @ d).min()
    assert worst >= (G @ g0).min() - 1e-9
    rng = np.random.default_rng(seed)
    for _ in range(200):  # no point of the ball improves the worst task more (up to the solve)
        u = torch.from_numpy(rng.normal(size=G.shape[1]))
        other = g0 + c * g0.norm() * u / u.norm() * rng.uniform() ** (1 / G.shape[1])
        assert (G @ other).min() <= worst + 1e-6 * G.norm() ** 2


def test_cagrad_c_zero_is_the_scaled_mean_and_rescale_options():
    G = jac(2, 3, 5)
    torch.testing.assert_close(
        run("cagrad", G, c=0.0)[0].weights, torch.ones(3, dtype=torch.float64)
    )
    w1 = run("cagrad", G, c=0.5)[0].weights
    w0 = run("cagrad", G, c=0.5, rescale=0)[0].weights
    torch.testing.assert_close(w1, w0 / 1.25)
    w2 = run("cagrad", G, c=0.5, rescale=2, sum_scale=False)[0].weights
    torch.testing.assert_close(w2, w0 / 1.5 / 3)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="c must be"):
            mtopt.make("cagrad", c=bad)
    # c ≥ 1 is allowed (the paper: converges to a Pareto-stationary point)
    out = run("cagrad", G, c=1.5)[0]
    assert out.solver.converged
    assert out.solver.residual <= out.solver.tolerance


# --------------------------------------------------------------------- Gama & Grassi App. A.4 + bad
@pytest.mark.parametrize("name", ["cagrad", "imtl_g", "edm", "mgda", "nash_mtl", "upgrad", "cdtt"])
@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 8), seed=seeds)
def test_equal_norm_two_tasks_give_equal_weights(name, d, seed):
    G = jac(seed, 2, d, scale=0.0)
    G = G / G.norm(dim=1, keepdim=True)
    out, _ = run(name, G, normalization="none") if name == "mgda" else run(name, G)
    torch.testing.assert_close(out.weights[0], out.weights[1], rtol=1e-6, atol=1e-9)


BAD = {
    "zero": torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.5, -1.0]], dtype=torch.float64),
    "collinear": torch.tensor([[1.0, 2.0], [2.0, 4.0], [-1.0, -2.0]], dtype=torch.float64),
    "singular": torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64
    ),
    "single": torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize(
    "name",
    ["pcgrad", "edm", "imtl_g", "imtl", "cagrad", "mgda", "aligned_mtl", "upgrad", "nash_mtl"],
)
def test_degenerate_inputs_give_finite_documented_results(name, case):
    G = BAD[case]
    hp = {"level": "param"} if name == "imtl" else {}
    out, direction = run(name, G, **hp)
    assert torch.isfinite(out.weights).all()
    assert torch.isfinite(direction).all()
    if case == "zero" and name in ("edm", "mgda"):
        assert out.solver.status == "zero_gradient"


# ------------------------------------------------------------------------------------- Aligned-MTL
@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), seeds)
def test_aligned_gradients_are_orthogonal_with_equal_norm(k, seed):
    from mtopt.methods.aligned_mtl import aligned_weights

    G = jac(seed, k, k + 2)
    M = G @ G.T
    eigvals, eigvecs = torch.linalg.eigh(M)
    B = torch.sqrt(eigvals.min()) * (eigvecs * eigvals.rsqrt()) @ eigvecs.T
    aligned = B @ G
    torch.testing.assert_close(aligned @ aligned.T, eigvals.min() * torch.eye(k, dtype=M.dtype))
    w, rank, residual = aligned_weights(M)
    assert rank == k
    assert residual <= 1e-12
    torch.testing.assert_close(w @ G, aligned.sum(0))


def test_aligned_mtl_leaves_orthonormal_inputs_unchanged_and_is_permutation_invariant():
    G = torch.eye(3, 5, dtype=torch.float64)
    out, _ = run("aligned_mtl", G)
    torch.testing.assert_close(out.weights, torch.ones(3, dtype=torch.float64))
    G = jac(8, 4, 6)
    perm = torch.tensor([2, 0, 3, 1])
    w = run("aligned_mtl", G)[0].weights
    torch.testing.assert_close(run("aligned_mtl", G[perm])[0].weights, w[perm])
    mean = run("aligned_mtl", G, reduction="mean")[0].weights
    torch.testing.assert_close(mean, w / 4)


# ------------------------------------------------------------------------------------------ UPGrad
@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(1, 8), seeds)
def test_upgrad_direction_does_not_conflict_and_weights_dominate_preference(k, d, seed):
    G = jac(seed, k, d)
    out, direction = run("upgrad", G, reg_eps=0.0)
    assert torch.all(out.weights >= 1 / k - 1e-9)
    assert torch.all(G @ direction >= -1e-9 * (G.norm(dim=1) ** 2).sum())
    assert out.solver.converged


def test_upgrad_without_conflict_is_the_mean_and_is_homogeneous():
    G = torch.tensor([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.0, 0.4, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(
        run("upgrad", G)[0].weights, torch.full((3,), 1 / 3, dtype=torch.float64)
    )
    H = jac(9, 3, 4)
    _, d1 = run("upgrad", H)
    _, d2 = run("upgrad", 3.0 * H)
    torch.testing.assert_close(d2, 3.0 * d1)


def test_box_lower_qp_meets_kkt():
    from mtopt.core.qp import box_lower_qp

    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(1, 7))
        A = rng.normal(size=(k, k))
        M = A @ A.T + 1e-3 * np.eye(k)
        lower = rng.normal(size=k)
        v, ok = box_lower_qp(M, lower)
        grad = 2 * M @ v
        assert ok
        assert np.all(v >= lower - 1e-12)
        assert np.all(grad >= -1e-9)
        assert np.all(np.abs(grad * (v - lower)) <= 1e-9)


# ---------------------------------------------------------------------------------------- Nash-MTL
@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5), seeds)
def test_nash_bargaining_solution(k, seed):
    G = jac(seed, k, k + 2)
    out, d = run("nash_mtl", G, max_norm=0.0)
    alpha = out.weights
    assert out.solver.converged
    assert torch.all(alpha > 0)
    torch.testing.assert_close(
        alpha * (G @ d), torch.ones(k, dtype=torch.float64), rtol=1e-7, atol=0
    )
    assert (d @ d).item() == pytest.approx(k, rel=1e-7)
    assert torch.all(G @ d > 0)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), seeds, st.floats(0.01, 100.0))
def test_nash_scaling_all_gradients_scales_alpha_inversely(k, seed, c):
    G = jac(seed, k, k + 1)
    out1, d1 = run("nash_mtl", G, max_norm=0.0)
    out2, d2 = run("nash_mtl", c * G, max_norm=0.0)
    torch.testing.assert_close(out2.weights, out1.weights / c, rtol=1e-6, atol=0)
    torch.testing.assert_close(d2, d1, rtol=1e-6, atol=1e-9)


def test_nash_max_norm_clips_the_shared_update_but_not_the_heads():
    G = 0.01 * jac(4, 3, 5)
    out, d = run("nash_mtl", G, max_norm=1.0)
    assert d.norm().item() == pytest.approx(1.0)
    alpha = torch.tensor(out.extras["nash_alpha"], dtype=torch.float64)
    torch.testing.assert_close(out.head_weights, alpha)
    torch.testing.assert_close(out.weights, alpha / (alpha @ G).norm())


def test_nash_has_no_solution_when_zero_is_in_the_hull_and_never_reuses_old_weights():
    method = mtopt.make("nash_mtl", max_norm=0.0)
    good = jac(1, 2, 3)
    first = method.aggregate(
        MethodInput(torch.ones(2, dtype=torch.float64), ("a", "b"), grads=good)
    )
    assert first.solver.status == "converged"
    opposite = torch.tensor([[1.0, 1.0], [-2.0, -2.0]], dtype=torch.float64)  # no αᵢ gᵢᵀd = 1
    out = method.aggregate(
        MethodInput(torch.ones(2, dtype=torch.float64), ("a", "b"), grads=opposite)
    )
    # defined: no direction improves both tasks, so the shared update is 0; heads weight 1
    assert out.solver.status == "stationary"
    assert out.solver.converged
    assert "no direction improves every task" in out.solver.message
    assert torch.equal(out.weights, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(out.head_weights, torch.ones(2, dtype=torch.float64))


def test_nash_leaves_a_zero_gradient_task_out_of_the_bargaining():
    G = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.2, 1.0, 0.3]], dtype=torch.float64)
    out = mtopt.make("nash_mtl", max_norm=0.0).aggregate(
        MethodInput(torch.ones(3, dtype=torch.float64), ("a", "z", "b"), grads=G)
    )
    assert out.solver.converged
    assert out.solver.residual <= 1e-9
    alpha = out.weights
    assert alpha[1] == 0.0
    assert out.head_weights[1] == 1.0
    gains = alpha * (G @ (alpha @ G))
    torch.testing.assert_close(gains[[0, 2]], torch.ones(2, dtype=torch.float64))
    # the others bargain exactly as without the zero task
    alone = mtopt.make("nash_mtl", max_norm=0.0).aggregate(
        MethodInput(torch.ones(2, dtype=torch.float64), ("a", "b"), grads=G[[0, 2]])
    )
    torch.testing.assert_close(alpha[[0, 2]], alone.weights)


def test_nash_update_weights_every_reuses_alpha_in_between():
    method = mtopt.make("nash_mtl", update_weights_every=3, max_norm=0.0)
    G = jac(2, 2, 4)
    outs = [
        method.aggregate(
            MethodInput(torch.ones(2, dtype=torch.float64), ("a", "b"), grads=(1 + i) * G)
        )
        for i in range(4)
    ]
    assert outs[0].solver is not None
    assert outs[1].solver is None
    assert outs[2].solver is None
    torch.testing.assert_close(outs[1].weights, outs[0].weights)
    assert outs[3].solver is not None
    torch.testing.assert_close(outs[3].weights, outs[0].weights / 4, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ DB-MTL
def db_step(method, G, losses):
    ins = MethodInput(torch.tensor(losses, dtype=torch.float64), ("a", "b", "c")[: len(losses)], G)
    return method.aggregate(ins)


def test_db_mtl_rescales_every_task_to_the_largest_norm_and_follows_the_ema():
    method = mtopt.make("db_mtl", beta=0.9)
    G1, G2 = jac(1, 3, 5), jac(2, 3, 5)
    l1, l2 = [0.5, 2.0, 1.0], [0.4, 1.5, 1.2]
    db_step(method, G1, l1)
    out = db_step(method, G2, l2)
    log1 = G1 / (torch.tensor(l1, dtype=torch.float64)[:, None] + 1e-8)
    log2 = G2 / (torch.tensor(l2, dtype=torch.float64)[:, None] + 1e-8)
    buffer = log2 + 0.9 * ((1 - 0.9) * log1 - log2)
    norms = buffer.norm(dim=1)
    scaled = (norms.max() / (norms + 1e-8))[:, None] * buffer
    torch.testing.assert_close(out.direction, scaled.sum(0))
    torch.testing.assert_close(
        scaled.norm(dim=1), torch.full((3,), float(norms.max()), dtype=torch.float64)
    )
    torch.testing.assert_close(out.head_weights, 1 / (torch.tensor(l2, dtype=torch.float64) + 1e-8))


def test_db_mtl_is_invariant_to_loss_rescaling():
    a, b = mtopt.make("db_mtl"), mtopt.make("db_mtl")
    c = torch.tensor([3.0, 0.2, 7.0], dtype=torch.float64)
    for seed in range(3):
        G = jac(seed, 3, 4)
        losses = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) * (seed + 1)
        da = db_step(a, G, losses.tolist()).direction
        db = db_step(b, c[:, None] * G, (c * losses).tolist()).direction
        torch.testing.assert_close(da, db, rtol=1e-6, atol=1e-9)


# -------------------------------------------------------------------------------------------- CDTT
def cdtt_steps(method, G, losses, n):
    return [
        method.aggregate(
            MethodInput(
                torch.tensor(losses, dtype=torch.float64), ("a", "b", "c")[: len(losses)], G
            )
        )
        for _ in range(n)
    ]


def test_cdtt_equals_edm_during_the_first_h_steps():
    G = jac(3, 3, 5)
    outs = cdtt_steps(mtopt.make("cdtt", history=4), G, [1.0, 2.0, 0.5], 4)
    edm = run("edm", G)[0].weights
    for out in outs:
        torch.testing.assert_close(out.weights, edm)


def test_cdtt_equal_tasks_keep_the_mean_and_alpha_zero_gives_unit_tension():
    G = jac(4, 2, 6, scale=0.0)
    G = G / G.norm(dim=1, keepdim=True)
    outs = cdtt_steps(mtopt.make("cdtt", history=3, alpha=0.7), G, [0.8, 0.8], 6)
    for out in outs:
        torch.testing.assert_close(out.weights, torch.full((2,), 0.5, dtype=torch.float64))
    outs = cdtt_steps(mtopt.make("cdtt", history=3, alpha=0.0), jac(5, 3, 4), [1.0, 2.0, 3.0], 5)
    assert outs[-1].extras["cdtt_tension"] == pytest.approx([1.0, 1.0, 1.0])
    from mtopt.methods.cdtt import tension

    assert tension(np.array([1.0]), 0.4)[0] == pytest.approx(0.4 / 2 + 0.6)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), seeds)
def test_cdtt_direction_check_in_vector_space(d, seed):
    """A direction more than 90° from g_0 is bent to be orthogonal to it, with length
    tan(β)‖g_0‖, β = π − ∠(g_0, d − g_0); directions within 90° of every task are left alone."""
    from mtopt.methods.cdtt import direction_check

    G = jac(seed, 2, d)
    M = (G @ G.T).numpy()
    omega = np.array([-1.0, 0.3])  # d = -g_0 + 0.3 g_1
    vec = torch.from_numpy(omega) @ G
    if float(G[0] @ vec) >= 0 or float(G[1] @ vec) < 0:
        return  # only the single-violation case has a closed form to compare with
    out = torch.from_numpy(direction_check(M, omega)) @ G
    diff = vec - G[0]
    # the angle by atan2 (arccos loses half the digits near 0 and π)
    along = float(G[0] @ diff) / G[0].norm().item()
    across = (diff - (G[0] @ diff) / (G[0] @ G[0]) * G[0]).norm().item()
    beta = np.pi - np.arctan2(across, along)
    assert abs(float(G[0] @ out)) < 1e-9 * float(G[0].norm() * out.norm())
    assert out.norm().item() == pytest.approx(np.tan(beta) * G[0].norm().item(), rel=1e-9)
    unit = G[0] / G[0].norm()
    w = vec - (vec @ unit) * unit
    torch.testing.assert_close(out / out.norm(), w / w.norm())
    fine = np.array([1.0, 1.0]) if float(G[0] @ G[1]) >= 0 else np.array([1.0, 0.0])
    if float(torch.from_numpy(fine) @ G @ G[1]) >= 0:
        np.testing.assert_array_equal(direction_check(M, fine), fine)


# ---------------------------------------------------------------------------------------- GradDrop
def graddrop_inputs(features, grads):
    k = grads.shape[0]
    return MethodInput(
        torch.ones(k, dtype=torch.float64),
        tuple("abcd"[:k]),
        grads=grads.reshape(k, -1),
        features=features,
    )


def test_graddrop_keeps_everything_when_signs_agree_or_leak_is_one():
    torch.manual_seed(0)
    features = torch.rand(4, 3, dtype=torch.float64) + 0.1  # positive activations
    grads = torch.rand(2, 4, 3, dtype=torch.float64) + 0.1  # every task pushes the same way
    for _ in range(20):
        out = mtopt.make("graddrop").aggregate(graddrop_inputs(features, grads))
        torch.testing.assert_close(out.direction, grads.sum(0).reshape(-1))
    mixed = torch.randn(3, 4, 3, dtype=torch.float64)
    out = mtopt.make("graddrop", leak=1.0).aggregate(graddrop_inputs(features, mixed))
    torch.testing.assert_close(out.direction, mixed.sum(0).reshape(-1))
    out = mtopt.make("graddrop", renormalize=True).aggregate(graddrop_inputs(features, mixed))
    assert out.direction.norm().item() == pytest.approx(mixed.sum(0).norm().item())


def test_graddrop_keeps_the_positive_side_with_probability_purity():
    from mtopt.methods.graddrop import graddrop_direction

    features = torch.ones(1, 1, dtype=torch.float64)
    grads = torch.tensor([[[3.0]], [[-1.0]]], dtype=torch.float64).reshape(2, 1)  # P = 3/4
    kept_positive = 0
    n = 4000
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        u = torch.rand(1, generator=gen, dtype=torch.float64)
        out = graddrop_direction(features, grads, u)
        assert out.item() in (3.0, -1.0)  # exactly one side survives
        kept_positive += out.item() == 3.0
    assert abs(kept_positive / n - 0.75) < 0.03


@pytest.mark.parametrize("name", ["pcgrad", "graddrop"])
def test_seeded_methods_resume_their_random_stream(name):
    G = jac(6, 3, 4)
    feats = torch.rand(2, 2, dtype=torch.float64)
    make_inputs = lambda: MethodInput(  # noqa: E731
        torch.ones(3, dtype=torch.float64), ("a", "b", "c"), grads=G, features=feats
    )
    a = mtopt.make(name, seed=11)
    a.aggregate(make_inputs())
    b = mtopt.make(name, seed=11)
    b.load_state_dict(a.state_dict())
    out_a, out_b = a.aggregate(make_inputs()), b.aggregate(make_inputs())
    got_a = out_a.weights if out_a.weights is not None else out_a.direction
    got_b = out_b.weights if out_b.weights is not None else out_b.direction
    assert torch.equal(got_a, got_b)
    with pytest.raises(ValueError, match="no seed"):
        mtopt.make(name).load_state_dict({**a.state_dict(), "hparams": mtopt.make(name).hparams})


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), seeds, st.floats(0.05, 1.5), st.booleans())
def test_cagrad_two_task_dual_is_exact(d, seed, c, cancelling):
    from mtopt.core.ball_maxmin import ball_maxmin

    G = jac(seed, 2, d).numpy()
    if cancelling:  # nearly opposite gradients: the hard, badly conditioned case
        G[1] = -1.3 * G[0] + 1e-4 * np.random.default_rng(seed).normal(size=d)
    M = G @ G.T
    res = ball_maxmin(M, c)
    b, s = M.sum(1) / 2, c * np.sqrt(max(M.mean(), 0.0))
    xs = np.linspace(0.0, 1.0, 20001)
    grid = np.stack([xs, 1 - xs], 1)
    values = grid @ b + s * np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", grid, M, grid), 0.0))
    w = res.dual
    ours = float(w @ b + s * np.sqrt(max(w @ M @ w, 0.0)))
    scale = np.sqrt(M.diagonal().max()) * (np.sqrt(max(M.mean(), 0.0)) + s)
    assert res.converged
    assert res.gap <= 1e-10
    # (near 0, √(wᵀMw) computed naively carries √ε of rounding: allowed for)
    sqrt_noise = s * np.sqrt(8 * np.finfo(float).eps * float(np.abs(w) @ np.abs(M) @ np.abs(w)))
    assert ours <= values.min() + 1e-12 * scale + sqrt_noise
    # the primal: d = Gᵀv in the ball, its worst gain equal to the dual value (strong duality)
    direction = G.T @ res.weights
    assert np.linalg.norm(direction - G.mean(0)) <= s * (1 + 1e-9) + 1e-15 * scale
    assert (G @ direction).min() >= ours - 1e-9 * scale - sqrt_noise
