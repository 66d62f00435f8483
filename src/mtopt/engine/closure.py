"""The user's closure: what it may return, how its losses are checked, and how it is re-run.

A closure runs the forward pass and returns the per-task losses: an :class:`Losses` (losses plus
the shared representation ``features``, which representation-level methods need), a mapping
task name → loss, a sequence of losses or a ``(K,)`` tensor. Each loss must be a finite scalar
in the autograd graph. Closure methods re-run the closure on the same batch with the step's
random state replayed (same dropout masks), leaving the caller's random stream untouched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Losses:
    """What a closure returns: per-task losses (a name → loss mapping or a sequence) and,
    for representation-level methods, the shared representation ``features`` they depend on."""

    losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor
    features: Tensor | None = None


Closure = Callable[[], "Losses | Mapping[str, Tensor] | Sequence[Tensor] | Tensor"]


@dataclass
class Unpacked:
    """A closure's output, checked: names, the K scalar losses (in the graph), the features,
    the detached values as a ``(K,)`` tensor and as Python floats, and whether the losses are
    separate tensors (not one tensor and not views of one: back-propagating a subset of them then
    reaches only their own heads)."""

    names: tuple[str, ...]
    losses: list[Tensor]
    features: Tensor | None
    stacked: Tensor
    values: list[float]
    separate: bool = True


def unpack(out: Any, known: tuple[str, ...] | None, require_grad: bool = True) -> Unpacked:
    """Check a closure's output against the known task names (``None``: not fixed yet)."""
    features = None
    if isinstance(out, Losses):
        features, out = out.features, out.losses
    if isinstance(out, Mapping):
        names = tuple(str(k) for k in out)
        values = list(out.values())
    elif isinstance(out, Tensor):
        if out.dim() != 1:
            raise ValueError(
                f"a loss tensor must have shape (K,), got {tuple(out.shape)}; "
                "or return a dict / list of scalar losses"
            )
        values = list(out.unbind(0))
        names = known or tuple(str(i) for i in range(len(values)))
    elif isinstance(out, Sequence):
        values = list(out)
        names = known or tuple(str(i) for i in range(len(values)))
    else:
        raise TypeError(
            "the closure must return mtopt.Losses, a dict of task losses, a sequence of "
            f"losses or a 1-D tensor; got {type(out).__name__}"
        )
    if not values:
        raise ValueError("the closure returned no losses")
    if known is not None:
        if len(values) != len(known):
            raise ValueError(
                f"expected {len(known)} losses (tasks {list(known)}), got {len(values)}"
            )
        if names != known:
            raise ValueError(f"expected tasks {list(known)}, got {list(names)}")
    separate = not isinstance(out, Tensor) and not any(
        isinstance(v, Tensor) and v._is_view() for v in values
    )
    losses: list[Tensor] = []
    for name, loss in zip(names, values, strict=True):
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss of task {name!r} is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(
                f"loss of task {name!r} must be a scalar, got shape {tuple(loss.shape)} "
                "(reduce it over the batch first)"
            )
        if require_grad and not loss.requires_grad:
            raise ValueError(
                f"loss of task {name!r} does not require grad: it does not depend on any "
                "trainable parameter"
            )
        losses.append(loss if loss.dim() == 0 else loss.reshape(()))
    stacked = torch.stack([loss.detach() for loss in losses])
    # one host copy of the K values (StepInfo needs them anyway): checking them as Python floats
    # is cheaper than a tensor isfinite/all pair on small K
    plain = stacked.tolist()
    if not all(math.isfinite(v) for v in plain):
        bad = [f"{n}={v}" for n, v in zip(names, plain, strict=True) if not math.isfinite(v)]
        raise ValueError(f"non-finite loss(es): {', '.join(bad)}")
    return Unpacked(names, losses, features, stacked, plain, separate)


def rng_state() -> tuple[Tensor, list[Tensor] | None]:
    """The global random state (CPU and CUDA), to replay a closure with."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replayed_rng(state: tuple[Tensor, list[Tensor] | None] | None) -> Iterator[None]:
    """Run a block with the global RNGs set to ``state``; restore the current state after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if state is not None:
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state_all(state[1])
        yield


def require_separate(method: str, step: Unpacked) -> None:
    """A method that back-propagates subsets of the losses needs them as separate tensors."""
    if not step.separate:
        raise ValueError(
            f"{method}: the closure returned the losses as one stacked tensor (or views of "
            "one); this method back-propagates subsets of them, and every head would then be in "
            "every subset's graph. Return a dict or list of the separate scalar losses."
        )
