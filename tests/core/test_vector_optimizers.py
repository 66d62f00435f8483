"""The small-vector optimizers of the learned task scalars equal torch's, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtopt.core.task_vector import (
    ScalarAdam,
    ScalarSGD,
    TaskVector,
    VectorAdam,
    floats_to_tensor,
)


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 12),
    lr=st.sampled_from([1e-4, 0.025, 0.5]),
    weight_decay=st.sampled_from([0.0, 1e-3, 0.01]),
    seed=st.integers(0, 2**31 - 1),
)
def test_vector_adam_equals_torch_adam(k, lr, weight_decay, seed):
    g = torch.Generator().manual_seed(seed)
    ours = torch.randn(k, dtype=torch.float64, generator=g, requires_grad=True)
    ref = ours.detach().clone().requires_grad_(True)
    a = VectorAdam([ours], lr=lr, weight_decay=weight_decay)
    b = torch.optim.Adam([ref], lr=lr, weight_decay=weight_decay)
    for _ in range(8):
        grad = torch.randn(k, dtype=torch.float64, generator=g) * 10 ** float(
            torch.randn(1, generator=g)
        )
        for opt, p in ((a, ours), (b, ref)):
            opt.zero_grad(set_to_none=True)
            p.grad = grad.clone()
            opt.step()
        assert torch.equal(ours, ref)
    state = a.state_dict()
    again = VectorAdam([ours.detach().clone().requires_grad_(True)], lr=lr)
    again.load_state_dict(state)
    assert again.step_count == 8
    assert torch.equal(again.exp_avg, a.exp_avg)


def test_task_vector_round_trip():
    vector = TaskVector("uw", 0.0, lambda ps: VectorAdam(ps, lr=0.1))
    vector.ensure(3)
    vector.step(torch.tensor([1.0, 2.0, 3.0]))
    twin = TaskVector("uw", 0.0, lambda ps: VectorAdam(ps, lr=0.1))
    twin.load(vector.state())
    for v in (vector, twin):
        v.step(torch.tensor([0.5, -1.0, 2.0]))
    assert torch.equal(vector.value, twin.value)
    with pytest.raises(ValueError, match="not a VectorAdam state"):
        VectorAdam([torch.ones(3, dtype=torch.float64)], lr=0.1).load_state_dict({"kind": "sgd"})


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 12),
    lr=st.sampled_from([1e-4, 0.025, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_scalar_adam_equals_torch_adam_to_rounding(k, lr, seed):
    """Same formulas on Python floats: torch's kernels fuse some multiply-adds, so the values
    agree to a few units in the last place, not bit for bit."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(k, dtype=torch.float64, generator=g, requires_grad=True)
    vector = TaskVector("uw", 0.0, lambda ps: ScalarAdam(ps, lr=lr))
    vector.ensure(k)
    with torch.no_grad():
        vector.value.copy_(ref)
    torch_adam = torch.optim.Adam([ref], lr=lr)
    for _ in range(8):
        grad = torch.randn(k, dtype=torch.float64, generator=g) * 10 ** float(
            torch.randn(1, generator=g)
        )
        ref.grad = grad.clone()
        torch_adam.step()
        new = vector.step_values(grad.tolist())
        assert new == vector.value.tolist()  # written into the tensor
        torch.testing.assert_close(vector.value.detach(), ref.detach(), rtol=1e-13, atol=1e-15)
    state = torch_adam.state[ref]
    ours = vector.optimizer.state_dict()
    assert ours["step"] == int(state["step"])
    torch.testing.assert_close(torch.tensor(ours["exp_avg"], dtype=torch.float64), state["exp_avg"])


def test_scalar_and_vector_optimizers_share_one_state_format():
    """A state saved by the tensor optimizers loads into the float ones and vice versa."""
    tensor_form = TaskVector("uw", 0.0, lambda ps: VectorAdam(ps, lr=0.1))
    float_form = TaskVector("uw", 0.0, lambda ps: ScalarAdam(ps, lr=0.1))
    tensor_form.ensure(3)
    for grad in ([1.0, 2.0, 3.0], [0.5, -1.0, 2.0]):
        tensor_form.step(torch.tensor(grad, dtype=torch.float64))
    float_form.load(tensor_form.state())
    assert float_form.state() == tensor_form.state()
    tensor_form.step(torch.tensor([0.25, 0.0, -4.0], dtype=torch.float64))
    float_form.step(torch.tensor([0.25, 0.0, -4.0], dtype=torch.float64))  # tensor grad: ok
    torch.testing.assert_close(float_form.value, tensor_form.value, rtol=1e-15, atol=1e-16)
    twin = TaskVector("uw", 0.0, lambda ps: VectorAdam(ps, lr=0.1))
    twin.load(float_form.state())
    assert twin.optimizer.step_count == 3
    sgd = TaskVector("imtl_l", 0.5, lambda ps: ScalarSGD(ps, lr=0.5))
    sgd.ensure(3)
    assert sgd.step_values([1.0, -2.0, 0.0]) == [0.0, 1.5, 0.5]
    with torch.no_grad():  # writing into the tensor sets the values the next step reads
        sgd.value.fill_(1.0)
    assert sgd.values() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="not an SGD state"):
        ScalarSGD([sgd.value], lr=0.1).load_state_dict({"kind": "adam"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_floats_to_tensor_rounds_like_torch_tensor(dtype):
    g = torch.Generator().manual_seed(0)
    values = [*(torch.randn(50, dtype=torch.float64, generator=g) * 1e3).tolist(), 1 / 3, 1e-40]
    out = floats_to_tensor(values, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, torch.tensor(values, dtype=dtype))
