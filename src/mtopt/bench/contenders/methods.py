"""mtopt methods as contenders: every registered method (or each ``--methods`` spec
``NAME[:key=value...][#ENGINE]``, :mod:`mtopt.bench.labels`) through
:class:`~mtopt.engine.MultiTaskOptimizer` with ``shared=encoder``, with the method's own
defaults and ``engine="auto"`` unless the spec names an engine.

The harness names no method: what it needs to know it reads from the method's class and from
each step's typed record. A method whose constructor has required hyperparameters is left out of
the default list (with a line saying what to pass) and runs when a spec gives them; the category
of a row is its capability (:class:`~mtopt.core.capabilities.ClosureMethod`) or its level
(``method.level``); a method that updates the model several times per batch reports its updates
in ``StepInfo.updates``. Representation-level methods get ``features=z`` and their heads see
``mto.task_input(z, k)``; a :class:`~mtopt.core.capabilities.MetaBatchMethod` gets the same batch
as its meta batch (the cost is what is measured).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

import mtopt
from mtopt.bench.contenders.base import Contender, SolverSamples, StepOutcome
from mtopt.bench.labels import SOLVER_REFERENCES, counterpart_label, method_spec
from mtopt.bench.results import ContenderResult
from mtopt.bench.workloads import Batch, BenchModel, Workload, forward
from mtopt.core.capabilities import ClosureMethod, MetaBatchMethod
from mtopt.core.gradients import gram_matrix, jacobian
from mtopt.core.method import Method
from mtopt.core.registry import method_class
from mtopt.engine import Losses, MultiTaskOptimizer
from mtopt.specs import MethodSpec

__all__ = [
    "MAX_SOLVER_SAMPLES",
    "MtoptContender",
    "default_specs",
    "left_out_message",
    "method_category",
    "required_hyperparameters",
]

#: at most this many Gramians are recorded for the solver comparison
MAX_SOLVER_SAMPLES = 60


def method_category(method: Method) -> str:
    """``closure``, ``param``, ``rep`` or ``loss`` (in that precedence)."""
    if isinstance(method, ClosureMethod):
        return "closure"
    return method.level


def required_hyperparameters(name: str) -> list[str]:
    """The hyperparameters method ``name`` has no default for."""
    values = method_class(name).hyperparameters()
    return [k for k, v in values.items() if v is inspect.Parameter.empty]


def left_out_message(name: str, missing: list[str]) -> str:
    """The line saying why a method is not in the default list, and what to pass."""
    needs = ", ".join(f"{k}=..." for k in missing)
    return f"{name}: needs {needs}; pass {'it' if len(missing) == 1 else 'them'} in --methods"


def default_specs(notify: Callable[[str], None] | None = None) -> list[str]:
    """Every registered method that runs with its defaults, then ``NAME#gramian`` for each one
    that can run on the Gramian engine (``gramian_only`` at the parameter level; its Jacobian row
    stays the default engine's). A method with a required hyperparameter is left out, with one
    line through ``notify`` (:func:`left_out_message`)."""
    specs: list[str] = []
    gramian: list[str] = []
    for name in mtopt.available_methods():
        missing = required_hyperparameters(name)
        if missing:
            if notify is not None:
                notify(left_out_message(name, missing))
            continue
        specs.append(name)
        cls = method_class(name)
        if cls.gramian_only and cls.default_level() == "param":
            gramian.append(name + "#gramian")
    return specs + gramian


class MtoptContender(Contender):
    """One mtopt method spec through ``MultiTaskOptimizer``."""

    def __init__(self, model: BenchModel, workload: Workload, spec: str | MethodSpec) -> None:
        parsed = method_spec(spec) if isinstance(spec, str) else spec
        method = mtopt.make(parsed.name, **parsed.hparams)
        result = ContenderResult(
            parsed.text,
            "mtopt",
            method_category(method),
            counterpart=counterpart_label(parsed.name, method.level, parsed.engine),
        )
        super().__init__(result, model)
        self.name = parsed.name
        self.workload = workload
        self.mto = MultiTaskOptimizer(
            self.optimizer,
            method,
            shared=model.encoder,
            tasks=workload.task_names,
            loss_types=workload.loss_types,
            engine=parsed.engine or "auto",
        )
        self.meta = isinstance(method, MetaBatchMethod)
        #: the Gramians of the measured steps, for methods whose solver is compared alone
        self.gramians: list[Tensor] | None = None
        if parsed.name in SOLVER_REFERENCES and not parsed.hparams:
            self.gramians = []

    def observe(self, batch: Batch) -> None:
        """Record the Gramian the coming step's method will see (same parameters, same batch),
        untimed, for the solver comparison."""
        if self.gramians is None or len(self.gramians) >= MAX_SOLVER_SAMPLES:
            return
        _, losses = forward(self.model, self.workload, batch, self.mto.task_input)
        rows = jacobian(losses, self.mto.shared)
        self.gramians.append(gram_matrix(rows).detach().to(torch.float64).cpu())

    def solver_samples(self) -> SolverSamples | None:
        if self.gramians is None:
            return None
        return SolverSamples(self.name, self.gramians)

    def step(self, batch: Batch) -> StepOutcome:
        def closure() -> Losses:
            z, losses = forward(self.model, self.workload, batch, self.mto.task_input)
            return Losses(dict(zip(self.workload.task_names, losses, strict=True)), features=z)

        info = self.mto.step(closure, meta_closure=closure if self.meta else None)
        return StepOutcome(
            times=dict(info.times),
            # M of the (M + 0.1)× target: the updates per batch (a lone group is stepped twice)
            updates=info.updates if info.sequential is not None else None,
            solver_failed=info.solver is not None and not info.solver.converged,
        )
