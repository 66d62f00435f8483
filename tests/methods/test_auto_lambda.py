"""Auto-Lambda (Liu et al. 2022): the meta-gradient against autograd through an explicit
unrolled step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtopt
from _context import make_context
from mtopt.core.method import MethodInput


def quadratic_problem(seed: int, k: int = 3, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    a_tr = torch.randn(k, 4, d, generator=g, dtype=torch.float64)
    b_tr = torch.randn(k, 4, generator=g, dtype=torch.float64)
    a_me = torch.randn(k, 4, d, generator=g, dtype=torch.float64)
    b_me = torch.randn(k, 4, generator=g, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def losses(t, a, b):
        return 0.5 * ((a @ t - b) ** 2).sum(-1)  # (k,)

    return theta, (lambda t: losses(t, a_tr, b_tr)), (lambda t: losses(t, a_me, b_me))


def method_context(theta, train, meta, optimizer):
    return make_context(lambda: train(theta), lambda: meta(theta), [theta], optimizer)


def run(method, theta, train, meta, optimizer):
    inputs = MethodInput(train(theta).detach(), ("a", "b", "c"))
    return method.aggregate_in_context(inputs, method_context(theta, train, meta, optimizer))


def explicit_meta_gradient(theta, train, meta, lam, lr, wd=0.0, momentum=0.0, buf=None):
    lam = lam.clone().requires_grad_(True)
    t = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((lam * train(t)).sum(), t, create_graph=True)
    step = g + wd * t
    if buf is not None:
        step = step + momentum * buf
    t_virtual = t - lr * step
    (grad_lam,) = torch.autograd.grad(meta(t_virtual).sum(), lam)
    return grad_lam


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.floats(1e-3, 0.2), st.floats(0.0, 0.1))
def test_meta_gradient_matches_autograd_with_sgd(seed, lr, wd):
    theta, train, meta = quadratic_problem(seed)
    opt = torch.optim.SGD([theta], lr=lr, weight_decay=wd)
    method = mtopt.make("auto_lambda")
    method._ensure(3, lr)
    before = theta.detach().clone()
    got = method.meta_gradient(method_context(theta, train, meta, opt))
    expected = explicit_meta_gradient(theta, train, meta, method.lambdas.detach(), lr, wd)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)  # exact FD on quadratics
    assert torch.equal(theta.detach(), before)  # parameters restored bit for bit


def test_meta_gradient_uses_the_sgd_momentum_buffer():
    theta, train, meta = quadratic_problem(3)
    opt = torch.optim.SGD([theta], lr=0.05, momentum=0.9)
    opt.zero_grad()
    train(theta).sum().backward()
    opt.step()  # creates the momentum buffer
    buf = opt.state[theta]["momentum_buffer"].clone()
    method = mtopt.make("auto_lambda")
    method._ensure(3, 0.05)
    got = method.meta_gradient(method_context(theta, train, meta, opt))
    expected = explicit_meta_gradient(
        theta, train, meta, method.lambdas.detach(), 0.05, momentum=0.9, buf=buf
    )
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    no_buffer = explicit_meta_gradient(theta, train, meta, method.lambdas.detach(), 0.05)
    assert not torch.allclose(got, no_buffer)


def test_with_adam_the_virtual_step_is_plain_sgd():
    theta, train, meta = quadratic_problem(4)
    opt = torch.optim.Adam([theta], lr=0.01)
    method = mtopt.make("auto_lambda")
    method._ensure(3, 0.01)
    got = method.meta_gradient(method_context(theta, train, meta, opt))
    expected = explicit_meta_gradient(theta, train, meta, method.lambdas.detach(), 0.01)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_weights_move_toward_the_task_that_helps_the_meta_loss():
    """Task 'good' trains the same regression as the meta loss; 'bad' pulls elsewhere."""
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    target = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    mto = mtopt.MultiTaskOptimizer(torch.optim.SGD([theta], lr=0.05), "auto_lambda", meta_lr=0.05)
    for _ in range(30):
        info = mto.step(
            lambda: {"good": ((theta - target) ** 2).sum(), "bad": ((theta + target) ** 2).sum()},
            meta_closure=lambda: {"good": ((theta - target) ** 2).sum(), "bad": 0 * theta.sum()},
        )
    w = info.weight_dict()
    assert w["good"] > 0.1 > w["bad"]


def test_engine_requires_a_meta_closure():
    theta = torch.nn.Parameter(torch.ones(2))
    mto = mtopt.MultiTaskOptimizer(torch.optim.SGD([theta], lr=0.1), "auto_lambda")
    with pytest.raises(ValueError, match="meta_closure"):
        mto.step(lambda: [theta.sum(), theta.pow(2).sum()])


def test_state_round_trip_and_validation():
    theta, train, meta = quadratic_problem(5)
    opt = torch.optim.SGD([theta], lr=0.05)
    a = mtopt.make("auto_lambda", meta_lr=0.01)
    run(a, theta, train, meta, opt)
    b = mtopt.make("auto_lambda", meta_lr=0.01)
    b.load_state_dict(a.state_dict())
    wa = run(a, theta, train, meta, opt).weights
    wb = run(b, theta, train, meta, opt).weights
    assert torch.equal(wa, wb)
    with pytest.raises(ValueError, match="meta_split"):
        mtopt.make("auto_lambda", meta_split="test")


def test_meta_gradient_with_per_group_learning_rates_and_a_frozen_group():
    """Exact form -Σ_p a_p ∂ℓ/∂θ_p v_p with two parameter groups, one of them at lr 0."""
    theta, train, meta = quadratic_problem(6)
    k = 3
    for lrs in ((0.05, 0.01), (0.0, 0.02), (0.0, 0.0)):
        a = torch.nn.Parameter(theta.detach()[:2].clone())
        b = torch.nn.Parameter(theta.detach()[2:].clone())
        opt = torch.optim.SGD([{"params": [a], "lr": lrs[0]}, {"params": [b], "lr": lrs[1]}])
        method = mtopt.make("auto_lambda")
        method._ensure(k, lrs[0])
        context = make_context(
            lambda a=a, b=b: train(torch.cat([a, b])),
            lambda a=a, b=b: meta(torch.cat([a, b])),
            [a, b],
            opt,
        )
        got = method.meta_gradient(context)
        lam = method.lambdas.detach().clone().requires_grad_(True)
        t = torch.cat([a, b]).detach().requires_grad_(True)
        (g,) = torch.autograd.grad((lam * train(t)).sum(), t, create_graph=True)
        step = torch.cat([torch.full((2,), lrs[0]), torch.full((3,), lrs[1])]).double()
        (expected,) = torch.autograd.grad(meta(t - step * g).sum(), lam)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
