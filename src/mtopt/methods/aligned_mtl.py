r"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023).

Aligns the task gradients by making them orthogonal with equal norms: eigendecompose
:math:`M=V\Lambda V^\top`, keep the eigenpairs with :math:`\lambda>\lambda_{max}K\epsilon_{mach}`
(rank :math:`r`), and set :math:`B=\sqrt s\,V_r\Lambda_r^{-1/2}V_r^\top` with :math:`s` the smallest
kept eigenvalue (``scale_mode="min"``, default), the median or the mean (``"rmse"``). The aligned
gradients are the rows of :math:`BG` (for full rank, :math:`(BG)(BG)^\top=\lambda_{min}I`), and the
shared update is :math:`d=\mathbf 1^\top BG`, i.e. weights :math:`w=B\mathbf 1` (SamsungLabs,
LibMTL; TorchJD uses :math:`B\mathbf 1/K`, available as ``reduction="mean"``). A zero Gram matrix
gives zero weights. Uses ``torch.linalg.eigh`` (the references' ``torch.symeig`` is gone) in
float64 on :math:`M/\max_iM_{ii}` (:math:`B` does not change when :math:`M` is scaled, and the
scaled matrix neither overflows nor underflows whatever the loss scales).
``level``: ``param`` (Aligned-MTL) or ``rep`` ("Aligned-MTL-UB"). Heads: raw.

**Certificate.** The inner solver is the eigendecomposition; ``converged`` means it is
backward-stable to 1e-12: :math:`\max(\|MV-V\Lambda\|_F,\ \|M\|_F\|V^\top V-I\|_F)\le
10^{-12}\|M\|_F` (the report's residual is that maximum over :math:`\|M\|_F`). The aligned
gradients are then exactly orthogonal with equal norms for a matrix within that distance of
:math:`M`.

**Degenerate inputs.** Eigenvalues below :math:`K\epsilon\lambda_{max}` are dropped (rank
:math:`r`, in ``extras["aligned_rank"]``): a zero gradient, duplicates, exact opposites or any
linear dependence lower the rank, and :math:`B` acts on the span of the gradients only (a zero
gradient's weight is then the same as the others' share of the kept eigenvectors, which it
multiplies by 0).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from mtopt.core.method import Aggregation, Method, MethodInput, SolverReport, as_weights
from mtopt.core.registry import register

SCALE_MODES = ("min", "median", "rmse")


#: Backward-error tolerance of the eigendecomposition (relative to ‖M‖_F).
EIGH_RTOL = 1e-12


def aligned_weights(gram: torch.Tensor, scale_mode: str = "min") -> tuple[torch.Tensor, int, float]:
    """``(B·1, rank, residual)`` for a Gram matrix (computed in float64 on ``M / max M_ii``)."""
    k = gram.shape[0]
    gram = gram.detach().to(torch.float64)
    top = float(torch.diagonal(gram).max()) if k else 0.0
    if not top > 0:
        return torch.zeros(k, dtype=torch.float64), 0, 0.0
    m = gram / top
    eigvals, eigvecs = torch.linalg.eigh(m)
    residual = _eigh_residual(m, eigvals, eigvecs)
    tol = float(eigvals.max().clamp_min(0)) * k * torch.finfo(m.dtype).eps
    keep = eigvals > tol
    rank = int(keep.sum())
    if rank == 0:
        return torch.zeros(k, dtype=torch.float64), 0, residual
    lam, vec = eigvals[keep], eigvecs[:, keep]
    if scale_mode == "min":
        s = lam.min()
    elif scale_mode == "median":
        s = lam.median()
    else:
        s = lam.mean()
    b = torch.sqrt(s) * (vec * lam.rsqrt()) @ vec.T
    return b.sum(dim=1), rank, residual


def _eigh_residual(m: torch.Tensor, eigvals: torch.Tensor, eigvecs: torch.Tensor) -> float:
    norm = float(torch.linalg.matrix_norm(m))
    if norm == 0:
        return 0.0
    eye = torch.eye(m.shape[0], dtype=m.dtype)
    fit = float(torch.linalg.matrix_norm(m @ eigvecs - eigvecs * eigvals)) / norm
    orth = float(torch.linalg.matrix_norm(eigvecs.T @ eigvecs - eye))
    value = max(fit, orth)
    return value if math.isfinite(value) else math.inf


@register
class AlignedMTL(Method):
    """Aligned-MTL (Senushkin et al. 2023): orthogonal, equal-norm aligned task gradients."""

    gramian_only = True
    name = "aligned_mtl"
    levels = ("param", "rep")
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        scale_mode: Literal["min", "median", "rmse"] = "min",
        reduction: Literal["sum", "mean"] = "sum",
        level: Literal["param", "rep"] = "param",
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.scale_mode = scale_mode
        self.reduction = reduction
        self.level = level

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        gram = inputs.gramian().detach().cpu()
        w, rank, residual = aligned_weights(gram, self.scale_mode)
        if self.reduction == "mean":
            w = w / inputs.num_tasks
        ok = residual <= EIGH_RTOL
        report = SolverReport(
            "aligned_mtl/eigh",
            ok,
            0,
            "converged" if ok else "inaccurate",
            "" if ok else "the eigendecomposition's backward error exceeds 1e-12 (see residual)",
            residual,
            EIGH_RTOL,
        )
        extras: dict[str, Any] = {"aligned_rank": rank}
        return Aggregation(as_weights(w, inputs), solver=report, extras=extras)
