"""A :class:`~mtopt.core.capabilities.StepContext` for calling a closure method directly, outside
the engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mtopt.core.capabilities import StepContext


def make_context(
    evaluate: Callable[[], Tensor],
    evaluate_meta: Callable[[], Tensor] | None = None,
    parameters: Sequence[Tensor] = (),
    optimizer: torch.optim.Optimizer | None = None,
) -> StepContext:
    """``evaluate`` returns the ``(K,)`` losses; ``update`` is refused (a test that needs it
    runs the method through the engine)."""

    def update(loss: Tensor, zero_missing: bool = False) -> None:
        raise AssertionError("this test context makes no updates")

    if optimizer is None:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    return StepContext(
        evaluate=evaluate,
        evaluate_each=lambda: list(evaluate().unbind(0)),
        live_losses=[],
        parameters=list(parameters),
        optimizer=optimizer,
        update=update,
        evaluate_meta=evaluate_meta,
    )
