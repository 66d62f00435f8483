"""Gradient accumulation (mtopt.engine.accumulation): a step on a list of micro-batch closures is
the step on their concatenated batch, to float64 rounding, for every loss- and parameter-level
method (streamed: no micro-batch graph outlives its Jacobian) and every closure method."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mtopt
from mtopt import Losses, MultiTaskOptimizer
from mtopt.core.capabilities import MetaBatchMethod
from mtopt.core.registry import make

TASKS = ("a", "b", "c")
STEPS = 3
BATCH = 12
MICRO = 3  # micro-batches of 4
EXTRA: dict[str, dict[str, Any]] = {
    "fixed": {"weights": [0.2, 0.3, 0.5]},
    "pcgrad": {"seed": 3},
    "rlw": {"seed": 3},
    "selective_groups": {"seed": 3, "warmup_steps": 1},
}
#: GO4Align's weights are loss ratios (about 10³ on these losses): a step size to match
LR = {"go4align": 5e-5}


def _level(name: str) -> str:
    return make(name, **EXTRA.get(name, {})).level


#: every method at a level accumulation serves (the representation level is refused)
SPECS = [(n, {}) for n in mtopt.available_methods() if _level(n) != "rep"] + [
    ("mgda_ub", {"level": "param"}),
    ("imtl", {"level": "param"}),
]
REP = [n for n in mtopt.available_methods() if _level(n) == "rep"]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh())
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(6, 1) for t in TASKS})


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(STEPS, BATCH, 5, generator=g, dtype=torch.float64)
    y = torch.randn(STEPS, BATCH, len(TASKS), generator=g, dtype=torch.float64)
    return x, y * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)


def train(
    name: str,
    hps: dict[str, Any],
    micro: int | None,
    scaler: torch.amp.GradScaler | None = None,
    broken: int | None = None,
):
    """STEPS steps on the whole batch (``micro=None``) or on ``micro`` micro-batches; with
    ``broken``, that micro-batch's task ``a`` has a finite loss whose gradient is NaN."""
    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=LR.get(name, 0.05), momentum=0.9)
    mto = MultiTaskOptimizer(
        opt, name, shared=model.encoder, grad_scaler=scaler, **{**EXTRA.get(name, {}), **hps}
    )
    x, y = data()

    def closure(xb: torch.Tensor, yb: torch.Tensor, nan: bool = False):
        def run() -> Losses:
            z = model.encoder(xb)
            out = {
                t: ((model.heads[t](z).squeeze(1) - yb[:, i]) ** 2).mean()
                for i, t in enumerate(TASKS)
            }
            if nan:  # sqrt at 0: the value 0, the gradient NaN
                out["a"] = out["a"] + torch.sqrt(((z - z.detach()) ** 2).sum())
            return Losses(out)

        return run

    infos = []
    for s in range(STEPS):
        xm, ym = x[s].flip(0), y[s].flip(0)  # a meta batch, for Auto-Lambda
        if micro is None:
            main, meta = closure(x[s], y[s]), closure(xm, ym)
        else:
            size = BATCH // micro
            parts = [slice(i * size, (i + 1) * size) for i in range(micro)]
            main = [closure(x[s][p], y[s][p], nan=k == broken) for k, p in enumerate(parts)]
            meta = [closure(xm[p], ym[p]) for p in parts]
        needs_meta = isinstance(mto.method, MetaBatchMethod)
        infos.append(mto.step(main, meta_closure=meta if needs_meta else None))
    return dict(model.named_parameters()), infos


@pytest.mark.parametrize(("name", "hps"), SPECS, ids=[n + str(h or "") for n, h in SPECS])
def test_micro_batches_equal_the_whole_batch(name, hps):
    whole, whole_infos = train(name, hps, None)
    parts, infos = train(name, hps, MICRO)
    torch.manual_seed(0)
    start = dict(Net().double().named_parameters())
    moved = max(float((whole[n] - start[n]).detach().abs().max()) for n in start)
    assert moved > 1e-4, f"{name}: the parameters barely moved ({moved:.1e}); the test is void"
    for n, p in whole.items():
        torch.testing.assert_close(parts[n], p, rtol=1e-9, atol=1e-11, msg=f"{name} {n}")
    for a, b in zip(whole_infos, infos, strict=True):
        for t in TASKS:  # the method saw the concatenated batch's losses
            assert b.losses[t] == pytest.approx(a.losses[t], rel=1e-12)
        if a.weights is not None:
            torch.testing.assert_close(b.weights, a.weights, rtol=1e-9, atol=1e-12)


def test_a_single_micro_batch_is_a_plain_step():
    whole, _ = train("mgda", {}, None)
    one, _ = train("mgda", {}, 1)
    for n, p in whole.items():
        torch.testing.assert_close(one[n], p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", REP)
def test_representation_level_is_refused_in_one_line(name):
    model = Net().double()
    mto = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name,
                             shared=model.encoder, **EXTRA.get(name, {}))  # fmt: skip
    with pytest.raises(ValueError, match=r"not possible with .* at the representation level"):
        mto.step([lambda: {"a": model.encoder(torch.ones(1, 5)).sum()}] * 2)


def test_what_accumulation_cannot_serve_is_refused():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gram = MultiTaskOptimizer(opt, "upgrad", shared=model.encoder, engine="gramian")
    with pytest.raises(ValueError, match="needs the per-task gradients"):
        gram.step([lambda: {"a": model.encoder(torch.ones(1, 5)).sum()}])
    with pytest.raises(ValueError, match="non-empty list of closures"):
        MultiTaskOptimizer(opt, "mgda", shared=model.encoder).step([])


#: a grad scaler around accumulation: loss level, learned scales, weights, a direction, weights
#: that are not invariant to the gradients' scale (Nash-MTL: a method shown scaled gradients, or a
#: direction not scaled back, gives another step), a closure method, a meta-batch closure method
SCALED = ["unitary", "uw", "mgda", "pcgrad", "nash_mtl", "famo", "auto_lambda"]


@pytest.mark.parametrize("name", SCALED)
def test_micro_batches_under_a_grad_scaler_equal_the_whole_batch(name):
    """A power-of-two scale multiplies every backward quantity exactly: with a scaler, the
    micro-batches give the whole batch's step, and both the step without a scaler."""
    plain, _ = train(name, {}, None)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2)]
    whole, _ = train(name, {}, None, scaler=scalers[0])
    parts, infos = train(name, {}, MICRO, scaler=scalers[1])
    assert not any(i.skipped for i in infos)
    assert scalers[1].get_scale() == 2.0**12
    for n, p in whole.items():
        torch.testing.assert_close(parts[n], p, rtol=1e-9, atol=1e-11, msg=f"{name} {n}")
        torch.testing.assert_close(p, plain[n], rtol=1e-9, atol=1e-11, msg=f"{name} {n}")


@pytest.mark.parametrize("name", ["unitary", "mgda", "pcgrad"])
def test_a_non_finite_micro_batch_skips_the_step_under_a_grad_scaler(name):
    """One micro-batch's NaN gradient: with a scaler the whole step is skipped (no parameter
    moves, the scale halves, as GradScaler does); without one, the step raises naming the
    task."""
    torch.manual_seed(0)
    start = dict(Net().double().named_parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    params, infos = train(name, {}, MICRO, scaler=scaler, broken=1)
    assert all(i.skipped and i.weights is None and i.gradient_engine == "jacobian" for i in infos)
    assert scaler.get_scale() == 2.0 ** (12 - STEPS)
    for n, p in start.items():
        assert torch.equal(params[n], p), f"{name}: a skipped step moved {n}"
    with pytest.raises(FloatingPointError, match=r"task\(s\) \['a'\] is not finite"):
        train(name, {}, MICRO, broken=1)
