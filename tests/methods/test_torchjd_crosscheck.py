"""Cross-checks against TorchJD 0.18 (MIT; a dev dependency) on the same inputs.

Scaling conventions: TorchJD's scalarizers are modules returning the scalar loss; our methods
return the effective weights ``∂L/∂ℓ``, so we compare against autograd of TorchJD's scalar.
TorchJD's MGDA is Frank-Wolfe from the uniform point that stops when the step falls below 1e-3; ours
(``solver="wolfe"``) is exact, so ours must reach a norm no larger than theirs and the two must
agree to TorchJD's tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtopt
from _context import make_context
from mtopt.core.method import MethodInput
from mtopt.core.min_norm import min_norm_weights

torchjd = pytest.importorskip("torchjd")
from torchjd import aggregation as tjd_aggregation  # noqa: E402
from torchjd import scalarization as tjd_scalarization  # noqa: E402

losses_st = st.lists(st.floats(1e-2, 1e2), min_size=2, max_size=5)


def torchjd_weights(scalarizer, losses: list[float]) -> torch.Tensor:
    values = torch.tensor(losses, dtype=torch.float32, requires_grad=True)
    (grad,) = torch.autograd.grad(scalarizer(values), values)
    return grad.double()


def set_scales(method, scales: list[float]) -> None:
    method._ensure(len(scales))
    with torch.no_grad():
        method.scales.copy_(torch.tensor(scales, dtype=torch.float64))


def our_weights(method, losses):
    out = method.aggregate(
        MethodInput(torch.tensor(losses, dtype=torch.float64), tuple("abcde"[: len(losses)]))
    )
    return out.weights


@pytest.mark.parametrize(
    ("name", "torchjd_class", "attribute"),
    [("uw", "UW", "log_var"), ("imtl_l", "IMTLL", "log_scale")],
)
@settings(max_examples=40, deadline=None)
@given(losses=losses_st, scales=st.lists(st.floats(-2, 2), min_size=5, max_size=5))
def test_learned_scales_match_torchjd(name, torchjd_class, attribute, losses, scales):
    """Same learned scalars ⇒ same effective weights (UW: ½e^{-s}; IMTL-L: e^{s})."""
    s = scales[: len(losses)]
    theirs = getattr(tjd_scalarization, torchjd_class)(len(losses))
    with torch.no_grad():
        getattr(theirs, attribute).copy_(torch.tensor(s))
    ours = mtopt.make(name)
    set_scales(ours, s)
    expected = torchjd_weights(theirs, losses)
    torch.testing.assert_close(our_weights(ours, losses), expected, rtol=1e-5, atol=0)


@settings(max_examples=40, deadline=None)
@given(losses_st)
def test_gls_matches_torchjd_geometric_mean(losses):
    theirs = torchjd_weights(tjd_scalarization.GeometricMean(), losses)
    torch.testing.assert_close(our_weights(mtopt.make("gls"), losses), theirs, rtol=1e-5, atol=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_mgda_matches_torchjd(k, d, seed):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(k, d)) * np.exp(rng.normal(size=(k, 1)))
    M = G @ G.T
    theirs = tjd_aggregation.MGDAWeighting()(torch.tensor(M)).double().numpy()
    ours = min_norm_weights(M, solver="wolfe").weights
    scale = float(np.diag(M).max())
    cost_ours, cost_theirs = float(ours @ M @ ours), float(theirs @ M @ theirs)
    assert cost_ours <= cost_theirs + 1e-9 * scale
    assert cost_theirs - cost_ours <= 1e-2 * scale


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 4), st.integers(0, 2**31 - 1))
def test_dwa_epoch_mode_matches_torchjd(k, seed):
    """Same loss stream, same epoch boundaries: identical weights (we add a 1e-8 guard)."""
    rng = np.random.default_rng(seed)
    theirs = tjd_scalarization.DWA()
    ours = mtopt.make("dwa")
    for _epoch in range(4):
        for _batch in range(3):
            losses = rng.uniform(0.1, 3.0, size=k).tolist()
            expected = torchjd_weights(theirs, losses)
            torch.testing.assert_close(our_weights(ours, losses), expected, rtol=1e-6, atol=0)
        theirs.step()
        ours.end_epoch()


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 4), st.sampled_from([1e-2, 1e-3, 0.0]), st.integers(0, 2**31 - 1))
def test_famo_matches_torchjd(k, gamma, seed):
    """Same (loss, post-step loss) stream: same weights at every step (TorchJD in float64)."""
    rng = np.random.default_rng(seed)
    theirs = tjd_scalarization.FAMO(k, weight_decay=gamma).double()
    ours = mtopt.make("famo", gamma=gamma)
    for _ in range(6):
        before = rng.uniform(0.1, 3.0, size=k).tolist()
        after = (np.array(before) * rng.uniform(0.5, 1.1, size=k)).tolist()
        values = torch.tensor(before, dtype=torch.float64, requires_grad=True)
        (expected,) = torch.autograd.grad(theirs(values), values)
        inp = MethodInput(torch.tensor(before, dtype=torch.float64), tuple("abcd"[:k]))
        torch.testing.assert_close(ours.aggregate(inp).weights, expected, rtol=1e-9, atol=1e-12)
        theirs.update(torch.tensor(after, dtype=torch.float64))
        ours.after_step(inp, make_context(lambda a=after: torch.tensor(a, dtype=torch.float64)))


def _gram(seed: int, k: int, d: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(k, d)) * np.exp(rng.normal(size=(k, 1)))
    return torch.from_numpy(G @ G.T)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_imtl_g_matches_torchjd(k, d, seed):
    """Full rank (d ≥ k): the same weights (our C⁺1 on the cosine matrix equals TorchJD's
    M⁺‖g‖). Rank-deficient Grams (d < k): the direction's scale is not unique there (a null
    space of C changes Σw = 1); TorchJD takes the minimum-norm v, we the minimum-norm x = Nw on
    the unit gradients, so only the direction is compared, up to its sign and length."""
    from mtopt.core.equal_projection import imtl_g_weights

    rng = np.random.default_rng(seed)
    G = rng.normal(size=(k, d)) * np.exp(rng.normal(size=(k, 1)))
    M = torch.from_numpy(G @ G.T)
    theirs = tjd_aggregation.IMTLGWeighting()(M)
    ours, status, _ = imtl_g_weights(M)
    if d >= k:
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    elif status != "degenerate" and float(theirs.abs().sum()) > 0:
        a, b = ours.numpy() @ G, theirs.numpy() @ G
        cos = abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_pcgrad_matches_torchjd_for_two_tasks(d, seed):
    """With two tasks the visiting order cannot matter (TorchJD draws its own permutations)."""
    from mtopt.methods.pcgrad import pcgrad_weights

    M = _gram(seed, 2, d)
    theirs = tjd_aggregation.PCGradWeighting()(M)
    torch.testing.assert_close(pcgrad_weights(M, [[1], [0]]), theirs, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_aligned_mtl_matches_torchjd(k, d, seed):
    """TorchJD weights are B·p with p = 1/K: our ``reduction="mean"``."""
    from mtopt.methods.aligned_mtl import aligned_weights

    M = _gram(seed, k, d)
    theirs = tjd_aggregation.AlignedMTLWeighting()(M)
    ours, _, residual = aligned_weights(M)
    assert residual <= 1e-12
    torch.testing.assert_close(ours / k, theirs, rtol=1e-6, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_upgrad_matches_torchjd_quadprog(k, d, seed):
    """Same normalisation and regularisation; our active-set QP against quadprog."""
    from mtopt.methods.upgrad import upgrad_weights

    M = _gram(seed, k, d)
    theirs = tjd_aggregation.UPGradWeighting()(M)
    ours, ok = upgrad_weights(M.numpy(), np.full(k, 1.0 / k))
    assert ok
    torch.testing.assert_close(torch.from_numpy(ours), theirs, rtol=1e-6, atol=1e-9)
