r"""GradDrop — gradient sign dropout (Chen et al., "Just Pick a Sign", NeurIPS 2020).

Works on the gradients :math:`\nabla_i=\nabla_A\ell_i` at the shared activation :math:`A` (the
representation, shape :math:`B\times F`). Per feature, with the sign-corrected batch sums
:math:`S_i=\sum_b\mathrm{sign}(A_b)\odot\nabla_{i,b}`, the purity
:math:`P=\tfrac12\big(1+\sum_iS_i/(\sum_i|S_i|+\varepsilon)\big)\in[0,1]` and one uniform draw
:math:`U\sim\mathcal U[0,1]^F` shared by the tasks, task :math:`i` keeps its gradient where
:math:`f(P)>U` and :math:`S_i>0`, or :math:`f(P)<U` and :math:`S_i<0` (mask :math:`M_i`,
broadcast over the batch). The new activation gradient is
:math:`\sum_i(\lambda+(1-\lambda)M_i)\odot\nabla_i`, which the engine back-propagates through
the encoder.

Defaults: leak :math:`\lambda=0`, :math:`f` the identity, :math:`\varepsilon=10^{-7}` (paper,
LibMTL, Kurin). Kurin et al.'s variant (used by Gama & Grassi): :math:`f(P)=k(P-\tfrac12)+\tfrac12`
(``k``, 1 by default) and ``renormalize=True`` rescales the output to the norm of
:math:`\sum_i\nabla_i`. SamsungLabs' single global purity and inverted leak are not offered.
Randomness: torch's global generator unless ``seed`` is given. Heads: raw.
"""

from __future__ import annotations

from typing import Literal

import torch

from mtopt.core.hparams import Real, Seed, UnitInterval
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import register
from mtopt.core.seeded import SeededRandomness

_EPS = 1e-7


def graddrop_direction(
    features: torch.Tensor,
    grads: torch.Tensor,
    uniform: torch.Tensor,
    leak: float = 0.0,
    k: float = 1.0,
    renormalize: bool = False,
) -> torch.Tensor:
    """The GradDrop activation gradient (flattened like ``grads`` rows) for one draw ``uniform``."""
    n_tasks = grads.shape[0]
    batch = features.shape[0]
    per_sample = grads.reshape(n_tasks, batch, -1)  # (K, B, F)
    signs = torch.sign(features.reshape(batch, -1)).to(grads.dtype)
    s = (signs[None] * per_sample).sum(dim=1)  # (K, F)
    purity = 0.5 * (1.0 + s.sum(0) / (s.abs().sum(0) + _EPS))
    fp = k * (purity - 0.5) + 0.5
    keep = ((fp > uniform) & (s > 0)) | ((fp < uniform) & (s < 0))  # (K, F)
    factor = leak + (1.0 - leak) * keep.to(grads.dtype)
    out = (factor[:, None, :] * per_sample).sum(0).reshape(-1)
    if renormalize:
        plain = grads.sum(0).norm()
        norm = out.norm()
        if norm > 0:
            out = out * (plain / norm)
    return out


@register
class GradDrop(SeededRandomness, Method):
    """GradDrop (Chen et al. 2020): per-feature sign-consistent dropout of task gradients."""

    name = "graddrop"
    levels = ("rep",)
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        leak: UnitInterval = 0.0,
        k: Real = 1.0,
        renormalize: bool = False,
        seed: Seed = None,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.leak = float(leak)
        self.k = float(k)
        self.renormalize = bool(renormalize)
        self.seed = seed
        self._init_generator(seed)

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        if inputs.features is None or inputs.grads is None:
            raise ValueError("graddrop needs the shared representation (features) and its grads")
        width = inputs.features[0].numel()
        uniform = torch.rand(width, generator=self._generator, dtype=torch.float64)
        uniform = uniform.to(device=inputs.grads.device, dtype=inputs.grads.dtype)
        direction = graddrop_direction(
            inputs.features, inputs.grads, uniform, self.leak, self.k, self.renormalize
        )
        return Aggregation(weights=None, direction=direction)
