r"""Hybrid IMTL, the main method of Impartial Multi-Task Learning (Liu et al., "Towards
Impartial Multi-task Learning", ICLR 2021): IMTL-G on the gradients of IMTL-L's scaled losses.

Learned scales :math:`s` (IMTL-L, :math:`\tilde\ell_k=e^{s_k}\ell_k-s_k`, stationary at
:math:`e^{s_k}\ell_k=1`) and IMTL-G (:mod:`mtopt.core.equal_projection`) applied to the gradients
of the scaled losses :math:`e^{s_k}g_k`; shared update :math:`\sum_kw_ke^{s_k}g_k`; the heads
receive the raw gradients of the scaled losses (coefficients :math:`e^{s_k}`); :math:`s` takes an
Adam step (lr 0.025 by default) on :math:`\partial/\partial s_k=e^{s_k}\ell_k-1`.

``level``: ``rep`` (the representation's gradients, as in the paper, Kurin et al. and Gama &
Grassi; default) or ``param`` (the shared parameters'). ``solver`` and ``weight_bound`` as in
:mod:`mtopt.methods.imtl_g`. Needs non-negative losses. Heads: raw, scaled by :math:`e^{s_k}`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mtopt.core.checks import require_positive_losses
from mtopt.core.equal_projection import imtl_g_solve
from mtopt.core.hparams import Positive
from mtopt.core.method import Aggregation, MethodInput, as_weights
from mtopt.core.registry import register
from mtopt.core.task_vector import TaskVector, VectorAdam
from mtopt.methods.imtl_g import IMTLG


@register
class IMTL(IMTLG):
    """Hybrid IMTL (Liu et al. 2021): IMTL-G on the gradients of IMTL-L's scaled losses."""

    name = "imtl"
    levels = ("rep", "param")

    def __init__(
        self,
        *,
        level: Literal["param", "rep"] | None = None,
        solver: Literal["pinv", "closed_form"] = "pinv",
        weight_bound: Positive | None = None,
        lr: Positive = 0.025,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(
            level=level, solver=solver, weight_bound=weight_bound, head_policy=head_policy
        )
        self.lr = float(lr)
        self._vector = TaskVector("imtl", 0.0, lambda ps: VectorAdam(ps, lr=self.lr))

    @property
    def scales(self) -> Tensor | None:
        """The learned log-scales ``s`` (``None`` before the first step)."""
        return self._vector.value

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        losses = inputs.losses.detach().to(torch.float64).cpu()
        require_positive_losses(
            self.name, losses, inputs.task_names, "the scale e^{s}ℓ", allow_zero=True
        )
        s = self._vector.ensure(inputs.num_tasks).detach().clone()
        factor = torch.exp(s)
        gram = inputs.gramian().detach().to(torch.float64).cpu() * torch.outer(factor, factor)
        w, report = imtl_g_solve(gram, self.solver, self.weight_bound)
        self._vector.step(factor * losses - 1.0)
        return Aggregation(
            as_weights(w * factor, inputs),
            solver=report,
            head_weights=factor.to(dtype=inputs.losses.dtype),
            extras={"imtl_g_weights": w.tolist(), "scales": s.tolist()},
        )

    def _get_state(self) -> dict[str, Any]:
        return self._vector.state()

    def _set_state(self, state: dict[str, Any]) -> None:
        self._vector.load(state)
