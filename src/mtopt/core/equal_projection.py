r"""IMTL-G's equal-projection weights (Liu et al., "Towards Impartial Multi-task Learning",
ICLR 2021), shared by :mod:`mtopt.methods.imtl_g` and :mod:`mtopt.methods.imtl`.

**IMTL-G** finds weights :math:`w` with :math:`\sum_iw_i=1` such that :math:`d=G^\top w` has the
same projection on every unit gradient :math:`u_i=g_i/\|g_i\|` (no sign constraint on :math:`w`).

* ``solver="pinv"`` (default; TorchJD's generalisation, equal to the paper's closed form whenever
  that exists): with :math:`n_i=\|g_i\|` and the cosine matrix :math:`C=N^{-1}MN^{-1}`, the
  projections are :math:`d^\top u_i=(CNw)_i`, so :math:`Nw\propto x=C^{+}\mathbf 1` and
  :math:`w=N^{-1}x/\sum_ix_i/n_i`. For an invertible :math:`M` this is TorchJD's
  :math:`M^{+}\mathrm{diag}(M)^{1/2}`; posed on :math:`C` (unit diagonal) it stays accurate when
  the norms spread over many orders of magnitude, and for a singular :math:`M` the least-squares
  problem is the one on the unit gradients the method is defined by (TorchJD's differs there).
  :math:`C^+` comes from the eigendecomposition of :math:`C`, eigenvalues below
  :math:`K\epsilon\lambda_{max}` dropped.
* ``solver="closed_form"`` (the paper): with :math:`D_i=g_1-g_i`, :math:`U_i=u_1-u_i`,
  :math:`w_{2:K}=g_1^\top U^\top(DU^\top)^{-1}`, :math:`w_1=1-\sum w_{2:K}`, all from the Gram
  matrix; a singular :math:`DU^\top` raises an error (nash-mtl silently adds 1e-8 I).

**Certificate.** The defining equations are checked after the solve: the spread of the
projections, :math:`(\max_iu_i^\top d-\min_iu_i^\top d)/\|d\|` (dimensionless, the products
correctly rounded), must be at most 1e-9 for ``converged``; the report carries it.

**Degenerate inputs.** A task with a zero gradient has no unit gradient: it is left out (weight
0) and the others are equalised. Duplicate gradients are one constraint twice (consistent; they
share the weight). When :math:`C x=\mathbf 1` has no solution (two exactly opposite gradients:
no direction in their span has equal non-zero projections on both) or :math:`\sum_ix_i/n_i=0`
(the weights cannot sum to 1), there is no IMTL-G direction: the weights are 0 (``d = 0``), status
``degenerate`` (a defined outcome, converged), with a message.

IMTL-G's common projection :math:`d^\top u_i` equals :math:`1/\sum_iv_i`; when that sum is
negative, :math:`d` ascends every task's loss (a property of the method, kept as specified): the
step's solver status is then ``ascent`` with a message, so users can see it in ``StepInfo``.

``weight_bound`` (off by default): if :math:`\max_i|w_i|>b` all weights are scaled by
:math:`b/\max_i|w_i|`, which keeps the direction of :math:`d` (hence the equal projections) and only
shortens it; IMTL-G's weights are unbounded, and with many tasks they can overflow a
low-precision model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from mtopt.core import accurate
from mtopt.core.method import SolverReport

SOLVERS = ("pinv", "closed_form")


#: Largest projection spread (relative to ‖d‖) and consistency residual accepted.
IMTL_RTOL = 1e-9


def imtl_g_weights(gram: Tensor, solver: str = "pinv") -> tuple[Tensor, str, float]:
    """IMTL-G weights (sum 1) from a float64 Gram matrix, a status string and the certificate's
    residual (the relative spread of the projections ``dᵀu_i``)."""
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=gram.dtype), "ok", 0.0
    m = gram.detach().cpu().double().numpy()
    sq = np.diagonal(m).copy()
    active = sq > 0
    if solver == "pinv":
        w = np.zeros(k)
        if active.sum() >= 1:
            n = np.sqrt(sq[active])
            cos = m[np.ix_(active, active)] / np.outer(n, n)
            eigvals, eigvecs = np.linalg.eigh(cos)
            keep = eigvals > max(float(eigvals.max()), 0.0) * cos.shape[0] * np.finfo(float).eps
            x = (eigvecs[:, keep] / eigvals[keep]) @ (eigvecs[:, keep].T @ np.ones(n.size))
            consistent = np.abs(accurate.matvec(cos, x) - 1.0).max() <= IMTL_RTOL * max(
                1.0, float(np.abs(x).max())
            )
            total = math.fsum((x / n).tolist())
            if not consistent or not abs(total) > 0:
                return torch.zeros(k, dtype=gram.dtype), "degenerate", 0.0
            w[active] = x / n / total
        status, spread = _status_and_spread(m, w)
        return torch.from_numpy(w).to(gram.dtype), status, spread
    if not active.all():
        raise ValueError("imtl: closed_form needs non-zero gradients (use solver='pinv')")
    norms = torch.sqrt(torch.diagonal(gram))
    # rows D_i = g_1 - g_i, U_j = u_1 - u_j (i, j = 2..K), all inner products from the Gram matrix
    gu = gram / norms[None, :]  # g_aᵀ u_b
    d_u = gu[0, 0] - gu[0, 1:][None, :] - gu[1:, 0][:, None] + gu[1:, 1:]
    g1_u = gu[0, 0] - gu[0, 1:]
    try:
        rest = torch.linalg.solve(d_u.T, g1_u)
    except RuntimeError as exc:  # torch.linalg.LinAlgError
        raise ValueError(
            f"imtl: singular D Uᵀ in the closed form ({exc}); use solver='pinv'"
        ) from exc
    weights = torch.cat([(1 - rest.sum()).reshape(1), rest])
    status, spread = _status_and_spread(m, weights.detach().cpu().double().numpy())
    return weights, status, spread


def _status_and_spread(m: np.ndarray, w: np.ndarray) -> tuple[str, float]:
    """``ascent``/``ok`` from the sign of the common projection, and the certificate
    ``(max_i dᵀu_i − min_i dᵀu_i)/‖d‖`` (0 when ``d = 0``), from one correctly rounded ``Mw``."""
    sq = np.diagonal(m)
    active = sq > 0
    m_w = accurate.matvec(m, w)
    p = m_w[active] / np.sqrt(sq[active])
    if p.size == 0:
        return "ok", 0.0
    status = "ascent" if float(p.mean()) < 0 else "ok"
    norm = math.sqrt(max(accurate.dot(w, m_w), 0.0))
    if norm == 0:
        return status, 0.0
    value = float(p.max() - p.min()) / norm
    return status, (value if math.isfinite(value) else math.inf)


def bound_weights(w: Tensor, bound: float | None) -> Tensor:
    """Scale ``w`` down so that ``max|w_i| ≤ bound`` (direction of ``d = Gᵀw`` unchanged)."""
    if bound is None:
        return w
    largest = float(w.abs().max())
    return w * (bound / largest) if largest > bound else w


def imtl_g_solve(
    gram: Tensor, solver: str = "pinv", weight_bound: float | None = None
) -> tuple[Tensor, SolverReport]:
    """IMTL-G's weights for a float64 Gram matrix, bounded by ``weight_bound``, and the solve's
    certified report."""
    w, status, spread = imtl_g_weights(gram, solver)
    w = bound_weights(w, weight_bound)
    ok = status == "degenerate" or spread <= IMTL_RTOL
    message = {
        "ok": "",
        "degenerate": "no direction has equal non-zero projections on every unit gradient "
        "(opposite gradients, or weights that cannot sum to 1): weights 0",
        "ascent": "the equal-projection direction ascends every task's loss (Σv < 0)",
    }[status]
    if not ok:
        message = "the projections on the unit gradients are not equal (see residual)"
    return w, SolverReport(f"imtl_g/{solver}", ok, 0, status, message, spread, IMTL_RTOL)
