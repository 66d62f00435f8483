"""Mixed precision (mtopt.engine.scaling): a GradScaler inside the multi-task step, and bfloat16
autocast on the CPU."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mtopt import Losses, MultiTaskOptimizer

TASKS = ("a", "b", "c")
#: one spec per gradient source and kind of answer (weights or a direction), and a closure method
FAMILIES: list[tuple[str, dict[str, Any]]] = [
    ("unitary", {}),  # loss level
    ("uw", {}),  # loss level, learned scales
    ("mgda", {}),  # Jacobian, weights
    ("pcgrad", {"seed": 1}),  # Jacobian, a direction
    ("upgrad", {"engine": "gramian"}),  # Gramian engine
    ("mgda_ub", {}),  # representation, Gramian only
    ("graddrop", {"seed": 1}),  # representation, a direction
    ("famo", {}),  # closure method
]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh())
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(8, 1) for t in TASKS})


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 5, generator=g)
    y = torch.randn(16, len(TASKS), generator=g) * torch.tensor([1.0, 10.0, 0.1])
    return x, y


def run(name, hps, steps=3, scaler=None, autocast=None, big=1.0, fixed=False):
    """``steps`` steps (on one batch if ``fixed``); the model and the step records."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mto = MultiTaskOptimizer(opt, name, shared=model.encoder, grad_scaler=scaler, **hps)
    infos = []
    for s in range(steps):
        x, y = batch(0 if fixed else s)

        def closure(x=x, y=y):
            ctx = (
                torch.autocast("cpu", dtype=autocast)
                if autocast
                else torch.autocast("cpu", enabled=False)
            )
            with ctx:
                z = model.encoder(x)
                out = {
                    t: (
                        (model.heads[t](mto.task_input(z, t)).squeeze(1).float() - y[:, i]) ** 2
                    ).mean()
                    * big
                    for i, t in enumerate(TASKS)
                }
            return Losses(out, features=z)

        infos.append(mto.step(closure))
    return model, infos


@pytest.mark.parametrize(("name", "hps"), FAMILIES, ids=[n for n, _ in FAMILIES])
def test_a_scaler_changes_nothing_when_gradients_are_finite(name, hps):
    plain, plain_infos = run(name, hps)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled, infos = run(name, hps, scaler=scaler)
    assert not any(i.skipped for i in infos)
    assert scaler.get_scale() == 2.0**12  # growth only after 2000 good steps
    for (n, p), q in zip(plain.named_parameters(), scaled.parameters(), strict=True):
        # a power-of-two scale multiplies every backward quantity exactly; what remains is the
        # float32 rounding of the method's own arithmetic on the unscaled copy
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"{name} {n}")
    for a, b in zip(plain_infos, infos, strict=True):
        if a.weights is not None:
            torch.testing.assert_close(b.weights, a.weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "hps"), FAMILIES[:6], ids=[n for n, _ in FAMILIES[:6]])
def test_an_overflow_skips_the_step_as_gradscaler_does(name, hps):
    init = 2.0**100  # 1e30-sized losses × 2^100 overflow float32 in the backward pass
    scaler = torch.amp.GradScaler("cpu", init_scale=init)
    torch.manual_seed(0)
    start = [p.detach().clone() for p in Net().parameters()]
    model, infos = run(name, hps, steps=1, scaler=scaler, big=1e30)
    assert infos[0].skipped
    assert infos[0].updates in (0, 1)
    for p, q in zip(start, model.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: a skipped step moved the parameters"
    # what torch's own loop does with the same scaler settings on the same overflow
    torch.manual_seed(0)
    ref_model = Net()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    ref = torch.amp.GradScaler("cpu", init_scale=init)
    x, y = batch(0)
    z = ref_model.encoder(x)
    loss = sum(((ref_model.heads[t](z).squeeze(1) - y[:, i]) ** 2).mean() * 1e30
               for i, t in enumerate(TASKS))  # fmt: skip
    ref.scale(loss).backward()
    ref.step(ref_opt)
    ref.update()
    assert scaler.get_scale() == ref.get_scale() == init * 0.5


def test_scaled_steps_train_after_a_skip():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    _, infos = run("mgda", {}, steps=40, scaler=scaler, fixed=True)
    skipped = [i.skipped for i in infos]
    assert skipped[0]  # 2^127 times the gradients overflows float32 at once
    assert not skipped[-1]
    losses = [sum(i.losses.values()) for i in infos]
    assert losses[-1] < losses[0]


def test_what_a_scaler_cannot_serve_is_refused():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="makes its own optimizer updates"):
        MultiTaskOptimizer(opt, "selective_groups", grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match=r"must be a torch\.amp\.GradScaler"):
        MultiTaskOptimizer(opt, "unitary", grad_scaler=object())


@pytest.mark.parametrize(("name", "hps"), FAMILIES, ids=[n for n, _ in FAMILIES])
def test_bfloat16_autocast_follows_float32(name, hps):
    """Under bfloat16 autocast the encoder's matmuls round to 8 bits of mantissa: the weights of
    the first step agree with float32's to that precision, and training makes progress."""
    _, full = run(name, hps, steps=1)
    _, infos = run(name, hps, steps=30, autocast=torch.bfloat16, fixed=True)
    assert all(math.isfinite(v) for i in infos for v in i.losses.values())
    if full[0].weights is not None:
        torch.testing.assert_close(infos[0].weights, full[0].weights, rtol=0.05, atol=0.02)
    first = sum(infos[0].losses.values())
    last = sum(infos[-1].losses.values())
    assert last < first
