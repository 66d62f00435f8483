"""What a few methods need beyond :class:`~mtopt.core.method.MethodInput`, as explicit
capabilities.

A method declares a capability by inheriting its class; the engine checks with ``isinstance``
and provides exactly that, nothing on the base class:

* :class:`ClosureMethod`: re-runs the step's closure (on the same batch, with the step's random
  state replayed) before or after the optimizer step, through a :class:`StepContext`
  (FAMO's post-step loss decrease, Auto-Lambda's look-ahead);
* :class:`MetaBatchMethod`: also reads the losses on a second batch
  (``step(closure, meta_closure=...)``), drawn from the split its ``meta_split`` names;
* :class:`SequentialMethod`: updates the model itself, several optimizer steps per batch
  (selective group updates), and reports what it did in an :class:`UpdateReport`;
* :class:`RepresentationTransform`: changes what each head sees of the shared representation
  and owns parameters the base optimizer must train (RotoGrad's rotations);
* :class:`EpochAware`: is told when a training epoch ends (DWA's original form).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mtopt.core.method import Aggregation, MethodInput


def autograd_grad(outputs: Any, inputs: Any, **kwargs: Any) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` with ``allow_unused=True`` by default (``StepContext.grad`` of
    one process)."""
    kwargs.setdefault("allow_unused", True)
    return tuple(torch.autograd.grad(outputs, inputs, **kwargs))


@dataclass
class StepContext:
    """What the engine lends a :class:`ClosureMethod` for one step.

    Attributes:
        evaluate: re-runs the user's closure on the step's batch (same random state) and returns
            the per-task losses as a ``(K,)`` tensor, still part of the autograd graph unless
            called under ``torch.no_grad()``.
        evaluate_each: the same as a list of K scalar losses (back-propagating a subset of them
            then reaches only their own heads).
        live_losses: the step's own losses, still attached to the graph of its forward.
        parameters: every optimized parameter (shared first, then task-specific).
        optimizer: the base optimizer (its learning rates, momentum, weight decay).
        update: ``update(loss, zero_missing=False)``: one optimizer update on ``loss``: zero every
            gradient, back-propagate into the shared and task-specific parameters (a head that
            ``loss`` does not reach keeps ``grad = None`` unless ``zero_missing``), apply
            ``max_grad_norm``, step the base optimizer.
        evaluate_meta: for a :class:`MetaBatchMethod`: the per-task losses on the meta batch.
        grad: ``grad(outputs, inputs, **kwargs)``: ``torch.autograd.grad`` (``allow_unused``
            by default) of the full batch: in a process group, averaged over the ranks. A method
            that differentiates the losses itself (not through :attr:`update`) calls this.
    """

    evaluate: Callable[[], Tensor]
    evaluate_each: Callable[[], list[Tensor]]
    live_losses: list[Tensor]
    parameters: list[Tensor]
    optimizer: torch.optim.Optimizer
    update: Callable[..., None]
    evaluate_meta: Callable[[], Tensor] | None = None
    grad: Callable[..., tuple[Tensor | None, ...]] = field(default=autograd_grad)


class ClosureMethod(ABC):  # noqa: B024 - a capability; its hooks have defaults
    """A method that re-runs the closure: the engine calls :meth:`aggregate_in_context` (not
    ``aggregate``) before the optimizer step and :meth:`after_step` after it. A subclass
    overrides at least one of them."""

    def aggregate(self, inputs: MethodInput) -> Aggregation:  # pragma: no cover - see Method
        raise NotImplementedError

    def aggregate_in_context(self, inputs: MethodInput, context: StepContext) -> Aggregation:
        """The step's aggregation, with the closure at hand (default: :meth:`aggregate`, when
        only :meth:`after_step` needs the closure)."""
        return self.aggregate(inputs)

    def after_step(self, inputs: MethodInput, context: StepContext) -> dict[str, Any]:
        """Called once the base optimizer has stepped (e.g. a post-step update from the new
        losses of the same batch). Returns values to merge into ``StepInfo.extras``."""
        return {}


class MetaBatchMethod(ClosureMethod):
    """A closure method that also reads the losses on a meta batch
    (``StepContext.evaluate_meta``); ``meta_split`` names the split the trainer draws it
    from."""

    meta_split: str


@dataclass
class UpdateReport:
    """What a :class:`SequentialMethod` did in one step.

    Attributes:
        weights: how often each task's loss was part of an update (for logging).
        updates: the number of optimizer updates made.
        groups: the task groups, in the order they were updated (task names).
        num_groups: the number of groups in the current grouping.
        affinity: the tracked inter-task affinity (``K × K``), if the method keeps one.
        extras: anything else worth logging.
    """

    weights: Tensor
    updates: int
    groups: list[list[str]] = field(default_factory=list)
    num_groups: int = 0
    affinity: Sequence[Sequence[float]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class SequentialMethod(ClosureMethod):
    """A method that updates the model itself, several times per batch, through
    ``StepContext.update``: the engine writes no gradient and does not step the optimizer;
    it calls :meth:`apply` instead of :meth:`aggregate_in_context`."""

    @abstractmethod
    def apply(self, inputs: MethodInput, context: StepContext) -> UpdateReport:
        """Update the model for this batch and say what was done."""

    def aggregate_in_context(self, inputs: MethodInput, context: StepContext) -> Aggregation:
        raise TypeError(f"{type(self).__name__} updates the model itself: the engine calls apply")


class RepresentationTransform(ABC):
    """A method that changes what each head sees of the shared representation and owns
    parameters the base optimizer trains."""

    @abstractmethod
    def task_input(self, features: Tensor, index: int | None) -> Tensor:
        """What the head of task ``index`` sees (``index`` is ``None`` before the first step,
        when the task names are not known yet)."""

    @abstractmethod
    def new_param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups created since the last call, for the base optimizer; a group's
        ``lr_scale`` entry multiplies the optimizer's auxiliary learning rate
        (:func:`mtopt.engine.writeback.auxiliary_lr`)."""

    def to(self, device: torch.device) -> None:  # noqa: B027 - optional, nothing to move by default
        """Move state restored by ``load_state_dict`` to the model's device."""


class EpochAware(ABC):
    """A method that is told when a training epoch ends."""

    @abstractmethod
    def end_epoch(self) -> None:
        """Called by :meth:`mtopt.MultiTaskOptimizer.end_epoch`."""
