"""Need.CLOSURE: the engine hands the method a re-evaluation of the closure after the step."""

from __future__ import annotations

import torch

import mtopt
from mtopt.core.method import Aggregation, Method, MethodInput, Need


class PostStepProbe(Method):
    """Test-only method: equal weights, and it records the losses after the optimizer step."""

    name = "post_step_probe"
    needs = Need.LOSSES | Need.CLOSURE

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        return Aggregation(torch.ones(inputs.num_tasks, dtype=inputs.losses.dtype))

    def after_step(self, inputs: MethodInput) -> dict:
        assert inputs.evaluate is not None
        with torch.no_grad():
            return {"losses_after": inputs.evaluate().tolist()}


def test_after_step_sees_the_updated_parameters():
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = torch.optim.SGD([theta], lr=0.25)
    mto = mtopt.MultiTaskOptimizer(opt, PostStepProbe())
    targets = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)

    def closure():
        return {f"t{k}": (theta - targets[k]).pow(2).sum() for k in range(2)}

    info = mto.step(closure)
    # gradient of Σ_k ||θ - c_k||² is 2(2θ - c_0 - c_1); one SGD step with lr 0.25
    expected_theta = torch.tensor([1.0, -2.0], dtype=torch.float64)
    expected_theta -= 0.25 * 2 * (2 * expected_theta - targets[0] - targets[1])
    torch.testing.assert_close(theta.detach(), expected_theta)
    expected = [float((expected_theta - targets[k]).pow(2).sum()) for k in range(2)]
    assert info.extras["losses_after"] == expected
    assert info.losses == {"t0": 5.0, "t1": 17.0}
    assert "after_step" in info.times


def test_methods_without_closure_need_get_no_evaluate():
    seen = []

    class Plain(PostStepProbe):
        needs = Need.LOSSES

        def aggregate(self, inputs):
            seen.append(inputs.evaluate)
            return super().aggregate(inputs)

    theta = torch.nn.Parameter(torch.ones(2))
    info = mtopt.MultiTaskOptimizer(torch.optim.SGD([theta], lr=0.1), Plain()).step(
        lambda: [theta.sum(), theta.pow(2).sum()]
    )
    assert seen == [None] and "losses_after" not in info.extras


def test_evaluate_replays_the_dropout_masks_of_the_step():
    """Re-evaluation sees the same random state as the step's forward, and leaves the global
    random stream where it was."""
    seen = {}

    class Probe(PostStepProbe):
        def aggregate(self, inputs):
            seen["first"] = inputs.evaluate().detach()
            seen["second"] = inputs.evaluate().detach()
            seen["original"] = inputs.losses
            return super().aggregate(inputs)

        def after_step(self, inputs):
            return {}

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 2)
    drop = torch.nn.Dropout(0.5)
    x = torch.randn(32, 6)
    mto = mtopt.MultiTaskOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), Probe())
    torch.manual_seed(1)
    mto.step(lambda: list(drop(layer(x)).pow(2).mean(0)))
    after_step = torch.rand(3)
    torch.testing.assert_close(seen["first"], seen["original"], rtol=0, atol=0)
    torch.testing.assert_close(seen["second"], seen["original"], rtol=0, atol=0)
    # the same global stream as a plain step that never re-evaluates
    torch.manual_seed(1)
    drop(layer(x))
    torch.testing.assert_close(after_step, torch.rand(3))
