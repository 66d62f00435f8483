r"""DB-MTL — Dual-Balancing Multi-Task Learning (Lin et al. 2023), as in LibMTL.

Loss balancing by logarithms, gradient balancing by norms. With the gradients of the log-losses
:math:`g^{\log}_i=g_i/(\ell_i+10^{-8})` (no extra backward: the task gradients rescaled), keep an
exponential moving average :math:`\hat g_i\leftarrow g^{\log}_i+\beta_t(\hat g_i-g^{\log}_i)` with
:math:`\beta_t=\beta/t^{\sigma}` (:math:`t` = 1-based step), then rescale every task to the largest
norm: :math:`a_i=\max_j\|\hat g_j\|/(\|\hat g_i\|+10^{-8})`, :math:`d=\sum_ia_i\hat g_i`.

Defaults ``beta=0.9``, ``sigma=0`` (LibMTL). Because :math:`d` uses the averaged gradients it is
not a combination of the current ones: the method returns it as a ``direction``. Heads receive
the gradients of the log-losses (coefficients :math:`1/(\ell_i+10^{-8})`). The buffer
(:math:`K\times D`) lives on the gradients' device and is part of ``state_dict``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mtopt.core.checks import require_positive_losses
from mtopt.core.hparams import HalfOpenUnit, NonNegative
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import register

_EPS = 1e-8


@register
class DBMTL(Method):
    """DB-MTL (Lin et al. 2023): EMA of log-loss gradients, each rescaled to the largest norm."""

    name = "db_mtl"
    levels = ("param",)
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        beta: HalfOpenUnit = 0.9,
        sigma: NonNegative = 0.0,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.beta = float(beta)
        self.sigma = float(sigma)
        self._buffer: Tensor | None = None
        self._steps = 0

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        assert inputs.grads is not None
        losses = inputs.losses.detach()
        require_positive_losses(self.name, losses, inputs.task_names, "log ℓ", allow_zero=True)
        scale = 1.0 / (losses.to(inputs.grads) + _EPS)
        log_grads = inputs.grads.detach() * scale[:, None]
        self._steps += 1
        if self._buffer is None or self._buffer.shape != log_grads.shape:
            if self._buffer is not None:
                raise ValueError(f"db_mtl: buffer shape {tuple(self._buffer.shape)} changed")
            self._buffer = torch.zeros_like(log_grads)
        beta_t = self.beta / self._steps**self.sigma
        self._buffer = log_grads + beta_t * (self._buffer - log_grads)
        norms = self._buffer.norm(dim=1)
        a = norms.max() / (norms + _EPS)
        direction = a @ self._buffer
        return Aggregation(
            weights=None,
            direction=direction,
            head_weights=scale.to(inputs.losses.dtype),
            extras={"db_mtl_scales": a.tolist()},
        )

    def _get_state(self) -> dict[str, Any]:
        return {"buffer": self._buffer, "steps": self._steps}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._buffer = state.get("buffer")
        self._steps = int(state.get("steps", 0))
