r"""``MultiTaskOptimizer``: one engine that runs every method in a plain PyTorch loop.

``step(closure)`` is: run the closure (:mod:`mtopt.engine.closure`) → the per-task gradients the
method's level needs, from the gradient source chosen when the optimizer was built
(:mod:`mtopt.engine.sources`) → the method → write the shared update and the heads' gradients
(:mod:`mtopt.engine.writeback`) → step the base optimizer → a :class:`StepInfo`.

Shared parameters are those passed as ``shared``; every other parameter of the base optimizer is
task-specific. Representation-level methods assume the losses depend on the shared parameters
only through ``features``.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtopt.core.capabilities import (
    ClosureMethod,
    EpochAware,
    MetaBatchMethod,
    RepresentationTransform,
    SequentialMethod,
)
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import make
from mtopt.engine import writeback
from mtopt.engine.closure import Closure, Losses, Unpacked, require_separate, rng_state, unpack
from mtopt.engine.context import make_context
from mtopt.engine.info import PhaseClock, StepInfo, UncertifiedLog
from mtopt.engine.setup import ENGINES, Shared, choose_source, split_parameters
from mtopt.engine.sources import RepresentationSource

__all__ = ["ENGINES", "Losses", "MultiTaskOptimizer", "StepInfo"]


class MultiTaskOptimizer:
    """Wrap a ``torch.optim`` optimizer so that each step balances several task losses.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over all trainable parameters (positional).
        method: a registered method name (see :func:`mtopt.available_methods`) or a ``Method``.
        shared: the shared part: its module(s) (``model.encoder``; needed by the Gramian engine)
            or its parameters. ``None``: every optimized parameter.
        tasks: optional task names (or their number) to check every step's losses against;
            otherwise fixed by the first step.
        loss_types: optional loss type per task ("regression", "classification", "l1"), for
            methods whose rule depends on it.
        max_grad_norm: if set, clip the norm of the shared parameters' gradient to it before the
            optimizer step.
        engine: for parameter-level methods, how the per-task gradients are obtained:
            ``"jacobian"`` (K backward passes), ``"batched"`` (one batched pass), ``"gramian"``
            (only the ``K × K`` Gramian, module by module; needs a method with
            ``gramian_only`` and ``shared`` given as module(s)) or ``"auto"`` (the Jacobian,
            unless it would exceed ``max_jacobian_bytes`` and the Gramian engine applies).
        max_jacobian_bytes: under ``"auto"``, the size of the ``K × D`` Jacobian above which the
            Gramian engine is used; the Gramian engine keeps at most this many bytes of
            per-module rows. Default 1 GiB.
        **hparams: the method's hyperparameters when ``method`` is a name (``optimizer`` is
            positional-only, so a method's own ``optimizer`` hyperparameter can be
            passed here).

    Example::

        mto = MultiTaskOptimizer(torch.optim.Adam(model.parameters()), "mgda_ub",
                                 shared=model.encoder)
        info = mto.step(lambda: Losses({"a": la, "b": lb}, features=z))
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        /,
        method: str | Method,
        shared: Shared = None,
        *,
        tasks: Sequence[str] | int | None = None,
        loss_types: Sequence[str] | None = None,
        max_grad_norm: float | None = None,
        engine: str = "auto",
        max_jacobian_bytes: int = 2**30,
        **hparams: Any,
    ) -> None:
        if isinstance(method, Method):
            if hparams:
                raise ValueError(
                    f"hyperparameters {sorted(hparams)} given with a Method instance; "
                    "set them on the instance instead"
                )
            self.method = method
        else:
            self.method = make(method, **hparams)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.optimizer = optimizer
        self.engine = engine
        self.max_grad_norm = max_grad_norm
        self.max_jacobian_bytes = int(max_jacobian_bytes)
        self.step_count = 0
        self._uncertified = UncertifiedLog()
        if isinstance(tasks, int):
            tasks = [str(i) for i in range(tasks)]
        self.task_names: tuple[str, ...] | None = tuple(tasks) if tasks is not None else None
        self.loss_types = None if loss_types is None else tuple(loss_types)
        self.shared, self.task_params, modules = split_parameters(optimizer, shared, self.method)
        self.source = choose_source(
            self.method, engine, self.shared, modules, self.max_jacobian_bytes
        )

    @property
    def uncertified(self) -> collections.Counter[tuple[str, str]]:
        """Uncertified solves so far, by (solver name, status)."""
        return self._uncertified.counts

    # -- what the closure's model calls --------------------------------------------------------
    def task_input(self, features: Tensor, task: str | int) -> Tensor:
        """The input of task ``task``'s head (a name or an index): ``features`` itself, unless
        the method transforms the representation per task (a ``RepresentationTransform``). Call
        it in the closure *and* at evaluation, so that heads always see what they were trained
        on::

            z = model.encoder(x)
            outputs = {t: model.heads[t](mto.task_input(z, t)) for t in tasks}
        """
        if isinstance(task, int):
            index: int | None = task
        elif self.task_names is None:
            index = None
        else:
            if task not in self.task_names:
                raise KeyError(f"unknown task {task!r}; tasks are {list(self.task_names)}")
            index = self.task_names.index(task)
        if isinstance(self.source, RepresentationSource):
            copy = self.source.head_copy(features, task)
            if copy is not None:
                features = copy
        if isinstance(self.method, RepresentationTransform):
            return self.method.task_input(features, index)
        return features

    def end_epoch(self) -> None:
        """Call once at the end of every training epoch (``EpochAware`` methods use it)."""
        if isinstance(self.method, EpochAware):
            self.method.end_epoch()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- the step ------------------------------------------------------------------------------
    def step(self, closure: Closure, meta_closure: Closure | None = None) -> StepInfo:
        """One multi-task step; the closure runs the forward pass and returns the losses.

        ``meta_closure`` (only for methods that read a meta batch, ``MetaBatchMethod``) returns
        the losses on that batch; the method's ``meta_split`` says which split it comes from.
        """
        method = self.method
        if isinstance(method, MetaBatchMethod) and meta_closure is None:
            raise ValueError(
                f"method {method.name!r} needs a meta batch: call step(closure, "
                f"meta_closure=...) with losses on a {method.meta_split!r} batch"
            )
        clock = PhaseClock()
        self.optimizer.zero_grad(set_to_none=True)
        index = self.step_count
        replay = rng_state() if isinstance(method, ClosureMethod) else None
        known = None if self.task_names is None else len(self.task_names)
        with torch.enable_grad(), self.source.recording(known):
            step = unpack(closure(), self.task_names)
        if self.task_names is None:
            self.task_names = step.names
        clock.lap("forward")
        per_task = self.source.compute(step)
        clock.lap("gradients")
        features = step.features if method.level == "rep" else None
        inputs = MethodInput(
            step.stacked,
            step.names,
            grads=per_task.grads,
            step=index,
            loss_types=self.loss_types,
            features=None if features is None else features.detach(),
            gramian_matrix=per_task.gramian,
        )
        context = None
        if isinstance(method, ClosureMethod):
            context = make_context(
                method,
                closure,
                meta_closure,
                step,
                replay,
                self.shared,
                self.task_params,
                self.optimizer,
                self.max_grad_norm,
            )
        if isinstance(method, SequentialMethod):
            assert context is not None
            require_separate(method.name, step)
            report = method.apply(inputs, context)
            agg, updates = Aggregation(report.weights, extras=dict(report.extras)), report.updates
            self._add_param_groups()
            clock.lap("method")
        else:
            report, updates = None, 1
            agg = self._update_once(inputs, step, per_task, context, clock)
        self.step_count += 1
        extras = dict(agg.extras)
        if context is not None:
            assert isinstance(method, ClosureMethod)
            extras.update(method.after_step(inputs, context))
            clock.lap("after_step")
        if agg.solver is not None and not agg.solver.converged:
            self._uncertified.record(index, method.name, agg.solver)
        return StepInfo(
            step=index,
            losses=dict(zip(step.names, step.values, strict=True)),
            weights=None if agg.weights is None else agg.weights.detach().cpu(),
            task_names=step.names,
            solver=agg.solver,
            times=clock.done(),
            extras=extras,
            gradient_engine=self.source.label,
            updates=updates,
            sequential=report,
        )

    def _update_once(
        self, inputs: MethodInput, step: Unpacked, per_task: Any, context: Any, clock: PhaseClock
    ) -> Aggregation:
        """The method's aggregation, written into ``.grad`` and applied by one optimizer step."""
        method = self.method
        if context is not None:
            assert isinstance(method, ClosureMethod)
            agg = method.aggregate_in_context(inputs, context)
        else:
            agg = method.aggregate(inputs)
        writeback.check_aggregation(method, agg, inputs.num_tasks)
        self._add_param_groups()
        clock.lap("method")
        heads = (
            writeback.head_coefficients(method, agg, inputs.num_tasks) if self.task_params else None
        )
        self.source.write(agg, step, per_task, self.task_params, heads)
        writeback.clip(self.shared, self.max_grad_norm)
        clock.lap("backward")
        self.optimizer.step()
        clock.lap("optimizer")
        return agg

    def _add_param_groups(self) -> None:
        if isinstance(self.method, RepresentationTransform):
            writeback.add_param_groups(self.optimizer, self.method.new_param_groups())

    # -- state, like torch.optim ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "step": self.step_count,
            "task_names": None if self.task_names is None else list(self.task_names),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the method first: parameters it owns (a representation transform's) must be in the
        # param_groups before the optimizer's state can be loaded
        self.method.load_state_dict(state_dict["method"])
        if isinstance(self.method, RepresentationTransform):
            self.method.to(self.shared[0].device)
        self._add_param_groups()
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.step_count = int(state_dict["step"])
        names = state_dict.get("task_names")
        self.task_names = None if names is None else tuple(names)
