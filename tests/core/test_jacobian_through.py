"""The batched Jacobian through the features only (``only_through``; ``batched_jacobian`` and
``batched_grads`` given the features): the same matrix as K backward passes whenever the losses
reach the shared parameters only through ``z``, refused on the graph whenever they do not, and
each head's backward run once per task rather than K times."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from mtopt import Losses, MultiTaskOptimizer
from mtopt.core.gradients import batched_jacobian, jacobian, only_through
from mtopt.core.gramian import GramianEngine

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _encoder(dtype):
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6)).to(dtype)


@settings(max_examples=25)
@given(
    k=st.integers(1, 6),
    batch=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_two_stages_give_the_jacobian_of_k_passes(k, batch, dtype, seed):
    torch.manual_seed(seed)
    enc = _encoder(dtype)
    heads = [nn.Linear(6, 2).to(dtype) for _ in range(k)]
    unused = nn.Parameter(torch.ones(3, dtype=dtype))
    z = enc(torch.randn(batch, 5, dtype=dtype))
    losses = [nn.functional.mse_loss(h(z), torch.randn(batch, 2, dtype=dtype)) for h in heads]
    losses[0] = losses[0] + heads[0].bias.sum() ** 2  # a head-only term: no path to the encoder
    shared = [*enc.parameters(), unused]
    assert only_through(losses, z, shared)
    got = batched_jacobian(losses, shared, features=z)
    want = jacobian(losses, shared)
    assert got.shape == want.shape
    assert torch.equal(got[:, -3:], torch.zeros(k, 3, dtype=dtype))  # unreached: zero columns
    assert _relative(got, want) < TOL[dtype]


def _detours():
    """Closure builders whose losses reach the encoder other than through z (pytest params)."""

    def weight_decay(enc, heads, x):
        z = enc(x)
        first = heads[0](z).pow(2).mean() + 1e-2 * enc[0].weight.pow(2).sum()
        return [first, heads[1](z).abs().mean()], z

    def inner_layer(enc, heads, x):
        hidden = enc[1](enc[0](x))  # a loss on the encoder's hidden layer, beside z
        z = enc[2](hidden)
        return [heads[0](z).pow(2).mean(), hidden.pow(2).mean()], z

    def other_output(enc, heads, x):
        z, w = enc(x).split(3, dim=1)  # z and w: two outputs of one node
        return [heads[0](torch.cat([z, z], 1)).pow(2).mean(), w.pow(2).mean()], z

    def hooked(enc, heads, x):
        z = enc(x)
        z.register_hook(lambda g: -0.5 * g)  # gradient reversal: it would run twice
        return [heads[0](z).pow(2).mean(), heads[1](z).abs().mean()], z

    def retained(enc, heads, x):
        z = enc(x)
        z.retain_grad()
        return [heads[0](z).pow(2).mean(), heads[1](z).abs().mean()], z

    builders = (weight_decay, inner_layer, other_output, hooked, retained)
    return [pytest.param(b, id=b.__name__) for b in builders]


@pytest.mark.parametrize("build", _detours())
def test_a_detour_around_z_is_seen_and_the_pass_is_batched_through_everything(build):
    torch.manual_seed(0)
    enc = _encoder(torch.float64)
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    losses, z = build(enc, heads, x)
    assert not only_through(losses, z, list(enc.parameters()))
    out = {}
    for engine in ("jacobian", "batched"):
        e, h = copy.deepcopy(enc), copy.deepcopy(heads)
        params = [*e.parameters(), *h.parameters()]
        mto = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), "mgda", shared=e, engine=engine)

        def closure(e=e, h=h):
            found, feats = build(e, h, x)
            return Losses(dict(zip("ab", found, strict=True)), features=feats)

        mto.step(closure)
        out[engine] = torch.cat([p.detach().reshape(-1) for p in params])
    assert _relative(out["batched"], out["jacobian"]) < 1e-12


def test_a_loss_that_is_another_output_of_zs_node_or_an_input_is_refused():
    # (found by review: the walk started every loss at output 0 of its node, and skipped a
    # loss without a node)
    enc = _encoder(torch.float64)
    shared = list(enc.parameters())
    h = enc(torch.randn(4, 5, dtype=torch.float64))
    z, aux = torch.stack([h.sum(), h.pow(2).sum()]).unbind()  # z: output 0, aux: output 1
    losses = [(3 * z).sin(), aux]
    assert not only_through(losses, z, shared)
    scale = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))  # a loss that is an input
    z = enc(torch.randn(4, 5, dtype=torch.float64))
    assert not only_through([z.pow(2).mean(), scale], z, [*shared, scale])


def test_features_outside_the_graph_are_refused():
    enc = _encoder(torch.float64)
    z = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)  # a leaf: no grad_fn
    assert not only_through([z.sum()], z, list(enc.parameters()))


def _steps(engine: str, features: bool, k: int = 6) -> tuple[int, Tensor]:
    """``mse_loss_backward`` profiler events in the second of two upgrad steps (the first also
    verifies a Gramian against autograd) on K MSE heads, and the parameters after them."""
    torch.manual_seed(0)
    e = _encoder(torch.float64)
    h = nn.ModuleList(nn.Linear(6, 1) for _ in range(k)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, k, dtype=torch.float64)
    params = [*e.parameters(), *h.parameters()]
    mto = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), "upgrad", shared=e, engine=engine)

    def closure():
        z = e(x)
        losses = {str(i): nn.functional.mse_loss(h[i](z)[:, 0], y[:, i]) for i in range(k)}
        return Losses(losses, features=z if features else None)

    mto.step(closure)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mto.step(closure)
    calls = sum(ev.count for ev in prof.key_averages() if ev.key == "aten::mse_loss_backward")
    return calls, torch.cat([p.detach().reshape(-1) for p in params])


@pytest.mark.parametrize("engine", ["batched", "gramian"])
def test_in_the_optimizer_each_head_is_differentiated_once_per_task(engine):
    """K = 6 MSE heads: a pass batched through the whole graph runs ``mse_loss_backward``
    (which has no batching rule) once per cotangent row of each head, K² times at least;
    started at z, as often as the K-pass engine. The update equals the K-pass engine's."""
    k = 6
    reference, expected = _steps("jacobian", True, k)
    calls, got = _steps(engine, True, k)
    assert calls == reference
    assert _relative(got, expected) < 1e-10
    if engine == "batched":  # without the features: through everything, as before
        calls, got = _steps(engine, False, k)
        assert calls >= k * k
        assert _relative(got, expected) < 1e-10


@settings(max_examples=15)
@given(k=st.integers(1, 5), seed=st.integers(0, 2**16), keep=st.sampled_from([0, 2**30]))
def test_the_gramian_engine_from_z_gives_the_gramian_and_the_update_of_the_jacobian(k, seed, keep):
    """The Gramian engine's cotangents started at z (features given, only_through holds):
    ``M = JJᵀ`` and ``Jᵀw`` as from the K-pass Jacobian (keep_bytes 0: the update recomputed
    from the kept cotangents; 2^30: from the kept rows)."""
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6)).double()
    heads = [nn.Linear(6, 1).double() for _ in range(k)]
    x = torch.randn(4, 5, dtype=torch.float64)
    params = list(enc.parameters())
    engine = GramianEngine([enc], params, keep_bytes=keep)
    with engine.record():
        z = enc(x)
        losses = [nn.functional.mse_loss(h(z)[:, 0], torch.ones(4, dtype=z.dtype)) for h in heads]
    gram = engine.gramian(losses, z)
    jac = jacobian(losses, params)
    assert _relative(gram, jac @ jac.T) < 1e-12
    w = torch.randn(k, dtype=torch.float64)
    engine.write_grads(w)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    assert _relative(got, w @ jac) < 1e-12
