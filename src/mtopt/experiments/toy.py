r"""The two-objective toy of CAGrad (Liu et al., NeurIPS 2021), reused by Nash-MTL (Navon et al.,
ICML 2022) and FAMO (Liu et al., NeurIPS 2023): two losses of a 2-D parameter, trained with Adam
from a few start points, each method's path drawn over the Pareto front.

For :math:`x=(x_1,x_2)`, with :math:`\epsilon=5\cdot10^{-6}`:

.. math::

   f_1 &= \log\max(|\tfrac12(-x_1-7)-\tanh(-x_2)|,\epsilon)+6, &
   f_2 &= \log\max(|\tfrac12(-x_1+3)+\tanh(-x_2)+2|,\epsilon)+6, &
   c_1 &= \max(\tanh(x_2/2),0),\\
   g_1 &= \big((7-x_1)^2+0.1(x_2+8)^2\big)/10-20, &
   g_2 &= \big((7+x_1)^2+0.1(x_2+8)^2\big)/10-20, &
   c_2 &= \max(\tanh(-x_2/2),0),

:math:`L_1=s\,(c_1f_1+c_2g_1)`, :math:`L_2=c_1f_2+c_2g_2`. Nash-MTL's and FAMO's scripts use
:math:`s=0.1` (``SCALE``: an unequal scale is what separates the scale-invariant methods from the
rest); the CAGrad paper used :math:`s=1`.

**The budget and start points** (the authors' scripts): Nash-MTL's toy trainer runs Adam at
lr 1e-3 for 35,000 steps (``STEPS``, ``LR``) from the five ``START_POINTS``; FAMO's toy trainer
uses the same five with 50,000 steps; CAGrad's ``toy.py`` used three starts
(``CAGRAD_START_POINTS``), :math:`s=1` and 100,000 steps (``CAGRAD_STEPS``). All three use
torch's Adam with its default betas (``BETAS``); :func:`run_method` takes others (the tests run
a time-rescaled Adam, ``tests/experiments/test_toy.py``). Every run here gets a fresh method and
a fresh Adam, as in those scripts; the parameter is float64 (theirs float32).

**The Pareto set.** Where :math:`x_2<0`, :math:`c_1=0` and the losses are :math:`c_2g_i`. Both
gradients are parallel exactly where

.. math:: 0.02\,(x_2+8)\sinh x_2 = 20-\tfrac{49-x_1^2}{10}-0.01\,(x_2+8)^2,

which has one root :math:`x_2=\varphi(x_1)<-8` for each :math:`x_1`; they point in opposite
directions (0 is in their hull) for :math:`|x_1|\le 7`. So the Pareto set is the arc
:math:`\{(x_1,\varphi(x_1)): |x_1|\le7\}`, :math:`\varphi(0)=-8.35511` (the papers' figures draw
the straight segment :math:`x_2=-8.3552`), :math:`\varphi(\pm7)=-8.43446`, the single-task
minima. The scale :math:`s` does not move it. :func:`pareto_x2` solves the equation,
:func:`pareto_front` gives the front in loss space for the plot.

**Judging an end point.** :func:`stationarity` is the norm of the min-norm element of the hull
of :math:`\nabla L_1,\nabla L_2` (:func:`mtopt.core.min_norm.min_norm_weights`) over the larger
gradient norm: 0 exactly at a Pareto-stationary point. It is also 0 at Pareto-stationary points
off the front (a point where the weighted sum of a scalarization is stationary is one), so *on
the front* is judged in parameter space: :func:`front_distance`, the distance to the arc
(:math:`\sqrt{(x_1-x_1')^2+(x_2-\varphi(x_1'))^2}` with :math:`x_1'` the point of
:math:`[-7,7]` nearest to :math:`x_1`), at most ``FRONT_TOL``.

**Methods.** Any registered method spec (:mod:`mtopt.specs`, without ``@``/``#`` suffixes:
the optimizer is the papers' Adam, the gradient engine the default). The toy has no
representation: a representation-level method sees :math:`z=x` (an identity encoder), so its
gradients are the parameter gradients. Skipped, with the reason: methods that read a meta batch
(there is no data) or update the model themselves (several optimizer steps per step would not be
the papers' Adam loop). Where the papers' toy scripts set a hyperparameter that our default does
not, ``toy_defaults`` fills it in unless the spec sets it: MGDA without gradient normalisation
(the loss-based ones need positive losses; the toy's are negative), CAGrad with :math:`c=0.4`
where :math:`s\ne1` (Nash-MTL's and FAMO's scripts; CAGrad's own used our default 0.5), and
FAMO with :math:`\gamma=0` and :math:`\ell^*=(-21s,-21)` (FAMO's toy script; the losses go down
to about :math:`-20`).

**Speed.** The losses and their Jacobian are computed in closed form on Python floats and
enter autograd as one node (:func:`toy_losses_fast`; :func:`toy_losses` is the same function
in plain torch operations, batched, used for the plot and checked against it in the tests), so a
step costs what the engine costs for K = 2 and a 2-D parameter: 0.3 ms (equal weighting) to
1.5 ms (Nash-MTL, CAGrad) on one CPU core, one to five minutes per method at the papers'
budget on a free core.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from mtopt.specs import MethodSpec

#: The start points of Nash-MTL's and FAMO's toy scripts (the order of their figures).
START_POINTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (0.0, 0.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)
#: The start points of CAGrad's ``toy.py``.
CAGRAD_START_POINTS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
STEPS = 35_000  #: Nash-MTL's toy budget (FAMO's: 50,000; CAGrad's: 100,000)
CAGRAD_STEPS = 100_000  #: CAGrad's toy budget (with its start points and :math:`s=1`)
LR = 1e-3  #: Adam's learning rate in all three scripts
BETAS = (0.9, 0.999)  #: Adam's betas in all three scripts (torch's defaults)
SCALE = 0.1  #: the factor on L1 in Nash-MTL's and FAMO's scripts (CAGrad's: 1)
LOWER = 5e-6  #: the floor inside the logarithms
X1_LIMIT = 7.0  #: the Pareto set spans :math:`|x_1|\le 7`
#: An end point within this distance of the Pareto set (parameter space) is on the front.
FRONT_TOL = 0.05
#: The methods ``mtopt toy`` runs by default.
DEFAULT_METHODS = ("unitary", "mgda", "cagrad", "pcgrad", "nash_mtl", "famo", "imtl_g", "upgrad")


# -- the problem -------------------------------------------------------------------------------
def toy_losses(x: Tensor, scale: float = SCALE) -> Tensor:
    """``(L1, L2)`` of ``x`` (shape ``(..., 2)`` → ``(..., 2)``), in plain torch operations
    (differentiable to any order, batched).

    >>> toy_losses(torch.tensor([0.0, -8.0], dtype=torch.float64), scale=1.0)
    tensor([-15.0899, -15.0899], dtype=torch.float64)
    """
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), LOWER).log() + 6
    c1 = torch.clamp(torch.tanh(x2 / 2), 0)
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = torch.clamp(torch.tanh(-x2 / 2), 0)
    return torch.stack((scale * (c1 * f1 + c2 * g1), c1 * f2 + c2 * g2), dim=-1)


def toy_jacobian(x1: float, x2: float, scale: float = SCALE) -> tuple[tuple[float, float], ...]:
    """``((L1, L2), ∇L1, ∇L2)`` at ``(x1, x2)`` in closed form, on Python floats. At the kinks
    it takes torch's one-sided choices (a clamp passes the gradient where its input equals the
    bound, ``|u|`` has derivative 0 at 0), so it agrees with autograd on :func:`toy_losses`
    everywhere, the start point (0, 0) included.

    >>> values, grad1, grad2 = toy_jacobian(0.0, -8.0, scale=1.0)
    >>> [round(v, 4) for v in values + grad1 + grad2]
    [-15.0899, -15.0899, -1.3991, 0.0101, 1.3991, 0.0101]
    """
    t2 = math.tanh(x2)
    sech2 = 1.0 - t2 * t2
    # f1, f2: log max(|u|, LOWER) + 6, u1 = -x1/2 - 7/2 + tanh(x2), u2 = -x1/2 + 7/2 - tanh(x2)
    u1 = -0.5 * x1 - 3.5 + t2
    u2 = -0.5 * x1 + 3.5 - t2
    a1, a2 = abs(u1), abs(u2)
    f1 = math.log(max(a1, LOWER)) + 6.0
    f2 = math.log(max(a2, LOWER)) + 6.0
    d1 = 1.0 / u1 if a1 >= LOWER and u1 != 0.0 else 0.0  # d f1 / d u1
    d2 = 1.0 / u2 if a2 >= LOWER and u2 != 0.0 else 0.0
    f1_x = (-0.5 * d1, sech2 * d1)
    f2_x = (-0.5 * d2, -sech2 * d2)
    # c1 = max(tanh(x2/2), 0), c2 = max(tanh(-x2/2), 0)
    th = math.tanh(0.5 * x2)
    half = 0.5 * (1.0 - th * th)
    c1, c1_x2 = (th, half) if th >= 0.0 else (0.0, 0.0)
    c2, c2_x2 = (-th, -half) if -th >= 0.0 else (0.0, 0.0)
    # g1, g2: quadratics
    q = 0.1 * (x2 + 8.0) ** 2
    g1 = ((7.0 - x1) ** 2 + q) / 10.0 - 20.0
    g2 = ((7.0 + x1) ** 2 + q) / 10.0 - 20.0
    q_x2 = 0.02 * (x2 + 8.0)
    g1_x = (0.2 * (x1 - 7.0), q_x2)
    g2_x = (0.2 * (x1 + 7.0), q_x2)
    l1 = scale * (c1 * f1 + c2 * g1)
    l2 = c1 * f2 + c2 * g2
    grad1 = (
        scale * (c1 * f1_x[0] + c2 * g1_x[0]),
        scale * (c1 * f1_x[1] + c1_x2 * f1 + c2 * g1_x[1] + c2_x2 * g1),
    )
    grad2 = (
        c1 * f2_x[0] + c2 * g2_x[0],
        c1 * f2_x[1] + c1_x2 * f2 + c2 * g2_x[1] + c2_x2 * g2,
    )
    return (l1, l2), grad1, grad2


class _ToyLosses(torch.autograd.Function):
    """Both losses as one autograd node whose backward is the closed-form Jacobian."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        x1, x2 = x.detach().tolist()
        (l1, l2), grad1, grad2 = toy_jacobian(x1, x2, scale)
        ctx.save_for_backward(x.new_tensor((grad1, grad2)))
        return x.new_tensor(l1), x.new_tensor(l2)

    @staticmethod
    def backward(ctx: Any, out1: Tensor, out2: Tensor) -> tuple[Tensor, None]:
        (jac,) = ctx.saved_tensors
        return out1 * jac[0] + out2 * jac[1], None


def toy_losses_fast(x: Tensor, scale: float = SCALE) -> tuple[Tensor, Tensor]:
    """``L1, L2`` of a parameter ``x`` of shape ``(2,)`` as two scalars, differentiable once
    (closed-form backward): the training path."""
    if x.shape != (2,):
        raise ValueError(f"the toy's parameter has shape (2,), got {tuple(x.shape)}")
    return _ToyLosses.apply(x, float(scale))


# -- the Pareto set and the judgement of an end point ------------------------------------------
def pareto_x2(x1: np.ndarray | float) -> np.ndarray:
    """``φ(x1)``: the ``x2 < -8`` where ``∇L1`` and ``∇L2`` are parallel (module doc), by
    bisection (the equation's two sides are monotone there), float64 to rounding.

    >>> [round(float(v), 5) for v in pareto_x2(np.array([0.0, 7.0]))]
    [-8.35511, -8.43446]
    """
    x1 = np.asarray(x1, dtype=np.float64)
    rhs = 20.0 - (49.0 - x1**2) / 10.0

    def excess(x2: np.ndarray) -> np.ndarray:  # increasing as x2 falls below -8
        return 0.02 * (x2 + 8.0) * np.sinh(x2) + 0.01 * (x2 + 8.0) ** 2 - rhs

    lo = np.full_like(x1, -12.0)  # excess > 0
    hi = np.full_like(x1, -8.0)  # excess < 0 (rhs ≥ 15.1)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        above = excess(mid) > 0.0
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    return 0.5 * (lo + hi)


def pareto_set(points: int = 401) -> np.ndarray:
    """``points × 2`` parameters along the Pareto set, ``x1`` from -7 to 7."""
    x1 = np.linspace(-X1_LIMIT, X1_LIMIT, points)
    return np.stack((x1, pareto_x2(x1)), axis=1)


def pareto_front(scale: float = SCALE, points: int = 401) -> np.ndarray:
    """``points × 2`` losses ``(L1, L2)`` along the Pareto set (the front the papers draw)."""
    xs = torch.from_numpy(pareto_set(points))
    return toy_losses(xs, scale).numpy()


def front_distance(x1: float, x2: float) -> float:
    """The distance of ``(x1, x2)`` to the Pareto set: ``|x2 − φ(x1')|`` at ``x1'`` the nearest
    point of [-7, 7], combined with ``|x1 − x1'|`` (the arc's slope is below 0.03, so this is
    the Euclidean distance to within a few per cent)."""
    near = min(max(x1, -X1_LIMIT), X1_LIMIT)
    return math.hypot(x1 - near, x2 - float(pareto_x2(near)))


def stationarity(x1: float, x2: float, scale: float = SCALE) -> float:
    """``‖d‖ / max(‖∇L1‖, ‖∇L2‖)`` with ``d`` the min-norm element of the hull of the two
    gradients (:func:`mtopt.core.min_norm.min_norm_weights`): 0 exactly at a Pareto-stationary
    point (0 also when both gradients are 0)."""
    from mtopt.core.min_norm import min_norm_weights

    _, grad1, grad2 = toy_jacobian(x1, x2, scale)
    jac = np.array((grad1, grad2), dtype=np.float64)
    largest = float(np.linalg.norm(jac, axis=1).max())
    if largest == 0.0:
        return 0.0
    unit = jac / largest  # the same direction, a Gram matrix of order 1
    weights = min_norm_weights(unit @ unit.T).weights
    return float(np.linalg.norm(weights @ unit))


# -- running a method --------------------------------------------------------------------------
def toy_defaults(name: str, scale: float = SCALE) -> dict[str, Any]:
    """The hyperparameters the papers' toy scripts used where ours differ (module doc)."""
    if name in ("mgda", "mgda_ub"):
        return {"normalization": "none"}
    if name == "cagrad" and scale != 1.0:  # Nash-MTL's and FAMO's scripts; CAGrad's: 0.5 (ours)
        return {"c": 0.4}
    if name == "famo":
        return {"gamma": 0.0, "min_losses": [-21.0 * scale, -21.0]}
    return {}


def skip_reason(method: Any) -> str | None:
    """Why a built method cannot run on the toy, or ``None``."""
    from mtopt.core.capabilities import MetaBatchMethod, SequentialMethod

    if isinstance(method, MetaBatchMethod):
        return "reads a meta batch; the toy has no data"
    if isinstance(method, SequentialMethod):
        return "updates the model itself (several optimizer steps per step), not the papers' loop"
    return None


@dataclass(frozen=True)
class ToyRun:
    """One method from one start point: the path (``steps + 1`` parameters), the end point's
    losses, stationarity and distance to the Pareto set, and the seconds the steps took."""

    start: tuple[float, float]
    path: np.ndarray
    losses: tuple[float, float]
    stationarity: float
    distance: float
    seconds: float
    uncertified: int = 0

    @property
    def end(self) -> tuple[float, float]:
        return float(self.path[-1, 0]), float(self.path[-1, 1])

    @property
    def on_front(self) -> bool:
        return self.distance <= FRONT_TOL


@dataclass(frozen=True)
class ToyResult:
    """A method's runs from every start point (``skipped``: why it did not run)."""

    spec: str
    runs: list[ToyRun] = field(default_factory=list)
    skipped: str | None = None

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.runs)


def effective_spec(text: str, scale: float = SCALE) -> MethodSpec:
    """Parse ``text`` (no ``@``/``#`` suffixes), fill in :func:`toy_defaults`; a
    :class:`~mtopt.specs.MethodSpec` whose ``text`` names every hyperparameter set."""
    from mtopt.specs import MethodSpec, format_spec, parse_spec

    spec = parse_spec(text, allow=())
    hparams = {**toy_defaults(spec.name, scale), **spec.hparams}
    method = format_spec(spec.name, hparams)
    parse_spec(method, allow=())  # the defaults build too
    return MethodSpec(method, spec.name, hparams)


def check_settings(
    steps: int, lr: float, scale: float, betas: tuple[float, float], prefix: str = ""
) -> None:
    """The run's settings, or a one-line ``ValueError`` naming the setting as ``prefix`` + its
    name (``prefix="--"``: the command line's option)."""
    if steps < 1:
        raise ValueError(f"{prefix}steps must be ≥ 1, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{prefix}lr must be a finite number > 0, got {lr}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{prefix}scale must be a finite number > 0, got {scale}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Adam's betas must be in [0, 1), got {betas}")


def run_method(
    text: str,
    starts: Sequence[tuple[float, float]] = START_POINTS,
    steps: int = STEPS,
    lr: float = LR,
    scale: float = SCALE,
    progress: Callable[[str], None] | None = None,
    betas: tuple[float, float] = BETAS,
) -> ToyResult:
    """Train ``x`` with ``MultiTaskOptimizer(torch.optim.Adam([x], lr, betas), method,
    shared=[x])`` from every start point, ``steps`` steps each (a fresh method and Adam per
    start)."""
    import mtopt

    check_settings(steps, lr, scale, betas)
    spec = effective_spec(text, scale)
    reason = skip_reason(mtopt.make(spec.name, **spec.hparams))
    if reason is not None:
        return ToyResult(spec.text, skipped=reason)
    runs = []
    for start in starts:
        x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        method = mtopt.make(spec.name, **spec.hparams)
        rep = method.level == "rep"
        opt = torch.optim.Adam([x], lr=lr, betas=betas)
        mto = mtopt.MultiTaskOptimizer(opt, method, shared=[x])

        def closure(x: Tensor = x, rep: bool = rep) -> Any:
            if rep:  # an identity encoder: z = x, a batch of one
                z = x.unsqueeze(0)
                l1, l2 = toy_losses_fast(z[0], scale)
                return mtopt.Losses({"L1": l1, "L2": l2}, features=z)
            l1, l2 = toy_losses_fast(x, scale)
            return {"L1": l1, "L2": l2}

        path = np.empty((steps + 1, 2))
        path[0] = start
        began = time.perf_counter()
        for i in range(steps):
            mto.step(closure)
            path[i + 1] = x.detach().numpy()
        seconds = time.perf_counter() - began
        end = (float(path[-1, 0]), float(path[-1, 1]))
        values, _, _ = toy_jacobian(*end, scale)
        runs.append(
            ToyRun(
                start=(float(start[0]), float(start[1])),
                path=path,
                losses=values,
                stationarity=stationarity(*end, scale),
                distance=front_distance(*end),
                seconds=seconds,
                uncertified=sum(mto.uncertified.values()),
            )
        )
        if progress is not None:
            where = "on the front" if runs[-1].on_front else "not on the front"
            progress(
                f"{spec.text} from {start}: {steps} steps in {seconds:.1f} s, "
                f"end ({end[0]:.3f}, {end[1]:.3f}), {where}"
            )
    return ToyResult(spec.text, runs)


def run_toy(
    specs: Sequence[str],
    starts: Sequence[tuple[float, float]] = START_POINTS,
    steps: int = STEPS,
    lr: float = LR,
    scale: float = SCALE,
    progress: Callable[[str], None] | None = None,
    betas: tuple[float, float] = BETAS,
) -> list[ToyResult]:
    """:func:`run_method` for every spec (the settings checked and all specs parsed before
    anything runs: a spec's defaults depend on ``scale``)."""
    check_settings(steps, lr, scale, betas)
    for text in specs:
        effective_spec(text, scale)
    return [run_method(text, starts, steps, lr, scale, progress, betas) for text in specs]


# -- the table and the figure ------------------------------------------------------------------
def format_table(results: Sequence[ToyResult]) -> str:
    """A markdown table: method, start, end point, final losses, stationarity, on the front."""
    lines = [
        "| method | start | end point | L1 | L2 | stationarity | front distance | on front |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for result in results:
        if result.skipped:
            lines.append(f"| {result.spec} | — | skipped: {result.skipped} | | | | | |")
            continue
        for run in result.runs:
            (s1, s2), (e1, e2) = run.start, run.end
            lines.append(
                f"| {result.spec} | ({s1:g}, {s2:g}) | ({e1:.3f}, {e2:.3f}) | "
                f"{run.losses[0]:.4f} | {run.losses[1]:.4f} | {run.stationarity:.1e} | "
                f"{run.distance:.1e} | {'yes' if run.on_front else 'no'} |"
            )
    return "\n".join(lines)


def plot_toy(
    results: Sequence[ToyResult],
    path: str | Path,
    scale: float = SCALE,
    parameter_space: bool = True,
    points: int = 400,
    dpi: int = 72,
) -> Path:
    """One panel per method: the paths in loss space over the Pareto front (grey), coloured from
    light (start) to dark (end), the start a black dot, the end a star when it is on the front
    and a cross when not; with ``parameter_space`` a second row shows the same paths over the
    contours of ``L1 + L2`` and the Pareto set. Each path is drawn with ``points`` points."""
    from matplotlib.collections import LineCollection

    from mtopt.report.plots import _pyplot

    plt = _pyplot()
    shown = [r for r in results if not r.skipped]
    if not shown:
        raise ValueError("no method ran: nothing to plot")
    rows = 2 if parameter_space else 1
    cols = len(shown)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.6 * cols, 2.7 * rows), squeeze=False, constrained_layout=True
    )
    front = pareto_front(scale)
    arc = pareto_set()
    cmap = plt.get_cmap("magma_r")
    grid = None
    if parameter_space:
        ticks = np.linspace(-10.0, 10.0, 161)
        mesh = np.stack(np.meshgrid(ticks, ticks), axis=-1)
        grid = (ticks, toy_losses(torch.from_numpy(mesh), scale).sum(-1).numpy())
    for col, result in enumerate(shown):
        ax = axes[0, col]
        ax.plot(front[:, 0], front[:, 1], color="#72727a", linewidth=5, zorder=1)
        for run in result.runs:
            every = max(1, (len(run.path) - 1) // points)
            xs = torch.from_numpy(np.ascontiguousarray(run.path[::every]))
            for ax_, data in ((ax, toy_losses(xs, scale).numpy()), (None, xs.numpy())):
                if ax_ is None:
                    if not parameter_space:
                        continue
                    ax_ = axes[1, col]
                segments = np.stack((data[:-1], data[1:]), axis=1)
                colours = cmap(np.linspace(0.1, 0.6, len(segments)))
                ax_.add_collection(LineCollection(list(segments), colors=colours, linewidths=1.6))
                ax_.scatter(*data[0], color="k", s=18, zorder=5)
                ax_.scatter(*data[-1], marker="*" if run.on_front else "x", color="tab:blue",
                            s=30, zorder=6)  # fmt: skip
        ax.set_title(result.spec, fontsize=8)
        ax.set_xlabel(f"L1 (×{scale:g})" if scale != 1 else "L1", fontsize=8)
        ax.autoscale()
        ax.tick_params(labelsize=7)
        if col == 0:
            ax.set_ylabel("L2", fontsize=8)
        if parameter_space and grid is not None:
            low = axes[1, col]
            ticks, values = grid
            low.contour(ticks, ticks, values, levels=14, linewidths=0.5, cmap="viridis")
            low.plot(arc[:, 0], arc[:, 1], color="#72727a", linewidth=3, zorder=1)
            low.set_xlim(-10, 10)
            low.set_ylim(-10, 10)
            low.set_aspect("equal")
            low.set_xlabel("x1", fontsize=8)
            low.tick_params(labelsize=7)
            if col == 0:
                low.set_ylabel("x2", fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
