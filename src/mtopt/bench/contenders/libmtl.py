"""LibMTL 1.1.5's weighting strategies as contenders (``libmtl:<Name>``), measured when LibMTL is
installed (``pip install --no-deps LibMTL==1.1.5``: its declared dependencies would pull another
torch).

Each strategy runs as LibMTL's ``Trainer`` uses it: the model's backward through the strategy
(per-task ``loss.backward`` passes, then the shared gradient reset), then the optimizer step.
Which of our methods it is paired with, and with which arguments, is the table
:data:`~mtopt.bench.labels.LIBMTL_COUNTERPARTS`.

**The torchvision stub.** ``import LibMTL`` runs its package ``__init__``, which imports model
code that needs ``torchvision.models.utils.load_state_dict_from_url`` (a module gone from recent
torchvision releases, and torchvision is not one of our dependencies). When torchvision is not
installed, :func:`import_libmtl_weighting` writes three empty modules into ``sys.modules``
(``torchvision``, ``torchvision.models``, ``torchvision.models.utils``) whose only function
raises if called; the weighting code never calls it. An installed torchvision is left alone.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import torch

from mtopt.bench.contenders.base import Contender, StepOutcome
from mtopt.bench.labels import LIBMTL_COUNTERPARTS, LIBMTL_PREFIX
from mtopt.bench.results import ContenderResult
from mtopt.bench.workloads import Batch, BenchModel, Workload, forward

__all__ = ["LibMTLContender", "import_libmtl_weighting", "libmtl_available"]


def _stub_torchvision() -> None:
    """Register the stub modules (module doc) unless torchvision is importable."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    stub = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    utils = types.ModuleType("torchvision.models.utils")

    def load_state_dict_from_url(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("stub: torchvision is not installed")

    utils.load_state_dict_from_url = load_state_dict_from_url  # type: ignore[attr-defined]
    stub.models, models.utils = models, utils  # type: ignore[attr-defined]
    sys.modules.update(
        {"torchvision": stub, "torchvision.models": models, "torchvision.models.utils": utils}
    )


def import_libmtl_weighting() -> Any:
    """``LibMTL.weighting`` (PyPI 1.1.5), with torchvision stubbed when it is missing (module
    doc). Raises ``ImportError`` when LibMTL is not installed."""
    if importlib.util.find_spec("LibMTL") is None:
        raise ImportError("LibMTL is not installed (pip install --no-deps LibMTL==1.1.5)")
    _stub_torchvision()
    import LibMTL.weighting as weighting

    return weighting


def libmtl_available() -> bool:
    """Whether LibMTL's weightings can be imported."""
    try:
        import_libmtl_weighting()
    except ImportError:
        return False
    return True


def _bind(base: type, model: BenchModel, workload: Workload) -> Any:
    """The strategy, a mixin in LibMTL, bound to the bench model's encoder
    (``get_share_params``) and task count."""
    encoder = model.encoder
    device = next(model.parameters()).device

    class Bound(base):
        def __init__(self) -> None:
            super().__init__()
            self.task_num = workload.num_tasks
            self.task_name = list(workload.task_names)
            self.device = device
            self.rep_grad = False
            self.epoch = 0

        def get_share_params(self) -> Any:
            return encoder.parameters()

        def zero_grad_share_params(self) -> None:
            encoder.zero_grad(set_to_none=False)

    return Bound()


class LibMTLContender(Contender):
    """The LibMTL counterpart of our method ``name`` (a key of ``LIBMTL_COUNTERPARTS``)."""

    def __init__(self, model: BenchModel, workload: Workload, name: str) -> None:
        weighting, kwargs = LIBMTL_COUNTERPARTS[name]
        super().__init__(ContenderResult(LIBMTL_PREFIX + weighting, "libmtl", "libmtl"), model)
        self.strategy = _bind(getattr(import_libmtl_weighting(), weighting), model, workload)
        self.strategy.init_param()
        own = [p for p in self.strategy.parameters() if p.requires_grad]
        if own:  # UW / IMTL loss scales: trained with the model, as in LibMTL's Trainer
            self.optimizer.add_param_group({"params": own})
        self.kwargs = kwargs
        self.workload = workload

    def step(self, batch: Batch) -> StepOutcome:
        self.optimizer.zero_grad(set_to_none=False)
        _, losses = forward(self.model, self.workload, batch)
        self.strategy.backward(torch.stack(losses), **self.kwargs)
        self.optimizer.step()
        return StepOutcome()
