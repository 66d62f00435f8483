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
import dataclasses
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
from mtopt.engine import accumulation, writeback
from mtopt.engine.closure import Closure, Losses, Unpacked, require_separate, rng_state, unpack
from mtopt.engine.context import make_context
from mtopt.engine.distributed import make_sync
from mtopt.engine.info import PhaseClock, StepInfo, UncertifiedLog
from mtopt.engine.scaling import Scaling
from mtopt.engine.setup import ENGINES, Shared, choose_source, split_parameters
from mtopt.engine.sources import PerTask, RepresentationSource

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
            ``"jacobian"`` (K backward passes), ``"batched"`` (one batched pass; through the
            encoder only when the closure returns ``features`` through which alone the losses
            reach the shared parameters, :class:`~mtopt.engine.sources.JacobianSource`),
            ``"gramian"`` (only the ``K × K`` Gramian, module by module; needs a method with
            ``gramian_only`` and ``shared`` given as module(s)) or ``"auto"`` (the Jacobian,
            unless it would exceed ``max_jacobian_bytes`` and the Gramian engine applies; by
            K passes, or by one batched pass when the shared parameters are on one CUDA device
            at construction, which holds K cotangents at once, more memory than
            ``max_jacobian_bytes`` counts, and falls back to K passes with a warning if the
            model's backward cannot be batched). Streaming accumulation over micro-batches
            (:mod:`mtopt.engine.accumulation`) takes K passes.
        max_jacobian_bytes: under ``"auto"``, the size of the ``K × D`` Jacobian above which the
            Gramian engine is used; the Gramian engine keeps at most this many bytes of
            per-module rows. Default 1 GiB.
        process_group: data parallelism (:mod:`mtopt.engine.distributed`): ``"auto"`` works in
            the default ``torch.distributed`` group when one is initialised with more than one
            rank; ``None`` never communicates; or a group. Each rank's closure computes the
            losses of its own part of the batch (the model not wrapped in DDP); every rank's
            method then sees the full batch's losses and gradients, and all apply the same
            update. Parameters are broadcast from the group's first rank when the optimizer is
            built.
        grad_scaler: a ``torch.amp.GradScaler`` for mixed precision
            (:mod:`mtopt.engine.scaling`): the step back-propagates the scaled losses, the method
            sees the per-task gradients unscaled, and a step whose gradients are not finite is
            skipped and the scale lowered, as ``GradScaler.step`` and ``update`` do (the step
            calls both).
        **hparams: the method's hyperparameters when ``method`` is a name (``optimizer`` is
            positional-only, so a method's own ``optimizer`` hyperparameter can be
            passed here).

    Example:
        Two regression heads on a shared encoder, balanced by MGDA:

        >>> import torch
        >>> from mtopt import Losses, MultiTaskOptimizer
        >>> _ = torch.manual_seed(0)
        >>> encoder = torch.nn.Linear(4, 8)
        >>> heads = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 1)})
        >>> params = [*encoder.parameters(), *heads.parameters()]
        >>> mto = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), "mgda",
        ...                          shared=encoder, normalization="l2")
        >>> x, y = torch.randn(16, 4), torch.randn(16, 2)
        >>> def closure():
        ...     z = encoder(x)
        ...     return Losses({k: ((heads[k](z).squeeze(1) - y[:, i]) ** 2).mean()
        ...                    for i, k in enumerate(heads)})
        >>> info = mto.step(closure)
        >>> info.task_names, tuple(info.weights.shape), bool(info.weights.sum() > 0)
        (('a', 'b'), (2,), True)
        >>> info.gradient_engine
        'jacobian'
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
        process_group: Any = "auto",
        grad_scaler: torch.amp.GradScaler | None = None,
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
        if self.task_names is not None:  # a per-task hyperparameter of the wrong length: now
            self.method.check_tasks(len(self.task_names))
            if self.loss_types is not None and len(self.loss_types) != len(self.task_names):
                raise ValueError(
                    f"{len(self.loss_types)} loss_types for {len(self.task_names)} tasks "
                    f"{list(self.task_names)}"
                )
        self.shared, self.task_params, modules = split_parameters(optimizer, shared, self.method)
        self.sync = make_sync(process_group)
        self.scaling = Scaling.make(grad_scaler, self.method)
        self.source = choose_source(
            self.method,
            engine,
            self.shared,
            modules,
            self.max_jacobian_bytes,
            self.sync,
            heads=self.task_params,
        )
        if self.sync is not None:
            self.sync.check_method(self.method, self.shared[0].device)
            self.sync.broadcast_parameters(self.shared + self.task_params)

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
    def step(
        self,
        closure: Closure | Sequence[Closure],
        meta_closure: Closure | Sequence[Closure] | None = None,
    ) -> StepInfo:
        """One multi-task step; the closure runs the forward pass and returns the losses.

        A list of closures is one step on their micro-batches together (gradient accumulation,
        :mod:`mtopt.engine.accumulation`). ``meta_closure`` (only for methods that read a meta
        batch, ``MetaBatchMethod``) returns the losses on that batch (or is a list, like
        ``closure``); the method's ``meta_split`` says which split it comes from.
        """
        if isinstance(meta_closure, Sequence):
            meta_closure = accumulation.mean_closure(meta_closure)
        if isinstance(closure, Sequence):
            accumulation.check(self, closure)
            if accumulation.is_streaming(self):
                return accumulation.streaming_step(self, closure)
            closure = accumulation.mean_closure(closure)
        method = self.method
        if isinstance(method, MetaBatchMethod) and meta_closure is None:
            raise ValueError(
                f"method {method.name!r} needs a meta batch: call step(closure, "
                f"meta_closure=...) with losses on a {method.meta_split!r} batch"
            )
        clock, index = PhaseClock(), self.step_count
        sent = 0 if self.sync is None else self.sync.sent_bytes
        replay = rng_state() if isinstance(method, ClosureMethod) else None
        step = self._forward(closure)
        clock.lap("forward")
        try:
            per_task = self.source.compute(step)
        except FloatingPointError:
            if self.scaling is None:
                raise
            return self._skip(index, step.names, step.values, clock, sent)
        clock.lap("gradients")
        inputs = self._method_input(step, per_task, index)
        context = None
        if isinstance(method, ClosureMethod):
            context = make_context(
                method, closure, meta_closure, step, replay, self.shared, self.task_params,
                self.optimizer, self.max_grad_norm, self.sync,
            )  # fmt: skip
        report, skipped = None, False
        if isinstance(method, SequentialMethod):
            assert context is not None
            require_separate(method.name, step)
            report = method.apply(inputs, context)
            agg = Aggregation(report.weights, extras=dict(report.extras))
            self._add_param_groups()
            clock.lap("method")
        else:
            agg, skipped = self._update_once(inputs, step, per_task, context, clock)
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
            updates=1 if report is None else report.updates,
            sequential=report,
            communicated_bytes=0 if self.sync is None else self.sync.sent_bytes - sent,
            skipped=skipped,
        )

    def _forward(self, closure: Closure) -> Unpacked:
        """The closure's losses, checked; in a process group the global ones (global values,
        local gradients); under a grad scaler the back-propagated ones scaled."""
        self.optimizer.zero_grad(set_to_none=True)
        known = None if self.task_names is None else len(self.task_names)
        with torch.enable_grad(), self.source.recording(known):
            step = unpack(closure(), self.task_names)
        if self.task_names is None:
            self.task_names = step.names
        if self.sync is not None:
            losses, mean = self.sync.losses(step.losses)
            step = dataclasses.replace(step, losses=losses, stacked=mean, values=mean.tolist())
        if self.scaling is not None:
            step = self.scaling.scaled(step)
        return step

    def _method_input(self, step: Unpacked, per_task: PerTask, index: int) -> MethodInput:
        """What the method reads: the losses, and the per-task gradients (unscaled) or their
        Gramian, and the (gathered) features at the representation level."""
        grads, gram = per_task.grads, per_task.gramian
        if self.scaling is not None:
            grads, gram = self.scaling.unscaled(per_task)
        features = None
        if self.method.level == "rep":
            features = per_task.features if per_task.features is not None else step.features
        return MethodInput(
            step.stacked,
            step.names,
            grads=grads,
            step=index,
            loss_types=self.loss_types,
            features=None if features is None else features.detach(),
            gramian_matrix=gram,
        )

    def _update_once(
        self, inputs: MethodInput, step: Unpacked, per_task: Any, context: Any, clock: PhaseClock
    ) -> tuple[Aggregation, bool]:
        """The method's aggregation, written into ``.grad`` and applied by one optimizer step;
        whether a grad scaler skipped that step."""
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
        written = agg if self.scaling is None else self.scaling.scaled_direction(agg)
        self.source.write(written, step, per_task, self.task_params, heads)
        optimized = self._optimized()
        if self.sync is not None:
            skip = self.shared if self.source.writes_global else []
            self.sync.average_grads(optimized, skip=skip)
        if self.scaling is not None:
            self.scaling.unscale(self.optimizer)
        else:  # after the ranks' mean: every rank sees the same gradients and stops together
            writeback.check_written(optimized, self.shared, self.task_params, method.name)
        writeback.clip(self.shared, self.max_grad_norm)
        clock.lap("backward")
        skipped = False
        if self.scaling is None:
            self.optimizer.step()
        else:
            skipped = self.scaling.step(self.optimizer)
        clock.lap("optimizer")
        return agg, skipped

    def _skip(
        self,
        index: int,
        names: tuple[str, ...],
        values: list[float],
        clock: PhaseClock,
        sent: int,
        engine: str | None = None,
    ) -> StepInfo:
        """A step whose scaled per-task gradients are not finite: no update, a lower scale
        (``engine``: the gradient engine the step used, if not the source's)."""
        assert self.scaling is not None
        self.scaling.skip(self.optimizer, self.shared)
        self.step_count += 1
        return StepInfo(
            step=index,
            losses=dict(zip(names, values, strict=True)),
            weights=None,
            task_names=names,
            solver=None,
            times=clock.done(),
            gradient_engine=engine or self.source.label,
            updates=0,
            communicated_bytes=0 if self.sync is None else self.sync.sent_bytes - sent,
            skipped=True,
        )

    def _optimized(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _add_param_groups(self) -> None:
        if isinstance(self.method, RepresentationTransform):
            known = len(self.optimizer.param_groups)
            writeback.add_param_groups(self.optimizer, self.method.new_param_groups())
            if self.sync is not None:  # a method's own parameters start from rank 0's too
                added = [p for g in self.optimizer.param_groups[known:] for p in g["params"]]
                self.sync.broadcast_parameters(added)

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
