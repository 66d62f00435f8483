"""The Gramian engine against the naive K-call Jacobian (``mtopt.core.gradients.jacobian``)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import mtopt
from _unbatchable import unbatchable
from mtopt import MultiTaskOptimizer
from mtopt.core.gradients import batched_jacobian, jacobian
from mtopt.core.gramian import GramianEngine
from mtopt.core.method import MethodInput, Need
from mtopt.core.registry import method_class
from mtopt.engine.closure import unpack
from mtopt.engine.setup import batched_pass
from mtopt.engine.sources import JacobianSource


def _relative(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _engine_vs_jacobian(
    modules: list[nn.Module],
    losses_fn,
    keep_bytes: int = 0,
    batched: bool = True,
) -> tuple[float, float]:
    """Relative errors of the Gramian and of ``Jᵀw`` (random w) against the Jacobian path."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    engine = GramianEngine(modules, params, keep_bytes=keep_bytes)
    engine._batched = batched
    with engine.record():
        losses = losses_fn()
    gram = engine.gramian(losses)
    jac = jacobian(losses, params)
    w = torch.randn(len(losses), dtype=jac.dtype)
    for p in params:
        p.grad = None
    engine.write_grads(w)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    engine.verify(losses, gram)
    return _relative(gram, jac @ jac.T), _relative(got, w @ jac)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    d_in=st.integers(1, 12),
    hidden=st.integers(1, 24),
    k=st.integers(1, 6),
    keep=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mlp_float32_matches_the_jacobian(n, d_in, hidden, k, keep, seed):
    """Linear layers (explicit and kernel routes, depending on the shapes) in float32."""
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 5))
    heads = [nn.Linear(5, 1) for _ in range(k)]
    x, y = torch.randn(n, d_in), torch.randn(n, k)

    def losses():
        z = enc(x)
        return [((heads[i](z).squeeze(1) - y[:, i]) ** 2).mean() for i in range(k)]

    gram_err, grad_err = _engine_vs_jacobian([enc], losses, keep_bytes=2**30 if keep else 0)
    assert gram_err < 1e-5
    assert grad_err < 1e-5


class _Block(nn.Module):
    """Convolution, batch norm, in-place ReLU, layer norm, a direct parameter of a module with
    children, a grouped convolution with string padding (generic route) called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.ln = nn.LayerNorm([6, 8, 8])
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6).view(6, 1, 1))
        self.grouped = nn.Conv2d(6, 6, 3, groups=2, padding="same")
        self.conv1d = nn.Conv1d(6, 4, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(self.relu(self.bn(self.conv(x)))) * self.scale
        h = self.grouped(self.grouped(h))
        return self.conv1d(h.flatten(2)).flatten(1)


@pytest.mark.parametrize("keep_bytes", [0, 2**30])
@pytest.mark.parametrize("batched", [True, False])
def test_conv_norm_generic_routes_float64(keep_bytes, batched):
    torch.manual_seed(0)
    enc = _Block().double()
    k = 3
    heads = [nn.Linear(128, 1).double() for _ in range(k)]
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)

    def losses():
        z = enc(x)
        return [torch.tanh(heads[i](z)).pow(i + 1).sum() for i in range(k)]

    gram_err, grad_err = _engine_vs_jacobian([enc], losses, keep_bytes, batched)
    assert gram_err < 1e-10
    assert grad_err < 1e-10


def test_batch_norm_statistics_are_updated_once():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    x = torch.randn(4, 2, 6, 6)
    engine = GramianEngine([enc], list(enc.parameters()))
    with engine.record():
        z = enc(x)
    mean_after_forward = enc[1].running_mean.clone()
    engine.gramian([z[:, :5].sum(), z[:, 5:].pow(2).sum()])
    assert int(enc[1].num_batches_tracked) == 1
    assert torch.equal(enc[1].running_mean, mean_after_forward)


def test_embedding_and_unowned_parameter():
    """A parameter no hooked module owns gets its rows from the batched pass itself."""
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6).double()
    lin = nn.Linear(18, 4).double()
    free = nn.Parameter(torch.randn(4, dtype=torch.float64))
    idx = torch.randint(0, 20, (7, 3))
    params = list(emb.parameters()) + list(lin.parameters()) + [free]
    engine = GramianEngine([emb, lin], params)
    assert engine.unowned == [free]
    with engine.record():
        z = lin(emb(idx).flatten(1)) * free
        losses = [z[:, i].pow(2).mean() for i in range(4)]
    gram = engine.gramian(losses)
    jac = jacobian(losses, params)
    assert _relative(gram, jac @ jac.T) < 1e-10


def test_tied_weights_are_caught_by_verify():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    engine = GramianEngine([lin], list(lin.parameters()))
    with engine.record():
        z = lin(torch.randn(4, 6)) @ lin.weight  # the weight also used outside lin's forward
        losses = [z[:, i].sum() ** 2 for i in range(3)]
    gram = engine.gramian(losses)
    with pytest.raises(RuntimeError, match="outside its module's forward"):
        engine.verify(losses, gram)


def _gramian_methods() -> list[str]:
    return [name for name in mtopt.available_methods() if method_class(name).gramian_only]


GRAMIAN_METHODS = _gramian_methods()


def test_the_gramian_only_methods_are_the_expected_ones():
    expected = {"aligned_mtl", "cagrad", "cdtt", "edm", "imtl", "imtl_g", "mgda", "mgda_ub"}
    expected |= {"nash_mtl", "pcgrad", "upgrad"}
    assert set(GRAMIAN_METHODS) == expected


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
@settings(max_examples=10, deadline=None)
@given(k=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_gramian_only_methods_read_nothing_but_the_gramian(name, k, seed):
    """The flag is honest: given only the Gramian, the same weights as given the gradients."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, 7, generator=gen, dtype=torch.float64)
    losses = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    names = tuple(str(i) for i in range(k))
    hparams = {"seed": 0} if "seed" in method_class(name).hyperparameters() else {}
    full = mtopt.make(name, **hparams).aggregate(MethodInput(losses, names, grads=grads))
    only = MethodInput(losses, names)
    only.gramian_matrix = grads @ grads.T
    reduced = mtopt.make(name, **hparams).aggregate(only)
    assert full.direction is None
    assert reduced.direction is None
    torch.testing.assert_close(reduced.weights, full.weights, rtol=1e-9, atol=1e-12)


def _model(k: int) -> tuple[nn.Module, nn.ModuleList]:
    enc = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8)
    )
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(k)])
    return enc.double(), heads.double()


@pytest.mark.parametrize("name", [n for n in GRAMIAN_METHODS if n != "mgda_ub"])
@pytest.mark.parametrize("head_policy", ["raw", "weighted"])
def test_training_matches_the_jacobian_engine(name, head_policy):
    """Three optimizer steps with each engine give the same parameters (float64); the encoder
    runs once per head, so each hooked module is called K times per step."""
    torch.manual_seed(0)
    k = 3
    enc, heads = _model(k)
    x, y = torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randn(6, k, dtype=torch.float64)
    out = {}
    for engine in ("jacobian", "gramian"):
        e, h = copy.deepcopy(enc), copy.deepcopy(heads)
        params = list(e.parameters()) + list(h.parameters())
        mto = MultiTaskOptimizer(
            torch.optim.SGD(params, lr=0.05),
            name,
            shared=e,
            engine=engine,
            max_grad_norm=5.0,
            head_policy=head_policy,
            **({"level": "param"} if name == "imtl" else {}),
            **({"seed": 0} if "seed" in method_class(name).hyperparameters() else {}),
        )
        for _ in range(3):
            info = mto.step(
                lambda e=e, h=h: [((h[i](e(x)).squeeze(1) - y[:, i]) ** 2).mean() for i in range(k)]
            )
        assert info.gradient_engine == engine
        out[engine] = torch.cat([p.detach().reshape(-1) for p in params])
    # iterative inner solvers (CAGrad, Nash-MTL) amplify float64 rounding a little
    assert _relative(out["gramian"], out["jacobian"]) < 1e-8


def test_auto_engine_switches_on_the_jacobian_size():
    enc, heads = _model(2)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    params = list(enc.parameters()) + list(heads.parameters())

    def closure():
        z = enc(x)
        return [heads[0](z).pow(2).mean(), heads[1](z).abs().mean()]

    small = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.0), "upgrad", shared=enc)
    assert small.step(closure).gradient_engine == "jacobian"
    tiny_budget = MultiTaskOptimizer(
        torch.optim.SGD(params, lr=0.0), "upgrad", shared=enc, max_jacobian_bytes=0
    )
    assert tiny_budget.step(closure).gradient_engine == "gramian"
    assert tiny_budget.step(closure).gradient_engine == "gramian"
    as_params = MultiTaskOptimizer(
        torch.optim.SGD(params, lr=0.0), "upgrad", shared=enc.parameters(), max_jacobian_bytes=0
    )
    assert as_params.step(closure).gradient_engine == "jacobian"
    loss_only = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.0), "unitary", shared=enc)
    assert loss_only.step(closure).gradient_engine is None


def test_auto_takes_one_batched_pass_on_one_cuda_device_only():
    cpu, gpu0, gpu1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert not batched_pass("auto", {cpu})
    assert batched_pass("auto", {gpu0})
    assert not batched_pass("auto", {gpu0, gpu1})  # one batched pass cannot span devices
    assert not batched_pass("auto", {gpu0, cpu})
    assert batched_pass("batched", {cpu})
    assert not any(batched_pass(e, {d}) for e in ("jacobian", "gramian") for d in (cpu, gpu0))


def test_a_failed_batched_pass_falls_back_to_k_passes_once_and_says_so(caplog):
    enc, _, losses = unbatchable(3)
    shared = list(enc.parameters())
    expected = jacobian(losses(), shared)
    with pytest.raises(RuntimeError):  # engine="batched" by name: the error is the user's
        JacobianSource(shared, batched=True).compute(unpack(losses(), None))
    source = JacobianSource(shared, batched=True, fallback=True)  # engine="auto" on CUDA
    with caplog.at_level(logging.WARNING, logger="mtopt"):
        first = source.compute(unpack(losses(), None))
        second = source.compute(unpack(losses(), None))
    assert source.label == "jacobian"
    assert [r.message.count("batched Jacobian pass failed") for r in caplog.records] == [1]
    for got in (first, second):
        assert got.grads is not None
        torch.testing.assert_close(got.grads, expected)


def test_auto_wires_the_fall_back_and_batched_by_name_does_not(monkeypatch, caplog):
    # batched_pass says "batched" as it would on one CUDA device; the backward cannot be batched
    import mtopt.engine.setup as setup

    monkeypatch.setattr(setup, "batched_pass", lambda engine, devices: engine != "jacobian")
    enc, heads, closure = unbatchable(2)
    params = [*enc.parameters(), *heads.parameters()]
    auto = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.0), "mgda", shared=enc)
    with caplog.at_level(logging.WARNING, logger="mtopt"):
        assert auto.step(closure).gradient_engine == "jacobian"
    assert "batched Jacobian pass failed" in caplog.text
    named = MultiTaskOptimizer(
        torch.optim.SGD(params, lr=0.0), "mgda", shared=enc, engine="batched"
    )
    with pytest.raises(RuntimeError):
        named.step(closure)


def test_engine_errors():
    enc, heads = _model(2)
    opt = torch.optim.SGD(list(enc.parameters()) + list(heads.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="engine must be one of"):
        MultiTaskOptimizer(opt, "upgrad", shared=enc, engine="fast")
    with pytest.raises(ValueError, match="needs the gradients, not only their Gramian"):
        MultiTaskOptimizer(opt, "db_mtl", shared=enc, engine="gramian")
    with pytest.raises(ValueError, match="pass the shared module"):
        MultiTaskOptimizer(opt, "upgrad", shared=enc.parameters(), engine="gramian")
    with pytest.raises(ValueError, match="does not use parameter gradients"):
        MultiTaskOptimizer(opt, "mgda_ub", shared=enc, engine="gramian")
    assert Need.PARAM_GRADS in mtopt.make("upgrad").needs


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_batched_jacobian_matches_the_loop(dtype, tol):
    torch.manual_seed(0)
    enc = _Block().to(dtype)
    heads = [nn.Linear(128, 1).to(dtype) for _ in range(3)]
    z = enc(torch.randn(4, 3, 8, 8, dtype=dtype))
    unused = nn.Parameter(torch.ones(2, dtype=dtype))
    losses = [torch.tanh(h(z)).pow(i + 1).sum() for i, h in enumerate(heads)]
    params = [*enc.parameters(), unused]
    got = batched_jacobian(losses, params)
    want = jacobian(losses, params)
    assert got.shape == want.shape
    assert torch.equal(got[:, -2:], torch.zeros(3, 2, dtype=dtype))
    assert _relative(got, want) < tol


def test_batched_engine_in_the_optimizer():
    enc, heads = _model(2)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    params = list(enc.parameters()) + list(heads.parameters())
    out = {}
    for engine in ("jacobian", "batched"):
        e, h = copy.deepcopy(enc), copy.deepcopy(heads)
        ps = list(e.parameters()) + list(h.parameters())
        mto = MultiTaskOptimizer(torch.optim.SGD(ps, lr=0.1), "mgda", shared=e, engine=engine)
        info = mto.step(lambda e=e, h=h: [h[0](e(x)).pow(2).mean(), h[1](e(x)).abs().mean()])
        assert info.gradient_engine == engine
        out[engine] = torch.cat([p.detach().reshape(-1) for p in ps])
    assert _relative(out["batched"], out["jacobian"]) < 1e-10
    assert params
