"""The contenders of ``mtopt bench``, one module per kind, each with its own deep copy of the same
initial model and its own ``Adam(lr=1e-3)``:

* :mod:`~mtopt.bench.contenders.plain`: ``plain``, ``sum(losses).backward()``;
* :mod:`~mtopt.bench.contenders.methods`: every mtopt method (or each ``--methods`` spec)
  through ``MultiTaskOptimizer``;
* :mod:`~mtopt.bench.contenders.torchjd`: TorchJD 0.18's aggregators (Jacobian path,
  representation level, autogram);
* :mod:`~mtopt.bench.contenders.libmtl`: LibMTL 1.1.5's weightings, when it is installed (with
  the torchvision stub it needs).

:func:`build_contenders` sets up one workload's contenders in a fixed order (plain, mtopt,
TorchJD, LibMTL); a contender that cannot be set up becomes a result carrying its error.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

import mtopt
from mtopt.bench.contenders.base import LR, Contender, SolverSamples, StepOutcome
from mtopt.bench.contenders.libmtl import (
    LibMTLContender,
    import_libmtl_weighting,
    libmtl_available,
)
from mtopt.bench.contenders.methods import (
    MAX_SOLVER_SAMPLES,
    MtoptContender,
    default_specs,
    left_out_message,
    method_category,
    required_hyperparameters,
)
from mtopt.bench.contenders.plain import PlainContender
from mtopt.bench.contenders.torchjd import TorchJDContender, make_aggregator, torchjd_available
from mtopt.bench.labels import (
    DEFAULT_TORCHJD,
    LIBMTL_COUNTERPARTS,
    LIBMTL_PREFIX,
    PLAIN,
    TORCHJD_PREFIX,
    counterpart_label,
    method_spec,
    parse_torchjd,
)
from mtopt.bench.results import ContenderResult
from mtopt.bench.workloads import BenchModel, Workload
from mtopt.specs import MethodSpec

if TYPE_CHECKING:
    from mtopt.bench.options import BenchOptions

__all__ = [
    "LR",
    "MAX_SOLVER_SAMPLES",
    "Contender",
    "LibMTLContender",
    "MtoptContender",
    "PlainContender",
    "SolverSamples",
    "StepOutcome",
    "TorchJDContender",
    "build_contenders",
    "default_specs",
    "import_libmtl_weighting",
    "left_out_message",
    "libmtl_available",
    "make_aggregator",
    "method_category",
    "one_contender",
    "required_hyperparameters",
    "select_torchjd",
    "torchjd_available",
]

#: what a contender's set-up may raise (the contender is then reported as failed)
_SETUP_ERRORS = (ValueError, TypeError, ImportError, RuntimeError)


def _parsed(specs: Sequence[str]) -> list[MethodSpec]:
    """The specs that parse (a spec that does not is reported by its own row)."""
    out = []
    for spec in specs:
        try:
            out.append(method_spec(spec))
        except ValueError:
            continue
    return out


def _canonical(name: str) -> str:
    """A TorchJD contender's canonical name (as given when it does not parse: its set-up then
    fails with the reason)."""
    try:
        return parse_torchjd(name).name
    except ValueError:
        return name.strip()


def select_torchjd(options: BenchOptions, specs: Sequence[str]) -> list[str]:
    """The TorchJD contenders of a run (names without the ``torchjd:`` prefix): those asked
    for, else every default one without ``--methods``, else the counterparts of ``specs``."""
    if not options.torchjd:
        return []
    if options.torchjd_aggregators is not None:
        return [_canonical(name) for name in options.torchjd_aggregators]
    if options.methods is None:
        return list(DEFAULT_TORCHJD)
    names: list[str] = []
    for spec in _parsed(specs):
        try:
            method = mtopt.make(spec.name, **spec.hparams)
        except (ValueError, TypeError):  # its own row says why
            continue
        label = counterpart_label(spec.name, method.level, spec.engine)
        if label is not None and label.removeprefix(TORCHJD_PREFIX) not in names:
            names.append(label.removeprefix(TORCHJD_PREFIX))
    return names


def one_contender(
    label: str, workload: Workload, device: torch.device, seed: int = 0
) -> tuple[Contender, dict[str, Tensor]]:
    """One contender by its report label (``plain``, an mtopt spec, ``torchjd:NAME``) on a
    model built from ``seed`` on ``device``, and a batch there: what the diagnostic scripts
    (``scripts/gpu_syncs.py``, ``scripts/step_profile.py``) step."""
    torch.manual_seed(seed)
    model = workload.build().to(device)
    gen = torch.Generator().manual_seed(seed)
    batch = {k: v.to(device) for k, v in workload.make_batch(gen).items()}
    if label == PLAIN:
        return PlainContender(model, workload), batch
    if label.startswith(TORCHJD_PREFIX):
        return TorchJDContender(model, workload, label.removeprefix(TORCHJD_PREFIX)), batch
    return MtoptContender(model, workload, label), batch


def build_contenders(
    workload: Workload, options: BenchOptions, device: torch.device, specs: Sequence[str]
) -> tuple[list[Contender], list[ContenderResult]]:
    """The contenders of one workload (module doc), each on a deep copy of one model built from
    ``options.seed``, and the results of those whose set-up failed."""
    torch.manual_seed(options.seed)
    base = workload.build().to(device)
    ready: list[Contender] = []
    failed: list[ContenderResult] = []

    def add(factory: Callable[[BenchModel], Contender], label: str, kind: str) -> None:
        try:
            ready.append(factory(copy.deepcopy(base)))
        except _SETUP_ERRORS as exc:
            failed.append(ContenderResult(label, kind, kind, error=f"set-up: {exc}"))

    if options.plain:
        add(lambda m: PlainContender(m, workload), PLAIN, "plain")
    for spec in specs:
        add(functools.partial(MtoptContender, workload=workload, spec=spec), spec.strip(), "mtopt")
    for name in select_torchjd(options, specs):
        add(
            functools.partial(TorchJDContender, workload=workload, name=name),
            TORCHJD_PREFIX + name,
            "torchjd",
        )
    if options.libmtl and libmtl_available():
        names = {spec.name for spec in _parsed(specs) if spec.engine is None}
        for name, (weighting, _) in LIBMTL_COUNTERPARTS.items():
            if name in names:
                label = LIBMTL_PREFIX + weighting
                add(
                    functools.partial(LibMTLContender, workload=workload, name=name),
                    label,
                    "libmtl",
                )
    return ready, failed
