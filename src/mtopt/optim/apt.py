r"""APT: adaptive momentum and light direction preservation (Zhou et al., arXiv 2604.08939).

.. warning::
   EXPERIMENTAL. The paper's full text and code were not available: this is a reconstruction from
   its abstract and third-party summaries, not the authors' algorithm. Every rule
   below is a guess behind a flag; replace it when the real method is known.

**Adaptive momentum.** With :math:`d_t` the gradient the multi-task method left in ``.grad`` and
:math:`m_{t-1}` the momentum buffer (Adam's first moment or Muon's momentum),

.. math::
   \kappa_t = \frac{\langle d_t, m_{t-1}\rangle}{\|d_t\|\,\|m_{t-1}\| + \varepsilon},\qquad
   \beta_t = \beta_{min} + (\beta_{max}-\beta_{min})\,\frac{1+\kappa_t}{2},\qquad
   m_t = \beta_t m_{t-1} + (1-\beta_t)\,d_t,

with :math:`\kappa_t = 1` when :math:`\|m_{t-1}\| = 0` (first step), :math:`\varepsilon=10^{-12}`
and :math:`\beta_t` clamped to :math:`[\beta_{min},\beta_{max}]`. Agreement keeps the memory;
disagreement lets the fresh (de-conflicted) direction through. ``granularity="tensor"`` takes one
:math:`\kappa` per parameter tensor; ``"global"`` one per *parameter group* (inner products and
squared norms summed over the group's parameters that have a gradient), since APT options are
per-group keys and a group is the unit a user switches APT on for (e.g. the shared encoder).

**Light direction preservation** (Muon only), applied to the Newton–Schulz output :math:`O` of the
momentum input :math:`u`, before the shape scaling:

* ``"reinject"``: :math:`O' = (1-\rho)\,O + \rho\,\|O\|_F\,u/\|u\|_F`;
* ``"halfspace"``: if :math:`\langle O, d\rangle_F < 0`, project :math:`O` onto
  :math:`\{X : \langle X, d\rangle_F \ge 0\}`, i.e.
  :math:`O' = O - \frac{\langle O, d\rangle_F}{\|d\|_F^2}\,d`; otherwise :math:`O' = O`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from mtopt.core.checks import check_choice

EPS = 1e-12
GRANULARITIES = ("tensor", "global")
PRESERVE = (None, "reinject", "halfspace")


def agreement(pairs: Iterable[tuple[Tensor, Tensor | None]], eps: float = EPS) -> float:
    r"""Cosine :math:`\kappa` between the gradients and the momentum buffers of ``pairs``
    (``(d, m)``; ``m`` is ``None`` before the first step), pooled over all pairs.

    Returns 1 when every buffer is zero or missing; the result is clamped to ``[-1, 1]``.
    """
    dot = d_sq = m_sq = 0.0
    for d, m in pairs:
        d_sq += float(torch.sum(d * d))
        if m is not None:
            dot += float(torch.sum(d * m))
            m_sq += float(torch.sum(m * m))
    if m_sq == 0.0:
        return 1.0
    return max(-1.0, min(1.0, dot / (d_sq**0.5 * m_sq**0.5 + eps)))


def apt_beta(kappa: float, beta_min: float, beta_max: float) -> float:
    r""":math:`\beta_{min} + (\beta_{max}-\beta_{min})(1+\kappa)/2`, clamped to the range."""
    span = beta_max - beta_min
    if kappa >= 0:  # evaluated from the nearer end, so that κ = ±1 give the ends exactly
        beta = beta_max - span * (1.0 - kappa) / 2.0
    else:
        beta = beta_min + span * (1.0 + kappa) / 2.0
    return min(beta_max, max(beta_min, beta))


def group_betas(
    group: dict[str, Any], pairs: Sequence[tuple[Tensor, Tensor | None]]
) -> list[float]:
    """The momentum coefficient of each ``(d, m)`` pair of an APT group (see the module doc)."""
    lo, hi = group["beta_min"], group["beta_max"]
    if group["granularity"] == "global":
        return [apt_beta(agreement(pairs), lo, hi)] * len(pairs)
    return [apt_beta(agreement([pair]), lo, hi) for pair in pairs]


def reinject(o: Tensor, u: Tensor, rho: float) -> Tensor:
    r""":math:`(1-\rho)\,O + \rho\,\|O\|_F\,u/\|u\|_F` (``O`` unchanged for ``rho == 0``)."""
    if rho == 0.0:
        return o
    return (1.0 - rho) * o + rho * o.norm() * u / u.norm().clamp_min(EPS)


def halfspace(o: Tensor, d: Tensor) -> Tensor:
    r"""Projection of ``O`` onto :math:`\{X : \langle X, d\rangle_F \ge 0\}` (``O`` itself when
    it is already inside; after a projection :math:`\langle O', d\rangle_F = 0` up to rounding)."""
    dot = torch.sum(o * d)
    if not dot < 0:
        return o
    return o - (dot / torch.sum(d * d)) * d


def preserve(kind: str | None, o: Tensor, u: Tensor, d: Tensor, rho: float) -> Tensor:
    """Apply the direction-preservation rule ``kind`` (``None``: none) to the NS output ``o``."""
    if kind == "reinject":
        return reinject(o, u, rho)
    if kind == "halfspace":
        return halfspace(o, d)
    return o


def check_apt_group(owner: str, group: dict[str, Any]) -> None:
    """Validate the APT keys of a parameter group."""
    check_choice(owner, "granularity", group["granularity"], GRANULARITIES)
    lo, hi = group["beta_min"], group["beta_max"]
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"{owner}: need 0 ≤ beta_min ≤ beta_max < 1, got {lo}, {hi}")
    if "preserve" in group:
        check_choice(owner, "preserve", group["preserve"], PRESERVE)
        if not 0.0 <= group["rho"] <= 1.0:
            raise ValueError(f"{owner}: rho must be in [0, 1], got {group['rho']}")


class APTBetasMixin:
    """Adds :meth:`apt_betas` to an optimizer that keeps ``state[p]["apt_beta"]``."""

    state: Any

    def apt_betas(self) -> float | None:
        """Mean over the parameters of the last APT momentum coefficient (``None`` if none)."""
        betas = [s["apt_beta"] for s in self.state.values() if "apt_beta" in s]
        return sum(betas) / len(betas) if betas else None
