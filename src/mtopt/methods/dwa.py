r"""DWA — Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019).

Tasks whose loss falls more slowly get more weight:
:math:`\lambda_k = K\,\mathrm{softmax}(r/T)_k` with descent-rate ratios :math:`r_k`.

* ``mode="epoch"`` (the paper, LibMTL; default): :math:`r_k=\bar L_k(t-1)/\bar L_k(t-2)` from the
  mean training losses of the previous two epochs; :math:`\lambda=\mathbf 1` in the first two
  epochs; :math:`L=\sum_k\lambda_k\ell_k`. Epoch boundaries come from
  :meth:`MultiTaskOptimizer.end_epoch`.
* ``mode="window"`` (nash-mtl, SamsungLabs): a FIFO of the last :math:`2W` loss vectors (started
  with ones, the current step's losses included); once more than :math:`W` steps have run,
  :math:`r_k` is the mean of the newest :math:`W` over the mean of the oldest :math:`W`; the loss
  is the *mean* :math:`\frac1K\sum_k\lambda_k\ell_k`, so the logged weights are :math:`\lambda/K`.

Defaults: :math:`T=2`, :math:`W=25`. A zero previous mean is guarded by adding 1e-8.
Heads: weighted.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from mtopt.core.capabilities import EpochAware
from mtopt.core.hparams import Positive, PositiveInt
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import register

MODES = ("epoch", "window")
_GUARD = 1e-8


def dwa_weights(ratios: torch.Tensor, temperature: float) -> torch.Tensor:
    """``K · softmax(r / T)``."""
    return ratios.numel() * torch.softmax(ratios / temperature, dim=0)


@register
class DWA(Method, EpochAware):
    """DWA (Liu et al. 2019): weights ``K softmax(r/T)`` from the ratio of recent loss means."""

    name = "dwa"
    levels = ("loss",)

    def __init__(
        self,
        *,
        mode: Literal["epoch", "window"] = "epoch",
        temperature: Positive = 2.0,
        window: PositiveInt = 25,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.mode = mode
        self.temperature = float(temperature)
        self.window = int(window)
        self._epoch_means: list[torch.Tensor] = []  # the last two completed epochs
        self._epoch_sum: torch.Tensor | None = None
        self._epoch_steps = 0
        self._fifo: torch.Tensor | None = None
        self._steps = 0

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        losses = inputs.losses.detach().to(torch.float64).cpu()
        k = inputs.num_tasks
        if self.mode == "epoch":
            self._epoch_sum = (
                losses.clone() if self._epoch_sum is None else self._epoch_sum + losses
            )
            self._epoch_steps += 1
            if len(self._epoch_means) < 2:
                weights = torch.ones(k, dtype=torch.float64)
            else:
                older, newer = self._epoch_means
                weights = dwa_weights(newer / (older + _GUARD), self.temperature)
        else:
            if self._fifo is None:
                self._fifo = torch.ones(2 * self.window, k, dtype=torch.float64)
            self._fifo = torch.cat([self._fifo[1:], losses[None]])
            self._steps += 1
            if self._steps > self.window:
                oldest = self._fifo[: self.window].mean(0)
                newest = self._fifo[self.window :].mean(0)
                weights = dwa_weights(newest / (oldest + _GUARD), self.temperature) / k
            else:
                weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        return Aggregation(weights.to(inputs.losses.dtype))

    def end_epoch(self) -> None:
        if self.mode != "epoch" or self._epoch_sum is None:
            return
        self._epoch_means = [*self._epoch_means, self._epoch_sum / self._epoch_steps][-2:]
        self._epoch_sum, self._epoch_steps = None, 0

    def _get_state(self) -> dict[str, Any]:
        return {
            "epoch_means": [m.tolist() for m in self._epoch_means],
            "epoch_sum": None if self._epoch_sum is None else self._epoch_sum.tolist(),
            "epoch_steps": self._epoch_steps,
            "fifo": None if self._fifo is None else self._fifo.tolist(),
            "steps": self._steps,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        def tensor(v):
            return None if v is None else torch.tensor(v, dtype=torch.float64)

        self._epoch_means = [tensor(m) for m in state["epoch_means"]]
        self._epoch_sum = tensor(state["epoch_sum"])
        self._epoch_steps = int(state["epoch_steps"])
        self._fifo = tensor(state["fifo"])
        self._steps = int(state["steps"])
