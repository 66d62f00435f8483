r"""FAMO — Fast Adaptive Multitask Optimization (Liu, Feng, Stone & Liu, NeurIPS 2023).

Balances the *rates* at which the log-losses fall, with one backward pass per step.
Logits :math:`\xi\in\mathbb R^K` (init 0), :math:`z=\mathrm{softmax}(\xi)`, reference minima
:math:`\ell^*` (``min_losses``, default 0), :math:`D_k=\ell_k-\ell^*_k+10^{-8}`.

* Model step: back-propagate :math:`\sum_k (z_k/c)\log D_k` with :math:`c=\sum_k z_k/D_k`
  (detached), i.e. effective weights :math:`w_k = z_k/(c\,D_k)`, :math:`\sum_k w_k = 1`.
* Logit step (after the optimizer step, on the *same* batch, no grad): with the new losses
  :math:`\ell'`, :math:`\Delta_k=\log D_k-\log D'_k`; set
  :math:`\nabla_\xi = J_{\mathrm{softmax}}(\xi)^\top\Delta` and take one Adam step (lr 0.025,
  weight decay :math:`\gamma`).

This is why FAMO is a :class:`~mtopt.core.capabilities.ClosureMethod`: the engine re-evaluates
the closure after the optimizer step (``after_step``). Defaults: ``gamma=0.01`` (the authors'
method code; their NYUv2/QM9 scripts and LibMTL use 1e-3, another of their configurations 1e-5;
Gama & Grassi's grid is {1e-2, 1e-3, 1e-4}).
No gradient clipping: the authors' released training loop (Liu et al., NeurIPS 2023) calls a
clip to norm 1 on the shared parameters, but before the backward pass of the step, when their
gradients have just been zeroed (or are the previous step's, already used); the gradients the
optimizer then steps with are never clipped, so the clip has no effect on the update. To clip
anyway, ``MultiTaskOptimizer(..., max_grad_norm=1.0)``. Requires :math:`\ell > \ell^*` (checked,
with an error naming the task). Heads: weighted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from mtopt.core.capabilities import ClosureMethod, StepContext
from mtopt.core.checks import require_positive_losses
from mtopt.core.hparams import NonNegative, Positive, Reals
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import register
from mtopt.core.task_vector import TaskVector, VectorAdam

_OFFSET = 1e-8


@register
class FAMO(Method, ClosureMethod):
    """FAMO (Liu et al. 2023): softmax logits steered by the observed log-loss decrease."""

    name = "famo"
    levels = ("loss",)

    def __init__(
        self,
        *,
        gamma: NonNegative = 0.01,
        lr: Positive = 0.025,
        min_losses: Reals | None = None,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.gamma = float(gamma)
        self.lr = float(lr)
        self.min_losses = None if min_losses is None else tuple(float(v) for v in min_losses)
        self._vector = TaskVector(
            "famo", 0.0, lambda ps: VectorAdam(ps, lr=self.lr, weight_decay=self.gamma)
        )
        self._previous: Tensor | None = None

    @property
    def logits(self) -> Tensor | None:
        """The logits ``ξ`` (``None`` before the first step)."""
        return self._vector.value

    def _ensure(self, k: int) -> None:
        self._vector.ensure(k)
        self.check_tasks(k)

    def per_task(self) -> Mapping[str, tuple[float, ...]]:
        return {} if self.min_losses is None else {"min_losses": self.min_losses}

    def _shifted(self, losses: Tensor, names: tuple[str, ...]) -> Tensor:
        losses = losses.detach().to(torch.float64).cpu()
        floor = (
            torch.zeros_like(losses)
            if self.min_losses is None
            else torch.tensor(self.min_losses, dtype=torch.float64)
        )
        require_positive_losses(
            "famo", losses - floor, names, "log(ℓ − ℓ* + 1e-8)", allow_zero=True
        )
        return losses - floor + _OFFSET

    def aggregate(self, inputs: MethodInput) -> Aggregation:
        self._ensure(inputs.num_tasks)
        assert self.logits is not None
        d = self._shifted(inputs.losses, inputs.task_names)
        z = torch.softmax(self.logits.detach(), dim=0)
        c = (z / d).sum()
        self._previous = d
        weights = z / (c * d)
        return Aggregation(weights.to(inputs.losses.dtype), extras={"famo_z": z.tolist()})

    def after_step(self, inputs: MethodInput, context: StepContext) -> dict[str, Any]:
        """FAMO's logit update from the loss decrease on the same batch (the closure re-run
        after the optimizer step)."""
        assert self._previous is not None and self.logits is not None
        with torch.no_grad():
            new = self._shifted(context.evaluate(), inputs.task_names)
        delta = torch.log(self._previous) - torch.log(new)
        with torch.enable_grad():
            z = torch.softmax(self.logits, dim=0)
            (grad,) = torch.autograd.grad(z, self.logits, grad_outputs=delta)
        self._vector.step(grad)
        return {"famo_delta": delta.tolist()}

    def _get_state(self) -> dict[str, Any]:
        return self._vector.state()

    def _set_state(self, state: dict[str, Any]) -> None:
        self._vector.load(state)
