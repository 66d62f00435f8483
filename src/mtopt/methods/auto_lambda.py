r"""Auto-Lambda (Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task
Relationships", TMLR 2022).

Task weights :math:`\lambda` are learned by a one-step look-ahead: they move in the direction that
most lowers the loss on a *meta* batch after a virtual update of the model. Each step, before the
model update (which then uses the new :math:`\lambda`):

1. virtual step on the parameters :math:`\theta` (all of them, shared and task-specific):
   :math:`\theta'=\theta-a(\mu b+\nabla_\theta\sum_i\lambda_i\ell^{tr}_i(\theta)+\omega\theta)`,
   with the base optimizer's learning rate :math:`a`, weight decay :math:`\omega`, and SGD
   momentum :math:`\mu` with its buffer :math:`b` (none for Adam: the virtual step is then plain
   SGD, as in the reference code);
2. :math:`v=\nabla_{\theta'}\sum_i\ell^{meta}_i(\theta')` (every task is primary);
3. finite-difference mixed derivative: :math:`\epsilon=0.01/\|v\|`,
   :math:`h=(\ell^{tr}(\theta+\epsilon v)-\ell^{tr}(\theta-\epsilon v))/(2\epsilon)`;
4. meta-gradient :math:`\nabla_\lambda=-a\,h`; one Adam step on :math:`\lambda`.

The parameters are moved in place through ``.data`` and restored exactly, so the training graph of
the step stays valid and no model copy is needed. The meta batch comes from the training data
(``meta_split="train"``, the original) or the validation split (``"val"``, Gama & Grassi); the
trainer draws it. Defaults: :math:`\lambda_0=0.1`, meta-Adam lr 1e-4 (the NYUv2 setting);
``meta_lr_scale`` sets the meta lr to that multiple of the model lr instead (Gama & Grassi's grid).
``nonnegative`` clamps :math:`\lambda\ge0` (off: the reference leaves it unconstrained).
Heads: weighted by :math:`\lambda`. Cost: about three extra forward and two extra backward passes.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mtopt.core.capabilities import MetaBatchMethod, StepContext
from mtopt.core.hparams import Positive, Real
from mtopt.core.method import Aggregation, Method, MethodInput
from mtopt.core.registry import register
from mtopt.core.task_vector import TaskVector, VectorAdam

META_SPLITS = ("train", "val")


@register
class AutoLambda(Method, MetaBatchMethod):
    """Auto-Lambda (Liu et al. 2022): task weights learned by a one-step look-ahead."""

    name = "auto_lambda"
    levels = ("loss",)

    def __init__(
        self,
        *,
        init: Real = 0.1,
        meta_lr: Positive = 1e-4,
        meta_lr_scale: Positive | None = None,
        meta_split: Literal["train", "val"] = "train",
        nonnegative: bool = False,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.init = float(init)
        self.meta_lr = float(meta_lr)
        self.meta_lr_scale = None if meta_lr_scale is None else float(meta_lr_scale)
        self.meta_split = meta_split
        self.nonnegative = bool(nonnegative)
        self._model_lr = 1.0
        self._vector = TaskVector(
            "auto_lambda", self.init, lambda ps: VectorAdam(ps, lr=self._meta_lr())
        )

    def _meta_lr(self) -> float:
        return self.meta_lr if self.meta_lr_scale is None else self.meta_lr_scale * self._model_lr

    @property
    def lambdas(self) -> Tensor | None:
        """The learned task weights ``λ`` (``None`` before the first step)."""
        return self._vector.value

    def _ensure(self, k: int, model_lr: float) -> None:
        if self._vector.value is None:
            self._model_lr = float(model_lr)
        self._vector.ensure(k)

    def meta_gradient(self, context: StepContext) -> Tensor:
        """``∇_λ`` of the meta loss after a virtual step (finite-difference Hessian product).

        With a learning rate ``a_p`` per parameter the exact form is
        ``∇_λ ℓ^{meta}(θ') = -Σ_p a_p (∂ℓ^{tr}/∂θ_p) v_p``: the difference quotient is taken along
        ``u = a ⊙ v`` (the same points ``θ ± 0.01 v/‖v‖`` as the paper when ``a`` is one number).
        Both evaluations replay the step's random state (same dropout masks), so the difference
        measures the parameter change only.
        """
        assert context.evaluate_meta is not None and self.lambdas is not None
        params = context.parameters
        terms = _virtual_step_terms(context.optimizer, params)
        lam = self.lambdas.detach()
        saved = [p.data.clone() for p in params]
        try:
            with torch.enable_grad():
                train = context.evaluate()
                weighted = (lam.to(device=train.device, dtype=train.dtype) * train).sum()
                grads = context.grad(weighted, params)
            for p, g, (lr, wd, momentum, buf) in zip(params, grads, terms, strict=True):
                step = wd * p.data if g is None else g + wd * p.data
                if buf is not None:
                    step = step + momentum * buf
                p.data.sub_(lr * step)
            with torch.enable_grad():
                meta = context.evaluate_meta().sum()
                v = context.grad(meta, params)
            u = [
                torch.zeros_like(p) if g is None else t[0] * g
                for p, g, t in zip(params, v, terms, strict=True)
            ]
            square = torch.zeros((), dtype=torch.float64)
            for g in u:
                square = square + (g.double() ** 2).sum().cpu()
            norm = float(torch.sqrt(square))
            if not norm > 0:  # no meta signal, or every learning rate is 0
                return torch.zeros_like(self.lambdas.detach())
            eps = 0.01 / norm  # θ ± ε u = θ ± 0.01 v / ‖v‖ when there is one learning rate
            with torch.no_grad():
                for p, s, g in zip(params, saved, u, strict=True):
                    p.data.copy_(s + eps * g)
                plus = context.evaluate().double().cpu()
                for p, s, g in zip(params, saved, u, strict=True):
                    p.data.copy_(s - eps * g)
                minus = context.evaluate().double().cpu()
        finally:
            for p, s in zip(params, saved, strict=True):
                p.data.copy_(s)
        return -(plus - minus) / (2 * eps)

    def aggregate_in_context(self, inputs: MethodInput, context: StepContext) -> Aggregation:
        """One Adam step on λ along the meta-gradient, then λ as the weights."""
        self._ensure(inputs.num_tasks, float(context.optimizer.param_groups[0]["lr"]))
        assert self.lambdas is not None
        grad = self.meta_gradient(context)
        self._vector.step(grad)
        if self.nonnegative:
            with torch.no_grad():
                self.lambdas.clamp_(min=0.0)
        weights = self.lambdas.detach().clone().to(inputs.losses.dtype)
        return Aggregation(weights, extras={"meta_gradient": grad.tolist()})

    def _get_state(self) -> dict[str, Any]:
        state = self._vector.state()
        return {**state, "model_lr": self._model_lr} if state else {}

    def _set_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self._model_lr = float(state.pop("model_lr", 1.0))
        self._vector.load(state)


def _virtual_step_terms(optimizer: Any, params: list[Tensor]) -> list[tuple]:
    """Per parameter: (lr, weight decay, SGD momentum, momentum buffer or None)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p in params:
        group = group_of[id(p)]
        momentum = float(group.get("momentum", 0.0) or 0.0)
        buf = optimizer.state.get(p, {}).get("momentum_buffer") if momentum else None
        out.append(
            (float(group["lr"]), float(group.get("weight_decay", 0.0) or 0.0), momentum, buf)
        )
    return out
