r"""A property battery for multi-task methods, in the spirit of TorchJD's
``tests/unit/aggregation/_asserts.py``: reusable assertions, the matrices they run on, and the
adapter that turns a method *spec* into the callables the assertions take.

Only the public API is used (``mtopt.make``, ``mtopt.available_methods`` or ``mtopt.methods``,
``MethodInput``, ``Aggregation.weights`` / ``.direction`` / ``.solver.converged``,
``Method.level`` or ``Method.needs``, ``Method.hparams``), so that the assertions survive a
restructuring of the library's internals.

**Notation.** A problem is a Jacobian :math:`G\in\mathbb R^{K\times D}` (row :math:`g_i` the
gradient of task :math:`i`) and the losses :math:`\ell\in\mathbb R^K_{>0}`. A method answers with
the shared update :math:`d\in\mathbb R^D` it applies: its ``direction`` when it returns one, else
:math:`G^\top w` for its ``weights`` :math:`w` (the contract of ``Aggregation``). The assertions
take ``aggregate(G, losses, names) -> d`` (and, for the properties of the weights themselves,
``weigh(G, losses, names) -> w``; ``losses`` and ``names`` are optional); loss-only methods,
which weight the losses and never see a gradient, take ``weigh_losses(losses, names) -> w``.
:class:`Subject` builds these callables from a method spec.

**Tolerances** are relative and derived from the problem, never absolute on unscaled quantities.
Two sizes recur:

* the *natural size* of an update, :math:`\sigma=\max(\max_i\|g_i\|,\|d\|)`: a ``d`` that is a
  combination of the rows with weights of order one carries rounding errors of order
  :math:`\epsilon\,\max_i\|g_i\|` even when it should vanish (a Pareto-stationary point), and a
  degree-0 method's ``d`` (Nash-MTL) has its own size :math:`\|d\|`;
* the size of a first-order gain :math:`g_i^\top d`: :math:`\max(\max_j\|g_j\|^2,\|g_i\|\|d\|)`
  (the first term is the scale of every entry of :math:`GG^\top`, the second the Cauchy-Schwarz
  bound).

Scaling factors are powers of two, so that scaling a matrix is exact in floating point and any
discrepancy comes from the method, not from the test.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from torch import Tensor

import mtopt

# --------------------------------------------------------------------------------- property names
STRUCTURE = "structure"
NON_CONFLICTING = "non_conflicting"
PERMUTATION = "permutation_equivariant"
SCALE_1 = "scale_degree_1"
SCALE_0 = "scale_degree_0"
BALANCED = "balanced_on_orthogonal_equal_norm"
NO_CONFLICT_MEAN = "no_conflict_gives_mean"
NO_CONFLICT_SUM = "no_conflict_gives_sum"
PER_TASK_SCALE = "per_task_scale_invariant_direction"
PER_TASK_SCALE_LINE = "per_task_scale_invariant_line"
WEIGHTS_SUM_1 = "weights_sum_to_1"
WEIGHTS_SUM_K = "weights_sum_to_K"
LOSS_SCALE = "loss_scale_invariant_direction"

#: Every property the battery knows, with the one-line claim it checks.
PROPERTY_CLAIMS: dict[str, str] = {
    STRUCTURE: "a finite update of the right shape on generic and degenerate inputs",
    NON_CONFLICTING: "G d ≥ 0: no task's first-order gain is negative",
    PERMUTATION: "d(PG) = d(G) and w(PG) = P w(G) for a permutation P of the tasks",
    SCALE_1: "d(cG) = c d(G) for c > 0 (homogeneous like the mean)",
    SCALE_0: "d(cG) = d(G) for c > 0 (invariant)",
    BALANCED: "equal positive weights when the rows are orthogonal with a common norm",
    NO_CONFLICT_MEAN: "d = (1/K) Σ g_i when no two gradients conflict",
    NO_CONFLICT_SUM: "d = Σ g_i when no two gradients conflict",
    PER_TASK_SCALE: "d(diag(a) G) is a positive multiple of d(G) for any a > 0",
    PER_TASK_SCALE_LINE: "d(diag(a) G) is a non-zero multiple of d(G) for any a > 0 (same line, "
    "the orientation may flip)",
    WEIGHTS_SUM_1: "Σ w_i = 1",
    WEIGHTS_SUM_K: "Σ w_i = K",
    LOSS_SCALE: "w(a ⊙ ℓ) ⊙ a is a positive multiple of w(ℓ) (the update's direction does not "
    "depend on the losses' scales)",
}

#: Properties that only make sense for methods that see gradients / that weight losses only.
GRADIENT_ONLY = frozenset(
    {NON_CONFLICTING, SCALE_1, SCALE_0, BALANCED, NO_CONFLICT_MEAN, NO_CONFLICT_SUM}
    | {PER_TASK_SCALE, PER_TASK_SCALE_LINE}
)
LOSS_ONLY = frozenset({LOSS_SCALE})


@dataclass(frozen=True)
class Skip:
    """A registered method the battery cannot call on its own, and why."""

    reason: str


# ---------------------------------------------------------------------------- the registry's names
def _names() -> list[str]:
    """The registered method names, whatever the registry's function is called today
    (``mtopt.available_methods()`` after the renaming, ``mtopt.methods()`` before)."""
    lister = getattr(mtopt, "available_methods", None) or mtopt.methods
    return sorted(lister())


def _method_input_class() -> type:
    cls = getattr(mtopt, "MethodInput", None)
    if cls is None:  # pragma: no cover - the documented location
        from mtopt.core.method import MethodInput

        return MethodInput
    return cls


# ----------------------------------------------------------------------------------- method specs
def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value:key=value"`` → ``(name, hparams)`` (the grammar of the
    CLI's method specs; ``,`` separates pairs too).

    A value is a Python literal (``1.5``, ``None``, ``'none'``), ``true``/``false``, a list
    ``a/b/c`` of such values, or else the word itself (``normalization=none``)."""
    name, _, rest = spec.partition(":")
    hparams: dict[str, Any] = {}
    for item in rest.replace(":", ",").split(","):
        if not item:
            continue
        key, _, raw = item.partition("=")
        values = [_parse_value(v) for v in raw.split("/")]
        hparams[key.strip()] = values if "/" in raw else values[0]
    return name, hparams


def _parse_value(raw: str) -> Any:
    if raw in ("true", "false"):
        return raw == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def task_names(k: int) -> tuple[str, ...]:
    """The task names the battery hands a method: ``task0 … task{K-1}``."""
    return tuple(f"task{i}" for i in range(k))


@dataclass
class Update:
    """What a method applies for one call: ``direction`` (``d``), ``weights`` (``None`` for a
    direction-only method), and whether its solver certified its answer (``None``: no solver)."""

    direction: Tensor
    weights: Tensor | None
    converged: bool | None


def features_for(d: int) -> Tensor:
    """The representation ``z`` handed to representation-level methods for a ``D``-column
    Jacobian: a fixed float64 ``(B, F)`` tensor with ``B·F = D`` (``B = 2`` when ``D`` is even),
    the same for every call with the same ``D`` (so that a property compares like with like)."""
    batch = 2 if d % 2 == 0 else 1
    generator = torch.Generator().manual_seed(1000 + d)
    return torch.randn(batch, d // batch, generator=generator, dtype=torch.float64)


@dataclass
class Subject:
    """A method under test, built afresh from its spec for every call: the battery checks
    one step of a fresh instance, so that state carried across steps (warm starts, moving
    averages, learned scales, random generators) never makes two calls differ."""

    spec: str
    name: str = field(init=False)
    hparams: dict[str, Any] = field(init=False)
    kind: str = field(init=False)  # "param", "rep" or "loss"

    def __post_init__(self) -> None:
        self.name, self.hparams = parse_spec(self.spec)
        method = self.fresh()
        level = getattr(method, "level", None)  # "loss", "param" or "rep" where methods say so
        if level not in ("loss", "param", "rep"):
            needs = method.needs
            level = (
                "rep"
                if needs & mtopt.Need.REP_GRADS
                else "param"
                if needs & mtopt.Need.PARAM_GRADS
                else "loss"
            )
        self.kind = level

    @property
    def takes_gradients(self) -> bool:
        return self.kind != "loss"

    @property
    def fixed_k(self) -> int | None:
        """The number of tasks a spec is bound to (``fixed:weights=0.5/0.3/0.2``), else ``None``."""
        weights = self.hparams.get("weights")
        return None if weights is None else len(weights)

    def fresh(self):
        return mtopt.make(self.name, **self.hparams)

    def hparam(self, key: str) -> Any:
        """The value of a hyperparameter of this spec (its default when the spec omits it)."""
        return self.fresh().hparams[key]

    def run(self, G: Tensor | None, losses: Tensor, names: Sequence[str] | None = None) -> Update:
        """One ``aggregate`` call of a fresh instance on ``G`` (``None`` for loss-only methods)
        with ``losses`` and the task ``names`` (default :func:`task_names`)."""
        names = task_names(int(losses.shape[0])) if names is None else tuple(names)
        kwargs: dict[str, Any] = {}
        if G is not None and self.takes_gradients:
            kwargs["grads"] = G
            if self.kind == "rep":
                kwargs["features"] = features_for(G.shape[1])
        out = self.fresh().aggregate(_method_input_class()(losses, names, **kwargs))
        weights = out.weights
        if out.direction is not None:
            direction = out.direction
        elif G is not None and weights is not None:
            direction = weights.to(G.dtype) @ G
        else:
            direction = torch.zeros(0, dtype=losses.dtype)
        converged = None if out.solver is None else bool(out.solver.converged)
        return Update(direction, weights, converged)

    def aggregate(
        self, G: Tensor, losses: Tensor | None = None, names: Sequence[str] | None = None
    ) -> Tensor:
        """``d`` for ``G`` (losses: ones unless given)."""
        return self.run(G, _losses_or_ones(G, losses), names).direction

    def weigh(
        self, G: Tensor, losses: Tensor | None = None, names: Sequence[str] | None = None
    ) -> Tensor | None:
        """``w`` for ``G`` (``None`` for a direction-only method)."""
        return self.run(G, _losses_or_ones(G, losses), names).weights

    def weigh_losses(self, losses: Tensor, names: Sequence[str] | None = None) -> Tensor:
        """A loss-only method's weights on ``losses``."""
        out = self.run(None, losses, names)
        assert out.weights is not None, f"{self.spec}: a loss-only method returned no weights"
        return out.weights


def _losses_or_ones(G: Tensor, losses: Tensor | None) -> Tensor:
    return torch.ones(G.shape[0], dtype=G.dtype) if losses is None else losses


#: ``aggregate(G, losses=None, names=None) -> d``; ``weigh(G, losses=None, names=None) -> w``;
#: ``weigh_losses(losses, names=None) -> w``.
Aggregate = Callable[..., Tensor]
Weigh = Callable[..., Tensor | None]
WeighLosses = Callable[..., Tensor]


# ------------------------------------------------------------------------------------ the matrices
#: Kinds of Jacobian: generic rows, and the adversarial cases every method must survive.
KINDS = ("generic", "duplicate", "collinear", "opposite", "zero_row", "rank_deficient")


@dataclass
class Problem:
    """A Jacobian ``G`` (float64, ``K × D``), positive losses, and how it was made."""

    G: Tensor
    losses: Tensor
    kind: str
    seed: int

    @property
    def k(self) -> int:
        return int(self.G.shape[0])

    def __repr__(self) -> str:  # hypothesis prints this on a failure; the seed replays it
        matrix = f", G={self.G.tolist()}" if self.G.numel() <= 40 else ""
        return (
            f"make_problem({self.kind!r}, k={self.k}, d={self.G.shape[1]}, seed={self.seed})"
            f"{matrix}"
        )


def make_problem(kind: str, k: int, d: int, seed: int) -> Problem:
    """A ``K × D`` Jacobian of the given kind from ``seed``: standard normal rows, each scaled by
    :math:`e^{N(0,1)}`, then ``duplicate`` (row j := row i), ``collinear`` (row j := 2^m row i,
    m ∈ {±1, ±2, ±3}: the same direction, another norm), ``opposite`` (row j := −row i),
    ``zero_row`` (row j := 0) or ``rank_deficient`` (rank r < min(K, D)); losses
    :math:`e^{N(0,1/4)}`."""
    rng = np.random.default_rng(seed)
    if kind == "rank_deficient" and min(k, d) >= 2:
        r = int(rng.integers(1, min(k, d)))
        g = rng.normal(size=(k, r)) @ rng.normal(size=(r, d)) / math.sqrt(r)
    else:
        g = rng.normal(size=(k, d))
    g = g * np.exp(rng.normal(size=(k, 1)))
    i, j = rng.choice(k, size=2, replace=False)
    if kind == "duplicate":
        g[j] = g[i]
    elif kind == "collinear":
        g[j] = g[i] * 2.0 ** int(rng.choice([-3, -2, -1, 1, 2, 3]))
    elif kind == "opposite":
        g[j] = -g[i]
    elif kind == "zero_row":
        g[j] = 0.0
    losses = np.exp(rng.normal(0.0, 0.5, size=k))
    return Problem(torch.from_numpy(g), torch.from_numpy(losses), kind, seed)


@st.composite
def problems(
    draw,
    kinds: Sequence[str] = KINDS,
    min_k: int = 2,
    max_k: int = 8,
    fixed_k: int | None = None,
) -> Problem:
    """Hypothesis strategy: K in [min_k, max_k] (or ``fixed_k``), D in [K, 3K], a kind, a seed.

    The matrix is built from the drawn seed (so a failure replays from its printed seed)."""
    k = fixed_k if fixed_k is not None else draw(st.integers(min_k, max_k))
    d = draw(st.integers(k, 3 * k))
    kind = draw(st.sampled_from(list(kinds)))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_problem(kind, k, d, seed)


def gallery(fixed_k: int | None = None) -> list[Problem]:
    """A fixed set of problems for the structural check: every kind for K ∈ {2, 3, 5, 12}
    (``fixed_k`` only, if given), with D = K, 2K and D < K (more tasks than dimensions)."""
    out = []
    ks = (fixed_k,) if fixed_k is not None else (2, 3, 5, 12)
    for k in ks:
        for d in sorted({k, 2 * k, max(1, k // 2)}):
            for n, kind in enumerate(KINDS):
                out.append(make_problem(kind, k, d, seed=97 * k + 13 * d + n))
    return out


def orthonormal_rows(k: int, d: int, seed: int) -> Tensor:
    """``K`` orthonormal rows in ``R^D`` (``K ≤ D``), from a QR of a Gaussian matrix."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, k)))
    return torch.from_numpy(np.ascontiguousarray(q.T))


def non_conflicting_rows(k: int, d: int, seed: int) -> Tensor:
    """Rows with pairwise non-negative inner products (``G Gᵀ ≥ 0`` entrywise): positive
    vectors plus a shared component, each row scaled by :math:`e^{N(0,1)}`."""
    rng = np.random.default_rng(seed)
    g = np.abs(rng.normal(size=(k, d))) + 0.1
    g = g * np.exp(rng.normal(size=(k, 1)))
    return torch.from_numpy(g)


def positive_losses(k: int, seed: int, spread: float = 3.0) -> Tensor:
    """``K`` positive losses spread over ``e^{±spread}`` (plus a few repeated values)."""
    rng = np.random.default_rng(seed)
    values = np.exp(rng.uniform(-spread, spread, size=k))
    if k >= 3:
        values[rng.integers(k)] = values[0]
    return torch.from_numpy(values)


# -------------------------------------------------------------------------------- size helpers
def _row_norms(G: Tensor) -> Tensor:
    return torch.linalg.vector_norm(G.to(torch.float64), dim=1)


def natural_size(G: Tensor, *ds: Tensor) -> float:
    r""":math:`\sigma=\max(\max_i\|g_i\|,\|d\|,\dots)` (module doc)."""
    sizes = [float(_row_norms(G).max())] + [float(torch.linalg.vector_norm(d)) for d in ds]
    return max(sizes)


def _vec(x: Tensor) -> np.ndarray:
    return x.detach().cpu().to(torch.float64).numpy()


# ------------------------------------------------------------------------------------- assertions
def assert_expected_structure(aggregate: Aggregate, problems: Sequence[Problem]) -> None:
    r"""For every problem: ``d`` is a vector of shape ``(D,)`` with finite entries.

    Covers generic Jacobians and the degenerate ones (duplicate rows, an opposite pair, a zero
    row, a rank-deficient matrix, more tasks than dimensions, up to K = 12): a method must give
    a defined update there, not NaN, inf or an exception."""
    for p in problems:
        d = aggregate(p.G, p.losses)
        assert tuple(d.shape) == (p.G.shape[1],), f"d has shape {tuple(d.shape)} for {p!r}"
        assert bool(torch.isfinite(d).all()), f"non-finite d = {d.tolist()} for {p!r}"


def assert_certified(run: Callable[[Tensor, Tensor], Update], problems: Sequence[Problem]) -> None:
    """Where a method reports a solver, its certificate holds (``converged``) on every problem
    (``SolverReport.converged`` is a checked optimality condition, and every degenerate input has
    a defined outcome that the solver reports as converged)."""
    for p in problems:
        out = run(p.G, p.losses)
        assert out.converged in (None, True), f"solver not converged for {p!r}"


def assert_weights_structure(weights: Tensor | None, k: int) -> None:
    """``w`` is a finite vector of shape ``(K,)``."""
    assert weights is not None, "no weights"
    assert tuple(weights.shape) == (k,), f"weights have shape {tuple(weights.shape)}, not ({k},)"
    assert bool(torch.isfinite(weights).all()), f"non-finite weights {weights.tolist()}"


def assert_non_conflicting(
    aggregate: Aggregate,
    G: Tensor,
    losses: Tensor | None = None,
    rtol: float = 1e-9,
    weigh: Weigh | None = None,
    reg_eps: float = 0.0,
) -> None:
    r"""Every task's first-order gain is non-negative: :math:`g_i^\top d\ge-\tau_i` with
    :math:`\tau_i=\mathrm{rtol}\cdot\max(\max_j\|g_j\|^2,\ \|g_i\|\,\|d\|)`.

    (A step :math:`-\eta d` then decreases no loss to first order.) At a Pareto-stationary
    point the only such ``d`` is 0 and the check reduces to the rounding of a vanishing ``d``.

    A method that solves its problem on the regularised Gramian
    :math:`\tilde M=M/\mathrm{tr}(M)+\varepsilon I` (UPGrad's ``reg_eps``) certifies
    :math:`\tilde Mw\ge0` instead of :math:`Mw\ge0`, i.e.
    :math:`g_i^\top d=(Mw)_i\ge-\varepsilon\,\mathrm{tr}(M)\,w_i`: pass ``reg_eps`` and
    ``weigh`` and that documented slack is added to :math:`\tau_i`."""
    d = aggregate(G, losses)
    gains = _vec(G) @ _vec(d)
    norms = _vec(_row_norms(G))
    tol = rtol * np.maximum(norms.max() ** 2, norms * float(np.linalg.norm(_vec(d))))
    if reg_eps:
        assert weigh is not None, "the regularisation slack needs the weights"
        w = weigh(G, losses)
        assert w is not None
        tol = tol + reg_eps * float((norms**2).sum()) * np.abs(_vec(w))
    worst = int(np.argmin(gains + tol))
    assert gains[worst] >= -tol[worst], (
        f"task {worst} conflicts with d: g_iᵀd = {gains[worst]:.3e} < -{tol[worst]:.3e}"
        f"; all gains {gains.tolist()}"
    )


def assert_permutation_equivariant(
    aggregate: Aggregate,
    G: Tensor,
    losses: Tensor,
    perm: Sequence[int],
    rtol: float = 1e-9,
    weigh: Weigh | None = None,
) -> None:
    r"""Relabelling the tasks changes nothing: for the permutation matrix :math:`P`
    (``perm[i]`` is the old index of new task ``i``; rows, losses and names move together),
    :math:`d(PG, P\ell)=d(G,\ell)` to
    :math:`\mathrm{rtol}\cdot\sigma`, and, when ``weigh`` is given (use it only where the weights
    are unique, e.g. a full-row-rank ``G``), :math:`w(PG, P\ell)=P\,w(G,\ell)` to
    :math:`\mathrm{rtol}\cdot\|w\|_\infty`."""
    idx = torch.as_tensor(list(perm))
    names = task_names(G.shape[0])
    moved = [names[i] for i in perm]
    d0 = aggregate(G, losses, names)
    d1 = aggregate(G[idx], losses[idx], moved)
    gap = float(torch.linalg.vector_norm(d1 - d0))
    tol = rtol * natural_size(G, d0, d1)
    assert gap <= tol, f"d changed under the permutation {list(perm)}: ‖Δd‖ = {gap:.3e} > {tol:.3e}"
    if weigh is None:
        return
    w0, w1 = weigh(G, losses, names), weigh(G[idx], losses[idx], moved)
    assert w0 is not None
    assert w1 is not None
    gap = float((w1 - w0[idx]).abs().max())
    tol = rtol * float(w0.abs().max())
    assert gap <= tol, (
        f"weights did not follow the permutation {list(perm)}: w(PG) = {w1.tolist()}, "
        f"P w(G) = {w0[idx].tolist()} (max gap {gap:.3e} > {tol:.3e})"
    )


def assert_scale_behaviour(
    aggregate: Aggregate,
    G: Tensor,
    losses: Tensor | None,
    c: float,
    degree: int,
    rtol: float = 1e-9,
) -> None:
    r"""Homogeneity: :math:`d(cG)=c^{\mathrm{degree}}d(G)` for :math:`c>0` (losses unchanged), to
    :math:`\mathrm{rtol}\cdot c^{\mathrm{degree}}\sigma` with :math:`\sigma` the natural size of
    ``d(G)``. Degree 1: the update scales like the gradients (the mean, UPGrad, MGDA). Degree 0:
    it does not depend on their common scale (Nash-MTL, normalised-gradient methods).

    Use powers of two for ``c``: ``cG`` is then exact and the test adds no rounding."""
    assert c > 0, "use a power of two for c"
    assert math.log2(c).is_integer(), "use a power of two for c"
    d0 = aggregate(G, losses)
    d1 = aggregate(G * c, losses)
    factor = c**degree
    gap = float(torch.linalg.vector_norm(d1 - factor * d0))
    size = float(_row_norms(G).max()) ** degree if degree else 0.0
    tol = rtol * factor * max(size, float(torch.linalg.vector_norm(d0)))
    assert gap <= tol, (
        f"d(cG) ≠ c^{degree} d(G) for c = {c}: ‖d(cG) − c^{degree} d(G)‖ = {gap:.3e} > {tol:.3e}"
        f" (‖d(G)‖ = {float(torch.linalg.vector_norm(d0)):.3e})"
    )


def assert_balanced_on_orthogonal_equal_norm(
    aggregate: Aggregate, Q: Tensor, s: float, rtol: float = 1e-9
) -> None:
    r"""For orthonormal rows :math:`q_i` scaled by a common :math:`s>0` (:math:`G=sQ`) and equal
    losses, the update weighs every task the same: :math:`d=\bar w\,s\sum_iq_i` with
    :math:`\bar w>0`.

    The weights are read off ``d`` itself (the rows are orthogonal, so
    :math:`w_i=q_i^\top d/s`), which covers direction-only methods too; ``d`` must also lie in
    the span of the rows. Tolerance :math:`\mathrm{rtol}\cdot\max_i|w_i|`."""
    G = Q * s
    k = G.shape[0]
    d = aggregate(G, torch.ones(k, dtype=G.dtype))
    w = (Q @ d) / s
    residual = float(torch.linalg.vector_norm(d - (w * s) @ Q))
    size = float(w.abs().max())
    assert size > 0, f"d = 0 on orthogonal equal-norm gradients (s = {s})"
    assert residual <= rtol * size * s * math.sqrt(k), f"d leaves the span of the rows ({residual})"
    spread = float(w.max() - w.min())
    assert spread <= rtol * size, f"unequal weights {w.tolist()} on orthonormal rows × {s}"
    assert float(w.min()) > 0, f"non-positive common weight {w.tolist()}"


def assert_reduces_to_mean_without_conflict(
    aggregate: Aggregate, G: Tensor, pref: Tensor, rtol: float = 1e-9
) -> None:
    r"""When no two gradients conflict (:math:`GG^\top\ge0` entrywise) the method leaves them
    alone: :math:`d=G^\top p` for its fixed weights :math:`p` (UPGrad: its preference vector,
    :math:`\mathbf 1/K` by default; PCGrad: :math:`\mathbf 1`, the sum). Tolerance
    :math:`\mathrm{rtol}\cdot\|p\|_1\max_i\|g_i\|`."""
    gram = G @ G.T
    assert bool((gram >= 0).all()), "the test problem has a conflict"
    d = aggregate(G, torch.ones(G.shape[0], dtype=G.dtype))
    expected = pref.to(G.dtype) @ G
    gap = float(torch.linalg.vector_norm(d - expected))
    tol = rtol * float(pref.abs().sum()) * float(_row_norms(G).max())
    assert gap <= tol, f"d ≠ Gᵀp without conflict: ‖d − Gᵀp‖ = {gap:.3e} > {tol:.3e}"


def assert_per_task_scale_invariance_of_direction(
    aggregate: Aggregate,
    G: Tensor,
    losses: Tensor | None,
    a: Tensor,
    rtol: float = 1e-9,
    vanish: float = 1e-7,
    orientation: bool = True,
) -> None:
    r"""Rescaling each task's gradient by :math:`a_i>0` (:math:`G\to\mathrm{diag}(a)G`, as when a
    loss is multiplied by a constant) changes at most the length of ``d``:
    :math:`d(\mathrm{diag}(a)G)=\lambda\,d(G)` with :math:`\lambda>0` (``orientation=False``:
    :math:`\lambda\ne0`, the same line), i.e. the unit vectors agree to ``rtol``.

    Where the exact ``d`` is 0 (a Pareto-stationary configuration: opposite or collinear rows)
    the computed one is rounding and has no direction: a ``d`` with
    :math:`\|d\|\le` ``vanish`` :math:`\cdot\max_i\|g_i\|` counts as 0 (the default,
    1e-7, is about :math:`\sqrt u`, the precision to which a float64 Gram matrix determines a
    vanishing min-norm point), and then both sides must vanish. Use powers of two for ``a``."""
    Ga = G * a[:, None].to(G.dtype)
    d0 = aggregate(G, losses)
    d1 = aggregate(Ga, losses)
    n0, n1 = float(torch.linalg.vector_norm(d0)), float(torch.linalg.vector_norm(d1))
    zero0 = n0 <= vanish * float(_row_norms(G).max())
    zero1 = n1 <= vanish * float(_row_norms(Ga).max())
    assert zero0 == zero1, f"d vanished on one side only: ‖d(G)‖ = {n0:.3e}, ‖d(AG)‖ = {n1:.3e}"
    if zero0:
        return
    u0, u1 = d0 / n0, d1 / n1
    if not orientation and float(u0 @ u1) < 0:
        u1 = -u1
    gap = float(torch.linalg.vector_norm(u1 - u0))
    assert gap <= rtol, (
        f"the direction of d changed under per-task scaling a = {a.tolist()}: "
        f"‖d(AG)/‖d(AG)‖ − d(G)/‖d(G)‖‖ = {gap:.3e} > {rtol:.1e} "
        f"(cos = {float(d0 @ d1) / (n0 * n1):.6f})"
    )


def assert_weights_sum(weights: Tensor | None, expected: float, rtol: float = 1e-12) -> None:
    r""":math:`\sum_iw_i=` ``expected`` to ``rtol · max(1, Σ|w_i|)``."""
    assert weights is not None, "no weights"
    total = math.fsum(_vec(weights).tolist())
    tol = rtol * max(1.0, float(weights.abs().sum()))
    assert abs(total - expected) <= tol, (
        f"weights {weights.tolist()} sum to {total}, not {expected}"
    )


# ---------------------------------------------------------------------- loss-only methods' weights
def assert_loss_weights_structure(weigh_losses: WeighLosses, losses_list: Sequence[Tensor]) -> None:
    """For every loss vector: finite weights of shape ``(K,)``."""
    for losses in losses_list:
        assert_weights_structure(weigh_losses(losses), int(losses.shape[0]))


def assert_loss_permutation_equivariant(
    weigh_losses: WeighLosses, losses: Tensor, perm: Sequence[int], rtol: float = 1e-12
) -> None:
    r""":math:`w(P\ell)=P\,w(\ell)` (losses and names moved together): the weights follow the
    tasks, not their positions, to
    :math:`\mathrm{rtol}\cdot\|w\|_\infty`."""
    idx = torch.as_tensor(list(perm))
    names = task_names(int(losses.shape[0]))
    w0 = weigh_losses(losses, names)
    w1 = weigh_losses(losses[idx], [names[i] for i in perm])
    gap = float((w1 - w0[idx]).abs().max())
    tol = rtol * float(w0.abs().max())
    assert gap <= tol, (
        f"weights did not follow the permutation {list(perm)}: w(Pℓ) = {w1.tolist()}, "
        f"P w(ℓ) = {w0[idx].tolist()}"
    )


def assert_loss_scale_invariance(
    weigh_losses: WeighLosses,
    losses: Tensor,
    a: Tensor,
    factor: float | None = None,
    rtol: float = 1e-12,
) -> None:
    r"""Multiplying task ``i``'s loss by :math:`a_i>0` multiplies its gradient by :math:`a_i`, so
    the update :math:`\sum_iw_i(a\odot\ell)\,a_i\nabla\ell_i` is
    :math:`\lambda\sum_iw_i(\ell)\nabla\ell_i` for every set of gradients iff
    :math:`w(a\odot\ell)\odot a=\lambda\,w(\ell)`. ``factor`` is the documented
    :math:`\lambda` (SI: 1; GLS: :math:`(\prod_ia_i)^{1/K}`), or ``None`` for any
    :math:`\lambda>0` (then fitted by least squares). Tolerance
    :math:`\mathrm{rtol}\cdot\lambda\|w(\ell)\|_\infty`."""
    a = a.to(losses.dtype)
    w0 = weigh_losses(losses)
    w1 = weigh_losses(losses * a) * a
    lam = float(w1 @ w0) / float(w0 @ w0) if factor is None else factor
    assert lam > 0, f"w(a⊙ℓ)⊙a = {w1.tolist()} is not a positive multiple of w(ℓ) = {w0.tolist()}"
    gap = float((w1 - lam * w0).abs().max())
    tol = rtol * lam * float(w0.abs().max())
    assert gap <= tol, (
        f"w(a⊙ℓ)⊙a = {w1.tolist()} ≠ {lam} · w(ℓ) = {(lam * w0).tolist()} for a = {a.tolist()} "
        f"(max gap {gap:.3e} > {tol:.3e})"
    )
