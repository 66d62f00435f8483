r"""GO4Align (Shen et al., NeurIPS 2024), as the authors' released code computes it.

State: a task distribution :math:`p\in\Delta^K` (uniform at start). Each step, with the detached
losses :math:`\ell`:

1. robust update :math:`p \leftarrow p\odot e^{-\eta\ell}`, renormalised (``eta`` = the code's
   ``robust_step_size``, 1e-4);
2. scale :math:`q_i=\sum_j\ell_j/(\ell_i+10^{-8})` and indicator :math:`\omega_i=q_ip_i`;
3. group the K scalars :math:`\omega_i` into ``num_groups`` clusters; every task takes its
   cluster's mean :math:`\bar\omega_i`; the loss is :math:`\sum_i\bar\omega_i\ell_i`.

With one group (the released code's default, and the only grouping path it can run: its k-means
import is commented out) every task gets :math:`\mathrm{mean}(\omega)`. For ``num_groups ≥ 2`` we
cluster with *exact* one-dimensional k-means (dynamic programming over the sorted values: the
global optimum of the within-group sum of squares, deterministic), which is what a k-means on
scalars aims for; the spectral-clustering and SDP variants of the same file are not offered. The
paper text was not available to us. Requires positive losses. Heads: weighted.

The K-vector arithmetic runs on Python floats (float64, as before on tensors; sums left to
right): for a handful of tasks that costs a few microseconds, where each tensor kernel costs
several of dispatch alone. With one group there is nothing to cluster: the step skips k-means
(whose labels would all be 0) and gives every task :math:`\mathrm{mean}(\omega)` directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from mtopt.core.checks import require_positive_losses
from mtopt.core.hparams import NonNegative, PositiveInt
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import register
from mtopt.core.task_vector import floats_to_tensor


def kmeans_1d(values: np.ndarray, groups: int) -> np.ndarray:
    """Globally optimal 1-D k-means: the label (0..groups-1, by increasing value) of each value."""
    n = values.size
    groups = min(groups, n)
    order = np.argsort(values, kind="stable")
    x = values[order].astype(np.float64)
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])
    # sse[i, j]: within-group sum of squares of the segment x[i:j] (i < j); +inf otherwise
    lo, hi = np.triu_indices(n + 1, k=1)
    sse = np.full((n + 1, n + 1), np.inf)
    diff = s1[hi] - s1[lo]
    sse[lo, hi] = s2[hi] - s2[lo] - diff * diff / (hi - lo)
    # cost[g, j]: least cost of x[:j] in g groups; cut[g, j]: where its last group starts (the
    # first minimiser: argmin returns the first index). cost[g - 1, i] is +inf for i < g - 1.
    cost = np.full((groups + 1, n + 1), np.inf)
    cut = np.zeros((groups + 1, n + 1), dtype=np.int64)
    cost[0, 0] = 0.0
    for g in range(1, groups + 1):
        total = cost[g - 1][:, None] + sse  # [i, j]: last group x[i:j]
        best = np.argmin(total[:, g:], axis=0)
        cut[g, g:] = best
        cost[g, g:] = total[best, np.arange(g, n + 1)]
    labels_sorted = np.empty(n, dtype=np.int64)
    j = n
    for g in range(groups, 0, -1):
        i = cut[g, j]
        labels_sorted[i:j] = g - 1
        j = i
    labels = np.empty(n, dtype=np.int64)
    labels[order] = labels_sorted
    return labels


@register
class GO4Align(Method):
    """GO4Align (Shen et al. 2024): grouped risk-guided weights, as in the released code."""

    name = "go4align"
    levels = ("loss",)

    def __init__(
        self,
        *,
        eta: NonNegative = 1e-4,
        num_groups: PositiveInt = 1,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.eta = float(eta)
        self.num_groups = int(num_groups)
        self._p: list[float] | None = None

    @property
    def p(self) -> torch.Tensor | None:
        """The task distribution :math:`p` (float64; ``None`` before the first step)."""
        return None if self._p is None else torch.tensor(self._p, dtype=torch.float64)

    @p.setter
    def p(self, value: torch.Tensor | Sequence[float] | None) -> None:
        self._p = None if value is None else [float(v) for v in value]

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        losses = inputs.losses.detach().cpu().tolist()
        if not all(v >= 0 for v in losses):  # the error, naming the tasks (NaN fails too)
            why = "the loss ratios"
            require_positive_losses(
                self.name, inputs.losses, inputs.task_names, why, allow_zero=True
            )
        k = len(losses)
        if self._p is None:
            self._p = [1.0 / k] * k
        elif len(self._p) != k:
            raise ValueError(f"go4align: built for {len(self._p)} tasks, got {k}")
        eta = self.eta
        p = [pk * math.exp(-eta * ell) for pk, ell in zip(self._p, losses, strict=True)]
        total = sum(p)  # 0 only if every factor underflows: NaN weights, as 0/0 on tensors
        self._p = p = [x / total for x in p] if total > 0 else [math.nan] * k
        loss_sum = sum(losses)
        omega = [loss_sum / (ell + 1e-8) * pk for ell, pk in zip(losses, p, strict=True)]
        if min(self.num_groups, k) == 1:
            weights = floats_to_tensor([sum(omega) / k] * k, inputs.losses.dtype)
            groups = [0] * k
        else:
            labels = kmeans_1d(np.array(omega), self.num_groups).tolist()
            means: dict[int, float] = {}
            for g in set(labels):
                members = [w for w, lab in zip(omega, labels, strict=True) if lab == g]
                means[g] = sum(members) / len(members)
            weights = floats_to_tensor([means[g] for g in labels], inputs.losses.dtype)
            groups = labels
        return Aggregation(weights, extras={"go4align_omega": omega, "go4align_groups": groups})

    def _get_state(self) -> dict[str, Any]:
        return {} if self._p is None else {"p": list(self._p)}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.p = state["p"] if state else None
