"""The stress suite's inputs and runners, shared by ``tests/test_stress.py`` and
``scripts/stress_table.py`` (which prints the per-method table of the solver issue).

Two levels:

* **Method level**: generated Jacobians (``K ∈ {2, 3, 5, 11, 32, 64}``; row norms spread over
  1e-8..1e8, near-collinear rows, duplicates, exactly opposite pairs, zero rows, rank-deficient
  sets) handed to every gradient and representation method's ``aggregate``.
* **Engine level**: a small model in float16, bfloat16, float32 or float64, K tasks whose losses
  are scaled over 1e-3..1e3, one step of :class:`mtopt.MultiTaskOptimizer`; what the optimizer
  receives in ``.grad`` of the shared parameters (the applied update) is compared with what the
  method reported (``Gᵀw`` from its weights and the engine's own per-task gradients, or its
  explicit direction pushed through the encoder).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import mtopt
from mtopt.core.method import Aggregation, MethodInput

KS = (2, 3, 5, 11, 32, 64)
KINDS = ("generic", "spread", "collinear", "duplicate", "opposite", "zero_row", "rank_deficient")

#: (label, method name, hyperparameters): every gradient and representation method, with the
#: level variants and Sener's first-order min-norm solvers (which may end short: "stalled").
PARAM_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("mgda", "mgda", {}),
    ("mgda:none", "mgda", {"normalization": "none"}),
    ("mgda:pgd", "mgda", {"solver": "pgd"}),
    ("mgda:fw", "mgda", {"solver": "fw"}),
    ("edm", "edm", {}),
    ("cdtt", "cdtt", {}),
    ("cagrad", "cagrad", {}),
    ("cagrad:c=2", "cagrad", {"c": 2.0}),
    ("nash_mtl", "nash_mtl", {}),
    ("imtl_g", "imtl_g", {}),
    ("imtl:param", "imtl", {"level": "param"}),
    ("aligned_mtl", "aligned_mtl", {}),
    ("upgrad", "upgrad", {}),
    ("pcgrad", "pcgrad", {"seed": 0}),
    ("db_mtl", "db_mtl", {}),
)
REP_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("mgda_ub", "mgda_ub", {}),
    ("imtl", "imtl", {}),
    ("aligned_mtl:rep", "aligned_mtl", {"level": "rep"}),
    ("graddrop", "graddrop", {"seed": 0}),
    ("rotograd", "rotograd", {}),
)
#: statuses a solver may report instead of a certificate (each with a message)
NAMED_FAILURES = ("stalled", "max_iter", "inaccurate")


def stress_jacobian(kind: str, k: int, d: int, seed: int) -> np.ndarray:
    """A float64 ``K × D`` Jacobian of one adversarial kind (row scales e^N(0, 1) unless the
    kind sets them)."""
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(k, d)) * np.exp(rng.normal(size=(k, 1)))
    if kind == "spread":  # row norms log-uniform over 1e-8..1e8
        G = G / np.linalg.norm(G, axis=1, keepdims=True) * 10.0 ** rng.uniform(-8, 8, (k, 1))
    elif kind == "collinear":  # every row within 1e-6 of one direction, norms spread 1e-3..1e3
        base = rng.normal(size=d)
        G = (base + 1e-6 * rng.normal(size=(k, d))) * 10.0 ** rng.uniform(-3, 3, (k, 1))
    elif kind == "duplicate":
        G[1] = G[0]
        if k > 3:
            G[3] = G[2]
    elif kind == "opposite":
        G[1] = -G[0]
    elif kind == "zero_row":
        G[0] = 0.0
        if k > 4:
            G[k // 2] = 0.0
    elif kind == "rank_deficient":
        r = max(1, min(3, k - 1, d - 1))
        G = rng.normal(size=(k, r)) @ rng.normal(size=(r, d)) * np.exp(rng.normal(size=(k, 1)))
    return G


def stress_cases(ks: tuple[int, ...] = KS, d: int = 40) -> Iterator[tuple[str, np.ndarray]]:
    for k in ks:
        for i, kind in enumerate(KINDS):
            yield f"K={k} {kind}", stress_jacobian(kind, k, d, seed=1000 * k + i)


@dataclass
class Outcome:
    """One method on one input: finite, the solver's report, and |applied − reported|."""

    finite: bool
    converged: bool | None = None
    status: str | None = None
    message: str = ""
    residual: float | None = None
    deviation: float | None = None
    error: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def method_outcome(name: str, hparams: dict[str, Any], G: np.ndarray, rep: bool) -> Outcome:
    """``aggregate`` on ``G`` (float64): the outputs must be finite; the solver's report."""
    k = G.shape[0]
    grads = torch.from_numpy(G)
    losses = torch.ones(k, dtype=torch.float64)
    names = tuple(f"t{i}" for i in range(k))
    method = mtopt.make(name, **hparams)
    features = None
    if rep:  # the representation of 8 samples × D/8 channels the rows are gradients of
        features = torch.from_numpy(np.random.default_rng(k).normal(size=(8, G.shape[1] // 8)))
        grads = grads[:, : features.numel()]
    inputs = MethodInput(losses, names, grads=grads, features=features)
    try:
        agg = method.aggregate(inputs)
    except (ValueError, FloatingPointError, RuntimeError) as exc:
        return Outcome(False, error=f"{type(exc).__name__}: {exc}")
    return _describe(agg, grads)


def _describe(agg: Aggregation, grads: torch.Tensor) -> Outcome:
    values = []
    if agg.weights is not None:
        values.append(agg.weights)
        values.append(agg.weights.double() @ grads.double())
    if agg.direction is not None:
        values.append(agg.direction)
    finite = all(bool(torch.isfinite(v).all()) for v in values)
    out = Outcome(finite)
    if agg.solver is not None:
        out.converged = agg.solver.converged
        out.status = agg.solver.status
        out.message = agg.solver.message
        out.residual = agg.solver.residual
    return out


# -- engine level ----------------------------------------------------------------------------
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class _Model(nn.Module):
    def __init__(self, k: int, dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(k)])
        self.to(dtype)


class _Recorder(torch.optim.SGD):
    """SGD that keeps a copy of the shared parameters' ``.grad`` at each step."""

    def __init__(self, params, shared) -> None:
        super().__init__(params, lr=1e-3)
        self.shared = list(shared)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):  # type: ignore[override]
        self.seen.append([p.grad.detach().clone() for p in self.shared])
        return super().step(closure)


def engine_outcome(
    name: str, hparams: dict[str, Any], dtype: str, k: int = 5, seed: int = 0, engine: str = "auto"
) -> Outcome:
    """One step of a K-task model in ``dtype`` with loss scales 1e-3..1e3: the applied shared
    gradient against the reported update, relative to ``Σ_k |w_k| ‖g_k‖`` (the size of the
    summands; for an explicit direction, its norm pushed through the encoder)."""
    torch_dtype = DTYPES[dtype]
    model = _Model(k, torch_dtype, seed)
    shared = list(model.encoder.parameters())
    opt = _Recorder(model.parameters(), shared)
    mto = mtopt.MultiTaskOptimizer(opt, name, shared=model.encoder, engine=engine, **hparams)
    rep = mto.method.level == "rep"
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, generator=gen).to(torch_dtype)
    y = torch.randn(32, k, generator=gen).to(torch_dtype)
    scales = torch.logspace(-3, 3, k).tolist()
    captured: dict[str, Any] = {}
    original = mto.method.aggregate

    def recording(inputs: MethodInput) -> Aggregation:
        agg = original(inputs)
        captured["agg"], captured["inputs"] = agg, inputs
        return agg

    mto.method.aggregate = recording  # type: ignore[method-assign]

    def closure():
        z = model.encoder(x)
        losses = {
            f"t{i}": scales[i] * ((head(mto.task_input(z, i)).squeeze(1) - y[:, i]) ** 2).mean()
            for i, head in enumerate(model.heads)
        }
        return mtopt.Losses(losses, features=z)

    before = _float64_copy(model)  # the references are computed at the step's parameters
    try:
        info = mto.step(closure)
    except (ValueError, FloatingPointError, RuntimeError) as exc:
        return Outcome(False, error=f"{type(exc).__name__}: {exc}")
    agg: Aggregation = captured["agg"]
    inputs: MethodInput = captured["inputs"]
    applied = torch.cat([g.reshape(-1).double() for g in opt.seen[-1]])
    if not rep:
        if inputs.grads is None:  # Gramian engine: Jᵀw from the float64 copy of the model
            reported, scale = _float64_direction(before, x, y, scales, agg.weights)
        elif agg.direction is None:
            G = inputs.grads.double()
            reported = agg.weights.double() @ G
            scale = float((agg.weights.double().abs() * G.norm(dim=1)).sum())
        else:
            reported = agg.direction.double()
            scale = float(reported.norm())
    else:
        R = inputs.grads.double()
        rep_dir = agg.weights.double() @ R if agg.direction is None else agg.direction.double()
        reported = _through_encoder(before, x, rep_dir)
        if agg.direction is None:
            parts = agg.weights.double().abs()[:, None] * R
            scale = float(sum(_through_encoder(before, x, p).norm() for p in parts))
        else:
            scale = float(reported.norm())
    out = _describe(agg, inputs.grads if inputs.grads is not None else torch.zeros(k, 1))
    out.finite = out.finite and bool(torch.isfinite(applied).all())
    gap = float((applied - reported).norm())
    out.deviation = gap / scale if scale > 0 else gap
    out.extras = {"weights": None if info.weights is None else info.weights.tolist()}
    return out


def _through_encoder(model: _Model, x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``J_θ(z)ᵀ direction`` for the encoder's parameters of a float64 model."""
    encoder = model.encoder
    z = encoder(x.double())
    grads = torch.autograd.grad(z, list(encoder.parameters()), direction.view_as(z))
    return torch.cat([g.reshape(-1) for g in grads])


def _float64_direction(copy, x, y, scales, weights) -> tuple[torch.Tensor, float]:
    z = copy.encoder(x.double())
    rows = []
    for i, head in enumerate(copy.heads):
        loss = scales[i] * ((head(z).squeeze(1) - y[:, i].double()) ** 2).mean()
        g = torch.autograd.grad(loss, list(copy.encoder.parameters()), retain_graph=True)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(rows)
    w = weights.double()
    return w @ G, float((w.abs() * G.norm(dim=1)).sum())


def _float64_copy(model: _Model) -> _Model:
    import copy

    clone = copy.deepcopy(model)
    return clone.to(torch.float64)


def rounding_tolerance(dtype: str) -> float:
    """The relative deviation allowed between applied and reported updates: the update is
    summed in float32 at least (``work``) and rounded once to the model's dtype; the reference
    recomputed in float64 differs by the rounding of the per-task gradients themselves."""
    model = DTYPES[dtype]
    work = torch.promote_types(model, torch.float32)
    return 2 * torch.finfo(model).eps + 16 * torch.finfo(work).eps


def finite_float(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
