"""The heads' gradient ``Σ_k c_k ∇_h ℓ_k`` taken in the per-task passes (``HeadGrads``): the
same ``.grad`` as a backward pass of ``Σ_k c_k ℓ_k`` into the heads, on every engine, for heads
shared by two tasks, heads no loss reaches, head-only loss terms, a stem upstream of the encoder
and a weight tied between the input and a head; taken only when every head is reached before
``z`` and none has hooks; each loss and head differentiated once per task instead of twice."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from mtopt import Losses, MultiTaskOptimizer
from mtopt.core.gradients import HeadGrads, head_grads, jacobian
from mtopt.engine.closure import unpack
from mtopt.engine.sources import (
    AutoSource,
    GramianSource,
    JacobianSource,
    RepresentationSource,
    representation_rows,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


class Model(nn.Module):
    """An encoder and K heads; optionally one head parameter read by two tasks (``tied``), a
    stem before the encoder that is not shared (``stem``), and a gain that scales both the input
    and the first head's output (``gain``: a head reached before z and behind it), and a
    parameter no loss reads (``idle``); always a head-only term in the first loss."""

    def __init__(
        self,
        k: int,
        dtype: torch.dtype,
        tied: bool,
        seed: int,
        stem: bool = False,
        gain: bool = False,
        idle: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Linear(5, 5).to(dtype) if stem else None
        self.gain = nn.Parameter(torch.tensor(1.3, dtype=dtype)) if gain else None
        self.encoder = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6)).to(dtype)
        self.heads = nn.ModuleList(nn.Linear(6, 2) for _ in range(k)).to(dtype)
        self.tie = nn.Parameter(torch.randn(2, dtype=dtype)) if tied else None
        self.idle = nn.Parameter(torch.ones(3, dtype=dtype)) if idle else None
        self.x = torch.randn(4, 5, dtype=dtype)
        self.y = (
            torch.randn(k, 4, 2, dtype=dtype) * torch.logspace(0, 2, k, dtype=dtype)[:, None, None]
        )
        self.k = k

    def closure(self, features: bool = True) -> Losses:
        x = self.x if self.stem is None else torch.tanh(self.stem(self.x))
        x = x if self.gain is None else x * self.gain
        z = self.encoder(x)
        losses = []
        for i, head in enumerate(self.heads):
            out = head(z)
            if self.tie is not None and i < 2:
                out = out * self.tie
            if self.gain is not None and i == 0:
                out = out * self.gain
            losses.append(nn.functional.mse_loss(out, self.y[i]))
        losses[0] = losses[0] + 0.1 * self.heads[0].bias.pow(2).sum()
        return Losses(losses, features=z if features else None)

    def head_params(self) -> list[Tensor]:
        return [p for n, p in self.named_parameters() if not n.startswith("encoder")]


def _unfuse(mto: MultiTaskOptimizer) -> None:
    """The reference: the heads' gradient by its own backward pass, as before the fusion."""
    source = mto.source
    for part in (source, getattr(source, "jacobian", None), getattr(source, "gramian", None)):
        if isinstance(part, (JacobianSource, GramianSource, RepresentationSource)):
            part.heads = []


def _step(
    model: Model, engine: str, method: str, policy: str, fused: bool, features: bool
) -> list[Tensor | None]:
    mto = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),  # .grad after the step: what was written
        method,
        shared=model.encoder,
        engine=engine,
        head_policy=policy,
    )
    if not fused:
        _unfuse(mto)
    mto.step(lambda: model.closure(features))
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@settings(max_examples=40)
@given(
    k=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    tied=st.booleans(),
    stem=st.booleans(),
    gain=st.booleans(),
    idle=st.booleans(),
    engine=st.sampled_from(["auto", "jacobian", "batched", "gramian"]),
    features=st.booleans(),
    method=st.sampled_from(["upgrad", "mgda", "imtl_g"]),
    policy=st.sampled_from(["raw", "weighted"]),
    seed=st.integers(0, 2**16),
)
def test_the_heads_gradient_from_the_per_task_passes_equals_its_own_backward(
    k, dtype, tied, stem, gain, idle, engine, features, method, policy, seed
):
    if tied and k < 2:
        k = 2
    flags = (k, dtype, tied, seed, stem, gain, idle)
    got = _step(Model(*flags), engine, method, policy, True, features)
    want = _step(Model(*flags), engine, method, policy, False, features)
    for g, w in zip(got, want, strict=True):
        if w is None:  # no loss reaches it: left alone by both
            assert g is None
            continue
        assert g is not None
        assert g.dtype == w.dtype
        assert (g - w).norm() <= TOL[dtype] * w.norm()  # both zero where c_k is 0
    names = [n for n, _ in Model(*flags).named_parameters()]
    if idle:
        assert got[names.index("idle")] is None  # no loss reaches it


@pytest.mark.parametrize("engine", ["jacobian", "batched", "gramian"])
def test_against_an_independent_reference_with_tied_and_head_only_terms(engine):
    """c_k from the method's weights (policy "weighted"): every head parameter's gradient is
    ``Σ_k c_k ∂ℓ_k/∂p`` computed loss by loss with autograd, in float64 to 1e-12, with a
    parameter read by two heads and a gain read before z and behind it (taken in every pass,
    through the encoder)."""
    model = Model(4, torch.float64, True, 3, gain=True)
    mto = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "mgda", shared=model.encoder,
        head_policy="weighted", engine=engine,
    )  # fmt: skip
    info = mto.step(model.closure)
    c = info.weights.to(torch.float64)
    losses = model.closure().losses
    heads = model.head_params()
    want = [torch.zeros_like(p) for p in heads]
    for ck, loss in zip(c, losses, strict=True):
        for acc, g in zip(
            want,
            torch.autograd.grad(loss, heads, retain_graph=True, allow_unused=True),
            strict=True,
        ):
            if g is not None:
                acc += ck * g
    for p, w in zip(heads, want, strict=True):
        assert _relative(p.grad, w) < 1e-12


def _mse_backwards(engine: str, features: bool, fused: bool, k: int = 5) -> int:
    """Runs of the MSE's backward node in the second step (the first verifies a Gramian)."""
    model = Model(k, torch.float64, False, 0)
    mto = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), "upgrad", shared=model.encoder,
        engine=engine,
    )  # fmt: skip
    if not fused:
        _unfuse(mto)
    mto.step(lambda: model.closure(features))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mto.step(lambda: model.closure(features))
    return sum(ev.count for ev in prof.key_averages() if ev.key == "MseLossBackward0")


@pytest.mark.parametrize("engine", ["jacobian", "batched", "gramian"])
def test_each_loss_is_differentiated_once_per_step(engine):
    """K passes (or the rows ∂ℓ_k/∂z) take the heads' gradients too: each loss's backward
    runs once per step (K in all), where the heads' own backward pass made it 2K."""
    k = 5
    assert _mse_backwards(engine, True, True, k) == k
    assert _mse_backwards(engine, True, False, k) == 2 * k


def _taken(model: Model, closure, engine: str = "batched"):
    closure = closure or model.closure
    mto = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "upgrad", shared=model.encoder,
        engine=engine,
    )  # fmt: skip
    with mto.source.recording(None):  # the Gramian engine records the forward
        step = unpack(closure(), None)
    return mto.source.compute(step).heads


def _names(model: nn.Module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("engine", ["jacobian", "batched", "gramian"])
def test_the_heads_are_taken_only_when_all_are_reached_before_z_without_hooks(engine):
    """Taken: every head before z (a gain also behind it is fine). Left to the backward pass
    (``None``): a stem, a parameter no loss reaches, a hooked head, no z, a loss that reads
    an encoder weight beside z."""
    assert _taken(Model(3, torch.float64, True, 1, gain=True), None, engine) is not None
    assert _taken(Model(3, torch.float64, False, 1, stem=True), None, engine) is None
    assert _taken(Model(3, torch.float64, False, 1, idle=True), None, engine) is None
    hooked = Model(3, torch.float64, False, 1)
    hooked.heads[1].weight.register_hook(lambda g: g)
    assert _taken(hooked, None, engine) is None
    module_hook = Model(3, torch.float64, False, 1)
    module_hook.heads[2].register_full_backward_hook(lambda *args: None)
    assert _taken(module_hook, None, engine) is None
    plain = Model(3, torch.float64, False, 1)
    assert _taken(plain, lambda: plain.closure(features=False), engine) is None
    out = plain.closure()
    losses = list(out.losses)
    encoder = list(plain.encoder.parameters())
    assert head_grads(losses, out.features, encoder, plain.head_params()) is not None
    losses[1] = losses[1] + plain.encoder[0].weight.pow(2).sum()  # beside z
    assert head_grads(losses, out.features, encoder, plain.head_params()) is None


def test_a_hooked_head_sees_the_weighted_gradient_once():
    """A tensor hook on a head weight runs once per step on ``Σ_k c_k ∂ℓ_k/∂p``, as before;
    a post-accumulate-grad hook runs once too (both by the backward pass, which a hooked head
    keeps). Unhooked, the per-loss gradients are released once written."""
    model = Model(3, torch.float64, False, 4)
    seen, after = [], []
    model.heads[2].weight.register_hook(lambda g: seen.append(g.clone()))
    model.heads[0].bias.register_post_accumulate_grad_hook(lambda p: after.append(1))
    mto = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "mgda", shared=model.encoder,
        head_policy="weighted",
    )  # fmt: skip
    kept = []
    compute = mto.source.compute
    mto.source.compute = lambda step: kept.append(compute(step)) or kept[-1]
    info = mto.step(model.closure)
    assert len(seen) == 1
    assert len(after) == 1
    loss = model.closure().losses[2]
    want = float(info.weights[2]) * torch.autograd.grad(loss, model.heads[2].weight)[0]
    assert _relative(seen[0], want) < 1e-12
    assert kept[0].heads is None
    plain = Model(3, torch.float64, False, 4)
    mto = MultiTaskOptimizer(
        torch.optim.SGD(plain.parameters(), lr=0.0), "mgda", shared=plain.encoder
    )
    kept = []
    compute = mto.source.compute
    mto.source.compute = lambda step: kept.append(compute(step)) or kept[-1]
    mto.step(plain.closure)
    assert kept[0].heads is not None
    assert kept[0].heads.per_loss is None  # written, then released


def test_auto_and_the_gramian_engine_pass_the_heads_on():
    model = Model(2, torch.float64, False, 2)
    mto = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "upgrad", shared=model.encoder,
        engine="auto", max_jacobian_bytes=0,  # the Gramian
    )  # fmt: skip
    assert isinstance(mto.source, AutoSource)
    info = mto.step(model.closure)
    assert info.gradient_engine == "gramian"
    assert all(p.grad is not None for p in model.head_params() if p is not model.idle)


def test_write_accumulates_sums_in_float32_and_leaves_unreached_parameters():
    """Half-precision heads: the sum is formed in float32 and rounded once to float16; an
    existing ``.grad`` is added to; a parameter no loss reaches keeps ``None``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.zeros(64, dtype=torch.float16, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    idle = torch.zeros(2, requires_grad=True)
    ga = [torch.randn(64, generator=gen).half() for _ in range(3)]
    gb = torch.randn(3, generator=gen)
    heads = HeadGrads([a, b, idle])
    heads.per_loss = [(ga[0], gb, None), (ga[1], None, None), (ga[2], None, None)]
    b.grad = torch.ones(3)
    c = torch.tensor([0.1, 300.0, -7.25], dtype=torch.float64)
    heads.write(c)
    exact = sum(ck * g.double() for ck, g in zip(c, ga, strict=True))
    assert a.grad.dtype == torch.float16
    # one float16 rounding of a float32 sum (2⁻¹¹ relative) and float32's own (a few 2⁻²⁴)
    assert torch.all((a.grad.double() - exact).abs() <= 2.0**-10 * exact.abs() + 2.0**-24)
    torch.testing.assert_close(b.grad, 1.0 + 0.1 * gb, rtol=1e-6, atol=1e-7)
    assert idle.grad is None


def test_jacobian_fills_the_heads_and_keeps_its_rows():
    """``jacobian(losses, inputs, heads)``: the same rows as without heads, and each loss's
    own gradients of the heads (``None`` for a head it does not reach)."""
    torch.manual_seed(0)
    enc, h0, h1 = nn.Linear(3, 4).double(), nn.Linear(4, 1).double(), nn.Linear(4, 1).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    z = enc(x)
    losses = [h0(z).pow(2).mean(), h1(z).abs().mean()]
    shared = list(enc.parameters())
    heads = HeadGrads([*h0.parameters(), *h1.parameters()])
    rows = jacobian(losses, shared, heads)
    assert torch.equal(rows, jacobian(losses, shared))
    assert heads.per_loss is not None
    assert heads.per_loss[0][2:] == (None, None)
    assert heads.per_loss[1][:2] == (None, None)
    want = torch.autograd.grad(losses[1], list(h1.parameters()), retain_graph=True)
    for g, w in zip(heads.per_loss[1][2:], want, strict=True):
        assert torch.equal(g, w)


# -- the representation level: the heads' gradients from the one pass into the heads' copies ---


class RepModel(nn.Module):
    """An encoder and K heads that read ``z`` through ``mto.task_input``; optionally a head
    parameter two heads read (``tied``), one no loss reads (``idle``), a hook on a head
    weight (``hooked``), or a loss that also reads ``z`` itself (``direct``)."""

    def __init__(
        self, k: int, seed: int, tied=False, idle=False, hooked=False, direct=False, module=False
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6)).double()
        self.heads = nn.ModuleList(nn.Linear(6, 2) for _ in range(k)).double()
        self.tie = nn.Parameter(torch.randn(2, dtype=torch.float64)) if tied else None
        self.idle = nn.Parameter(torch.ones(3, dtype=torch.float64)) if idle else None
        if hooked:
            self.heads[0].weight.register_hook(lambda g: g)
        if module:  # a non-linear module hook: it must see the c-weighted gradient, once
            self.heads[1].register_full_backward_hook(
                lambda mod, gin, gout: tuple(
                    None if g is None else g.clamp(-1e-3, 1e-3) for g in gin
                )
            )
        self.direct = direct
        self.x = torch.randn(6, 5, dtype=torch.float64)
        self.y = torch.randn(k, 6, 2, dtype=torch.float64)

    def closure(self, mto: MultiTaskOptimizer):
        def run() -> Losses:
            z = self.encoder(self.x)
            losses = []
            for i, head in enumerate(self.heads):
                out = head(mto.task_input(z, i))
                if self.tie is not None and i < 2:
                    out = out * self.tie
                losses.append(nn.functional.mse_loss(out, self.y[i]))
            if self.direct:
                losses[-1] = losses[-1] + 0.1 * z.pow(2).mean()
            return Losses(losses, features=z)

        return run


def _rep_step(flags: dict, method: str, policy: str, fused: bool, k: int = 3):
    model = RepModel(k, **flags)
    mto = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), method, shared=model.encoder,
        head_policy=policy,
    )  # fmt: skip
    assert isinstance(mto.source, RepresentationSource)
    if not fused:
        _unfuse(mto)
    kept = []
    compute = mto.source.compute
    mto.source.compute = lambda step: kept.append(compute(step)) or kept[-1]
    mto.step(model.closure(mto))
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return grads, kept[0].heads is not None


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(2, 4),
    odd=st.sampled_from(["", "tied", "idle", "hooked", "direct", "module"]),
    method=st.sampled_from(["mgda_ub", "imtl", "rotograd"]),
    policy=st.sampled_from(["raw", "weighted"]),
)
def test_at_the_representation_level_the_one_pass_gives_the_heads_gradient(
    seed, k, odd, method, policy
):
    """The same ``.grad`` as the heads' own backward pass; taken only when every head
    parameter is reached by one loss alone through its copy, with no hook and no loss reading
    ``z`` itself."""
    flags = {"seed": seed, **({odd: True} if odd else {})}
    got, taken = _rep_step(flags, method, policy, True, k)
    want, _ = _rep_step(flags, method, policy, False, k)
    assert taken == (odd == "")
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            assert (g - w).norm() <= 1e-12 * w.norm()


def test_at_the_representation_level_each_loss_is_differentiated_once():
    def count(fused: bool) -> int:
        model = RepModel(4, 0)
        mto = MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.01), "mgda_ub", shared=model.encoder
        )
        if not fused:
            _unfuse(mto)
        mto.step(model.closure(mto))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            mto.step(model.closure(mto))
        return sum(ev.count for ev in prof.key_averages() if ev.key == "MseLossBackward0")

    assert count(True) == 4
    assert count(False) == 8


def test_a_stem_left_out_of_shared_is_refused_at_the_representation_level():
    """A task-specific parameter before z would get no gradient at the representation level
    (the update reaches the encoder side only through ``backward(z, d, inputs=shared)``):
    one line naming the fix, at the first step. At the parameter level it gets the heads'
    gradient, as before."""
    torch.manual_seed(0)
    stem, enc = nn.Linear(4, 4), nn.Linear(4, 3)
    heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    params = [*stem.parameters(), *enc.parameters(), *heads.parameters()]
    for method in ("imtl", "upgrad"):
        mto = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), method, shared=enc)

        def closure(mto=mto):
            z = enc(torch.tanh(stem(x)))
            outs = [h(mto.task_input(z, i))[:, 0] for i, h in enumerate(heads)]
            return Losses([(o - y[:, i]).pow(2).mean() for i, o in enumerate(outs)], features=z)

        if method == "imtl":
            with pytest.raises(ValueError, match=r"2 parameter\(s\) not in shared feed") as err:
                mto.step(closure)
            assert "\n" not in str(err.value)
            assert "(4, 4), (4,)" in str(err.value)
        else:
            mto.step(closure)
            assert stem.weight.grad is not None


@pytest.mark.parametrize("with_heads", [True, False])
def test_a_loss_reading_another_tasks_copy_gets_its_own_row(with_heads):
    """The one pass credits a copy's gradient to the copy's task; when loss 0 also reads task
    1's copy, the walk sends the rows to K passes (each row then holds all of its loss's
    reads), with or without heads to take."""
    torch.manual_seed(0)
    z = torch.randn(3, dtype=torch.float64, requires_grad=True) * 1.0
    c0, c1 = z.detach().requires_grad_(), z.detach().requires_grad_()
    w0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    l0 = (c0 * w0).sum() + 2 * c1.sum()
    l1 = (c1 * w1).sum()
    heads = HeadGrads([w0, w1]) if with_heads else None
    rows = representation_rows([(z, 0, c0), (z, 1, c1)], ("a", "b"), [l0, l1], z, heads)
    torch.testing.assert_close(rows[0], (w0 + 2).detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(rows[1], w1.detach(), rtol=0, atol=0)
    if heads is not None:
        assert heads.per_loss is None


@pytest.mark.parametrize("case", ["penalty", "second_forward", "fine"])
def test_a_loss_reaching_shared_parameters_beside_z_is_refused_at_the_representation_level(case):
    """At the representation level the shared parameters get only ``backward(z, d)``: a loss
    that reaches them otherwise (a penalty on an encoder weight, heads reading a second forward
    instead of the ``z`` returned) would lose that gradient; one line at the first step."""
    torch.manual_seed(0)
    enc, heads = nn.Linear(4, 3), nn.ModuleList(nn.Linear(3, 1) for _ in range(2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    mto = MultiTaskOptimizer(
        torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1), "imtl", shared=enc
    )

    def closure() -> Losses:
        z = enc(x)
        read = enc(x)  # a second forward, read without task_input (a copy would cut it off)
        losses = [
            (h(read if case == "second_forward" else mto.task_input(z, i))[:, 0] - y[:, i])
            .pow(2)
            .mean()
            for i, h in enumerate(heads)
        ]
        if case == "penalty":
            losses[0] = losses[0] + 1e-3 * enc.weight.pow(2).sum()
        return Losses(losses, features=z)

    if case == "fine":
        mto.step(closure)
        assert enc.weight.grad is not None
        return
    with pytest.raises(ValueError, match="reaches shared parameters other than through") as err:
        mto.step(closure)
    assert "\n" not in str(err.value)
