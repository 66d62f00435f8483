"""The small-vector optimizers of the learned task scalars equal torch's, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtopt.core.task_vector import TaskVector, VectorAdam, VectorSGD


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
    assert again.step_count == 8 and torch.equal(again.exp_avg, a.exp_avg)


def test_vector_sgd_and_task_vector_round_trip():
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    sgd = VectorSGD([p], lr=0.5)
    p.grad = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    sgd.step()
    assert p.tolist() == [0.5, 2.0, 1.0]
    vector = TaskVector("uw", 0.0, lambda ps: VectorAdam(ps, lr=0.1))
    vector.ensure(3)
    vector.step(torch.tensor([1.0, 2.0, 3.0]))
    twin = TaskVector("uw", 0.0, lambda ps: VectorAdam(ps, lr=0.1))
    twin.load(vector.state())
    for v in (vector, twin):
        v.step(torch.tensor([0.5, -1.0, 2.0]))
    assert torch.equal(vector.value, twin.value)
    with pytest.raises(ValueError, match="not a VectorAdam state"):
        VectorAdam([p], lr=0.1).load_state_dict({"kind": "sgd"})
