"""What the engine lends a closure method for one step (:class:`~mtopt.core.capabilities.
StepContext`): re-running the closure on the step's batch with its random state replayed, the
meta closure, and plain optimizer updates."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtopt.core.capabilities import MetaBatchMethod, StepContext
from mtopt.core.method import Method
from mtopt.engine import writeback
from mtopt.engine.closure import Closure, Unpacked, replayed_rng, unpack


def make_context(
    method: Method,
    closure: Closure,
    meta_closure: Closure | None,
    step: Unpacked,
    replay: Any,
    shared: list[Tensor],
    task_params: list[Tensor],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None,
) -> StepContext:
    """The context of one step of a closure method."""
    names = step.names

    def evaluate_each() -> list[Tensor]:
        # the step's random state replayed: the same dropout masks as its forward, and the
        # caller's random stream untouched; under no_grad the losses need no graph
        with replayed_rng(replay):
            out = closure()
        return unpack(out, names, require_grad=torch.is_grad_enabled()).losses

    evaluate_meta = None
    if meta_closure is not None and isinstance(method, MetaBatchMethod):

        def evaluate_meta() -> Tensor:
            out = unpack(meta_closure(), names, require_grad=torch.is_grad_enabled())
            return torch.stack(out.losses)

    def update(loss: Tensor, zero_missing: bool = False) -> None:
        """One plain update on ``loss`` (``StepContext.update``)."""
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss, inputs=shared + task_params)
        if zero_missing:
            for p in task_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        writeback.clip(shared, max_grad_norm)
        optimizer.step()

    return StepContext(
        evaluate=lambda: torch.stack(evaluate_each()),
        evaluate_each=evaluate_each,
        live_losses=step.losses,
        parameters=shared + task_params,
        optimizer=optimizer,
        update=update,
        evaluate_meta=evaluate_meta,
    )
