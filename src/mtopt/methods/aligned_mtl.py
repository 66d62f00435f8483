r"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023).

Aligns the task gradients by making them orthogonal with equal norms: eigendecompose
:math:`M=V\Lambda V^\top`, keep the eigenpairs with :math:`\lambda>\lambda_{max}K\epsilon_{mach}`
(rank :math:`r`), and set :math:`B=\sqrt s\,V_r\Lambda_r^{-1/2}V_r^\top` with :math:`s` the smallest
kept eigenvalue (``scale_mode="min"``, default), the median or the mean (``"rmse"``). The aligned
gradients are the rows of :math:`BG` (for full rank, :math:`(BG)(BG)^\top=\lambda_{min}I`), and the
shared update is :math:`d=\mathbf 1^\top BG`, i.e. weights :math:`w=B\mathbf 1` (SamsungLabs,
LibMTL; TorchJD uses :math:`B\mathbf 1/K`, available as ``reduction="mean"``). A zero Gram matrix
gives zero weights. Uses ``torch.linalg.eigh`` (the references' ``torch.symeig`` is gone).
``level``: ``param`` (Aligned-MTL) or ``rep`` ("Aligned-MTL-UB"). Heads: raw.
"""

from __future__ import annotations

from typing import Any

import torch

from mtopt.core.method import (
    LEVEL_NEEDS,
    Aggregation,
    Method,
    MethodInput,
    Need,
    as_weights,
    check_choice,
)
from mtopt.core.registry import register
from mtopt.methods.scalarization import REDUCTIONS

SCALE_MODES = ("min", "median", "rmse")


def aligned_weights(gram: torch.Tensor, scale_mode: str = "min") -> tuple[torch.Tensor, int]:
    """``(B·1, rank)`` for a float64 Gram matrix."""
    k = gram.shape[0]
    eigvals, eigvecs = torch.linalg.eigh(gram)
    tol = float(eigvals.max().clamp_min(0)) * k * torch.finfo(gram.dtype).eps
    keep = eigvals > tol
    rank = int(keep.sum())
    if rank == 0:
        return torch.zeros(k, dtype=gram.dtype), 0
    lam, vec = eigvals[keep], eigvecs[:, keep]
    if scale_mode == "min":
        s = lam.min()
    elif scale_mode == "median":
        s = lam.median()
    else:
        s = lam.mean()
    b = torch.sqrt(s) * (vec * lam.rsqrt()) @ vec.T
    return b.sum(dim=1), rank


@register
class AlignedMTL(Method):
    """Aligned-MTL (Senushkin et al. 2023): orthogonal, equal-norm aligned task gradients."""

    gramian_only = True
    name = "aligned_mtl"
    needs = Need.PARAM_GRADS
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        scale_mode: str = "min",
        reduction: str = "sum",
        level: str = "param",
        head_policy: str | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        check_choice(self.name, "scale_mode", scale_mode, SCALE_MODES)
        check_choice(self.name, "reduction", reduction, REDUCTIONS)
        check_choice(self.name, "level", level, tuple(LEVEL_NEEDS))
        self.scale_mode = scale_mode
        self.reduction = reduction
        self.level = level
        self.needs = LEVEL_NEEDS[level]  # type: ignore[misc]

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        gram = inputs.gramian().detach().to(torch.float64).cpu()
        w, rank = aligned_weights(gram, self.scale_mode)
        if self.reduction == "mean":
            w = w / inputs.num_tasks
        extras: dict[str, Any] = {"aligned_rank": rank}
        return Aggregation(as_weights(w, inputs), extras=extras)
