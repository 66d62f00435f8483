"""What the engine lends a closure method for one step
(:class:`~mtopt.core.capabilities.StepContext`): re-running the closure on the step's batch
with its random state replayed, the meta closure, and plain optimizer updates."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtopt.core.capabilities import MetaBatchMethod, StepContext, autograd_grad
from mtopt.core.method import Method
from mtopt.engine import writeback
from mtopt.engine.closure import Closure, Unpacked, replayed_rng, unpack
from mtopt.engine.distributed import ProcessGroupSync


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
    sync: ProcessGroupSync | None = None,
) -> StepContext:
    """The context of one step of a closure method; in a process group (``sync``) the losses it
    hands out are the global ones and its updates and gradients are averaged over the ranks
    (:mod:`mtopt.engine.distributed`)."""
    names = step.names

    def globalised(losses: list[Tensor]) -> list[Tensor]:
        return losses if sync is None else sync.losses(losses)[0]

    def evaluate_each() -> list[Tensor]:
        # the step's random state replayed: the same dropout masks as its forward, and the
        # caller's random stream untouched; under no_grad the losses need no graph
        with replayed_rng(replay):
            out = closure()
        return globalised(unpack(out, names, require_grad=torch.is_grad_enabled()).losses)

    evaluate_meta = None
    if meta_closure is not None and isinstance(method, MetaBatchMethod):

        def evaluate_meta() -> Tensor:
            out = unpack(meta_closure(), names, require_grad=torch.is_grad_enabled())
            return torch.stack(globalised(out.losses))

    def update(loss: Tensor, zero_missing: bool = False) -> None:
        """One plain update on ``loss`` (``StepContext.update``); a non-finite gradient stops
        it before the optimizer steps."""
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss, inputs=shared + task_params)
        if zero_missing:
            for p in task_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if sync is not None:
            sync.average_grads(params)
        writeback.check_written(params, shared, task_params, method.name)
        writeback.clip(shared, max_grad_norm)
        optimizer.step()

    base_grad = autograd_grad if sync is None else sync.grad

    def checked_grad(outputs: Any, inputs: Any, **kwargs: Any) -> tuple[Tensor | None, ...]:
        """``StepContext.grad``: the gradients (averaged over ranks), which must be finite."""
        inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        grads = base_grad(outputs, inputs, **kwargs)
        present = [i for i, g in enumerate(grads) if g is not None]
        bad = writeback.nonfinite([g for g in grads if g is not None])
        if bad:
            names = writeback.describe([inputs[i] for i in present], shared, task_params)
            raise FloatingPointError(
                f"a gradient method {method.name!r} took with respect to "
                f"{', '.join(names[i] for i in bad)} is not finite (inf or NaN); the step stops "
                f"here: {writeback.nonfinite_hint()}"
            )
        return grads

    return StepContext(
        evaluate=lambda: torch.stack(evaluate_each()),
        evaluate_each=evaluate_each,
        live_losses=step.losses,
        parameters=shared + task_params,
        optimizer=optimizer,
        update=update,
        evaluate_meta=evaluate_meta,
        grad=checked_grad,
    )
