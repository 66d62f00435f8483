"""APT (Zhou et al.; an EXPERIMENTAL reconstruction): adaptive momentum on Adam and Muon, and
Muon's light direction preservation; plus the APT-free Adam against ``torch.optim.Adam``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mtopt
from mtopt.optim import Adam, Muon, newton_schulz
from mtopt.optim.apt import agreement, apt_beta, halfspace, reinject

seeds = st.integers(0, 2**31 - 1)


def param(shape, seed=0, dtype=torch.float32) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype))


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


def make(kind: str, params, **kw):
    if kind == "adam":
        return Adam(params, lr=1e-2, **kw)
    return Muon([{"params": params, "use_muon": True}], ns_dtype=torch.float32, **kw)


# ----------------------------------------------------------------------------- beta schedule
@settings(max_examples=60, deadline=None)
@given(st.floats(-1.0, 1.0), st.floats(0.0, 0.99), st.floats(0.0, 0.99))
def test_apt_beta_is_affine_in_kappa_and_within_range(kappa, a, b):
    lo, hi = min(a, b), max(a, b)
    beta = apt_beta(kappa, lo, hi)
    assert lo <= beta <= hi
    assert beta == pytest.approx(lo + (hi - lo) * (1 + kappa) / 2, abs=1e-15)
    assert apt_beta(1.0, lo, hi) == hi
    assert apt_beta(-1.0, lo, hi) == lo


def test_agreement():
    d = torch.tensor([1.0, 2.0, -1.0])
    assert agreement([(d, None)]) == 1.0
    assert agreement([(d, torch.zeros(3))]) == 1.0
    assert agreement([(d, 3 * d)]) == pytest.approx(1.0)
    assert agreement([(d, -d)]) == pytest.approx(-1.0)
    assert agreement([(d, torch.tensor([2.0, -1.0, 0.0]))]) == 0.0
    e = torch.tensor([1.0, 0.0])
    # pooled: <d,m> summed over pairs, norms over the concatenation
    assert agreement([(d, d), (e, -e)]) == pytest.approx((6 - 1) / 7)


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from(["adam", "muon"]),
    st.sampled_from(["tensor", "global"]),
    st.floats(0.0, 0.95),
    st.floats(0.0, 0.95),
    seeds,
)
def test_betas_stay_in_range_on_random_gradients(kind, granularity, a, b, seed):
    lo, hi = min(a, b), max(a, b)
    params = [param((4, 3), seed), param((3, 5), seed + 1)]
    opt = make(kind, params, apt=True, beta_min=lo, beta_max=hi, granularity=granularity)
    assert opt.apt_betas() is None
    for step in range(5):
        set_grads(params, seed + step)
        opt.step()
        betas = [opt.state[p]["apt_beta"] for p in params]
        assert all(lo <= beta <= hi for beta in betas), betas
        if granularity == "global":
            assert betas[0] == betas[1]
        assert opt.apt_betas() == pytest.approx(sum(betas) / 2)


@pytest.mark.parametrize("kind", ["adam", "muon"])
def test_aligned_gradients_give_beta_max_and_opposite_ones_beta_min(kind):
    for sign, expected in ((2.0, 0.9), (-3.0, 0.5)):
        p = param((4, 3))
        opt = make(kind, [p], apt=True, beta_min=0.5, beta_max=0.9)
        g = torch.randn(4, 3)
        p.grad = g.clone()
        opt.step()
        assert opt.state[p]["apt_beta"] == 0.9, "κ = 1 on the first step (empty momentum)"
        p.grad = sign * g  # m₁ = (1-β)g, so κ₂ = cos(±g, g) = ±1
        opt.step()
        assert opt.state[p]["apt_beta"] == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------- Adam vs torch.optim.Adam
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("apt", [False, True])
def test_adam_equals_torch_adam_bit_for_bit(apt, weight_decay, dtype):
    """apt=False, or apt=True with beta_min = beta_max = β₁: the operations of torch's
    single-tensor Adam in the same order, hence identical bits (L2 decay in the gradient)."""
    ours = [param((5, 3), 0, dtype), param((4,), 1, dtype)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    kw = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": weight_decay}
    opt = Adam(ours, **kw, apt=apt, beta_min=0.8, beta_max=0.8)
    ref = torch.optim.Adam(theirs, **kw, foreach=False)
    for step in range(10):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), step


def test_adam_apt_bias_correction_uses_the_product_of_betas():
    """Hand computation in float64 with κ = -1 on step 2: β₁ = 0.9, β₂ = 0.5,
    m̂₂ = (0.5·0.1·g + 0.5·(-g)) / (1 - 0.9·0.5)."""
    p = param((3,), dtype=torch.float64)
    w0 = p.detach().clone()
    lr, b2, eps = 0.1, 0.999, 1e-8
    opt = Adam([p], lr=lr, betas=(0.9, b2), eps=eps, apt=True, beta_min=0.5, beta_max=0.9)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    w = w0.clone()
    v = torch.zeros(3, dtype=torch.float64)
    m = torch.zeros(3, dtype=torch.float64)
    prod = 1.0
    for t, (grad, beta) in enumerate(((g, 0.9), (-g, 0.5)), start=1):
        p.grad = grad.clone()
        opt.step()
        m = beta * m + (1 - beta) * grad
        v = b2 * v + (1 - b2) * grad**2
        prod *= beta
        w = w - lr * (m / (1 - prod)) / ((v / (1 - b2**t)).sqrt() + eps)
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-12)
    assert opt.state[p]["apt_beta_prod"] == pytest.approx(0.45)


# ------------------------------------------------------------------------------- APT on Muon
@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_apt_with_fixed_beta_is_muon(nesterov, granularity):
    """beta_min = beta_max = momentum and preserve=None: plain Muon exactly (bf16 NS)."""
    ours = [param((6, 4)), param((3, 2, 2, 2), 1)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    kw = {"momentum": 0.95, "nesterov": nesterov, "weight_decay": 0.01}
    opt = Muon(ours, **kw, apt=True, beta_min=0.95, beta_max=0.95, granularity=granularity)
    ref = Muon(theirs, **kw)
    for step in range(5):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), step
    assert opt.apt_betas() == 0.95
    assert ref.apt_betas() is None


def test_apt_is_applied_only_to_groups_that_enable_it():
    shared, head = param((4, 4)), param((4, 2), 1)
    twin = head.detach().clone().requires_grad_()
    opt = Muon(
        [{"params": [shared], "apt": True}, {"params": [head]}],
        beta_min=0.5,
        preserve="halfspace",
    )
    ref = Muon([twin])
    for step in range(4):
        set_grads([shared, head], step)
        set_grads([shared, twin], step)
        opt.step()
        ref.step()
    assert "apt_beta" in opt.state[shared]
    assert "apt_beta" not in opt.state[head]
    assert torch.equal(head, twin), "no APT and no preservation in the apt=False group"


def muon_delta(preserve, g_seq, rho=0.1, beta_min=0.5):
    p = param((5, 3))
    w0 = p.detach().clone()
    opt = Muon([p], apt=True, beta_min=beta_min, preserve=preserve, rho=rho, ns_dtype=torch.float32)
    for g in g_seq:
        p.grad = g.clone()
        opt.step()
    return p.detach() - w0, opt


def test_halfspace_makes_the_muon_step_a_descent_step_for_the_current_gradient():
    """Momentum built on g, then a gradient d with ⟨d, g⟩ < 0: with β fixed at 0.95 (so that the
    adaptive β does not already let d win) Muon's update ascends along d; with "halfspace" the
    step the parameter really takes, ΔW = W_new − W_old, satisfies ⟨ΔW, d⟩ ≤ 0 up to rounding.

    The rounding is derived, not guessed (float32, ε = 2⁻²³): writing ``W_old − η·s·O'`` into the
    parameter rounds each entry by at most ε/2·|W_new| (the parameters are O(1), the step is
    O(1e-2), so this term dominates: ⟨ΔW, d⟩ picks up ε/2·Σ|W_new|·|d|), and the projection's two
    dot products over n entries leave at most n·ε·|O'|·|d| of ⟨O', d⟩, i.e. n·ε·|ΔW|·|d| after
    the scaling."""
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    d = -g + 0.3 * torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    seq = [g] * 5 + [d]
    eps = torch.finfo(torch.float32).eps

    def last_step(preserve):  # (W_new − W_old, W_new): the same five steps, then one more
        w_new = muon_delta(preserve, seq, beta_min=0.95)[1].param_groups[0]["params"][0]
        w_old = muon_delta(preserve, seq[:-1], beta_min=0.95)[1].param_groups[0]["params"][0]
        return (w_new - w_old).detach(), w_new.detach()

    (plain, _), (projected, w_new) = last_step(None), last_step("halfspace")
    assert torch.sum(plain * d) > 0, "set-up: the momentum makes plain Muon ascend along d"
    rounding_of_write = eps * float(torch.sum(w_new.abs() * d.abs()))
    rounding_of_projection = d.numel() * eps * float(projected.norm() * d.norm())
    tol = rounding_of_write + rounding_of_projection
    assert float(torch.sum(projected * d)) <= tol
    assert float(torch.sum(plain * d)) > 1e3 * tol, "the tolerance cannot hide an ascent"
    assert projected.norm() > 0.1 * plain.norm()


@settings(max_examples=50, deadline=None)
@given(seeds, st.integers(1, 6), st.integers(1, 6))
def test_halfspace_projection(seed, rows, cols):
    g = torch.Generator().manual_seed(seed)
    o, d = torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g)
    out = halfspace(o, d)
    dot = torch.sum(o * d)
    if dot >= 0:
        assert out is o
    else:
        assert torch.sum(out * d) >= -1e-6 * o.norm() * d.norm()
        # the projection moves O along d only, by the smallest amount
        torch.testing.assert_close(out - o, -(dot / torch.sum(d * d)) * d)
    assert halfspace(o, torch.zeros_like(d)) is o


@settings(max_examples=50, deadline=None)
@given(seeds, st.floats(0.0, 1.0))
def test_reinject(seed, rho):
    g = torch.Generator().manual_seed(seed)
    o, u = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert reinject(o, u, 0.0) is o
    out = reinject(o, u, rho)
    torch.testing.assert_close(out, (1 - rho) * o + rho * o.norm() * u / u.norm())
    torch.testing.assert_close(reinject(o, 2.5 * o, rho), o)  # u ∥ O: O unchanged
    assert torch.isfinite(reinject(o, torch.zeros_like(u), rho)).all()


def test_reinject_in_muon_with_rho_zero_is_plain_apt_muon():
    g_seq = [torch.randn(5, 3, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    a, _ = muon_delta("reinject", g_seq, rho=0.0)
    b, _ = muon_delta(None, g_seq)
    c, _ = muon_delta("reinject", g_seq, rho=0.5)
    assert torch.equal(a, b)
    assert not torch.allclose(b, c)


def test_reinject_first_step_matches_hand_computation():
    """Step 1 (κ = 1, β = 0.95, Nesterov): u = (1-β)g + β(1-β)g; O' = 0.9·NS(u) + 0.1·‖NS(u)‖u/‖u‖;
    W₁ = W₀ - 0.02·√(5/3)·O'."""
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    delta, _ = muon_delta("reinject", [g], rho=0.1)
    u = 0.05 * g + 0.95 * (0.05 * g)
    o = newton_schulz(u, dtype=torch.float32)
    expected = -0.02 * (5 / 3) ** 0.5 * (0.9 * o + 0.1 * o.norm() * u / u.norm())
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)


def test_validation():
    with pytest.raises(ValueError, match="beta_min"):
        Adam([param((2,))], apt=True, beta_min=0.9, beta_max=0.5)
    with pytest.raises(ValueError, match="granularity"):
        Adam([param((2,))], granularity="layer")
    with pytest.raises(ValueError, match="preserve"):
        Muon([param((2, 2))], preserve="orthogonal")
    with pytest.raises(ValueError, match="rho"):
        Muon([param((2, 2))], rho=1.5)


# ------------------------------------------------------------------------------- integration
def test_apt_adam_trains_a_two_head_model_with_mgda():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(2))
    x = torch.randn(64, 6)
    ys = [x[:, :1] * x[:, 1:2], torch.sin(x[:, 2:3])]
    opt = Adam(
        [{"params": encoder.parameters(), "apt": True}, {"params": heads.parameters()}], lr=1e-2
    )
    mto = mtopt.MultiTaskOptimizer(opt, "mgda", shared=encoder.parameters())

    def closure():
        z = encoder(x)
        return [(h(z) - y).pow(2).mean() for h, y in zip(heads, ys, strict=True)]

    losses = [sum(mto.step(closure).losses.values()) for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0], losses
    betas = opt.apt_betas()
    assert betas is not None
    assert 0.5 <= betas <= 0.9
    assert all("apt_beta" not in opt.state[p] for p in heads.parameters())
    assert np.isfinite(losses).all()
