r"""CAGrad — conflict-averse gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021).

Within the ball :math:`\|d-g_0\|\le c\|g_0\|` around the average gradient
:math:`g_0=\frac1K\sum_ig_i`, CAGrad takes the direction that maximises the worst task's
first-order improvement :math:`\min_ig_i^\top d`. Its dual is a problem on the simplex,

.. math:: w^*=\arg\min_{w\in\Delta}\ g_w^\top g_0+c\|g_0\|\,\|g_w\|,\qquad g_w=G^\top w,

and :math:`d=g_0+c\|g_0\|\,g_{w^*}/\|g_{w^*}\|`. We solve it exactly from the Gram matrix
(:mod:`mtopt.core.ball_maxmin`: a one-parameter family of min-norm problems, an exact active-set
solve per piece, the crossing as the root of a quadratic), with a duality-gap certificate
(``StepInfo.solver.residual``, converged at a relative gap of 1e-10), for any ``c ≥ 0`` and any
number of tasks; the references call scipy's SLSQP (CAGrad, LibMTL) or cvxpy (TorchJD) every
step. The effective weights are :math:`v=\mathbf 1/K+w^*/\tau^*` with
:math:`\tau^*=\|g_{w^*}\|/(c\|g_0\|)`.

Then ``rescale``: 1 ⇒ :math:`d/(1+c^2)` (default), 2 ⇒ :math:`d/(1+c)`, 0 ⇒ none; and the
reference codes multiply by :math:`K` to match the summed loss (``sum_scale=True``, default;
TorchJD omits both factors).

Scale: :math:`d` is homogeneous of degree 1 in :math:`G`, so the weights do not change when every
loss is multiplied by a constant. The references' safeguards (:math:`\sqrt{\|g_0\|^2+10^{-8}}`,
:math:`\|g_w\|+10^{-8}` or :math:`\sqrt{w^\top Mw+10^{-4}}` in the denominator) break that
invariance and, near the Pareto front where :math:`g_w\to0`, decide the step size; we have none.

Degenerate inputs: ``c = 0`` or :math:`g_0=0` gives :math:`d=g_0` (weights :math:`1/K`). When 0
lies in the hull of the gradients and the dual optimum is :math:`g_{w^*}=0` (a zero gradient whose
task the others cannot help, exactly opposite tasks, or any Pareto-stationary point; always the
case for ``c ≥ 1`` once 0 is inside the hull) every direction in the ball with :math:`Gd\ge0` is
optimal: we take the one closest to :math:`g_0`, its projection onto that cone (status
``stationary``). It is :math:`d=0`, the Pareto-stationary point the paper describes for
``c ≥ 1``, when the cone is :math:`\{0\}`, and not otherwise: a zero gradient puts 0 in the
hull while the other tasks may still share a direction of descent, which we then take. A task
with an exactly zero gradient is reported with weight :math:`1/K` (any weight gives the same
:math:`d`). Duplicate tasks are one task counted twice.

Defaults: ``c=0.5`` (LibMTL, Gama & Grassi; the CAGrad repo runs 0.4; Gama & Grassi's grid
{0.2, 0.5, 0.8}). ``max_iter`` bounds the exact QP solves per step (one or two in practice).
Heads: raw.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mtopt.core.ball_maxmin import GAP_RTOL, ball_maxmin
from mtopt.core.hparams import NonNegative, NotBool, PositiveInt
from mtopt.core.method import Aggregation, Method, MethodInput, SolverReport, as_weights
from mtopt.core.registry import register

RESCALES = (0, 1, 2)


@register
class CAGrad(Method):
    """CAGrad (Liu et al. 2021): best worst-task gain in a ball around the mean gradient."""

    gramian_only = True
    name = "cagrad"
    levels = ("param",)
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        c: NonNegative = 0.5,
        rescale: Annotated[Literal[0, 1, 2], NotBool] = 1,
        sum_scale: bool = True,
        max_iter: PositiveInt = 100,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.c = float(c)
        self.rescale = int(rescale)
        self.sum_scale = bool(sum_scale)
        self.max_iter = int(max_iter)
        self._support: tuple[int, ...] = ()

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        gram = inputs.gramian().detach().cpu().double().numpy()
        k = inputs.num_tasks
        result = ball_maxmin(gram, self.c, support=self._support, max_iter=self.max_iter)
        self._support = result.support
        raw = result.weights / {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        if self.sum_scale:
            raw = raw * k
        message = ""
        if not result.converged:
            message = "CAGrad's duality gap exceeds its tolerance; weights are approximate"
        elif result.status == "stationary":
            message = "0 is in the hull of the gradients: d is g0 projected onto {d: Gd ≥ 0}"
        report = SolverReport(
            "cagrad/exact",
            result.converged,
            result.iterations,
            result.status,
            message,
            result.gap,
            GAP_RTOL,
        )
        return Aggregation(
            as_weights(raw, inputs),
            solver=report,
            extras={"cagrad_dual_weights": result.dual.tolist()},
        )

    def _get_state(self) -> dict[str, Any]:
        # the warm start: a resumed run takes the same solver path as an uninterrupted one
        return {"support": list(self._support)}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._support = tuple(int(i) for i in state.get("support", ()))
