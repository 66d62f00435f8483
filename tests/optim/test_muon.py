"""Muon (Jordan et al. 2024): Newton–Schulz, the update rule, the AdamW group, the parameter
split."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mtopt
from mtopt.optim import Muon, muon_param_groups, newton_schulz
from mtopt.optim.muon import NS_COEFFICIENTS, shape_scale

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic Newton–Schulz coefficients of Muon's authors

DTYPES = [torch.float32, torch.bfloat16]


def well_conditioned(rows: int, cols: int, seed: int, cond: float = 10.0) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with random orthogonal factors and singular values in ``[1, cond]``."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    s = 1.0 + (cond - 1.0) * torch.rand(k, generator=g, dtype=torch.float64)
    return (u * s) @ v.T


def assert_spectrum(sv: torch.Tensor, lo: float, hi: float) -> None:
    low, high = sv.min().item(), sv.max().item()
    span = f"singular values in [{low:.4f}, {high:.4f}] ⊄ [{lo}, {hi}]"
    assert lo <= low, span
    assert high <= hi, span


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def quintic(s: np.ndarray, steps: int = 5) -> np.ndarray:
    a, b, c = COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def reference_ns(g: np.ndarray, steps: int = 5, eps: float = 1e-7) -> np.ndarray:
    """An independent float64 NumPy transcription of the Newton–Schulz iteration."""
    a, b, c = COEFFICIENTS
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


# ----------------------------------------------------------------------------- Newton–Schulz
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
def test_ns_singular_values_of_gaussian_matrices(shape, dtype):
    """Measured over 50 seeds: [0.682, 1.134] in float32, [0.666, 1.145] in bf16 (a Gaussian
    32×64 matrix has σ_min/‖X‖_F ≈ 0.05, where the scalar map's range is [0.682, 1.134])."""
    torch.manual_seed(0)
    for _ in range(10):
        sv = torch.linalg.svdvals(newton_schulz(torch.randn(*shape), dtype=dtype).double())
        assert_spectrum(sv, 0.5, 1.5)
        if dtype == torch.float32:
            assert_spectrum(sv, 0.68, 1.14)
        else:
            assert_spectrum(sv, 0.64, 1.17)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 48), st.integers(2, 48), st.sampled_from(DTYPES), st.integers(0, 2**31 - 1))
def test_ns_singular_values_within_spec_range(rows, cols, dtype, seed):
    """Condition number ≤ 10 and min(rows, cols) ≤ 48 ⇒ every σ/‖X‖_F ≥ 1/(10·√48) > 0.01, where
    five quintic steps map into [0.682, 1.134]: the spec's [0.5, 1.5] holds with room (float32
    also the tight range; bf16 rounding moves values by up to ~0.03)."""
    x = well_conditioned(rows, cols, seed).float()
    sv = torch.linalg.svdvals(newton_schulz(x, dtype=dtype).double())
    assert_spectrum(sv, 0.5, 1.5)
    if dtype == torch.float32:
        assert_spectrum(sv, 0.675, 1.14)


def test_ns_acts_on_singular_values_by_the_scalar_quintic():
    assert NS_COEFFICIENTS == COEFFICIENTS
    x = well_conditioned(7, 4, seed=3, cond=1000.0)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    expected = (u * torch.from_numpy(quintic((s / s.norm()).numpy()))) @ vh
    out = newton_schulz(x, dtype=torch.float64, eps=0.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.numpy(), reference_ns(x.numpy(), eps=0.0), rtol=0, atol=1e-12)


def test_ns_batched_and_dtype():
    x = torch.randn(3, 2, 6, 4)
    out = newton_schulz(x, dtype=torch.float32)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(out[i, j], newton_schulz(x[i, j], dtype=torch.float32))
    with pytest.raises(ValueError, match="ndim"):
        newton_schulz(torch.randn(5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (5, 3), (16, 16)])
def test_ns_orthogonal_equivariance(shape, dtype):
    """NS(QXR) = Q NS(X) R on well-conditioned X. Measured over 20 seeds: max entry error
    2.8e-6 in float32; bf16 rounding breaks it more (relative Frobenius error up to 0.083)."""
    torch.manual_seed(1)
    for seed in range(5):
        x = well_conditioned(*shape, seed=seed).float()
        q, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
        r, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
        lhs = newton_schulz(q @ x @ r, dtype=dtype)
        rhs = q @ newton_schulz(x, dtype=dtype) @ r
        if dtype == torch.float32:
            torch.testing.assert_close(lhs, rhs, rtol=0, atol=2e-5)
        else:
            assert relative_error(lhs, rhs) < 0.15


@settings(max_examples=30, deadline=None)
@given(st.floats(-3.0, 3.0), st.sampled_from(DTYPES), st.integers(0, 2**31 - 1))
def test_ns_is_invariant_to_positive_scaling(log_c, dtype, seed):
    """Frobenius pre-normalisation: NS(cX) = NS(X). Measured float32 error ≤ 4.3e-5 for
    c ∈ [1e-3, 1e3] (the 1e-7 in the denominator, amplified at small σ); bf16 relative error up
    to 0.06 over 200 seeds (c·X rounds differently). Without the normalisation NS diverges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 20, generator=g)
    c = 10.0**log_c
    lhs, rhs = newton_schulz(c * x, dtype=dtype), newton_schulz(x, dtype=dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(lhs, rhs, rtol=0, atol=2e-4)
    else:
        assert relative_error(lhs, rhs) < 0.15


# -------------------------------------------------------------------------------- Muon update
def one_param(shape, seed=0, dtype=torch.float32) -> nn.Parameter:
    return nn.Parameter(
        torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    )


@pytest.mark.parametrize("scale_mode", ["keller", "rms_match"])
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 3, 2, 2)])
def test_no_momentum_is_orthogonalised_sgd(shape, scale_mode):
    p = one_param(shape)
    w0 = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False, scale_mode=scale_mode)
    for step in range(3):
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(10 + step))
        p.grad = g.clone()
        opt.step()
        g2 = g.reshape(shape[0], -1)
        rows, cols = g2.shape
        expected = {
            "keller": max(1.0, rows / cols) ** 0.5,
            "rms_match": 0.2 * max(rows, cols) ** 0.5,
        }
        w0 = w0.add((newton_schulz(g2) * expected[scale_mode]).view(shape), alpha=-0.1)
        torch.testing.assert_close(p.detach(), w0, rtol=0, atol=0)
        assert torch.equal(p.grad, g), "the gradient must not be modified"


def test_muon_update_matches_hand_computation():
    """Two Nesterov steps with decay on a 3×2 float64 matrix, against NumPy: m₁ = (1-β)g₁,
    u₁ = (1-β)g₁ + βm₁, W₁ = W₀(1-ηλ) - η·√(3/2)·NS(u₁); then m₂ = βm₁ + (1-β)g₂, ..."""
    lr, beta, wd = 0.05, 0.9, 0.1
    p = one_param((3, 2), dtype=torch.float64)
    w = p.detach().numpy().copy()
    opt = Muon([p], lr=lr, momentum=beta, weight_decay=wd, ns_dtype=torch.float64)
    rng = np.random.default_rng(0)
    m = np.zeros((3, 2))
    for _ in range(2):
        g = rng.normal(size=(3, 2))
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        m = beta * m + (1 - beta) * g
        u = (1 - beta) * g + beta * m
        w = w * (1 - lr * wd) - lr * np.sqrt(3 / 2) * reference_ns(u)
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(opt.state[p]["momentum_buffer"].numpy(), m, rtol=0, atol=1e-15)


def test_decoupled_weight_decay():
    """A zero gradient leaves exactly W(1-ηλ) in both kinds of group (NS(0) = 0; AdamW's
    moments stay 0); the decay never enters the momentum or the orthogonalised direction."""
    mat, vec = one_param((4, 3)), one_param((3,), seed=1)
    opt = Muon(
        [{"params": [mat], "use_muon": True}, {"params": [vec], "use_muon": False}],
        weight_decay=0.5,
    )
    m0, v0 = mat.detach().clone(), vec.detach().clone()
    mat.grad, vec.grad = torch.zeros_like(mat), torch.zeros_like(vec)
    opt.step()
    assert torch.equal(mat.detach(), m0 * (1 - 0.02 * 0.5))
    assert torch.equal(vec.detach(), v0 * (1 - 3e-4 * 0.5))
    assert torch.equal(opt.state[mat]["momentum_buffer"], torch.zeros_like(mat))

    plain, decayed = one_param((4, 3)), one_param((4, 3))
    g = torch.randn(4, 3)
    for p, wd in ((plain, 0.0), (decayed, 0.5)):
        p.grad = g.clone()
        Muon([p], weight_decay=wd, ns_dtype=torch.float32).step()
    torch.testing.assert_close(decayed.detach(), plain.detach() - 0.02 * 0.5 * m0)


def grads_for(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def test_state_dict_round_trip_gives_identical_steps():
    model = small_model()
    opt = Muon(muon_param_groups(model, output_modules=[model.head]), weight_decay=0.01)
    params = list(model.parameters())
    for step in range(3):
        grads_for(params, step)
        opt.step()
    clone = copy.deepcopy(model)
    restored = Muon(muon_param_groups(clone, output_modules=[clone.head]))
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert restored.param_groups[0]["weight_decay"] == 0.01
    for step in range(3, 6):
        grads_for(params, step)
        grads_for(list(clone.parameters()), step)
        opt.step()
        restored.step()
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_group_equals_torch_adamw(weight_decay):
    """Same operations in the same order as torch's single-tensor AdamW: bit-for-bit."""
    ours, theirs = one_param((5, 3)), one_param((5, 3))
    opt = Muon(
        [{"params": [ours], "use_muon": False}],
        adamw_lr=1e-2,
        adamw_betas=(0.8, 0.95),
        adamw_eps=1e-10,
        weight_decay=weight_decay,
    )
    ref = torch.optim.AdamW(
        [theirs], lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, foreach=False
    )
    for step in range(8):
        grads_for([ours], step)
        grads_for([theirs], step)
        opt.step()
        ref.step()
        assert torch.equal(ours, theirs), step


def test_closure_and_missing_grads():
    used, unused = one_param((3, 4)), one_param((4, 4), seed=1)
    before = unused.detach().clone()
    opt = Muon([used, unused])

    def closure():
        opt.zero_grad()
        loss = (used**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    assert loss.item() > 0
    assert torch.equal(unused.detach(), before)
    assert unused not in opt.state
    assert used in opt.state


def test_group_validation_and_inferred_kind():
    vec = one_param((3,))
    with pytest.raises(ValueError, match="ndim"):
        Muon([{"params": [vec], "use_muon": True}])
    with pytest.raises(ValueError, match="scale_mode"):
        Muon([one_param((3, 3))], scale_mode="spectral")
    opt = Muon([{"params": [one_param((3, 3))]}, {"params": [vec, one_param((2, 2))]}])
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[0]["lr"] == 0.02
    assert opt.param_groups[1]["lr"] == 3e-4
    assert opt.param_groups[1]["betas"] == (0.9, 0.95)
    assert opt.param_groups[1]["eps"] == 1e-10


def test_copied_optimizer_keeps_its_kind_defaults():
    opt = copy.deepcopy(Muon([one_param((3, 3))], lr=0.05, adamw_lr=1e-3))
    opt.add_param_group({"params": [one_param((2,))]})
    opt.add_param_group({"params": [one_param((2, 2))]})
    assert [g["lr"] for g in opt.param_groups] == [0.05, 1e-3, 0.05]


def test_shape_scale():
    assert shape_scale(8, 2, "keller") == 2.0
    assert shape_scale(2, 8, "keller") == 1.0
    assert shape_scale(2, 100, "rms_match") == pytest.approx(2.0)


# ---------------------------------------------------------------------------- parameter split
class SmallModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.conv = nn.Conv2d(4, 4, 3)
        self.embed = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def small_model() -> SmallModel:
    torch.manual_seed(0)
    return SmallModel()


def test_param_split_puts_each_parameter_where_documented():
    model = small_model()
    groups = muon_param_groups(
        model, output_modules=[model.head], muon_lr=0.05, weight_decay=0.01, apt=True
    )
    muon, adamw = groups
    assert muon["use_muon"]
    assert not adamw["use_muon"]
    assert muon["lr"] == 0.05
    assert "lr" not in adamw, "unset options are left to the optimizer"
    assert muon["weight_decay"] == adamw["weight_decay"] == 0.01
    assert muon["apt"]
    assert adamw["apt"]
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(muon["params"]) == ids([model.conv.weight, model.hidden.weight])
    expected_adamw = [
        model.stem.weight,  # first layer
        model.stem.bias,
        model.conv.bias,
        model.embed.weight,  # embedding
        model.hidden.bias,
        model.norm.weight,
        model.norm.bias,
        model.head.weight,  # output layer
        model.head.bias,
    ]
    assert ids(adamw["params"]) == ids(expected_adamw)

    no_first = muon_param_groups(model, output_modules=["head"], first_layer=False)
    assert id(model.stem.weight) in ids(no_first[0]["params"])
    assert id(model.head.weight) in ids(no_first[1]["params"])
    named = muon_param_groups(list(model.named_parameters()), first_layer=False)
    assert id(model.embed.weight) in ids(named[0]["params"]), "type detection needs a Module"
    opt = Muon(groups, adamw_lr=1e-3, weight_decay=0.5)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.05, 0.01), (1e-3, 0.01)]
    opt = Muon(muon_param_groups(model), lr=0.03, weight_decay=0.5)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.03, 0.5), (3e-4, 0.5)]


def test_param_split_leaves_out_empty_groups():
    groups = muon_param_groups(nn.Linear(3, 3))
    assert len(groups) == 1
    assert not groups[0]["use_muon"]


# ------------------------------------------------------------------------------- integration
def test_muon_trains_a_two_head_model_under_multitask_optimizer():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
    heads = nn.ModuleList(
        nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1)) for _ in range(2)
    )
    model = nn.ModuleDict({"encoder": encoder, "heads": heads})
    x = torch.randn(64, 6)
    ys = [x[:, :1] * x[:, 1:2], torch.sin(x[:, 2:3])]
    opt = Muon(muon_param_groups(model, output_modules=[h[-1] for h in heads]), adamw_lr=1e-2)
    mto = mtopt.MultiTaskOptimizer(opt, "unitary", shared=encoder.parameters())

    def closure():
        z = encoder(x)
        return [(h(z) - y).pow(2).mean() for h, y in zip(heads, ys, strict=True)]

    losses = [sum(mto.step(closure).losses.values()) for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0], losses
