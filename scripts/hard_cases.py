r"""Measure the hard cases of the solver issue (inner solvers on hard inputs; docs/solvers.md).

The script uses only the public API that both the code before the certified solvers (commit
ec6e60b) and after offer, so the same file gives before/after figures; pick the code version
with PYTHONPATH::

    git worktree add /tmp/old ec6e60b
    PYTHONPATH=/tmp/old/src OMP_NUM_THREADS=1 .venv/bin/python scripts/hard_cases.py \
        --out docs/solvers/before.json
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python scripts/hard_cases.py \
        --out docs/solvers/after.json

Every random draw is seeded (``torch.Generator`` / ``numpy.random.default_rng`` with fixed seeds,
``torch.manual_seed`` right before each model is built), so both runs see identical inputs. Each
case runs inside ``try``/``except``: an exception is recorded (type and first line of its
message) as the case's outcome, since a crash is itself a figure. ``--quick`` shortens cases 1-3
(50 instead of 200 training steps, 20 instead of 50 random Jacobians); ``--only 2 5`` runs some
cases. Where a solver report has a ``residual`` attribute (new code only) it is printed and saved.
The full run takes about 15 s on one CPU thread.

Cases (numbered as in the issue):

1. ``mlp11``: an MLP encoder 40→64→64 (ReLU) with 11 ``Linear(64, 1)`` heads, float32 (the
   realistic dtype), MSE on seeded random regression data (1024 samples, batches of 64), task k's
   loss multiplied by ``logspace(-3, 3, 11)[k]``; ``torch.optim.Adam`` lr 1e-3 for 200 steps from
   the same initial model for cagrad, cdtt, edm, mgda_ub, mgda, nash_mtl, upgrad, imtl_g and
   aligned_mtl (default hyperparameters). Counted: steps whose ``info.solver`` exists and says
   ``converged=False`` (and the statuses seen).
2. ``cagrad_random``: 50 random K = 11 Jacobians (40 columns; row i Gaussian times e^{u_i},
   u_i ~ U(-3, 3)). ``make("cagrad", c=0.5, rescale=0, sum_scale=False)`` so that ``d = Gᵀw`` is
   ``g0`` plus the correction; ``d`` is mapped onto CAGrad's ball
   ``d_ball = g0 + s (d - g0)/‖d - g0‖`` (``s = c‖g0‖``, ``g0`` the mean row) and its worst-task
   gain ``min_i g_iᵀd_ball / ‖g0‖²`` is compared with the exact optimum of
   ``max t s.t. G d ≥ t, ‖d - g0‖ ≤ s`` (cvxpy, CLARABEL), normalised the same way.
3. ``mgda_kkt``: on the same family, ``mgda`` with ``normalization="none"`` and solver ``pgd``
   (the original default), the installed default solver, and ``fw``; KKT miss of the min-norm
   point ``min_i g_iᵀd/‖d‖² - 1`` (``d = Gᵀw``; ≥ 0 at the min-norm point) and how many runs
   reported ``converged=True``. Plus K = 2 with a dominated pair (g1 = (1, 0), g2 = (3, 1):
   g1ᵀg2 = 3‖g1‖², exact γ = 1, d = g1), where Sener's pair rule clamps γ to 0.999.
4. ``cagrad_scale``: CAGrad defaults on a fixed seeded K = 3 Jacobian G (20 columns, rows of norm
   about 1) and on 1e-6·G (losses × 1e-6): both weight vectors and the largest relative change
   of a weight.
5. ``nash_singular``: Nash-MTL (defaults) with a task whose loss reaches only its head (its
   shared gradient is exactly 0), K = 2, ``torch.optim.SGD`` lr 0.1, 3 steps: α per step
   (``extras["nash_alpha"]`` when present, else the weights), solver status per step, the largest
   |head bias| afterwards. Then two exactly opposite tasks (ℓ_b = 100 - ℓ_a, every parameter
   shared): the weights of step 0 and the outcome of step 1.
6. ``mgda_scales``: MGDA, K = 5 tasks with loss scales 1e-8, 1e-4, 1, 1e4, 1e8, at the installed
   defaults and with ``normalization="none"``; one step with Adam lr 1e-3 and one with SGD lr 1
   (where the applied change must equal -lr·Gᵀw exactly). Reported: status/message, weights,
   ‖Δθ_shared‖, ‖Gᵀw‖ from a Jacobian computed here with ``torch.autograd``, and under SGD
   ‖Δθ + lr·Gᵀw‖.
7. ``zero_task_weights``: K = 3 where task 2's head reads a fixed input (its loss does not depend
   on the shared parameters or the representation); SGD (lr 0.01) with cagrad, nash_mtl
   and rotograd (closure returns ``mtopt.Losses(..., features=z)``, heads read
   ``mto.task_input(z, k)``), 3 steps: the logged weights and their largest magnitude per step.
8. ``low_precision``: a float16 model (K = 3, loss scales [1, 100, 3000], so that the largest
   task-gradient norm is about 1e3, measured on a float32 copy), one SGD step (lr 1e-3) with
   cagrad, nash_mtl, imtl_g, aligned_mtl, edm: the exception, or the weights, the solver status
   and whether any shared parameter changed. Then a float32 model with losses near 3e31 (losses
   × 1e31) with imtl_g and aligned_mtl.
9. ``rotograd_halfprec``: RotoGrad on a float16 and on a bfloat16 model (K = 2, a 6-channel
   representation: 2×6×6 = 72 entries), SGD lr 0.01: NaN entries of the rotation generators
   (``method.generator``) and of the rotations (``method.rotations()``) after step 0, then the
   outcome of step 1.
10. ``toy``: the two-objective toy of the CAGrad paper (Liu et al., NeurIPS 2021, their toy
    example; also used by Nash-MTL and FAMO) at the float32 point nearest to the Pareto-stationary
    point (0, x2*) of the front (found by root-finding in float64; there the task gradients
    cancel up to float32 rounding) and at a point 1e-3 below it: our CAGrad (c = 0.5) weights
    and ‖d‖ (defaults, and with the toy's /(1+c) and no ×K) against the authors' computation
    (float32 Gram entries, scipy bounded scalar minimisation of the dual,
    ‖g_w‖ = sqrt(wᵀGGw + 1e-4), λ = c‖g0‖/(‖g_w‖ + 1e-4), d = (g0 + λ g_w)/(1 + c)).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mtopt
from mtopt.core.method import MethodInput

# ----------------------------------------------------------------------------------------------
# helpers


def first_line(exc: BaseException) -> dict[str, str]:
    """An exception as a figure: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return {"exception": type(exc).__name__, "message": text[0] if text else ""}


def exc_text(exc: BaseException) -> str:
    info = first_line(exc)
    return f"{info['exception']}: {info['message'][:120]}"


def vec(values: Sequence[float] | Tensor | np.ndarray) -> str:
    """A short printed form of a vector (3 significant digits)."""
    if isinstance(values, Tensor):
        values = values.detach().double().tolist()
    return "[" + ", ".join(f"{float(v):.3g}" for v in values) + "]"


def as_list(values: Tensor | np.ndarray | Sequence[float] | None) -> list[float] | None:
    if values is None:
        return None
    if isinstance(values, Tensor):
        return values.detach().double().cpu().tolist()
    return [float(v) for v in values]


def solver_dict(report: Any) -> dict[str, Any] | None:
    """The fields of a SolverReport (``residual`` only where the installed code has it)."""
    if report is None:
        return None
    out = {
        "name": getattr(report, "name", None),
        "converged": bool(report.converged),
        "status": report.status,
        "iterations": report.iterations,
        "message": report.message,
    }
    residual = getattr(report, "residual", None)
    if residual is not None:
        out["residual"] = float(residual)
    return out


def solver_text(report: Any) -> str:
    if report is None:
        return "no solver report"
    text = f"{report.status} (converged={report.converged}, it={report.iterations})"
    residual = getattr(report, "residual", None)
    if residual is not None:
        text += f" residual={float(residual):.3g}"
    return text


def jsonable(obj: Any) -> Any:
    """Plain JSON: non-finite floats become strings ("nan", "inf", "-inf")."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return jsonable(obj.detach().double().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def aggregate(method: Any, grads: np.ndarray | Tensor, losses: Sequence[float] | None = None):
    """``method.aggregate`` on a given Jacobian (rows = task gradients)."""
    g = torch.as_tensor(grads)
    k = g.shape[0]
    loss = torch.ones(k, dtype=g.dtype) if losses is None else torch.tensor(losses, dtype=g.dtype)
    names = tuple(f"t{i}" for i in range(k))
    return method.aggregate(MethodInput(losses=loss, task_names=names, grads=g))


def kkt_miss(grads: np.ndarray, w: np.ndarray) -> float:
    """``min_i g_iᵀd/‖d‖² - 1`` for ``d = Gᵀw`` (≥ 0 at the min-norm point of the hull)."""
    d = grads.T @ w
    return float((grads @ d).min() / (d @ d) - 1.0)


class MultiHeadNet(nn.Module):
    """An MLP encoder (ReLU after every layer) and K one-output linear heads."""

    def __init__(self, sizes: Sequence[int], num_tasks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(sizes[-1], 1) for _ in range(num_tasks))


def make_closure(
    model: MultiHeadNet,
    mto: Any,
    x: Tensor,
    y: Tensor,
    scales: Sequence[float],
    head_inputs: dict[int, Tensor] | None = None,
) -> Callable[[], Any]:
    """Closure of scaled MSE losses; heads read ``mto.task_input(z, k)`` except those listed in
    ``head_inputs``, which read a fixed tensor (their loss reaches only their head)."""
    head_inputs = head_inputs or {}

    def closure() -> Any:
        z = model.encoder(x)
        losses = []
        for k, head in enumerate(model.heads):
            inp = head_inputs[k] if k in head_inputs else mto.task_input(z, k)
            pred = head(inp).squeeze(-1)
            losses.append(float(scales[k]) * F.mse_loss(pred, y[:, k]))
        return mtopt.Losses(losses, features=z)

    return closure


def shared_snapshot(params: Sequence[Tensor]) -> Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in params])


def own_jacobian(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """Rows ``∇ℓ_k`` of the shared parameters, by K ``torch.autograd.grad`` calls (float64)."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        flat = [
            (torch.zeros_like(p) if g is None else g).double().reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
        rows.append(torch.cat(flat))
    return torch.stack(rows)


def regression_data(seed: int, n: int, d_in: int, k: int, dtype=torch.float32):
    """Seeded inputs and K targets ``tanh(x a_k) + 0.1 noise``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    a = torch.randn(d_in, k, generator=gen) / math.sqrt(d_in)
    y = torch.tanh(x @ a) + 0.1 * torch.randn(n, k, generator=gen)
    return x.to(dtype), y.to(dtype)


def random_jacobian(seed: int, k: int = 11, n: int = 40) -> np.ndarray:
    """Case 2/3 family: Gaussian rows scaled by e^u, u ~ U(-3, 3)."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(-3.0, 3.0, size=k)
    return rng.standard_normal((k, n)) * np.exp(u)[:, None]


# ----------------------------------------------------------------------------------------------
# case 1


CASE1_METHODS = (
    "cagrad",
    "cdtt",
    "edm",
    "mgda_ub",
    "mgda",
    "nash_mtl",
    "upgrad",
    "imtl_g",
    "aligned_mtl",
)


def case_mlp11(quick: bool) -> dict[str, Any]:
    steps = 50 if quick else 200
    k, d_in, hidden, batch = 11, 40, 64, 64
    scales = torch.logspace(-3, 3, k, dtype=torch.float64).tolist()
    x, y = regression_data(11, 1024, d_in, k)
    torch.manual_seed(12)
    init = MultiHeadNet([d_in, hidden, hidden], k).state_dict()
    out: dict[str, Any] = {"dtype": "float32", "steps": steps, "optimizer": "Adam lr 1e-3"}
    parts = []
    for name in CASE1_METHODS:
        model = MultiHeadNet([d_in, hidden, hidden], k)
        model.load_state_dict(init)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        row: dict[str, Any] = {}
        try:
            mto = mtopt.MultiTaskOptimizer(opt, name, shared=model.encoder)
            order = torch.Generator().manual_seed(13)  # same batches for every method
            statuses: Counter[str] = Counter()
            failed = 0
            reported = 0
            start = time.perf_counter()
            for step in range(steps):
                idx = torch.randint(x.shape[0], (batch,), generator=order)
                try:
                    info = mto.step(make_closure(model, mto, x[idx], y[idx], scales))
                except Exception as exc:
                    row["exception_at_step"] = step
                    row.update(first_line(exc))
                    break
                if info.solver is not None:
                    reported += 1
                    statuses[str(info.solver.status)] += 1
                    failed += int(not info.solver.converged)
            row.update(
                {
                    "not_converged": failed,
                    "steps_with_report": reported,
                    "statuses": dict(statuses),
                    "seconds": time.perf_counter() - start,
                }
            )
            if reported == 0 and "exception" not in row:
                part = f"{name} n/a"
            else:
                part = f"{name} {failed}/{reported}"
            if "exception" in row:
                part += f" ({row['exception']} at step {row['exception_at_step']})"
        except Exception as exc:
            row.update(first_line(exc))
            part = f"{name} {row['exception']}"
        out[name] = row
        parts.append(part)
    print(f"  not converged / steps with a solver report ({steps} Adam steps, float32):")
    print("  " + ", ".join(parts))
    return out


# ----------------------------------------------------------------------------------------------
# cases 2 and 3


def exact_cagrad_gain(grads: np.ndarray, g0: np.ndarray, radius: float) -> float:
    """``max t s.t. G d ≥ t, ‖d - g0‖ ≤ radius`` by cvxpy with CLARABEL."""
    import cvxpy as cp

    d = cp.Variable(grads.shape[1])
    t = cp.Variable()
    problem = cp.Problem(cp.Maximize(t), [grads @ d >= t, cp.norm(d - g0, 2) <= radius])
    problem.solve(solver=cp.CLARABEL)
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"cvxpy: {problem.status}")
    return float(t.value)


def case_cagrad_random(quick: bool) -> dict[str, Any]:
    count = 20 if quick else 50
    c = 0.5
    method = mtopt.make("cagrad", c=c, rescale=0, sum_scale=False)
    not_converged = 0
    rows: list[dict[str, Any]] = []
    for seed in range(count):
        grads = random_jacobian(1000 + seed)
        agg = aggregate(method, grads)
        w = agg.weights.detach().double().numpy()
        g0 = grads.mean(axis=0)
        g0_sq = float(g0 @ g0)
        radius = c * math.sqrt(g0_sq)
        d = grads.T @ w
        diff = d - g0
        d_ball = g0 + radius * diff / np.linalg.norm(diff)
        ours = float((grads @ d_ball).min()) / g0_sq
        exact = exact_cagrad_gain(grads, g0, radius) / g0_sq
        shortfall = (exact - ours) / max(abs(exact), 1e-300)
        converged = agg.solver is None or bool(agg.solver.converged)
        not_converged += int(not converged)
        row = {"seed": 1000 + seed, "ours": ours, "exact": exact, "shortfall": shortfall}
        row["converged"] = converged
        if agg.solver is not None:
            row["solver"] = solver_dict(agg.solver)
        rows.append(row)
    example = max(rows, key=lambda r: r["shortfall"])
    trusted = [r for r in rows if r["converged"]]
    example_ok = max(trusted, key=lambda r: r["shortfall"]) if trusted else None
    print(
        f"  gain min_i g_iᵀd_ball/‖g0‖²: {not_converged}/{count} reported not converged; "
        f"worst relative shortfall {example['shortfall']:.3g} (seed {example['seed']}: "
        f"ours {example['ours']:+.4g} vs exact {example['exact']:+.4g}, "
        f"reported converged={example['converged']})"
    )
    if example_ok is not None:
        print(
            f"  among those reported converged: worst shortfall {example_ok['shortfall']:.3g} "
            f"(seed {example_ok['seed']}: ours {example_ok['ours']:+.4g} vs exact "
            f"{example_ok['exact']:+.4g})"
        )
    return {
        "count": count,
        "normalisation": "gain / ‖g0‖²",
        "not_converged": not_converged,
        "worst_relative_shortfall": example["shortfall"],
        "worst_example": example,
        "worst_relative_shortfall_reported_converged": (
            None if example_ok is None else example_ok["shortfall"]
        ),
        "worst_example_reported_converged": example_ok,
        "per_jacobian": rows,
    }


def case_mgda_kkt(quick: bool) -> dict[str, Any]:
    count = 20 if quick else 50
    default_solver = mtopt.make("mgda").hparams.get("solver")
    variants = {
        "pgd": {"solver": "pgd"},
        f"default({default_solver})": {},
        "fw": {"solver": "fw"},
    }
    out: dict[str, Any] = {"count": count, "default_solver": default_solver}
    parts = []
    for label, extra in variants.items():
        row: dict[str, Any] = {}
        try:
            method = mtopt.make("mgda", normalization="none", **extra)
            misses, trusted_misses, statuses = [], [], Counter()
            converged = bad_converged = 0
            for seed in range(count):
                grads = random_jacobian(1000 + seed)
                agg = aggregate(method, grads)
                miss = kkt_miss(grads, agg.weights.detach().double().numpy())
                misses.append(miss)
                ok = bool(agg.solver.converged)
                statuses[str(agg.solver.status)] += 1
                converged += int(ok)
                bad_converged += int(ok and miss < -1e-3)
                if ok:
                    trusted_misses.append(miss)
            worst_ok = min(trusted_misses) if trusted_misses else None
            row = {
                "worst_kkt_miss": min(misses),
                "worst_kkt_miss_reported_converged": worst_ok,
                "reported_converged": converged,
                "converged_but_miss_below_-1e-3": bad_converged,
                "statuses": dict(statuses),
            }
            shown_ok = "n/a" if worst_ok is None else f"{worst_ok:+.3g}"
            parts.append(
                f"{label}: worst miss {min(misses):+.3g} (among converged {shown_ok}), "
                f"converged {converged}/{count} ({bad_converged} of them miss < -1e-3)"
            )
        except Exception as exc:
            row = first_line(exc)
            parts.append(f"{label}: {exc_text(exc)}")
        out[label] = row
    print("  K = 11:\n    " + "\n    ".join(parts))

    # K = 2, a dominated pair: g1ᵀg2 = 3‖g1‖² ≥ ‖g1‖², exact γ = 1 (d = g1)
    grads = np.array([[1.0, 0.0], [3.0, 1.0]])
    pair: dict[str, Any] = {"grads": grads.tolist(), "exact_weights": [1.0, 0.0]}
    parts = []
    for label, extra in (("default", {}), ("pgd", {"solver": "pgd"})):
        try:
            agg = aggregate(mtopt.make("mgda", normalization="none", **extra), grads)
            w = agg.weights.detach().double().numpy()
            miss = kkt_miss(grads, w)
            pair[label] = {"weights": w.tolist(), "solver": solver_dict(agg.solver), "miss": miss}
            parts.append(f"{label}: {agg.solver.status}, w={vec(w)}, KKT miss {miss:+.3g}")
        except Exception as exc:
            pair[label] = first_line(exc)
            parts.append(f"{label}: {exc_text(exc)}")
    out["k2_dominated_pair"] = pair
    print("  K = 2, g1=(1,0), g2=(3,1): " + "; ".join(parts))
    return out


# ----------------------------------------------------------------------------------------------
# case 4


def case_cagrad_scale(quick: bool) -> dict[str, Any]:
    # a generic G with rows of norm about 1 (‖g0‖ ≈ 0.6)
    grads = np.random.default_rng(2).standard_normal((3, 20)) / math.sqrt(20)
    losses = [1.0, 1.0, 1.0]
    method = mtopt.make("cagrad")
    w1 = aggregate(method, grads, losses).weights.detach().double().numpy()
    w2 = aggregate(method, 1e-6 * grads, [1e-6 * v for v in losses]).weights
    w2 = w2.detach().double().numpy()
    change = float(np.max(np.abs(w2 - w1) / np.abs(w1)))
    print(f"  weights on G {vec(w1)} -> on 1e-6·G {vec(w2)}; max relative change {change:.3g}")
    return {"weights_G": w1.tolist(), "weights_1e-6G": w2.tolist(), "max_relative_change": change}


# ----------------------------------------------------------------------------------------------
# case 5


def case_nash_singular(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # (a) task 1's loss reaches only its head: its shared gradient is exactly 0
    x, y = regression_data(5, 32, 8, 2)
    torch.manual_seed(51)
    model = MultiHeadNet([8, 16], 2)
    fixed = torch.randn(32, 16, generator=torch.Generator().manual_seed(52))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mto = mtopt.MultiTaskOptimizer(opt, "nash_mtl", shared=model.encoder)
    closure = make_closure(model, mto, x, y, [1.0, 1.0], head_inputs={1: fixed})
    steps = []
    for step in range(3):
        try:
            info = mto.step(closure)
        except Exception as exc:
            steps.append({"step": step, **first_line(exc)})
            break
        alpha = info.extras.get("nash_alpha", as_list(info.weights))
        steps.append(
            {
                "step": step,
                "alpha": alpha,
                "weights": as_list(info.weights),
                "solver": solver_dict(info.solver),
            }
        )
    bias = max(float(h.bias.detach().abs().max()) for h in model.heads)
    out["head_only_task"] = {"steps": steps, "max_abs_head_bias": bias}
    shown = [
        f"α={vec(s['alpha'])} {s['solver']['status'] if s.get('solver') else '-'}"
        if "alpha" in s
        else f"{s['exception']}: {s['message'][:80]}"
        for s in steps
    ]
    print(f"  head-only task, 3 SGD steps: {'; '.join(shown)}; max |head bias| {bias:.3g}")

    # (b) exactly opposite tasks: ℓ_b = 100 - ℓ_a, every parameter shared
    torch.manual_seed(53)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mto = mtopt.MultiTaskOptimizer(opt, "nash_mtl", shared=net)

    def opposite() -> list[Tensor]:
        loss_a = F.mse_loss(net(x).squeeze(-1), y[:, 0])
        return [loss_a, 100.0 - loss_a]

    steps = []
    for step in range(2):
        try:
            info = mto.step(opposite)
            steps.append(
                {"step": step, "weights": as_list(info.weights), "solver": solver_dict(info.solver)}
            )
        except Exception as exc:
            steps.append({"step": step, **first_line(exc)})
            break
    out["opposite_tasks"] = steps
    shown = [
        f"step {s['step']}: w={vec(s['weights'])} "
        f"{s['solver']['status'] if s.get('solver') else '-'}"
        if "weights" in s
        else f"step {s['step']}: {s['exception']}: {s['message'][:80]}"
        for s in steps
    ]
    print(f"  opposite tasks: {'; '.join(shown)}")
    return out


# ----------------------------------------------------------------------------------------------
# case 6


def case_mgda_scales(quick: bool) -> dict[str, Any]:
    scales = [1e-8, 1e-4, 1.0, 1e4, 1e8]
    k = len(scales)
    x, y = regression_data(6, 64, 10, k)
    torch.manual_seed(61)
    init = MultiHeadNet([10, 16], k).state_dict()
    default_norm = mtopt.make("mgda").hparams.get("normalization")
    out: dict[str, Any] = {"default_normalization": default_norm}
    settings = [
        (f"default({default_norm})", {}, "adam", 1e-3),
        (f"default({default_norm})", {}, "sgd", 1.0),
        ("none", {"normalization": "none"}, "adam", 1e-3),
        ("none", {"normalization": "none"}, "sgd", 1.0),
    ]
    for label, hparams, opt_name, lr in settings:
        key = f"{label}/{opt_name}"
        try:
            model = MultiHeadNet([10, 16], k)
            model.load_state_dict(init)
            shared = list(model.encoder.parameters())
            opt_cls = torch.optim.Adam if opt_name == "adam" else torch.optim.SGD
            opt = opt_cls(model.parameters(), lr=lr)
            mto = mtopt.MultiTaskOptimizer(opt, "mgda", shared=model.encoder, **hparams)
            closure = make_closure(model, mto, x, y, scales)
            jac = own_jacobian(closure().losses, shared)
            before = shared_snapshot(shared)
            info = mto.step(closure)
            moved = shared_snapshot(shared) - before
            w = info.weights.detach().double()
            direction = jac.T @ w
            row = {
                "optimizer": f"{opt_name} lr {lr:g}",
                "solver": solver_dict(info.solver),
                "weights": w.tolist(),
                "shared_change_norm": float(moved.norm()),
                "reported_direction_norm": float(direction.norm()),
            }
            line = (
                f"{key:<22} {solver_text(info.solver)} w={vec(w)} ‖Δθ‖={float(moved.norm()):.3g}"
                f" ‖Gᵀw‖={float(direction.norm()):.3g}"
            )
            if opt_name == "sgd":
                gap = float((moved + lr * direction).norm())
                row["applied_minus_reported"] = gap
                relative = gap / max(lr * float(direction.norm()), 1e-300)
                row["applied_minus_reported_relative"] = relative
                line += f" ‖Δθ+lr·Gᵀw‖={gap:.3g} (relative {relative:.2g})"
            if info.solver is not None and info.solver.message:
                line += f"\n{'':24}message: {info.solver.message[:110]}"
        except Exception as exc:
            row = first_line(exc)
            line = f"{key:<22} {exc_text(exc)}"
        out[key] = row
        print("  " + line)
    return out


# ----------------------------------------------------------------------------------------------
# case 7


def case_zero_task_weights(quick: bool) -> dict[str, Any]:
    k = 3
    x, y = regression_data(7, 32, 8, k)
    fixed = torch.randn(32, 16, generator=torch.Generator().manual_seed(71))
    torch.manual_seed(72)
    init = MultiHeadNet([8, 16], k).state_dict()
    out: dict[str, Any] = {}
    parts = []
    for name in ("cagrad", "nash_mtl", "rotograd"):
        try:
            model = MultiHeadNet([8, 16], k)
            model.load_state_dict(init)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            mto = mtopt.MultiTaskOptimizer(opt, name, shared=model.encoder)
            closure = make_closure(model, mto, x, y, [1.0] * k, head_inputs={2: fixed})
            steps: list[dict[str, Any]] = []
            for step in range(3):
                try:
                    info = mto.step(closure)
                except Exception as exc:
                    steps.append({"step": step, **first_line(exc)})
                    break
                w = info.weights.detach().double()
                steps.append(
                    {
                        "step": step,
                        "weights": w.tolist(),
                        "max_abs_weight": float(w.abs().max()),
                        "solver": solver_dict(info.solver),
                    }
                )
            largest = max((s["max_abs_weight"] for s in steps if "weights" in s), default=None)
            out[name] = {"steps": steps, "max_abs_weight": largest}
            shown = [
                f"{s['max_abs_weight']:.3g}" if "weights" in s else s["exception"] for s in steps
            ]
            first = f" w0={vec(steps[0]['weights'])}" if "weights" in steps[0] else ""
            parts.append(f"{name} max|w| per step {'/'.join(shown)}{first}")
        except Exception as exc:
            out[name] = first_line(exc)
            parts.append(f"{name} {exc_text(exc)}")
    print("  task 2 head-only, 3 SGD steps: " + "; ".join(parts))
    return out


# ----------------------------------------------------------------------------------------------
# case 8


def case_low_precision(quick: bool) -> dict[str, Any]:
    k = 3
    scales = [1.0, 100.0, 3000.0]
    x, y = regression_data(8, 64, 16, k)
    torch.manual_seed(81)
    init = MultiHeadNet([16, 32, 32], k).state_dict()

    # the task-gradient norms, measured on a float32 copy
    ref = MultiHeadNet([16, 32, 32], k)
    ref.load_state_dict(init)
    z = ref.encoder(x)
    losses = [
        s * F.mse_loss(h(z).squeeze(-1), y[:, i])
        for i, (s, h) in enumerate(zip(scales, ref.heads, strict=True))
    ]
    norms = own_jacobian(losses, list(ref.encoder.parameters())).norm(dim=1)
    out: dict[str, Any] = {"grad_norms_float32": norms.tolist()}
    print(f"  float16 model, loss scales {scales}: task-gradient norms (float32) {vec(norms)}")
    for name in ("cagrad", "nash_mtl", "imtl_g", "aligned_mtl", "edm"):
        try:
            model = MultiHeadNet([16, 32, 32], k)
            model.load_state_dict(init)
            model.half()
            shared = list(model.encoder.parameters())
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            mto = mtopt.MultiTaskOptimizer(opt, name, shared=model.encoder)
            before = [p.detach().clone() for p in shared]
            info = mto.step(make_closure(model, mto, x.half(), y.half(), scales))
            changed = any(
                not torch.equal(a, p.detach()) for a, p in zip(before, shared, strict=True)
            )
            out[name] = {
                "weights": as_list(info.weights),
                "solver": solver_dict(info.solver),
                "shared_changed": changed,
            }
            line = (
                f"{name:<12} w={vec(info.weights)} {solver_text(info.solver)} "
                f"shared changed={changed}"
            )
        except Exception as exc:
            out[name] = first_line(exc)
            line = f"{name:<12} {exc_text(exc)}"
        print("    " + line)

    # float32, losses near 3e31
    big = [1e31] * k
    parts = []
    for name in ("imtl_g", "aligned_mtl"):
        key = f"{name}/float32_losses_1e31"
        try:
            model = MultiHeadNet([16, 32, 32], k)
            model.load_state_dict(init)
            shared = list(model.encoder.parameters())
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            mto = mtopt.MultiTaskOptimizer(opt, name, shared=model.encoder)
            before = [p.detach().clone() for p in shared]
            info = mto.step(make_closure(model, mto, x, y, big))
            changed = any(
                not torch.equal(a, p.detach()) for a, p in zip(before, shared, strict=True)
            )
            out[key] = {
                "losses": list(info.losses.values()),
                "weights": as_list(info.weights),
                "solver": solver_dict(info.solver),
                "shared_changed": changed,
            }
            parts.append(f"{name} w={vec(info.weights)} {solver_text(info.solver)}")
        except Exception as exc:
            out[key] = first_line(exc)
            parts.append(f"{name} {exc_text(exc)}")
    print("  float32, losses × 1e31: " + "; ".join(parts))
    return out


# ----------------------------------------------------------------------------------------------
# case 9


def case_rotograd_halfprec(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    x, y = regression_data(9, 32, 4, 2)
    torch.manual_seed(91)
    init = MultiHeadNet([4, 6], 2).state_dict()
    for dtype in (torch.float16, torch.bfloat16):
        label = str(dtype).removeprefix("torch.")
        row: dict[str, Any] = {}
        try:
            model = MultiHeadNet([4, 6], 2)
            model.load_state_dict(init)
            model.to(dtype)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            mto = mtopt.MultiTaskOptimizer(opt, "rotograd", shared=model.encoder)
            closure = make_closure(model, mto, x.to(dtype), y.to(dtype), [1.0, 1.0])
            mto.step(closure)
            generator = getattr(mto.method, "generator", None)
            generator = torch.zeros(0) if generator is None else generator.detach().double()
            gen_nan = int(torch.isnan(generator).sum())
            rotations = mto.method.rotations().detach().double()
            nan = int(torch.isnan(rotations).sum())
            bad = int((~torch.isfinite(rotations)).sum())
            row.update(
                {
                    "entries": rotations.numel(),
                    "generator_nan_after_step0": gen_nan,
                    "rotations_nan_after_step0": nan,
                    "rotations_non_finite": bad,
                }
            )
            try:
                mto.step(closure)
                row["step1"] = "ok"
                step1 = "ok"
            except Exception as exc:
                row["step1"] = first_line(exc)
                step1 = exc_text(exc)
            line = (
                f"{label}: after step 0 NaN in generator {gen_nan}/{generator.numel()}, "
                f"in rotations {nan}/{rotations.numel()}; step 1: {step1}"
            )
        except Exception as exc:
            row.update(first_line(exc))
            line = f"{label}: {exc_text(exc)}"
        out[label] = row
        print("  " + line)
    return out


# ----------------------------------------------------------------------------------------------
# case 10


def toy_losses(p: Tensor) -> tuple[Tensor, Tensor]:
    """The two objectives of the toy example of the CAGrad paper (Liu et al., NeurIPS 2021;
    reused by Nash-MTL and FAMO), written from its formulas: above the x1 axis each task is a
    shifted log-of-absolute-value valley, below it a wide quadratic bowl (minima at x1 = ±7),
    blended by tanh(±x2/2) clipped at 0; the log's argument is floored at 5e-6."""
    x1, x2 = p[0], p[1]
    floor = 5e-6
    upper_1 = torch.log(torch.clamp(torch.abs(-0.5 * (x1 + 7) + torch.tanh(x2)), min=floor)) + 6
    upper_2 = torch.log(torch.clamp(torch.abs(0.5 * (3 - x1) - torch.tanh(x2) + 2), min=floor)) + 6
    lower_1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    lower_2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    up = torch.clamp(torch.tanh(0.5 * x2), min=0)
    down = torch.clamp(torch.tanh(-0.5 * x2), min=0)
    return upper_1 * up + lower_1 * down, upper_2 * up + lower_2 * down


def toy_front_x2() -> float:
    """x2* with ∂f/∂x2 (0, x2*) = 0: at x1 = 0 the two objectives are equal (mirror images), so
    their gradients (∓a, b) cancel exactly when b = 0; Pareto-stationary point of the front."""
    from scipy.optimize import brentq

    def slope(x2: float) -> float:
        p = torch.tensor([0.0, x2], dtype=torch.float64, requires_grad=True)
        f1, _ = toy_losses(p)
        (g,) = torch.autograd.grad(f1, p)
        return float(g[1])

    return float(brentq(slope, -9.0, -7.5, xtol=1e-15))


def authors_cagrad(grads: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """The CAGrad toy script's computation (our transcription): float32 Gram entries, the dual
    minimised over x ∈ [0, 1] by scipy's bounded scalar search, ‖g_w‖ with + 1e-4 under the root
    and in λ's denominator, d = (g0 + λ g_w)/(1 + c). Returns (d, weights) with d = Gᵀw."""
    from scipy.optimize import minimize_scalar

    g = torch.from_numpy(grads).float()
    g11, g12, g22 = (float(g[0] @ g[0]), float(g[0] @ g[1]), float(g[1] @ g[1]))
    coef = c * 0.5 * math.sqrt(g11 + g22 + 2 * g12 + 1e-4)

    def dual(x: float) -> float:
        ww = x * x * g11 + 2 * x * (1 - x) * g12 + (1 - x) ** 2 * g22
        w0 = 0.5 * (x * (g11 + g12) + (1 - x) * (g12 + g22))
        return w0 + coef * math.sqrt(ww + 1e-4)

    x = float(minimize_scalar(dual, bounds=(0, 1), method="bounded").x)
    gw_norm = math.sqrt(x * x * g11 + 2 * x * (1 - x) * g12 + (1 - x) ** 2 * g22 + 1e-4)
    lam = coef / (gw_norm + 1e-4)
    w = np.array([0.5 + lam * x, 0.5 + lam * (1 - x)]) / (1 + c)
    return grads.T @ w, w


def case_toy(quick: bool) -> dict[str, Any]:
    x2_star = toy_front_x2()
    out: dict[str, Any] = {"x2_star": x2_star}
    points = {"front": (0.0, x2_star), "front-1e-3": (0.0, x2_star - 1e-3)}
    for label, point in points.items():
        p = torch.tensor(point, dtype=torch.float32, requires_grad=True)
        f1, f2 = toy_losses(p)
        grads32 = torch.stack([torch.autograd.grad(f, p, retain_graph=True)[0] for f in (f1, f2)])
        grads = grads32.double().numpy()  # exact float32 values
        g0 = grads.mean(axis=0)
        row: dict[str, Any] = {"point": [float(v) for v in p.detach()], "grads": grads.tolist()}
        ref_d, ref_w = authors_cagrad(grads, 0.5)
        row["authors"] = {"weights": ref_w.tolist(), "d_norm": float(np.linalg.norm(ref_d))}
        line = (
            f"{label}: x=({point[0]:g}, {float(p[1]):.6f}) ‖g0‖={np.linalg.norm(g0):.3g}; "
            f"authors w={vec(ref_w)} ‖d‖={np.linalg.norm(ref_d):.3g}"
        )
        for variant, hparams in (
            ("ours", {"c": 0.5}),
            ("ours_toy_scaling", {"c": 0.5, "rescale": 2, "sum_scale": False}),
        ):
            try:
                agg = aggregate(mtopt.make("cagrad", **hparams), grads32)
                w = agg.weights.detach().double().numpy()
                d_norm = float(np.linalg.norm(grads.T @ w))
                ratio = d_norm / float(np.linalg.norm(ref_d))
                row[variant] = {
                    "hparams": hparams,
                    "weights": w.tolist(),
                    "d_norm": d_norm,
                    "d_norm_over_authors": ratio,
                    "solver": solver_dict(agg.solver),
                }
                line += f"\n{'':4}{variant}: w={vec(w)} ‖d‖={d_norm:.3g} ({ratio:.3g}× authors)"
            except Exception as exc:
                row[variant] = first_line(exc)
                line += f"\n{'':4}{variant}: {exc_text(exc)}"
        out[label] = row
        print("  " + line)
    return out


# ----------------------------------------------------------------------------------------------


CASES: list[tuple[str, str, Callable[[bool], dict[str, Any]]]] = [
    ("1_mlp11", "K = 11 MLP, loss scales 1e-3..1e3, Adam", case_mlp11),
    ("2_cagrad_random", "CAGrad worst-task gain vs cvxpy on random K = 11", case_cagrad_random),
    ("3_mgda_kkt", "MGDA min-norm KKT miss on random K = 11, and a K = 2 pair", case_mgda_kkt),
    ("4_cagrad_scale", "CAGrad weights on G and 1e-6·G", case_cagrad_scale),
    ("5_nash_singular", "Nash-MTL with a head-only task / opposite tasks", case_nash_singular),
    ("6_mgda_scales", "MGDA with loss scales 1e-8..1e8, one step", case_mgda_scales),
    ("7_zero_task_weights", "logged weights with a zero-gradient task", case_zero_task_weights),
    ("8_low_precision", "float16 model; float32 with losses ~3e31", case_low_precision),
    ("9_rotograd_halfprec", "RotoGrad rotations under float16 / bfloat16", case_rotograd_halfprec),
    ("10_toy", "CAGrad on the CAGrad paper's toy near the Pareto front", case_toy),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    parser.add_argument("--quick", action="store_true", help="fewer steps and Jacobians")
    parser.add_argument("--only", nargs="*", help="case numbers to run (default: all)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    logging.getLogger("mtopt").setLevel(logging.ERROR)  # non-convergence is counted, not logged
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    print(f"mtopt from {mtopt.__file__}, torch {torch.__version__}, quick={args.quick}")
    results: dict[str, Any] = {
        "meta": {
            "mtopt_file": mtopt.__file__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
            "quick": args.quick,
        },
        "cases": {},
    }
    total = time.perf_counter()
    for key, title, run in CASES:
        number = key.split("_")[0]
        if args.only and number not in args.only:
            continue
        print(f"[{number}] {title}")
        start = time.perf_counter()
        try:
            figures = run(args.quick)
        except Exception as exc:
            figures = first_line(exc)
            print(f"  {exc_text(exc)}")
        figures["seconds"] = time.perf_counter() - start
        results["cases"][key] = figures
    results["meta"]["seconds"] = time.perf_counter() - total
    print(f"total {results['meta']['seconds']:.1f} s")
    with open(args.out, "w") as fh:
        json.dump(jsonable(results), fh, indent=1)
        fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
