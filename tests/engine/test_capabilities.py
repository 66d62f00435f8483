"""The capabilities (:mod:`mtopt.core.capabilities`): the engine provides exactly what a method
declares by inheriting one, and nothing to a method that does not."""

from __future__ import annotations

import pytest
import torch

import mtopt
from mtopt.core.capabilities import (
    ClosureMethod,
    EpochAware,
    MetaBatchMethod,
    RepresentationTransform,
    SequentialMethod,
    StepContext,
    UpdateReport,
)
from mtopt.core.method import Aggregation, Method, MethodInput


def equal(inputs: MethodInput) -> Aggregation:
    return Aggregation(torch.ones(inputs.num_tasks, dtype=inputs.losses.dtype))


class PostStepProbe(Method, ClosureMethod):
    """Test-only method: equal weights, and it records the losses after the optimizer step."""

    name = "post_step_probe"

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        return equal(inputs)

    def after_step(self, inputs: MethodInput, context: StepContext) -> dict:
        with torch.no_grad():
            return {"losses_after": context.evaluate().tolist()}


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


def test_a_plain_method_is_only_asked_to_aggregate():
    calls = []

    class Plain(Method):
        name = "plain_probe"

        def aggregate(self, inputs):
            calls.append(sorted(vars(inputs)))
            return equal(inputs)

    theta = torch.nn.Parameter(torch.ones(2))
    info = mtopt.MultiTaskOptimizer(torch.optim.SGD([theta], lr=0.1), Plain()).step(
        lambda: [theta.sum(), theta.pow(2).sum()]
    )
    assert len(calls) == 1
    assert "after_step" not in info.times
    # the input carries what every method may read, and nothing about the closure
    assert calls[0] == sorted(
        ["losses", "task_names", "grads", "step", "loss_types", "features", "gramian_matrix"]
    )
    assert info.sequential is None
    assert info.updates == 1


def test_evaluate_replays_the_dropout_masks_of_the_step():
    """Re-evaluation sees the same random state as the step's forward, and leaves the global
    random stream where it was."""
    seen = {}

    class Probe(Method, ClosureMethod):
        name = "replay_probe"

        def aggregate_in_context(self, inputs, context):
            seen["first"] = context.evaluate().detach()
            seen["second"] = context.evaluate().detach()
            seen["original"] = inputs.losses
            return equal(inputs)

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


class MetaProbe(Method, MetaBatchMethod):
    name = "meta_probe"
    meta_split = "val"

    def aggregate_in_context(self, inputs, context):
        assert context.evaluate_meta is not None
        with torch.no_grad():
            return Aggregation(context.evaluate_meta().to(inputs.losses.dtype))


def test_a_meta_batch_method_reads_the_meta_closure_and_requires_it():
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    mto = mtopt.MultiTaskOptimizer(torch.optim.SGD([theta], lr=0.0), MetaProbe())
    with pytest.raises(ValueError, match=r"meta_closure=.*'val' batch"):
        mto.step(lambda: [theta[0] ** 2, theta[1] ** 2])
    info = mto.step(
        lambda: {"a": (theta**2).sum(), "b": theta.sum()},
        meta_closure=lambda: {"a": 3 * theta.sum(), "b": theta.prod()},
    )
    assert info.weights.tolist() == [9.0, 2.0]


class TwoUpdates(Method, SequentialMethod):
    """Test-only sequential method: one update per task, in order."""

    name = "two_updates"

    def apply(self, inputs, context):
        live = context.live_losses
        for k in range(inputs.num_tasks):
            if k:
                live = context.evaluate_each()
            context.update(live[k])
        return UpdateReport(
            torch.ones(inputs.num_tasks), updates=inputs.num_tasks, num_groups=inputs.num_tasks
        )


def test_a_sequential_method_updates_the_model_itself():
    theta = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    opt = torch.optim.SGD([theta], lr=0.25)
    mto = mtopt.MultiTaskOptimizer(opt, TwoUpdates())
    info = mto.step(lambda: {"a": (theta - 3) ** 2, "b": (theta + 1) ** 2})
    # θ = 1 → 1 - 0.25·2(1 - 3) = 2 → 2 - 0.25·2(2 + 1) = 0.5: two updates, no combined one
    assert theta.item() == 0.5
    assert info.updates == 2
    assert info.sequential is not None
    assert info.sequential.num_groups == 2


@pytest.mark.parametrize("form", ["stacked", "views"])
def test_a_sequential_method_refuses_losses_that_share_one_tensor(form):
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    mto = mtopt.MultiTaskOptimizer(torch.optim.SGD([theta], lr=0.1), TwoUpdates())

    def closure():
        both = theta**2
        return both if form == "stacked" else [both[0], both[1]]

    with pytest.raises(ValueError, match="separate scalar losses"):
        mto.step(closure)
    assert theta.tolist() == [1.0, 2.0]


def test_end_epoch_reaches_only_epoch_aware_methods():
    class Counter(Method, EpochAware):
        name = "epoch_counter"
        epochs = 0

        def aggregate(self, inputs):
            return equal(inputs)

        def end_epoch(self):
            self.epochs += 1

    theta = torch.nn.Parameter(torch.ones(2))
    counter = Counter()
    mto = mtopt.MultiTaskOptimizer(torch.optim.SGD([theta], lr=0.1), counter)
    mto.end_epoch()
    mto.end_epoch()
    assert counter.epochs == 2
    # a method without the capability: nothing to call, nothing fails
    mtopt.MultiTaskOptimizer(torch.optim.SGD([theta], lr=0.1), "unitary").end_epoch()


class Shift(Method, RepresentationTransform):
    """Test-only transform: head k sees z + b_k, b trained by the base optimizer."""

    name = "shift"
    levels = ("rep",)

    def __init__(self) -> None:
        super().__init__()
        self.bias: torch.Tensor | None = None
        self.pending = False

    def aggregate(self, inputs):
        if self.bias is None:
            self.bias = torch.zeros(inputs.num_tasks, requires_grad=True)
            self.pending = True
        self.bias.grad = torch.ones_like(self.bias)
        return equal(inputs)

    def task_input(self, features, index):
        return features if self.bias is None or index is None else features + self.bias[index]

    def new_param_groups(self):
        if not self.pending:
            return []
        self.pending = False
        return [{"params": [self.bias], "lr_scale": 0.5}]


def test_a_representation_transform_gets_its_parameters_trained_at_the_auxiliary_lr():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(3, 2)
    heads = torch.nn.ModuleList([torch.nn.Linear(2, 1) for _ in range(2)])
    opt = torch.optim.SGD([*encoder.parameters(), *heads.parameters()], lr=0.2)
    shift = Shift()
    mto = mtopt.MultiTaskOptimizer(opt, shift, shared=encoder)
    x = torch.randn(5, 3)

    def closure():
        z = encoder(x)
        return mtopt.Losses(
            {f"t{k}": heads[k](mto.task_input(z, f"t{k}")).pow(2).mean() for k in range(2)},
            features=z,
        )

    mto.step(closure)
    group = opt.param_groups[-1]
    assert group["params"] == [shift.bias]
    assert group["auxiliary"] is True
    assert group["lr"] == pytest.approx(0.1)  # lr_scale × the first group's lr
    # the group joins before the optimizer steps: the step that created it trains it
    torch.testing.assert_close(shift.bias.detach(), torch.full((2,), -0.1))


def test_muon_takes_auxiliary_groups_as_adamw_at_its_adamw_lr():
    from mtopt.optim import Muon

    w = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.zeros(4))
    opt = Muon([{"params": [w]}, {"params": [b], "use_muon": False, "lr": 1e-3}])
    assert opt.auxiliary_lr() == 1e-3
    from mtopt.engine.writeback import add_param_groups

    rotation = torch.zeros(2, 3, 3, requires_grad=True)  # ndim 3: a matrix stack
    add_param_groups(opt, [{"params": [rotation], "lr_scale": 0.1, "weight_decay": 0.0}])
    assert opt.param_groups[-1]["use_muon"] is False
    assert opt.param_groups[-1]["lr"] == pytest.approx(1e-4)
