r"""Correctly rounded dot products, matrix-vector products and quadratic forms in float64.

Certificates judge solutions whose interesting quantities are small differences of large
numbers: a gain :math:`g_i^\top d` near zero, the norm :math:`\|G^\top w\|` of a nearly
cancelling combination. Computed naively from the Gram matrix, such a value carries an absolute
error of about :math:`\epsilon\sum_j|M_{ij}w_j|`, which can exceed the value itself. Here every
product is split exactly into two floats (Dekker's *TwoProduct*: :math:`xy=p+e` with
:math:`p=\mathrm{fl}(xy)`, by Veltkamp splitting, exact barring overflow and underflow) and the
resulting terms are summed by :func:`math.fsum` (exactly rounded), so the result is the exact
value of the expression for the given float inputs, rounded once. Cost: a few vectorised numpy
operations on ``K × K`` arrays and one ``fsum`` per output entry; meant for ``K`` up to a few
hundred, after a solve, not inside one.
"""

from __future__ import annotations

import math

import numpy as np

_SPLIT = 134217729.0  # 2**27 + 1


def _split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = _SPLIT * x
    hi = c - (c - x)
    return hi, x - hi


def two_product(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(p, e)`` with ``p = fl(x·y)`` and ``x·y = p + e`` exactly (element-wise, broadcast)."""
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    p = x * y
    xh, xl = _split(x)
    yh, yl = _split(y)
    e = ((xh * yh - p) + xh * yl + xl * yh) + xl * yl
    return p, e


def dot(x: np.ndarray, y: np.ndarray) -> float:
    """``Σ x_i y_i``, correctly rounded."""
    p, e = two_product(x, y)
    return math.fsum(np.concatenate([p.ravel(), e.ravel()]).tolist())


def matvec(M: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``M @ x``, each entry correctly rounded."""
    p, e = two_product(M, np.asarray(x, dtype=np.float64)[None, :])
    terms = np.concatenate([p, e], axis=1).tolist()
    return np.array([math.fsum(row) for row in terms])


def quad(M: np.ndarray, x: np.ndarray, y: np.ndarray | None = None) -> float:
    """``xᵀ M y`` (``y = x`` by default) as ``dot(x, matvec(M, y))``: each ``(My)_i`` correctly
    rounded, then the outer sum exactly. The error is at most ``u Σ_i |x_i (My)_i|`` (``u`` the
    unit roundoff): for a Gram matrix, ``u ‖u_x‖ Σ_i |x_i| ‖g_i‖`` where the naive product has
    ``u (Σ_i |x_i| ‖g_i‖)²``, so a small norm ``‖Gᵀx‖`` keeps its relative accuracy."""
    x = np.asarray(x, dtype=np.float64)
    y = x if y is None else np.asarray(y, dtype=np.float64)
    return dot(x, matvec(M, y))
