r"""Gradient accumulation: one multi-task step on several micro-batches.

``step([closure_1, ..., closure_m])`` is one step on the micro-batches together: the method sees
the losses and per-task gradients of the concatenated batch, for micro-batches of equal size
whose losses are means over their samples (then :math:`\ell_k=\frac1m\sum_i\ell_k^{(i)}` and
:math:`\nabla\ell_k=\frac1m\sum_i\nabla\ell_k^{(i)}`; weight unequal micro-batches inside the
closures if needed).

* **Loss- and parameter-level methods** (:func:`streaming_step`): each micro-batch's forward is
  run and differentiated at once, K backward passes into *every* parameter, and its graph freed;
  the mean ``K × D`` Jacobian is kept (K times the memory of one gradient, no activations).
  Then the method sees the mean losses (and, at the parameter level, the shared columns); the
  shared parameters receive its update, the task-specific ones :math:`\sum_k c_k\nabla\ell_k`
  from the kept columns. In a process group both are then averaged over the ranks.
* **Closure methods** (FAMO, Auto-Lambda, selective group updates) re-run and back-propagate
  the losses after seeing them: their micro-batches are run as one closure returning the mean
  losses, each re-run replaying the step's random state. Every micro-batch's graph is kept
  until the step ends, so this saves no memory; it gives the same step.
* **Representation-level methods** are refused: their update is a per-sample direction that
  has to be back-propagated through every micro-batch's graph after the whole batch was seen,
  so accumulation would keep the whole batch in memory; use a larger batch.

Under a ``grad_scaler`` (:mod:`mtopt.engine.scaling`) each micro-batch's losses are scaled
before they are differentiated, the method sees the mean Jacobian unscaled, and a non-finite mean
Jacobian skips the step the scaler's way. The mean Jacobian is checked once, after the
micro-batches (and, in a process group, after the ranks' mean), so a non-finite gradient on one
rank stops every rank alike. Not with the Gramian engine (refused in one line: the Gramian of the
whole batch has cross terms between micro-batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtopt.core.capabilities import ClosureMethod
from mtopt.core.gradients import jacobian, write_flat_grad
from mtopt.core.method import Aggregation, MethodInput
from mtopt.engine import writeback
from mtopt.engine.closure import Closure, Losses, unpack
from mtopt.engine.info import PhaseClock, StepInfo
from mtopt.engine.sources import GramianSource, PerTask, check_finite, combine

if TYPE_CHECKING:
    from mtopt.engine.optimizer import MultiTaskOptimizer


def check(mto: MultiTaskOptimizer, closures: Sequence[Closure]) -> None:
    """Raise a one-line ``ValueError`` where accumulation cannot give the step (module doc)."""
    name = mto.method.name
    if not closures or not all(callable(c) for c in closures):
        raise ValueError("step() takes a closure or a non-empty list of closures (micro-batches)")
    if mto.method.level == "rep":
        raise ValueError(
            f"gradient accumulation is not possible with {name!r} at the representation level: "
            "its per-sample direction needs every micro-batch's graph at once; use a larger "
            "batch, or the method at the parameter level where it has one"
        )
    if isinstance(mto.source, GramianSource) or mto.engine == "gramian":
        raise ValueError(
            "gradient accumulation needs the per-task gradients (engine='jacobian' or 'auto'); "
            "the Gramian of the whole batch has cross terms between micro-batches"
        )


def mean_closure(closures: Sequence[Closure]) -> Closure:
    """One closure for the micro-batches together: the mean of their losses (closure methods)."""

    def closure() -> Losses:
        parts = [unpack(c(), None, require_grad=torch.is_grad_enabled()) for c in closures]
        names = parts[0].names
        for part in parts[1:]:
            if part.names != names:
                raise ValueError(
                    f"micro-batches return different tasks: {list(names)} and {list(part.names)}"
                )
        m = len(parts)
        return Losses(
            {n: torch.stack([p.losses[k] for p in parts]).sum() / m for k, n in enumerate(names)}
        )

    return closure


def streaming_step(mto: MultiTaskOptimizer, closures: Sequence[Closure]) -> StepInfo:
    """One step of a loss- or parameter-level method on ``closures``' micro-batches, keeping
    only the mean Jacobian of every parameter (module doc)."""
    method = mto.method
    clock = PhaseClock()
    mto.optimizer.zero_grad(set_to_none=True)
    index = mto.step_count
    shared, heads = mto.shared, mto.task_params
    params = shared + heads
    total: Tensor | None = None
    values: Tensor | None = None
    names: tuple[str, ...] | None = mto.task_names
    scaling = mto.scaling
    for closure in closures:
        with torch.enable_grad():
            part = unpack(closure(), names)
        names = part.names
        losses = part.losses if scaling is None else scaling.scaled(part).losses
        rows = jacobian(losses, params)  # K backward passes; the graph goes with `part`
        total = rows if total is None else total + rows
        values = part.stacked if values is None else values + part.stacked
        del part
    assert total is not None and values is not None and names is not None
    m = len(closures)
    grads, stacked = total / m, values / m
    sent, before = 0, 0 if mto.sync is None else mto.sync.sent_bytes
    if mto.sync is not None:
        grads, stacked = mto.sync.mean(grads), mto.sync.mean(stacked)
        sent = mto.sync.sent_bytes - before
    if mto.task_names is None:
        mto.task_names = names
    try:  # reduced first: a non-finite row on one rank stops every rank
        check_finite(names, grads=grads)
    except FloatingPointError:
        if scaling is None:
            raise
        return mto._skip(index, names, stacked.tolist(), clock, before, engine="jacobian")
    clock.lap("gradients")
    width = sum(p.numel() for p in shared)
    shared_rows, head_rows = grads[:, :width], grads[:, width:]  # scaled under a grad scaler
    seen = shared_rows if scaling is None else scaling.unscaled(PerTask(grads=shared_rows))[0]
    inputs = MethodInput(
        stacked,
        names,
        grads=seen if method.level == "param" else None,
        step=index,
        loss_types=mto.loss_types,
    )
    agg = method.aggregate(inputs)
    writeback.check_aggregation(method, agg, inputs.num_tasks)
    clock.lap("method")
    written = agg if scaling is None else scaling.scaled_direction(agg)
    if method.level == "param":
        write_flat_grad(shared, combine(written, shared_rows).detach())
    else:
        assert agg.weights is not None
        write_flat_grad(shared, combine(Aggregation(agg.weights), shared_rows).detach())
    if heads:
        coeffs = writeback.head_coefficients(method, agg, inputs.num_tasks)
        write_flat_grad(heads, combine(Aggregation(coeffs), head_rows).detach())
    if scaling is not None:
        scaling.unscale(mto.optimizer)
    writeback.clip(shared, mto.max_grad_norm)
    clock.lap("backward")
    skipped = False
    if scaling is None:
        mto.optimizer.step()
    else:
        skipped = scaling.step(mto.optimizer)
    clock.lap("optimizer")
    mto.step_count += 1
    if agg.solver is not None and not agg.solver.converged:
        mto._uncertified.record(index, method.name, agg.solver)
    return StepInfo(
        step=index,
        losses=dict(zip(names, stacked.tolist(), strict=True)),
        weights=None if agg.weights is None else agg.weights.detach().cpu(),
        task_names=names,
        solver=agg.solver,
        times=clock.done(),
        extras=dict(agg.extras),
        gradient_engine="jacobian" if method.level == "param" else None,
        updates=1,
        communicated_bytes=sent,
        skipped=skipped,
    )


def is_streaming(mto: MultiTaskOptimizer) -> bool:
    return not isinstance(mto.method, ClosureMethod)
