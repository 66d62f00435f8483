"""Loss-based methods: each one's documented properties, on random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtopt
from _context import make_context
from mtopt.core.method import MethodInput

pos_losses = st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=6)


def inputs(losses, names=None, **kw) -> MethodInput:
    t = torch.as_tensor(losses, dtype=torch.float64)
    names = names or tuple(f"t{i}" for i in range(t.numel()))
    return MethodInput(t, tuple(names), **kw)


def shared_grad(method, loss_scales, seed=0):
    """Shared-parameter gradient written by the engine for losses a_k · ℓ_k on a tiny model."""
    torch.manual_seed(seed)
    enc = torch.nn.Linear(3, 4).double()
    heads = [torch.nn.Linear(4, 1).double() for _ in loss_scales]
    x = torch.randn(8, 3, dtype=torch.float64)
    params = [*enc.parameters(), *(p for h in heads for p in h.parameters())]
    mto = mtopt.MultiTaskOptimizer(torch.optim.SGD(params, lr=0.0), method, shared=enc.parameters())

    def closure():
        z = torch.tanh(enc(x))
        return [
            a * (h(z) - k).pow(2).mean()
            for k, (a, h) in enumerate(zip(loss_scales, heads, strict=True))
        ]

    mto.step(closure)
    return torch.cat([p.grad.reshape(-1) for p in enc.parameters()])


# ---------------------------------------------------------------------------------------------- SI
@settings(max_examples=60, deadline=None)
@given(pos_losses)
def test_si_weights_are_inverse_losses(losses):
    w = mtopt.make("si").aggregate(inputs(losses)).weights
    torch.testing.assert_close(w, 1.0 / torch.tensor(losses, dtype=torch.float64))
    w_mean = mtopt.make("si", reduction="mean").aggregate(inputs(losses)).weights
    torch.testing.assert_close(w_mean, w / len(losses))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.05, 20.0), min_size=3, max_size=3))
def test_si_gradient_is_invariant_to_loss_rescaling(scales):
    base = shared_grad(mtopt.make("si"), [1.0, 1.0, 1.0])
    scaled = shared_grad(mtopt.make("si"), scales)
    torch.testing.assert_close(scaled, base, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["si", "gls", "uw", "imtl_l", "famo", "go4align"])
@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_log_based_methods_reject_invalid_losses(name, bad):
    """Negative losses are refused by all; an exact 0 (float32 NLL on an easy batch) only by the
    methods that take its logarithm (SI without eps, GLS)."""
    method = mtopt.make(name)
    if bad == 0.0 and name not in ("si", "gls"):
        out = method.aggregate(inputs([1.0, bad, 2.0]))
        assert torch.isfinite(out.weights).all()
        return
    with pytest.raises(ValueError, match="t1=") as err:
        method.aggregate(inputs([1.0, bad, 2.0]))
    assert name in str(err.value)


# --------------------------------------------------------------------------------------------- GLS
@settings(max_examples=60, deadline=None)
@given(pos_losses)
def test_gls_weights_are_the_gradient_of_the_geometric_mean(losses):
    t = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(torch.exp(torch.log(t).mean()), t)
    torch.testing.assert_close(mtopt.make("gls").aggregate(inputs(losses)).weights, expected)


def test_gls_with_one_task_is_the_plain_loss():
    assert mtopt.make("gls").aggregate(inputs([3.7])).weights.tolist() == pytest.approx([1.0])


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0.05, 20.0), min_size=3, max_size=3))
def test_gls_rescaling_keeps_the_direction(scales):
    base = shared_grad(mtopt.make("gls"), [1.0, 1.0, 1.0])
    scaled = shared_grad(mtopt.make("gls"), scales)
    factor = math.prod(scales) ** (1 / 3)
    torch.testing.assert_close(scaled, factor * base, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------- RLW
@pytest.mark.parametrize("distribution", ["normal", "dirichlet"])
@pytest.mark.parametrize("sum_to", ["one", "k"])
def test_rlw_weights_positive_sum_and_unbiased(distribution, sum_to):
    k = 4
    method = mtopt.make("rlw", distribution=distribution, sum_to=sum_to, seed=3)
    draws = torch.stack([method.aggregate(inputs([1.0] * k)).weights for _ in range(4000)])
    target = 1.0 if sum_to == "one" else float(k)
    assert torch.all(draws > 0)
    torch.testing.assert_close(draws.sum(1), torch.full((4000,), target, dtype=torch.float64))
    mean = draws.mean(0) / target
    assert torch.allclose(mean, torch.full((k,), 1 / k, dtype=torch.float64), atol=0.01)


def test_rlw_dirichlet_one_is_uniform_on_the_simplex():
    method = mtopt.make("rlw", distribution="dirichlet", seed=0)
    first = np.array([float(method.aggregate(inputs([1.0, 1.0])).weights[0]) for _ in range(6000)])
    assert abs(first.mean() - 0.5) < 0.015
    assert abs(first.var() - 1 / 12) < 0.005


def test_rlw_is_reproducible_and_resumable():
    a = mtopt.make("rlw", seed=5)
    b = mtopt.make("rlw", seed=5)
    first = [a.aggregate(inputs([1.0] * 3)).weights for _ in range(3)]
    assert all(torch.equal(x, b.aggregate(inputs([1.0] * 3)).weights) for x in first)
    state = a.state_dict()
    nxt = a.aggregate(inputs([1.0] * 3)).weights
    c = mtopt.make("rlw", seed=5)
    c.load_state_dict(state)
    assert torch.equal(c.aggregate(inputs([1.0] * 3)).weights, nxt)
    torch.manual_seed(0)
    g1 = mtopt.make("rlw").aggregate(inputs([1.0] * 3)).weights
    torch.manual_seed(0)
    assert torch.equal(g1, mtopt.make("rlw").aggregate(inputs([1.0] * 3)).weights)


# --------------------------------------------------------------------------------------------- DWA
def run_epochs(method, epoch_losses, steps=3):
    out = []
    for losses in epoch_losses:
        out.extend(method.aggregate(inputs(losses)).weights for _ in range(steps))
        method.end_epoch()
    return out


def test_dwa_epoch_identical_histories_give_ones():
    weights = run_epochs(mtopt.make("dwa"), [[2.0, 2.0], [1.5, 1.5], [1.0, 1.0], [0.8, 0.8]])
    for w in weights:
        torch.testing.assert_close(w, torch.ones(2, dtype=torch.float64))


def test_dwa_epoch_slower_task_gets_larger_weight_and_sum_is_k():
    method = mtopt.make("dwa")
    weights = run_epochs(method, [[2.0, 2.0, 2.0], [1.0, 1.8, 1.5], [0.5, 1.7, 1.0]])
    first_two = weights[:6]
    assert all(torch.equal(w, torch.ones(3, dtype=torch.float64)) for w in first_two)
    w = weights[-1]  # epoch 3 uses the ratios of epochs 2 / 1: (0.5, 0.9, 0.75)
    assert w.sum().item() == pytest.approx(3.0)
    assert w[1] > w[2] > w[0]
    ratios = torch.tensor([0.5, 0.9, 0.75], dtype=torch.float64)
    torch.testing.assert_close(w, 3 * torch.softmax(ratios / 2.0, 0))


def test_dwa_high_temperature_is_uniform():
    method = mtopt.make("dwa", temperature=1e9)
    w = run_epochs(method, [[2.0, 2.0], [0.1, 1.9], [0.01, 1.8]])[-1]
    torch.testing.assert_close(w, torch.ones(2, dtype=torch.float64))


def test_dwa_window_mode():
    method = mtopt.make("dwa", mode="window", window=3)
    ws = [method.aggregate(inputs([1.0, 1.0])).weights for _ in range(3)]
    assert all(torch.equal(w, torch.full((2,), 0.5, dtype=torch.float64)) for w in ws)
    for losses in ([1.0, 1.0], [1.0, 1.0], [0.1, 1.0]):
        w = method.aggregate(inputs(losses)).weights
    # FIFO of 6 (ones, then the 6 pushed values): oldest 3 = (1,1)x3, newest 3 = mean (0.7, 1.0)
    ratios = torch.tensor([0.7, 1.0], dtype=torch.float64)
    torch.testing.assert_close(w, torch.softmax(ratios / 2.0, 0))
    assert w.sum().item() == pytest.approx(1.0)


def test_dwa_state_round_trip():
    a = mtopt.make("dwa")
    run_epochs(a, [[2.0, 1.0], [1.0, 0.9]])
    b = mtopt.make("dwa")
    b.load_state_dict(a.state_dict())
    assert torch.equal(
        a.aggregate(inputs([0.5, 0.5])).weights, b.aggregate(inputs([0.5, 0.5])).weights
    )


# -------------------------------------------------------------------------------------- UW, IMTL-L
@settings(max_examples=10, deadline=None)
@given(st.lists(st.floats(0.05, 20.0), min_size=2, max_size=4))
def test_uw_common_stationary_point_is_log_loss(losses):
    method = mtopt.make("uw", lr=0.05)
    for _ in range(1500):
        w = method.aggregate(inputs(losses)).weights
    ell = torch.tensor(losses, dtype=torch.float64)
    torch.testing.assert_close(method.scales.detach(), torch.log(ell), atol=2e-3, rtol=0)
    torch.testing.assert_close(w, 1 / (2 * ell), rtol=5e-3, atol=0)


def test_uw_scale_gradient_is_exact():
    method = mtopt.make("uw", optimizer="sgd", lr=1.0, init=0.3)
    out = method.aggregate(inputs([2.0, 0.5]))
    s0 = torch.tensor([0.3, 0.3], dtype=torch.float64)
    torch.testing.assert_close(out.weights, 0.5 * torch.exp(-s0))
    grad = 0.5 * (1 - torch.exp(-s0) * torch.tensor([2.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(method.scales.detach(), s0 - grad)


def test_uw_equal_losses_equal_weights_and_typed_form():
    w = mtopt.make("uw").aggregate(inputs([0.7, 0.7, 0.7])).weights
    assert torch.all(w == w[0])
    typed = mtopt.make("uw", variant="typed", loss_types=["regression", "classification", "l1"])
    losses = [0.4, 1.3, 2.2]
    for _ in range(2000):
        typed.aggregate(inputs(losses))
    p, f = torch.tensor([2.0, 2.0, 1.0]), torch.tensor([2.0, 1.0, 1.0])
    expected = torch.log(p * torch.tensor(losses) / f) / p  # e^{pη} = pℓ/f
    torch.testing.assert_close(typed.scales.detach().float(), expected, atol=3e-3, rtol=0)


def test_uw_typed_takes_loss_types_from_the_engine_or_says_what_is_missing():
    with pytest.raises(ValueError, match="loss type"):
        mtopt.make("uw", variant="typed").aggregate(inputs([1.0, 2.0]))
    out = mtopt.make("uw", variant="typed", init=0.0).aggregate(
        inputs([1.0, 2.0], loss_types=("classification", "regression"))
    )
    torch.testing.assert_close(out.weights, torch.tensor([1.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^uw: loss_types must be 'regression'.*'gaussian'"):
        mtopt.make("uw", loss_types=["gaussian"])


def test_imtl_l_drives_scaled_losses_to_one():
    method = mtopt.make("imtl_l", lr=0.05)
    losses = [0.05, 1.0, 30.0]
    for _ in range(2000):
        w = method.aggregate(inputs(losses)).weights
    torch.testing.assert_close(w * torch.tensor(losses, dtype=torch.float64),
                               torch.ones(3, dtype=torch.float64), atol=5e-3, rtol=0)  # fmt: skip
    sgd = mtopt.make("imtl_l", optimizer="sgd", lr=1.0)
    sgd.aggregate(inputs([2.0, 0.5]))
    torch.testing.assert_close(sgd.scales.detach(), -torch.tensor([1.0, -0.5], dtype=torch.float64))


def test_learned_scales_state_round_trip():
    a = mtopt.make("uw")
    for _ in range(5):
        a.aggregate(inputs([1.0, 3.0]))
    b = mtopt.make("uw")
    b.load_state_dict(a.state_dict())
    assert torch.equal(
        a.aggregate(inputs([1.0, 3.0])).weights, b.aggregate(inputs([1.0, 3.0])).weights
    )
    assert torch.equal(a.scales, b.scales)


LEARNED_SCALES = [
    ("uw", {}),
    ("uw", {"variant": "typed", "loss_types": ["regression", "classification", "l1"] * 2}),
    ("imtl_l", {}),
]


@pytest.mark.parametrize(("name", "hparams"), LEARNED_SCALES)
@settings(max_examples=30, deadline=None)
@given(
    losses=st.lists(st.floats(0.0, 1e3), min_size=6, max_size=6),
    scales=st.lists(st.floats(-5, 5), min_size=6, max_size=6),
)
def test_learned_scales_closed_form_equals_autograd_of_the_objective(name, hparams, losses, scales):
    method = mtopt.make(name, **hparams)
    inp = inputs(losses)
    s = torch.tensor(scales, dtype=torch.float64, requires_grad=True)
    ell = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    value = method.objective(s, ell, inp)
    d_ell, d_s = torch.autograd.grad(value, [ell, s])
    closed_value, weights, grad_s = method.derivatives(scales, losses, inp)
    # float64 either way: equal to rounding, relative to the size of the terms that cancel
    size = 1.0 + 2 * float((d_ell * ell.detach()).abs().max())
    f64 = torch.float64
    torch.testing.assert_close(torch.tensor(weights, dtype=f64), d_ell, rtol=1e-14, atol=0)
    torch.testing.assert_close(torch.tensor(grad_s, dtype=f64), d_s, rtol=0, atol=1e-14 * size)
    assert closed_value == pytest.approx(float(value.detach()), rel=1e-13, abs=1e-13 * size)


# -------------------------------------------------------------------------------------------- FAMO
def famo_toy(scales, gamma=0.01, steps=5):
    """Two linear-regression tasks on one shared parameter vector, run through the engine."""
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randn(16, dtype=torch.float64)
    mto = mtopt.MultiTaskOptimizer(torch.optim.SGD([theta], lr=0.05), "famo", gamma=gamma)
    infos = [
        mto.step(lambda: [a * ((x @ theta - y) ** 2).mean() + 0.1 for a in scales])
        for _ in range(steps)
    ]
    return mto, infos


def test_famo_equal_losses_keep_equal_weights():
    mto, infos = famo_toy([1.0, 1.0], steps=8)
    for info in infos:
        torch.testing.assert_close(info.weights, torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.allclose(mto.method.logits.detach(), torch.zeros(2, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=5),
    st.lists(st.floats(-2, 2), min_size=5, max_size=5),
)
def test_famo_weights_sum_to_one(losses, logits):
    method = mtopt.make("famo")
    method._ensure(len(losses))
    with torch.no_grad():
        method.logits.copy_(torch.tensor(logits[: len(losses)], dtype=torch.float64))
    w = method.aggregate(inputs(losses)).weights
    assert w.sum().item() == pytest.approx(1.0)
    assert torch.all(w > 0)


def test_famo_task_that_improved_more_loses_weight():
    method = mtopt.make("famo", gamma=0.0)
    before = inputs([1.0, 1.0])
    w0 = method.aggregate(before).weights
    # task 0 fell faster
    method.after_step(before, make_context(lambda: torch.tensor([0.5, 0.9], dtype=torch.float64)))
    w1 = method.aggregate(inputs([1.0, 1.0])).weights
    assert w1[0] < w0[0]
    assert w1[1] > w0[1]


def test_famo_runs_its_post_step_update_through_the_engine():
    _, infos = famo_toy([1.0, 3.0], steps=3)
    assert all("famo_delta" in i.extras and "after_step" in i.times for i in infos)
    assert infos[-1].weights[0] != infos[0].weights[0]


def test_max_grad_norm_clips_the_shared_gradient():
    theta = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    mto = mtopt.MultiTaskOptimizer(torch.optim.SGD([theta], lr=0.0), "unitary", max_grad_norm=1.0)
    mto.step(lambda: [10 * theta.sum(), 10 * theta.sum()])
    assert theta.grad.norm().item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- GO4Align
def brute_force_kmeans_cost(values, groups):
    """Least within-group SSE over all partitions of the sorted values into contiguous groups."""
    import itertools

    x = sorted(values)
    best = math.inf
    for cuts in itertools.combinations(range(1, len(x)), min(groups, len(x)) - 1):
        bounds = [0, *cuts, len(x)]
        cost = 0.0
        for a, b in itertools.pairwise(bounds):
            seg = x[a:b]
            m = sum(seg) / len(seg)
            cost += sum((v - m) ** 2 for v in seg)
        best = min(best, cost)
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=7), st.integers(1, 4))
def test_kmeans_1d_is_globally_optimal(values, groups):
    from mtopt.methods.go4align import kmeans_1d

    labels = kmeans_1d(np.array(values), groups)
    cost = 0.0
    for g in set(labels.tolist()):
        seg = [v for v, lab in zip(values, labels, strict=True) if lab == g]
        m = sum(seg) / len(seg)
        cost += sum((v - m) ** 2 for v in seg)
    assert cost <= brute_force_kmeans_cost(values, groups) + 1e-9


def loop_kmeans_1d(values, groups):
    """The plain triple-loop dynamic program (first minimiser wins), for comparison."""
    n = len(values)
    groups = min(groups, n)
    order = np.argsort(values, kind="stable")
    x = np.asarray(values, dtype=np.float64)[order]
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])
    cost = np.full((groups + 1, n + 1), np.inf)
    cut = np.zeros((groups + 1, n + 1), dtype=np.int64)
    cost[0, 0] = 0.0
    for g in range(1, groups + 1):
        for j in range(g, n + 1):
            for i in range(g - 1, j):
                d = s1[j] - s1[i]
                c = cost[g - 1, i] + (s2[j] - s2[i] - d * d / (j - i))
                if c < cost[g, j]:
                    cost[g, j], cut[g, j] = c, i
    labels = np.empty(n, dtype=np.int64)
    j = n
    for g in range(groups, 0, -1):
        labels[order[cut[g, j] : j]] = g - 1
        j = cut[g, j]
    return labels


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(-10, 10), st.sampled_from([0.0, 1.0, 2.0])), min_size=1, max_size=9
    ),
    st.integers(1, 5),
)
def test_kmeans_1d_equals_the_plain_dynamic_program(values, groups):
    """Same labels as the loop form, ties (repeated values, equal costs) included."""
    from mtopt.methods.go4align import kmeans_1d

    expected = loop_kmeans_1d(values, groups)
    assert kmeans_1d(np.array(values), groups).tolist() == expected.tolist()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 10.0), min_size=2, max_size=6))
def test_go4align_one_group_shares_one_weight_and_k_groups_keep_omega(losses):
    one = mtopt.make("go4align").aggregate(inputs(losses))
    omega = torch.tensor(one.extras["go4align_omega"], dtype=torch.float64)
    torch.testing.assert_close(one.weights, torch.full_like(omega, float(omega.mean())))
    k = mtopt.make("go4align", num_groups=len(losses)).aggregate(inputs(losses))
    torch.testing.assert_close(
        k.weights, torch.tensor(k.extras["go4align_omega"], dtype=torch.float64)
    )


def test_go4align_equal_losses_keep_p_uniform_and_weights_one():
    method = mtopt.make("go4align", eta=0.5, num_groups=2)
    for _ in range(5):
        w = method.aggregate(inputs([0.3, 0.3, 0.3])).weights
    torch.testing.assert_close(method.p, torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(w, torch.ones(3, dtype=torch.float64))


def test_go4align_robust_update_shifts_mass_away_from_high_loss():
    method = mtopt.make("go4align", eta=0.1)
    method.aggregate(inputs([1.0, 5.0]))
    expected = torch.tensor([math.exp(-0.1), math.exp(-0.5)], dtype=torch.float64)
    torch.testing.assert_close(method.p, expected / expected.sum())
