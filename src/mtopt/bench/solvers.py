"""Inner solvers alone: ours against the reference implementation, on the same Gramians.

An mtopt contender whose method has an entry in
:data:`~mtopt.bench.labels.SOLVER_REFERENCES` (and runs with its defaults) records, untimed
before each measured step, the Gramian its method is about to see (its ``observe`` hook; the
method itself is not touched). After the rounds the Gramians are replayed, in order, through a
fresh instance of the method (its ``aggregate`` on the Gramian alone: the solve plus its
bookkeeping) and through the reference TorchJD aggregator fed a ``K × K`` square root of the
same Gramian, alternating call by call, so that both keep their warm starts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

import mtopt
from mtopt.bench.labels import SOLVER_REFERENCES, torchjd_arguments
from mtopt.bench.results import SolverResult
from mtopt.core.method import MethodInput

__all__ = ["compare_solver", "square_root"]


def square_root(gram: Tensor) -> Tensor:
    """A ``K × K`` matrix ``J`` with ``J Jᵀ = gram`` (symmetric square root, negative
    eigenvalues of rounding clipped)."""
    values, vectors = torch.linalg.eigh(gram)
    return vectors * values.clamp_min(0.0).sqrt()


def _reference(name: str, first: Tensor) -> Any:
    """A factory of the reference aggregator; calling it once on ``first`` raises here when its
    dependencies (cvxpy/ECOS) are missing."""
    from torchjd import aggregation

    cls = getattr(aggregation, SOLVER_REFERENCES[name].aggregator)
    kwargs = torchjd_arguments(SOLVER_REFERENCES[name].aggregator, first.shape[0])
    cls(**kwargs)(square_root(first).float())
    return lambda: cls(**kwargs)


def compare_solver(name: str, gramians: Sequence[Tensor]) -> SolverResult:
    """Replay ``gramians`` (in order) through a fresh instance of method ``name`` with its
    defaults and through the reference (module doc), alternating, and time each call."""
    result = SolverResult(name, SOLVER_REFERENCES[name].description)
    if not gramians:
        result.error = "no Gramian recorded"
        return result
    try:
        make_reference = _reference(name, gramians[0])
    except Exception as exc:  # the reference is optional
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    ours, reference = mtopt.make(name), make_reference()
    k = gramians[0].shape[0]
    names = tuple(str(i) for i in range(k))
    losses = torch.ones(k, dtype=torch.float64)
    for gram in gramians:
        inputs = MethodInput(losses, names, gramian_matrix=gram)
        matrix = square_root(gram).float()
        t0 = time.perf_counter()
        ours.aggregate(inputs)
        t1 = time.perf_counter()
        reference(matrix)
        t2 = time.perf_counter()
        result.ours.append(t1 - t0)
        result.theirs.append(t2 - t1)
    return result
