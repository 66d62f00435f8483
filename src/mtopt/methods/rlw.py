r"""RLW — Random Loss Weighting (Lin et al., "Reasonable Effectiveness of Random Weighting",
TMLR 2022).

Fresh weights every step, :math:`L=\sum_k\lambda_k\ell_k`:

* ``distribution="normal"``: :math:`\lambda=\mathrm{softmax}(\epsilon)`,
  :math:`\epsilon\sim\mathcal N(0,I_K)`;
* ``distribution="dirichlet"``: :math:`\lambda\sim\mathrm{Dir}(\alpha\mathbf 1)`
  (``alpha=1``: uniform on the simplex).

``sum_to="one"`` (LibMTL, nash-mtl, TorchJD; default) keeps :math:`\sum\lambda=1`;
``sum_to="k"`` rescales to :math:`\sum\lambda=K` (Kurin et al., Gama & Grassi). Randomness comes
from torch's global generator (so ``seed_everything`` makes runs reproducible) unless ``seed`` is
given, in which case the method owns a NumPy generator whose state is part of ``state_dict``.
Heads: weighted.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from mtopt.core.hparams import Positive, Seed
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import register

DISTRIBUTIONS = ("normal", "dirichlet")
SUM_TO = ("one", "k")


@register
class RLW(Method):
    """RLW (Lin et al. 2022): random weights from softmax(N(0, I)) or Dirichlet(α)."""

    name = "rlw"
    levels = ("loss",)

    def __init__(
        self,
        *,
        distribution: Literal["normal", "dirichlet"] = "normal",
        alpha: Positive = 1.0,
        sum_to: Literal["one", "k"] = "one",
        seed: Seed = None,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.distribution = distribution
        self.alpha = float(alpha)
        self.sum_to = sum_to
        self.seed = seed
        self._generator = None if seed is None else np.random.default_rng(seed)

    def sample(self, k: int) -> torch.Tensor:
        """One draw of ``k`` weights summing to 1 (float64)."""
        if self._generator is not None:
            rng = self._generator
            raw = rng.standard_normal(k) if self.distribution == "normal" else None
            if raw is None:
                g = rng.gamma(self.alpha, size=k)
                return torch.from_numpy(g / g.sum())
            return torch.softmax(torch.from_numpy(raw), dim=0)
        if self.distribution == "normal":
            return torch.softmax(torch.randn(k, dtype=torch.float64), dim=0)
        concentration = torch.full((k,), self.alpha, dtype=torch.float64)
        return torch.distributions.Dirichlet(concentration).sample()

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        k = inputs.num_tasks
        w = self.sample(k)
        if self.sum_to == "k":
            w = w * k
        return Aggregation(w.to(inputs.losses.dtype))

    def _get_state(self) -> dict[str, Any]:
        return {} if self._generator is None else {"generator": self._generator.bit_generator.state}

    def _set_state(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            if self._generator is None:
                raise ValueError("rlw: state has a generator but this instance has no seed")
            self._generator.bit_generator.state = state["generator"]
