"""TorchJD 0.18's aggregators as contenders (names: :mod:`mtopt.bench.labels`), three ways:

* ``torchjd:NAME``: ``mtl_backward(losses, features=z, tasks_params=..., shared_params=...)``
  then ``jac_to_grad(shared, aggregator)``: the aggregator on the Jacobian of the losses with
  respect to the shared parameters;
* ``torchjd:NAME:level=rep``: ``torchjd.autojac.jac`` of the losses with respect to the
  features ``z``, the aggregator on that ``K × numel(z)`` matrix, one backward of the result
  through the encoder (and ``sum(losses)`` into the heads): GradDrop's original place, and the
  counterparts of our representation-level methods;
* ``torchjd:NAME#gramian``: the autogram engine,
  ``Engine(encoder, batch_dim=None).compute_gramian(losses)``, the aggregator's Gramian
  weighting, one ``losses.backward(w)``: the counterpart of our ``#gramian`` rows.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from mtopt.bench.contenders.base import Contender, StepOutcome
from mtopt.bench.labels import GRAM_WEIGHTINGS, TorchJDSpec, parse_torchjd, torchjd_arguments
from mtopt.bench.results import ContenderResult
from mtopt.bench.workloads import Batch, BenchModel, Workload, forward

__all__ = ["TorchJDContender", "make_aggregator", "torchjd_available"]


def torchjd_available() -> bool:
    """Whether TorchJD can be imported."""
    try:
        import torchjd  # noqa: F401
    except ImportError:
        return False
    return True


def make_aggregator(name: str | TorchJDSpec, num_tasks: int) -> Any:
    """TorchJD's aggregator (or, for ``#gramian``, its Gramian weighting) for a contender name
    such as ``UPGrad``, ``GradDrop:level=rep`` or ``UPGrad#gramian``."""
    from torchjd import aggregation

    spec = parse_torchjd(name) if isinstance(name, str) else name
    kwargs = torchjd_arguments(spec.aggregator, num_tasks)
    if spec.engine == "gramian":
        if spec.aggregator not in GRAM_WEIGHTINGS:
            raise ValueError(f"TorchJD 0.18 has no Gramian weighting for {spec.aggregator!r}")
        return getattr(aggregation, spec.aggregator + "Weighting")(**kwargs)
    cls = getattr(aggregation, spec.aggregator, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, aggregation.Aggregator):
        raise ValueError(f"TorchJD 0.18 has no aggregator {spec.aggregator!r}")
    return cls(**kwargs)


class TorchJDContender(Contender):
    """One TorchJD aggregator, at the level and through the engine its name says (module
    doc)."""

    def __init__(self, model: BenchModel, workload: Workload, name: str | TorchJDSpec) -> None:
        spec = parse_torchjd(name) if isinstance(name, str) else name
        super().__init__(ContenderResult(spec.label, "torchjd", "torchjd"), model)
        from torchjd import autojac

        self.autojac = autojac
        self.workload = workload
        self.aggregator = make_aggregator(spec, workload.num_tasks)
        self.rep = spec.level == "rep"
        self.gram_engine = None
        if spec.engine == "gramian":
            from torchjd.autogram import Engine

            self.gram_engine = Engine(model.encoder, batch_dim=None)
        self.shared = list(model.encoder.parameters())
        self.tasks_params = [list(head.parameters()) for head in model.heads]
        self.head_params = [p for ps in self.tasks_params for p in ps]

    def step(self, batch: Batch) -> StepOutcome:
        self.optimizer.zero_grad()
        z, losses = forward(self.model, self.workload, batch)
        if self.gram_engine is not None:
            stacked = torch.stack(losses)
            weights = self.aggregator(self.gram_engine.compute_gramian(stacked))
            stacked.backward(weights)
        elif self.rep:
            (matrix,) = self.autojac.jac(losses, z, retain_graph=True)
            direction = self.aggregator(matrix.flatten(1))
            total = cast(torch.Tensor, sum(losses))  # a sum of K ≥ 1 tensors
            torch.autograd.backward(total, inputs=self.head_params, retain_graph=True)
            torch.autograd.backward(z, grad_tensors=direction.view_as(z), inputs=self.shared)
        else:
            self.autojac.mtl_backward(
                losses, features=z, tasks_params=self.tasks_params, shared_params=self.shared
            )
            self.autojac.jac_to_grad(self.shared, self.aggregator)
        self.optimizer.step()
        return StepOutcome()
