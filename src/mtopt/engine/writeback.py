"""After a method answered: what the task-specific parameters receive, clipping, and the
parameter groups a method adds to the base optimizer.

* **Head policy.** Task-specific parameters ("heads") receive ``Σ_k c_k ∇ℓ_k`` with ``c = w``
  under the ``weighted`` policy, ``c = 1`` under ``raw``, or the method's own ``head_weights``.
* **Finiteness.** Without a grad scaler, the gradients the optimizer is about to apply must be
  finite: per-task gradients are checked where the engine forms them (naming the tasks), but a
  head's gradient, and every gradient of a loss-level method, exists only once written; a NaN
  there would otherwise enter the parameters silently. :func:`check_written` stops the step
  before it (one fused norm per device and dtype; under a grad scaler the scaler skips
  such a step instead).
* **Clipping.** ``max_grad_norm`` clips the shared parameters' gradient before the optimizer
  steps (some methods' reference training loops do).
* **Method parameters.** A method that owns parameters (a representation transform) hands the
  engine parameter groups. The engine marks them ``auxiliary=True`` and turns a group's
  ``lr_scale`` into ``lr = lr_scale ×`` the base optimizer's *auxiliary* learning rate:
  ``optimizer.auxiliary_lr()`` when the optimizer defines it, else the first group's ``lr``. An
  optimizer whose groups do not all share one role (orthogonalised hidden matrices next to
  element-wise parameters, say) defines ``auxiliary_lr`` and reads the ``auxiliary`` mark.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtopt.core.method import Aggregation, Method


def head_coefficients(method: Method, agg: Aggregation, num_tasks: int) -> Tensor:
    """``c`` of the heads' gradient ``Σ_k c_k ∇ℓ_k`` (module doc)."""
    if agg.head_weights is not None:
        return agg.head_weights
    if method.head_policy == "weighted":
        if agg.weights is None:
            raise RuntimeError(
                f"method {method.name!r} has no weights, so the 'weighted' head policy is undefined"
            )
        return agg.weights
    return torch.ones(num_tasks)


def clip(shared: list[Tensor], max_grad_norm: float | None) -> None:
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in shared if p.grad is not None], max_grad_norm)


def auxiliary_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate for parameters a method adds (module doc)."""
    own = getattr(optimizer, "auxiliary_lr", None)
    return float(own()) if callable(own) else float(optimizer.param_groups[0]["lr"])


def add_param_groups(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Add a method's parameter groups, marked ``auxiliary``, ``lr_scale`` turned into an
    ``lr``."""
    for group in groups:
        group = {**group, "auxiliary": True}
        scale = group.pop("lr_scale", None)
        if scale is not None:
            group["lr"] = scale * auxiliary_lr(optimizer)
        optimizer.add_param_group(group)


def nonfinite(tensors: list[Tensor]) -> list[int]:
    """The positions of the tensors with a non-finite entry: one fused 2-norm per device and
    dtype (finite when every entry is, unless the sum of squares overflows), then, for the
    tensors it flags, the max-abs, which is finite iff every entry is."""
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    bad: list[int] = []
    for members in groups.values():
        norms = torch.stack(torch._foreach_norm([tensors[i] for i in members]))
        flagged = [
            i for i, ok in zip(members, torch.isfinite(norms).tolist(), strict=True) if not ok
        ]
        bad.extend(i for i in flagged if not math.isfinite(float(tensors[i].abs().amax())))
    return sorted(bad)


def describe(tensors: list[Tensor], shared: list[Tensor], heads: list[Tensor]) -> list[str]:
    """Each tensor as its position among the shared or the task-specific parameters (else among
    ``tensors``), with its shape."""
    where = {id(p): f"shared parameter {i}" for i, p in enumerate(shared)}
    where.update({id(p): f"task-specific parameter {i}" for i, p in enumerate(heads)})
    return [
        f"{where.get(id(t), f'input {i}')} (shape {tuple(t.shape)})" for i, t in enumerate(tensors)
    ]


def nonfinite_hint(dtype: str = "") -> str:
    """What a non-finite gradient usually means, and what helps (``dtype``: `` in float16``, say,
    when the gradients' dtype is known)."""
    return (
        f"the loss is not differentiable there, or the backward pass overflowed{dtype} (a "
        "GradScaler or a wider dtype helps with overflow)"
    )


def check_written(
    params: list[Tensor], shared: list[Tensor], heads: list[Tensor], method: str
) -> None:
    """Raise a ``FloatingPointError`` naming the parameters whose written gradient is not
    finite; the optimizer has not stepped yet (module doc, *Finiteness*)."""
    with_grad = [p for p in params if p.grad is not None]
    bad = nonfinite([g for p in with_grad if (g := p.grad) is not None])
    if bad:
        names = describe(with_grad, shared, heads)
        raise FloatingPointError(
            f"the gradient written for method {method!r} into "
            f"{', '.join(names[i] for i in bad)} is not finite (inf or NaN), so no update was "
            f"applied: {nonfinite_hint()}"
        )


def check_aggregation(method: Method, agg: Aggregation, num_tasks: int) -> None:
    """What a method returned must be usable: weights of the right shape, finite."""
    name = method.name
    if agg.weights is None and agg.direction is None:
        raise RuntimeError(f"method {name!r} returned neither weights nor a direction")
    if agg.weights is not None:
        if agg.weights.shape != (num_tasks,):
            raise RuntimeError(
                f"method {name!r} returned weights of shape {tuple(agg.weights.shape)} "
                f"for {num_tasks} tasks"
            )
        if not all(math.isfinite(v) for v in agg.weights.tolist()):
            raise FloatingPointError(
                f"method {name!r} produced non-finite weights {agg.weights.tolist()}"
            )
    if agg.head_weights is not None and not bool(torch.isfinite(agg.head_weights).all()):
        raise FloatingPointError(f"method {name!r} produced non-finite head weights")
