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
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtopt.core.capabilities import (
    ClosureMethod,
    EpochAware,
    MetaBatchMethod,
    RepresentationTransform,
    SequentialMethod,
    StepContext,
)
from mtopt.core.gramian import GramianEngine
from mtopt.core.method import Aggregation, Method, MethodInput, SolverReport
from mtopt.core.registry import make
from mtopt.engine import writeback
from mtopt.engine.closure import Closure, Losses, Unpacked, replayed_rng, rng_state, unpack
from mtopt.engine.info import StepInfo
from mtopt.engine.sources import (
    AutoSource,
    GradientSource,
    GramianSource,
    JacobianSource,
    LossSource,
    RepresentationSource,
)

logger = logging.getLogger("mtopt")

#: How per-task gradients of the shared parameters are obtained (``MultiTaskOptimizer(engine=)``).
ENGINES = ("auto", "jacobian", "batched", "gramian")

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
            methods whose rule depends on it (typed UW).
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
            positional-only, so a method's own ``optimizer`` setting, UW's and IMTL-L's, can be
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
        method: str | Method = "unitary",
        shared: Iterable[Tensor] | nn.Module | Sequence[nn.Module] | None = None,
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
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.optimizer = optimizer
        self.engine = engine
        self.max_grad_norm = max_grad_norm
        self.max_jacobian_bytes = int(max_jacobian_bytes)
        self.step_count = 0
        #: uncertified solves so far, by (solver name, status)
        self.uncertified: collections.Counter[tuple[str, str]] = collections.Counter()
        if isinstance(tasks, int):
            tasks = [str(i) for i in range(tasks)]
        self.task_names: tuple[str, ...] | None = tuple(tasks) if tasks is not None else None
        self.loss_types = None if loss_types is None else tuple(loss_types)
        modules = self._split_parameters(shared)
        self.source = self._choose_source(modules)

    # -- set-up --------------------------------------------------------------------------------
    def _split_parameters(self, shared: Any) -> list[nn.Module] | None:
        """Set ``self.shared`` and ``self.task_params``; return the shared modules, if given."""
        optimized = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        if shared is None and self.method.level == "rep":
            raise ValueError(
                f"method {self.method.name!r} works on the shared representation: pass "
                "shared=<the encoder or its parameters> so the heads are told apart (with "
                "shared=None every parameter would count as shared and the heads would never "
                "train)"
            )
        modules: list[nn.Module] | None = None
        if isinstance(shared, nn.Module):
            modules = [shared]
        elif shared is not None:
            shared = list(shared)
            if shared and all(isinstance(m, nn.Module) for m in shared):
                modules = list(shared)
        if modules is not None:
            unique: dict[int, Tensor] = {}
            for m in modules:
                for p in m.parameters():
                    unique.setdefault(id(p), p)
            shared = list(unique.values())
        if shared is None:
            self.shared = optimized
        else:
            ids = {id(p) for p in optimized}
            self.shared = [p for p in shared if p.requires_grad]
            missing = [i for i, p in enumerate(self.shared) if id(p) not in ids]
            if missing:
                raise ValueError(
                    f"shared parameters at positions {missing} are not in the optimizer's "
                    "param_groups; they would never be updated"
                )
        if not self.shared:
            raise ValueError("no shared parameter requires grad")
        shared_ids = {id(p) for p in self.shared}
        self.task_params = [p for p in optimized if id(p) not in shared_ids]
        return modules

    def _choose_source(self, modules: list[nn.Module] | None) -> GradientSource:
        method, level = self.method, self.method.level
        if self.engine == "gramian" and level != "param":
            raise ValueError(
                f"engine='gramian' is not possible: method {method.name!r} does not use parameter "
                f"gradients (it works at level {level!r})"
            )
        if level == "loss":
            return LossSource(self.shared)
        if level == "rep":
            # heads read per-task copies of z (one backward pass for all K rows), unless the
            # method re-runs the closure itself
            return RepresentationSource(self.shared, not isinstance(method, ClosureMethod))
        reasons = []
        if not method.gramian_only:
            reasons.append(f"method {method.name!r} needs the gradients, not only their Gramian")
        if modules is None:
            reasons.append("shared was given as parameters; pass the shared module(s) instead")
        if self.engine == "gramian" and reasons:
            raise ValueError("engine='gramian' is not possible: " + "; ".join(reasons))
        jac = JacobianSource(self.shared, batched=self.engine == "batched")
        if reasons or self.engine in ("jacobian", "batched"):
            return jac
        assert modules is not None
        # rows that fit the Jacobian budget are kept: Jᵀw is then a product, not a pass
        gram = GramianSource(
            GramianEngine(modules, self.shared, keep_bytes=self.max_jacobian_bytes)
        )
        if self.engine == "gramian":
            return gram
        row_bytes = sum(p.numel() for p in self.shared) * self.shared[0].element_size()
        return AutoSource(jac, gram, row_bytes, self.max_jacobian_bytes)

    # -- what the closure's model calls --------------------------------------------------------
    def task_input(self, features: Tensor, task: str | int) -> Tensor:
        """The input of task ``task``'s head (a name or an index): ``features`` itself, unless
        the method transforms the representation per task (RotoGrad rotates it). Call it in
        the closure *and* at evaluation, so that heads always see what they were trained on::

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
        """Call once at the end of every training epoch (epoch-aware methods such as DWA's
        original form use it)."""
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
        times: dict[str, float] = {}
        clock = start = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            times[phase] = now - clock
            clock = now

        self.optimizer.zero_grad(set_to_none=True)
        index = self.step_count
        replay = rng_state() if isinstance(method, ClosureMethod) else None
        known = None if self.task_names is None else len(self.task_names)
        with torch.enable_grad(), self.source.recording(known):
            step = unpack(closure(), self.task_names)
        if self.task_names is None:
            self.task_names = step.names
        lap("forward")

        per_task = self.source.compute(step)
        lap("gradients")

        features = (
            step.features.detach() if method.level == "rep" and step.features is not None else None
        )
        inputs = MethodInput(
            step.stacked,
            step.names,
            grads=per_task.grads,
            step=index,
            loss_types=self.loss_types,
            features=features,
            gramian_matrix=per_task.gramian,
        )
        context = self._context(closure, meta_closure, step, replay)
        updates, report = 1, None
        if isinstance(method, SequentialMethod):
            assert context is not None
            if not step.separate:
                raise ValueError(
                    f"{method.name}: the closure returned the losses as one stacked tensor (or "
                    "views of one); this method back-propagates subsets of them, and every head "
                    "would then be in every subset's graph. Return a dict or list of the separate "
                    "scalar losses."
                )
            report = method.apply(inputs, context)
            agg = Aggregation(report.weights, extras=dict(report.extras))
            updates = report.updates
            self._add_param_groups()
            lap("method")
        else:
            if isinstance(method, ClosureMethod):
                assert context is not None
                agg = method.aggregate_in_context(inputs, context)
            else:
                agg = method.aggregate(inputs)
            writeback.check_aggregation(method, agg, inputs.num_tasks)
            self._add_param_groups()
            lap("method")
            heads = (
                writeback.head_coefficients(method, agg, inputs.num_tasks)
                if self.task_params
                else None
            )
            self.source.write(agg, step, per_task, self.task_params, heads)
            writeback.clip(self.shared, self.max_grad_norm)
            lap("backward")
            self.optimizer.step()
            lap("optimizer")
        self.step_count += 1
        extras = dict(agg.extras)
        if isinstance(method, ClosureMethod) and context is not None:
            extras.update(method.after_step(inputs, context))
            lap("after_step")
        times["total"] = time.perf_counter() - start
        if agg.solver is not None and not agg.solver.converged:
            self._report_uncertified(index, agg.solver)
        return StepInfo(
            step=index,
            losses=dict(zip(step.names, step.values, strict=True)),
            weights=None if agg.weights is None else agg.weights.detach().cpu(),
            task_names=step.names,
            solver=agg.solver,
            times=times,
            extras=extras,
            gradient_engine=self.source.label,
            updates=updates,
            sequential=report,
        )

    def _context(
        self,
        closure: Closure,
        meta_closure: Closure | None,
        step: Unpacked,
        replay: Any,
    ) -> StepContext | None:
        """The step context of a closure method (``None`` for every other method)."""
        if not isinstance(self.method, ClosureMethod):
            return None
        names = step.names

        def evaluate_each() -> list[Tensor]:
            # the step's random state replayed: the same dropout masks as its forward, and the
            # caller's random stream untouched; under no_grad the losses need no graph
            with replayed_rng(replay):
                out = closure()
            return unpack(out, names, require_grad=torch.is_grad_enabled()).losses

        evaluate_meta = None
        if meta_closure is not None and isinstance(self.method, MetaBatchMethod):

            def evaluate_meta() -> Tensor:
                out = unpack(meta_closure(), names, require_grad=torch.is_grad_enabled())
                return torch.stack(out.losses)

        return StepContext(
            evaluate=lambda: torch.stack(evaluate_each()),
            evaluate_each=evaluate_each,
            live_losses=step.losses,
            parameters=self.shared + self.task_params,
            optimizer=self.optimizer,
            update=self._update,
            evaluate_meta=evaluate_meta,
        )

    def _update(self, loss: Tensor, zero_missing: bool = False) -> None:
        """One plain update on ``loss`` (``StepContext.update``)."""
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss, inputs=self.shared + self.task_params)
        if zero_missing:
            for p in self.task_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        writeback.clip(self.shared, self.max_grad_norm)
        self.optimizer.step()

    def _add_param_groups(self) -> None:
        if isinstance(self.method, RepresentationTransform):
            writeback.add_param_groups(self.optimizer, self.method.new_param_groups())

    def _report_uncertified(self, step_index: int, report: SolverReport) -> None:
        """Count an uncertified solve; log the first of each kind (solver, status) with its
        details at WARNING, later ones at DEBUG (``logging.getLogger("mtopt")`` at DEBUG, or
        ``mtopt --verbose``, shows every one)."""
        kind = (report.name, report.status)
        self.uncertified[kind] += 1
        first = self.uncertified[kind] == 1
        residual = "" if report.residual is None else f", residual {report.residual:.3g}"
        tolerance = "" if report.tolerance is None else f" > {report.tolerance:.3g}"
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "step %d: %s solver %s not certified (%s after %d iterations%s%s): %s%s",
            step_index,
            self.method.name,
            report.name,
            report.status,
            report.iterations,
            residual,
            tolerance,
            report.message,
            "; further steps like this are counted, not logged (--verbose logs them)"
            if first
            else "",
        )

    # -- state, like torch.optim ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "step": self.step_count,
            "task_names": None if self.task_names is None else list(self.task_names),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the method first: parameters it owns (RotoGrad's rotations) must be in the optimizer's
        # param_groups before the optimizer's state can be loaded
        self.method.load_state_dict(state_dict["method"])
        if isinstance(self.method, RepresentationTransform):
            self.method.to(self.shared[0].device)
        self._add_param_groups()
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.step_count = int(state_dict["step"])
        names = state_dict.get("task_names")
        self.task_names = None if names is None else tuple(names)
