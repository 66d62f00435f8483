r"""Mixed precision: a ``torch.amp.GradScaler`` inside the multi-task step.

Under autocast, float16 gradients underflow unless the losses are scaled up before the backward
pass. ``MultiTaskOptimizer(..., grad_scaler=scaler)`` does what ``GradScaler`` does around a
plain ``loss.backward()``, with the per-task gradients in between:

1. the losses are scaled (``scaler.scale``) before anything is back-propagated: the per-task
   gradients, the Gramian, the heads' and the loss-level gradients are all computed scaled by
   :math:`s`; the loss *values* the method reads are the unscaled ones;
2. if a scaled per-task gradient is not finite, the method is not called: the step is skipped
   and the scale lowered exactly as ``GradScaler.step`` and ``GradScaler.update`` do (the
   shared gradients are set to inf, so the scaler finds them and skips the base optimizer);
3. otherwise the method sees the per-task gradients divided by :math:`s` (and the Gramian by
   :math:`s^2`), in float32 at least; its weights combine the *scaled* gradients, and a
   direction it returns is multiplied by :math:`s`, so that every ``.grad`` is scaled;
4. ``scaler.unscale_(optimizer)`` (then ``max_grad_norm`` clips the true gradients),
   ``scaler.step(optimizer)`` and ``scaler.update()``. The default scales are powers of two, so
   scaling and unscaling are exact.

A method that makes its own optimizer updates (a ``SequentialMethod``) is refused: its updates
would bypass the scaler.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from mtopt.core.capabilities import SequentialMethod
from mtopt.core.method import Aggregation, Method
from mtopt.engine.closure import Unpacked
from mtopt.engine.sources import PerTask


class Scaling:
    """The steps of the module doc, for one ``GradScaler``."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    @classmethod
    def make(cls, scaler: torch.amp.GradScaler | None, method: Method) -> Scaling | None:
        if scaler is None:
            return None
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}"
            )
        if isinstance(method, SequentialMethod):
            raise ValueError(
                f"grad_scaler cannot be used with {method.name!r}: it makes its own optimizer "
                "updates, which the scaler would not see; train it without a scaler (bfloat16 "
                "autocast needs none)"
            )
        return cls(scaler) if scaler.is_enabled() else None

    def scale(self) -> float:
        return float(self.scaler.get_scale())

    def scaled(self, step: Unpacked) -> Unpacked:
        """The step with its losses (those back-propagated) multiplied by the scale."""
        losses = [self.scaler.scale(loss) for loss in step.losses]
        return dataclasses.replace(step, losses=losses)

    def unscaled(self, per_task: PerTask) -> tuple[Tensor | None, Tensor | None]:
        """What the method sees: the per-task gradients and Gramian without the scale."""
        inv = 1.0 / self.scale()
        grads = gram = None
        if per_task.grads is not None:
            work = torch.promote_types(per_task.grads.dtype, torch.float32)
            grads = per_task.grads.to(work) * inv
        if per_task.gramian is not None:
            work = torch.promote_types(per_task.gramian.dtype, torch.float32)
            gram = per_task.gramian.to(work) * (inv * inv)
        return grads, gram

    def scaled_direction(self, agg: Aggregation) -> Aggregation:
        """The aggregation the sources write: a direction (computed from unscaled gradients)
        multiplied by the scale; weights act on the scaled gradients already."""
        if agg.direction is None:
            return agg
        return dataclasses.replace(agg, direction=agg.direction * self.scale())

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``scaler.step`` then ``scaler.update``; whether the step was skipped."""
        before = self.scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scale() < before

    def skip(self, optimizer: torch.optim.Optimizer, shared: list[Tensor]) -> None:
        """Skip the step the scaler's way: inf gradients it finds, no update, a lower scale."""
        optimizer.zero_grad(set_to_none=True)
        for p in shared:
            p.grad = torch.full_like(p, math.inf)
        self.scaler.unscale_(optimizer)
        skipped = self.step(optimizer)
        assert skipped, "the scaler did not see the non-finite gradients"
        optimizer.zero_grad(set_to_none=True)
