r"""``MultiTaskOptimizer``: one engine that runs every method in a plain PyTorch loop.

Per step: call the closure (per-task losses, plus the shared representation when the method needs
it), compute exactly what the method declared (:class:`~mtopt.core.method.Need`), ask the method
for weights and/or a direction, write ``.grad`` of the shared parameters (``d``) and of the
task-specific parameters (``Σ_k c_k ∇ℓ_k`` with ``c = w`` under the ``weighted`` head policy and
``c = 1`` under ``raw``), step the base optimizer and return a :class:`StepInfo`.

Shared parameters are those passed as ``shared``; every other parameter of the base optimizer is
task-specific. Methods that need representation gradients assume the losses depend on the shared
parameters only through ``features``.

Per-task gradients of the shared parameters come from one of three engines (``engine=``):
``"jacobian"`` forms the ``K × D`` matrix with K ``autograd.grad`` calls
(:func:`~mtopt.core.gradients.jacobian`); ``"batched"`` forms it from one backward pass with K
batched cotangents (:func:`~mtopt.core.gradients.batched_jacobian`; slower than the loop on the
CPU models measured, offered for devices where batching pays); ``"gramian"`` (only for methods
whose weights depend on the Gramian alone, ``Method.gramian_only``, and only when ``shared`` is
given as modules) accumulates the ``K × K`` Gramian module by module and writes ``Jᵀw`` from
what it kept (:mod:`mtopt.core.gramian`), never holding ``J``. ``"auto"`` (default) takes the
Jacobian unless it would exceed ``max_jacobian_bytes`` and the Gramian engine applies.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mtopt.core.gradients import batched_jacobian, jacobian, write_flat_grad
from mtopt.core.gramian import GramianEngine
from mtopt.core.method import Aggregation, Method, MethodInput, Need, SolverReport
from mtopt.core.registry import make

logger = logging.getLogger("mtopt")

#: How per-task gradients of the shared parameters are obtained (``MultiTaskOptimizer(engine=)``).
ENGINES = ("auto", "jacobian", "batched", "gramian")


@dataclass
class Losses:
    """What a closure returns: per-task losses (a name → loss mapping or a sequence) and,
    for representation-level methods, the shared representation ``features`` they depend on."""

    losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor
    features: Tensor | None = None


@dataclass
class StepInfo:
    """The record of one step.

    Attributes:
        step: 0-based index of the step.
        losses: task name → loss value before the update.
        weights: the method's effective weights (``d = Σ w_k g_k``), or ``None``.
        task_names: names in the order of ``weights``.
        solver: the inner solver's report (``None`` if the method has no solver).
        times: seconds per phase: ``forward``, ``gradients``, ``method``, ``backward``,
            ``optimizer`` (``after_step`` for ``Need.CLOSURE`` methods), ``total``.
        extras: method-specific values worth logging.
        gradient_engine: how the per-task gradients were obtained: ``"jacobian"`` or
            ``"batched"`` (of the shared parameters), ``"gramian"`` (their Gramian only),
            ``"representation"``, or
            ``None`` (the method needs no per-task gradient).
    """

    step: int
    losses: dict[str, float]
    weights: Tensor | None
    task_names: tuple[str, ...]
    solver: SolverReport | None
    times: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)
    gradient_engine: str | None = None

    def weight_dict(self) -> dict[str, float] | None:
        if self.weights is None:
            return None
        return dict(zip(self.task_names, self.weights.tolist(), strict=True))


Closure = Callable[[], "Losses | Mapping[str, Tensor] | Sequence[Tensor] | Tensor"]


class MultiTaskOptimizer:
    """Wrap a ``torch.optim`` optimizer so that each step balances several task losses.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over all trainable parameters.
        method: a registered method name (see :func:`mtopt.methods`) or a ``Method`` instance.
        shared: the shared part: its module(s) (``model.encoder``; needed by the Gramian engine)
            or its parameters. ``None``: every optimized parameter.
        tasks: optional task names (or their number) to check every step's losses against;
            otherwise fixed by the first step.
        loss_types: optional loss type per task ("regression", "classification", "l1"), for
            methods whose rule depends on it (typed UW).
        max_grad_norm: if set, clip the norm of the shared parameters' gradient to it before the
            optimizer step (FAMO's and Nash-MTL's reference training loops do).
        engine: ``"auto"``, ``"jacobian"``, ``"batched"`` or ``"gramian"``: how per-task
            gradients of the shared parameters are obtained (module docstring). ``"gramian"``
            needs a method with ``gramian_only`` and ``shared`` given as module(s).
        max_jacobian_bytes: under ``engine="auto"``, the size of the ``K × D`` Jacobian above
            which the Gramian engine is used (when it applies); the Gramian engine keeps at most
            this many bytes of per-module Jacobian rows. Default 1 GiB.
        **hparams: the method's hyperparameters when ``method`` is a name (``optimizer`` is
            positional-only, so a method's own ``optimizer`` setting, UW's and IMTL-L's, can be
            passed here).

    Example::

        mto = MultiTaskOptimizer(torch.optim.Adam(model.parameters()), "mgda_ub",
                                 shared=model.encoder.parameters())
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
        self.optimizer = optimizer
        optimized = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        optimized_ids = {id(p) for p in optimized}
        if shared is None and Need.REP_GRADS in self.method.needs:
            raise ValueError(
                f"method {self.method.name!r} works on the shared representation: pass "
                "shared=<the encoder's parameters> so the heads are told apart (with shared=None "
                "every parameter would count as shared and the heads would never train)"
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
            self.shared = [p for p in shared if p.requires_grad]
            missing = [i for i, p in enumerate(self.shared) if id(p) not in optimized_ids]
            if missing:
                raise ValueError(
                    f"shared parameters at positions {missing} are not in the optimizer's "
                    "param_groups; they would never be updated"
                )
        if not self.shared:
            raise ValueError("no shared parameter requires grad")
        shared_ids = {id(p) for p in self.shared}
        self.task_params = [p for p in optimized if id(p) not in shared_ids]
        if isinstance(tasks, int):
            tasks = [str(i) for i in range(tasks)]
        self.task_names: tuple[str, ...] | None = tuple(tasks) if tasks is not None else None
        self.loss_types = None if loss_types is None else tuple(loss_types)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        self.step_count = 0
        #: uncertified solves so far, by (solver name, status)
        self.uncertified: collections.Counter[tuple[str, str]] = collections.Counter()
        self.engine = engine
        self.max_jacobian_bytes = int(max_jacobian_bytes)
        #: bytes of one Jacobian row (the shared parameters do not change)
        self._jacobian_row_bytes = (
            sum(p.numel() for p in self.shared) * self.shared[0].element_size()
        )
        self._gramian_engine = self._make_gramian_engine(modules)
        self._gramian_verified = False
        # representation-level methods that leave the heads' input alone get one backward
        # pass for all K rows (task_input hands each head a detached copy of z during a step)
        self._split_heads = (
            Need.REP_GRADS in self.method.needs and Need.CLOSURE not in self.method.needs
        )
        self._split: list[tuple[Tensor, str | int, Tensor]] | None = None

    def _make_gramian_engine(self, modules: list[nn.Module] | None) -> GramianEngine | None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        method = self.method
        reasons = []
        if Need.PARAM_GRADS not in method.needs:
            reasons.append(f"method {method.name!r} does not use parameter gradients")
        elif not getattr(method, "gramian_only", False):
            reasons.append(f"method {method.name!r} needs the gradients, not only their Gramian")
        if modules is None:
            reasons.append("shared was given as parameters; pass the shared module(s) instead")
        if self.engine == "gramian" and reasons:
            raise ValueError("engine='gramian' is not possible: " + "; ".join(reasons))
        if reasons or self.engine in ("jacobian", "batched"):
            return None
        assert modules is not None
        # rows that fit the Jacobian budget are kept: Jᵀw is then a product, not a pass
        return GramianEngine(modules, self.shared, keep_bytes=self.max_jacobian_bytes)

    def _gramian_wanted(self, num_tasks: int | None) -> bool:
        """Whether this step's per-task gradients go through the Gramian engine (``None``:
        the number of tasks is not known yet)."""
        if self._gramian_engine is None:
            return False
        if self.engine == "gramian" or num_tasks is None:
            return True
        return num_tasks * self._jacobian_row_bytes > self.max_jacobian_bytes

    # ------------------------------------------------------------------------------------------
    def end_epoch(self) -> None:
        """Call once at the end of every training epoch; forwarded to the method."""
        self.method.end_epoch()

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
        if self._split is not None and features.requires_grad:
            # inside a representation-level step: head k reads its own detached copy of z (through
            # the method's transform, RotoGrad's rotation), so one backward pass yields every
            # ∂ℓ_k/∂z (see _representation_grads)
            leaf = features.detach().requires_grad_(True)
            self._split.append((features, task, leaf))
            return self.method.task_input(leaf, index)
        return self.method.task_input(features, index)

    @staticmethod
    def _representation_grads(
        split: list[tuple[Tensor, str | int, Tensor]],
        names: tuple[str, ...],
        losses: list[Tensor],
        features: Tensor,
    ) -> Tensor:
        """Rows ``∂ℓ_k/∂z`` (``K × numel(z)``). When the heads read ``z`` through
        :meth:`task_input` (detached copies, one per head call), one backward pass of ``Σ_k ℓ_k``
        into those copies gives every row at once; otherwise (or when some loss also reads
        ``z`` directly) K ``autograd.grad`` calls."""
        index_of = {name: i for i, name in enumerate(names)}
        usable = bool(split) and all(src is features for src, _, _ in split)
        tasks: list[int] = []
        for _, task, _ in split:
            index = task if isinstance(task, int) else index_of.get(task)
            if index is None or not 0 <= index < len(losses):
                usable = False
                break
            tasks.append(index)
        if usable and len(set(tasks)) == len(losses):
            leaves = [leaf for _, _, leaf in split]
            total = torch.stack(losses).sum()
            direct, *per_leaf = torch.autograd.grad(
                total, [features, *leaves], retain_graph=True, allow_unused=True
            )
            if direct is None:  # no loss reads z except through its head's copy
                rows = torch.zeros(
                    len(losses), features.numel(), dtype=features.dtype, device=features.device
                )
                for k, g in zip(tasks, per_leaf, strict=True):
                    if g is not None:
                        rows[k] += g.reshape(-1)
                return rows
        if split:  # the copies cut z out of the heads' graphs: differentiate through them
            leaves = [leaf for _, _, leaf in split]
            if any(leaf.shape != features.shape for leaf in leaves):
                raise ValueError(
                    "task_input was given a tensor other than the features the closure returned"
                )
            rows = jacobian(losses, [features, *leaves])
            n = features.numel()
            out = rows[:, :n].clone()
            for j in range(len(leaves)):
                out += rows[:, n * (j + 1) : n * (j + 2)]
            return out
        return jacobian(losses, [features])

    def _add_method_param_groups(self) -> None:
        for group in self.method.new_param_groups():
            group = dict(group)
            scale = group.pop("lr_scale", None)
            if scale is not None:  # relative to the model's lr: not to Muon's matrix groups
                groups = self.optimizer.param_groups
                base = next((g for g in groups if not g.get("use_muon", False)), groups[0])
                group["lr"] = scale * base["lr"]
            self.optimizer.add_param_group(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Closure, meta_closure: Closure | None = None) -> StepInfo:
        """One multi-task step; the closure runs the forward pass and returns the losses.

        ``meta_closure`` (only for methods that declare ``Need.META_BATCH``) returns the losses on
        a second batch drawn by the caller (see the method's ``meta_split``).
        """
        needs = self.method.needs
        if Need.META_BATCH in needs and meta_closure is None:
            raise ValueError(
                f"method {self.method.name!r} needs a meta batch: call "
                f"step(closure, meta_closure=...) with losses on a {self.method.meta_split!r} batch"
            )
        times: dict[str, float] = {}
        clock = time.perf_counter()
        start = clock

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            times[phase] = now - clock
            clock = now

        self.optimizer.zero_grad(set_to_none=True)
        step_index = self.step_count
        rng_state = _rng_state() if Need.CLOSURE in needs else None
        known = None if self.task_names is None else len(self.task_names)
        recorder = self._gramian_engine if self._gramian_wanted(known) else None
        split: list[tuple[Tensor, str | int, Tensor]] = []
        self._split = split if self._split_heads else None
        try:
            with torch.enable_grad(), recorder.record() if recorder else contextlib.nullcontext():
                names, losses, features, stacked, step_values = self._unpack(closure())
        finally:
            self._split = None
        lap("forward")

        grads = None
        gram = None
        engine_used = None
        if Need.PARAM_GRADS in needs:
            if recorder is not None and self._gramian_wanted(len(losses)):
                gram = recorder.gramian(losses)
                if not self._gramian_verified:
                    recorder.verify(losses, gram)
                    self._gramian_verified = True
                engine_used = "gramian"
            else:
                if recorder is not None:
                    recorder.clear()
                if self.engine == "batched":
                    grads = batched_jacobian(losses, self.shared)
                    engine_used = "batched"
                else:
                    grads = jacobian(losses, self.shared)
                    engine_used = "jacobian"
        elif Need.REP_GRADS in needs:
            engine_used = "representation"
            if features is None:
                raise ValueError(
                    f"method {self.method.name!r} needs the shared representation: return "
                    "mtopt.Losses(losses, features=z) from the closure"
                )
            if not features.requires_grad:
                raise ValueError("features must be part of the autograd graph (requires_grad)")
            grads = self._representation_grads(split, names, losses, features)
        _check_finite(names, grads, gram)
        lap("gradients")

        inputs = MethodInput(
            stacked, names, grads=grads, step=step_index, loss_types=self.loss_types
        )
        if gram is not None:
            inputs._gramian = gram
        if Need.REP_GRADS in needs and features is not None:
            inputs.features = features.detach()
        if Need.CLOSURE in needs:

            def evaluate_each() -> list[Tensor]:
                # replay the step's random state: the same dropout masks as the step's forward,
                # and the caller's random stream is left untouched; under torch.no_grad() the
                # re-evaluated losses need not be part of a graph
                with _replayed_rng(rng_state):
                    out = closure()
                return self._unpack(out, require_grad=torch.is_grad_enabled())[1]

            inputs.evaluate = lambda: torch.stack(evaluate_each())
            inputs.evaluate_each = evaluate_each
            inputs.parameters = self.shared + self.task_params
            inputs.optimizer = self.optimizer
            inputs.live_losses = losses
            inputs.update = self._update
        if meta_closure is not None and Need.META_BATCH in needs:
            inputs.evaluate_meta = lambda: torch.stack(
                self._unpack(meta_closure(), require_grad=torch.is_grad_enabled())[1]
            )
        agg = self.method.aggregate(inputs)
        self._check_aggregation(agg, inputs)
        self._add_method_param_groups()
        lap("method")

        if not agg.applied:
            self._write_grads(agg, losses, grads, features, gramian=gram is not None)
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.shared, self.max_grad_norm)
            lap("backward")
            self.optimizer.step()
            lap("optimizer")
        self.step_count += 1
        extras = dict(agg.extras)
        if Need.CLOSURE in needs:
            extras.update(self.method.after_step(inputs))
            lap("after_step")
        times["total"] = time.perf_counter() - start

        if agg.solver is not None and not agg.solver.converged:
            self._report_uncertified(step_index, agg.solver)
        info = StepInfo(
            step=step_index,
            losses=dict(zip(names, step_values, strict=True)),
            weights=None if agg.weights is None else agg.weights.detach().cpu(),
            task_names=names,
            solver=agg.solver,
            times=times,
            extras=extras,
            gradient_engine=engine_used,
        )
        return info

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

    # ------------------------------------------------------------------------------------------
    def _unpack(
        self, out: Any, require_grad: bool = True
    ) -> tuple[tuple[str, ...], list[Tensor], Tensor | None, Tensor, list[float]]:
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
            names = self.task_names or tuple(str(i) for i in range(len(values)))
        elif isinstance(out, Sequence):
            values = list(out)
            names = self.task_names or tuple(str(i) for i in range(len(values)))
        else:
            raise TypeError(
                "the closure must return mtopt.Losses, a dict of task losses, a sequence of "
                f"losses or a 1-D tensor; got {type(out).__name__}"
            )
        if not values:
            raise ValueError("the closure returned no losses")
        if self.task_names is None:
            self.task_names = names
        elif len(values) != len(self.task_names):
            raise ValueError(
                f"expected {len(self.task_names)} losses (tasks {list(self.task_names)}), "
                f"got {len(values)}"
            )
        elif names != self.task_names:
            raise ValueError(f"expected tasks {list(self.task_names)}, got {list(names)}")
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
        values_now = torch.stack([loss.detach() for loss in losses])
        # one host copy of the K values (StepInfo needs them anyway): checking them as Python
        # floats is cheaper than a tensor isfinite/all pair on small K
        plain = values_now.tolist()
        if not all(math.isfinite(v) for v in plain):
            bad = [f"{n}={v}" for n, v in zip(names, plain, strict=True) if not math.isfinite(v)]
            raise ValueError(f"non-finite loss(es): {', '.join(bad)}")
        return names, losses, features, values_now, plain

    def _check_aggregation(self, agg: Aggregation, inputs: MethodInput) -> None:
        name = self.method.name
        if agg.weights is None and agg.direction is None:
            raise RuntimeError(f"method {name!r} returned neither weights nor a direction")
        if agg.weights is not None:
            if agg.weights.shape != (inputs.num_tasks,):
                raise RuntimeError(
                    f"method {name!r} returned weights of shape {tuple(agg.weights.shape)} "
                    f"for {inputs.num_tasks} tasks"
                )
            if not all(math.isfinite(v) for v in agg.weights.tolist()):
                raise FloatingPointError(
                    f"method {name!r} produced non-finite weights {agg.weights.tolist()}"
                )
        if agg.applied and Need.CLOSURE not in self.method.needs:
            raise RuntimeError(f"method {name!r} says it applied the update without Need.CLOSURE")
        if agg.direction is not None and inputs.grads is None:
            raise RuntimeError(
                f"method {name!r} returned a direction without gradient inputs (under the "
                "Gramian engine a method must return weights)"
            )
        if agg.head_weights is not None and not bool(torch.isfinite(agg.head_weights).all()):
            raise FloatingPointError(f"method {name!r} produced non-finite head weights")
        if (
            agg.weights is None
            and agg.head_weights is None
            and self.method.head_policy == "weighted"
            and self.task_params
        ):
            raise RuntimeError(
                f"method {name!r} has no weights, so the 'weighted' head policy is undefined"
            )

    def _update(self, loss: Tensor, zero_missing: bool = False) -> None:
        """One plain update on ``loss`` (see ``MethodInput.update``)."""
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss, inputs=self.shared + self.task_params)
        if zero_missing:
            for p in self.task_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.shared if p.grad is not None], self.max_grad_norm
            )
        self.optimizer.step()

    def _write_grads(
        self,
        agg: Aggregation,
        losses: list[Tensor],
        grads: Tensor | None,
        features: Tensor | None,
        gramian: bool = False,
    ) -> None:
        w = agg.weights
        head_coeffs = None
        if self.task_params:
            if agg.head_weights is not None:
                head_coeffs = agg.head_weights
            elif self.method.head_policy == "weighted":
                head_coeffs = w
            else:
                head_coeffs = torch.ones(len(losses))

        if gramian:  # Jᵀw from the Gramian engine's kept cotangents, heads by backward
            assert w is not None and self._gramian_engine is not None
            self._gramian_engine.write_grads(w.detach())
            if head_coeffs is not None:
                torch.autograd.backward(_weighted_sum(losses, head_coeffs), inputs=self.task_params)
            return
        if grads is None:  # loss-only: back-propagate Σ w_k ℓ_k
            assert w is not None
            total = _weighted_sum(losses, w)
            if head_coeffs is None or head_coeffs is w:
                total.backward()
            else:
                torch.autograd.backward(total, inputs=self.shared, retain_graph=True)
                torch.autograd.backward(_weighted_sum(losses, head_coeffs), inputs=self.task_params)
            return

        direction = agg.direction
        if direction is None:
            assert w is not None
            # summed in float32 at least: under a float16 model, Σ w_k g_k in float16 would
            # round (or overflow) where the weights are large and the gradients cancel
            work = torch.promote_types(grads.dtype, torch.float32)
            direction = w.to(device=grads.device, dtype=work) @ grads.to(work)
        if Need.PARAM_GRADS in self.method.needs:
            write_flat_grad(self.shared, direction.detach())
        else:  # representation gradients: push d through the encoder once
            assert features is not None
            torch.autograd.backward(
                features,
                grad_tensors=direction.detach().to(features.dtype).view_as(features),
                inputs=self.shared,
                retain_graph=head_coeffs is not None,
            )
        if head_coeffs is not None:
            torch.autograd.backward(_weighted_sum(losses, head_coeffs), inputs=self.task_params)

    # ------------------------------------------------------------------------------------------
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
        self.method.to(self.shared[0].device)
        self._add_method_param_groups()
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.step_count = int(state_dict["step"])
        names = state_dict.get("task_names")
        self.task_names = None if names is None else tuple(names)


def _check_finite(names: tuple[str, ...], grads: Tensor | None, gram: Tensor | None) -> None:
    """Raise a ``FloatingPointError`` naming the tasks whose per-task gradient is not finite
    (one reduction over the rows, or the Gramian's diagonal)."""
    if grads is not None:
        # a row sum is non-finite iff an entry is (or the sum overflows: then look closer)
        peaks = grads.sum(dim=1).tolist()
        if not all(math.isfinite(v) for v in peaks):
            peaks = [
                v if math.isfinite(v) else float(grads[k].abs().amax()) for k, v in enumerate(peaks)
            ]
    elif gram is not None:
        peaks = torch.diagonal(gram).tolist()
    else:
        return
    bad = [n for n, v in zip(names, peaks, strict=True) if not math.isfinite(v)]
    if bad:
        dtype = grads.dtype if grads is not None else None
        raise FloatingPointError(
            f"the gradient of task(s) {bad} is not finite (inf or NaN): the loss is not "
            "differentiable there, or the backward pass overflowed"
            + (f" in {dtype}" if dtype is not None else "")
            + " (a GradScaler or a wider dtype helps with overflow)"
        )


def _weighted_sum(losses: list[Tensor], coeffs: Tensor) -> Tensor:
    c = coeffs.detach().to(device=losses[0].device, dtype=losses[0].dtype)
    return (torch.stack(losses) * c).sum()


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(state: tuple[Tensor, list[Tensor] | None] | None):
    """Run a block with the global RNGs set to ``state``; restore the current state after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if state is not None:
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state_all(state[1])
        yield
