r"""PCGrad — projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020).

For each task :math:`i`, start from :math:`\tilde g_i=g_i` and, for every other task :math:`j` in a
fresh random order, if :math:`\tilde g_i^\top g_j<0` remove the conflicting component
:math:`\tilde g_i\leftarrow\tilde g_i-\frac{\tilde g_i^\top g_j}{\|g_j\|^2}g_j` (always against the
*original* :math:`g_j`). Shared update :math:`d=\sum_i\tilde g_i` (``reduction="sum"``, the TF
reference, LibMTL, nash-mtl; default) or the mean (Pytorch-PCGrad).

Computed on the Gram matrix (TorchJD's form): :math:`\tilde g_i=G^\top c^{(i)}`, so every projection
updates a coefficient vector, and :math:`w=\sum_i c^{(i)}` are the effective weights (``d = Gᵀw``).
A task with a zero gradient is never projected against (references add 1e-8 to the norm
instead). Randomness: torch's global generator unless ``seed`` is given. Heads: raw.
"""

from __future__ import annotations

from typing import Literal

import torch

from mtopt.core.hparams import Seed
from mtopt.core.method import Aggregation, Method, MethodInput, as_weights
from mtopt.core.registry import register
from mtopt.core.seeded import SeededRandomness


def pcgrad_weights(gram: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Effective weights of PCGrad for the Gram matrix ``gram`` and each task's visiting order.

    The K·(K−1) projections are scalar updates of a K-vector: done on Python floats (a tensor
    op per scalar would cost more than the arithmetic)."""
    k = gram.shape[0]
    g = gram.tolist()
    total = [0.0] * k
    for i in range(k):
        c = [0.0] * k
        c[i] = 1.0
        for j in orders[i]:
            norm_sq = g[j][j]
            if norm_sq <= 0:
                continue
            row = g[j]
            dot = sum(row[m] * c[m] for m in range(k))  # g_jᵀ g̃_i
            if dot < 0:
                c[j] -= dot / norm_sq
        for m in range(k):
            total[m] += c[m]
    return torch.tensor(total, dtype=gram.dtype)


@register
class PCGrad(SeededRandomness, Method):
    """PCGrad (Yu et al. 2020): project away pairwise gradient conflicts, then sum."""

    gramian_only = True
    name = "pcgrad"
    levels = ("param",)
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        reduction: Literal["sum", "mean"] = "sum",
        seed: Seed = None,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.reduction = reduction
        self.seed = seed
        self._init_generator(seed)

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        gram = inputs.gramian().detach().to(torch.float64).cpu()
        k = inputs.num_tasks
        orders = []
        for i in range(k):
            others = [j for j in range(k) if j != i]
            perm = torch.randperm(k - 1, generator=self._generator).tolist()
            orders.append([others[p] for p in perm])
        w = pcgrad_weights(gram, orders)
        if self.reduction == "mean":
            w = w / k
        return Aggregation(as_weights(w, inputs))
