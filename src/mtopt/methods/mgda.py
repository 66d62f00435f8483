r"""MGDA and MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018; Désidéri 2012).

MGDA takes the min-norm element of the convex hull of the (optionally normalised) task gradients,

.. math::  w^* = \arg\min_{w \in \Delta^K} \Big\| \sum_k w_k \, g_k / n_k \Big\|^2 ,

a common descent direction whenever one exists (KKT: :math:`g_i^\top d \ge \|d\|^2`, equality on
the support), and the zero vector at a Pareto-stationary point.

Normalisers :math:`n_k` (``normalization``): ``l2`` :math:`\|g_k\|`; ``loss`` :math:`\ell_k`;
``loss+`` :math:`\ell_k\|g_k\|`; ``none`` 1. ``loss`` and ``loss+`` require positive losses. A zero
gradient is not normalised (as in Gama & Grassi); the solver then returns ``d = 0`` and says so.

How :math:`w^*` is applied (``apply_to``; the reference implementations disagree):
``raw_losses`` (Sener's script, nash-mtl; default) uses :math:`d = \sum w^*_k g_k`, i.e.
back-propagates :math:`\sum w^*_k \ell_k`; ``normalized_grads`` (LibMTL param mode, Gama's MGDA)
uses :math:`d = \sum w^*_k g_k / n_k`. The logged ``weights`` are the effective ones (``w*`` or
``w*/n``) so that ``d = Gᵀw`` always; the simplex weights are in ``extras["simplex_weights"]``.

Defaults: ``normalization="loss+"`` (Sener's ``sample.json`` and Gama & Grassi) and the exact
solver ``solver="wolfe"`` (:mod:`mtopt.core.min_norm`). ``solver="pgd"`` reproduces Sener's
training script (projected gradient, stop at :math:`\|\Delta w\|_1<` ``tol`` = 1e-5 or
``max_iter`` = 250, their 0.001/0.999 pair clamp ``pair_clamp``) and ``"fw"`` their Frank-Wolfe;
every solver is judged by the same KKT certificate (``StepInfo.solver.residual``, converged at
1e-10), so a first-order solve that stops short is reported as ``stalled``. Heads: weighted by
``w`` (Sener, nash-mtl); LibMTL and Gama use ``raw``.

Degenerate inputs. A zero task gradient puts 0 in the hull: ``d = 0`` with ``w = e_i`` (status
``zero_gradient``; tiny gradients are not zero). Duplicate gradients share their weight (any
split gives the same ``d``; the solver keeps one of them in its support); two exactly opposite
gradients, or any set whose hull contains 0, give ``d = 0`` (a Pareto-stationary point) with
the weights of a convex combination that vanishes; a rank-deficient Gramian is no obstacle to
the exact solver.

``level``: ``param`` (the shared parameters' gradients; default) or ``rep`` (the shared
representation's, which is MGDA-UB: :mod:`mtopt.methods.mgda_ub`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from mtopt.core.checks import require_positive_losses
from mtopt.core.hparams import NonNegativeInt, NotBool, Positive
from mtopt.core.method import Aggregation, Method, MethodInput, SolverReport, as_weights
from mtopt.core.min_norm import KKT_RTOL, min_norm_weights
from mtopt.core.registry import register

NORMALIZATIONS = ("l2", "loss", "loss+", "none")
APPLY_TO = ("raw_losses", "normalized_grads")
#: Sener's pair clamp: a float in [0, 0.5) (the two weights are clamped to [c, 1 − c]).
PairClamp = Annotated[float, Field(ge=0, lt=0.5, allow_inf_nan=False), NotBool]


def gradient_normalizers(
    kind: str,
    losses: np.ndarray,
    sq_norms: np.ndarray,
    method: str,
    task_names: tuple[str, ...],
) -> np.ndarray:
    """Per-task normalisers ``n_k`` (1 where a gradient is zero), in float64.

    ``losses`` and ``sq_norms`` are float64 arrays (the ``K`` entries are handled in numpy: a
    torch call costs several microseconds, more than the arithmetic)."""
    if kind in ("loss", "loss+"):
        why = f"normalization={kind!r} divides by the loss (use 'l2' or 'none' otherwise) and"
        require_positive_losses(method, torch.from_numpy(losses), task_names, why)
    norms = np.sqrt(np.maximum(sq_norms, 0.0))
    if kind == "l2":
        n = norms
    elif kind == "loss":
        n = losses.copy()
    elif kind == "loss+":
        n = losses * norms
    else:
        n = np.ones_like(losses)
    return np.where(n > 0, n, 1.0)


@register
class MGDA(Method):
    """MGDA (Sener & Koltun 2018): min-norm combination of the shared-parameter task gradients."""

    gramian_only = True
    name = "mgda"
    levels = ("param", "rep")
    default_head_policy = "weighted"

    def __init__(
        self,
        *,
        level: Literal["param", "rep"] | None = None,
        normalization: Literal["l2", "loss", "loss+", "none"] = "loss+",
        solver: Literal["wolfe", "pgd", "fw"] = "wolfe",
        apply_to: Literal["raw_losses", "normalized_grads"] = "raw_losses",
        max_iter: NonNegativeInt = 250,
        tol: Positive = 1e-5,
        pair_clamp: PairClamp = 1e-3,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        if level is not None:
            self.level = level
        self.normalization = normalization
        self.solver = solver
        self.apply_to = apply_to
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.pair_clamp = float(pair_clamp)
        self._support: list[int] = []  # the exact solver's warm start

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        gram = inputs.gramian().detach().to(torch.float64).cpu().numpy()
        losses = inputs.losses.detach().to(torch.float64).cpu().numpy()
        n = gradient_normalizers(
            self.normalization, losses, np.diagonal(gram), self.name, inputs.task_names
        )
        result = min_norm_weights(
            gram / np.outer(n, n),
            solver=self.solver,
            max_iter=self.max_iter,
            tol=self.tol,
            clamp=self.pair_clamp,
            support=self._support,
        )
        simplex = result.weights
        self._support = [int(i) for i in np.flatnonzero(simplex > 0)]
        effective = simplex / n if self.apply_to == "normalized_grads" else simplex
        report = SolverReport(
            name=f"min_norm/{self.solver}",
            converged=result.converged,
            iterations=result.iterations,
            status=result.status,
            message=_message(result.status, inputs.task_names, simplex),
            residual=result.residual,
            tolerance=KKT_RTOL,
        )
        return Aggregation(
            weights=as_weights(effective, inputs),
            solver=report,
            extras={"simplex_weights": simplex.tolist(), "normalizers": n.tolist()},
        )

    def _get_state(self) -> dict[str, Any]:
        # the warm start: a resumed run takes the same solver path as an uninterrupted one
        return {"support": list(self._support)}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._support = [int(i) for i in state.get("support", [])]


def _message(status: str, names: tuple[str, ...], simplex: np.ndarray) -> str:
    if status == "zero_gradient":
        task = names[int(np.argmax(simplex))]
        return f"task {task!r} has a zero gradient: the min-norm direction is d = 0"
    if status == "max_iter":
        return "min-norm solver hit max_iter; the KKT certificate fails, weights are approximate"
    if status == "stalled":
        return "min-norm solver stopped short of the optimum (KKT certificate fails)"
    return ""
