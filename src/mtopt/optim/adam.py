r"""Adam with an optional (experimental) APT adaptive first-moment coefficient.

Per parameter, with gradient :math:`g_t` (plus :math:`\lambda W` for L2 ``weight_decay``, as in
``torch.optim.Adam``):

.. math::
   m_t = \beta_t m_{t-1} + (1-\beta_t)\,g_t,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2,\qquad
   W \leftarrow W - \eta\,\frac{m_t / (1-\prod_{s\le t}\beta_s)}
   {\sqrt{v_t/(1-\beta_2^t)} + \epsilon},

with :math:`\beta_t = \beta_1` (so :math:`\prod_s\beta_s=\beta_1^t`) unless ``apt=True``, in which
case :math:`\beta_t\in[\beta_{min},\beta_{max}]` follows the cosine rule of :mod:`mtopt.optim.apt`
(EXPERIMENTAL: a reconstruction, not the APT authors' code). With ``apt=False`` the arithmetic is
that of ``torch.optim.Adam``'s single-tensor path, operation for operation, so the two agree bit for
bit; the AdamW groups of :class:`~mtopt.optim.Muon` use the same update with decoupled decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from mtopt.optim.apt import APTBetasMixin, check_apt_group, group_betas


def adam_group_step(group: dict[str, Any], state: dict[Tensor, Any], *, decoupled: bool) -> None:
    """One Adam (``decoupled=False``: L2 in the gradient) or AdamW step on every parameter of
    ``group`` that has a gradient. Parameters without a gradient are skipped."""
    params = [p for p in group["params"] if p.grad is not None]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    grads = []
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError("mtopt.optim: sparse gradients are not supported")
        st = state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grads.append(p.grad if decoupled or wd == 0 else p.grad.add(p, alpha=wd))
    if group["apt"]:
        betas = group_betas(
            group, [(g, state[p]["exp_avg"]) for p, g in zip(params, grads, strict=True)]
        )
    else:
        betas = [beta1] * len(params)
    for p, grad, beta in zip(params, grads, betas, strict=True):
        st = state[p]
        st["step"] += 1
        step = st["step"]
        if decoupled and wd != 0:
            p.mul_(1 - lr * wd)
        st["exp_avg"].lerp_(grad, 1 - beta)
        st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if group["apt"]:
            st["apt_beta"] = beta
            if group["beta_min"] == group["beta_max"]:  # closed form, exactly as the base rule
                st["apt_beta_prod"] = beta**step
            else:
                st["apt_beta_prod"] = st.get("apt_beta_prod", 1.0) * beta
            bias_correction1 = 1 - st["apt_beta_prod"]
        else:
            bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (st["exp_avg_sq"].sqrt() / bias_correction2**0.5).add_(eps)
        p.addcdiv_(st["exp_avg"], denom, value=-step_size)


class Adam(APTBetasMixin, torch.optim.Optimizer):
    r"""``torch.optim.Adam`` (L2 ``weight_decay`` added to the gradient) plus the EXPERIMENTAL APT
    adaptive first moment.

    Args:
        params: parameters or parameter groups (groups may set every option below).
        lr, betas, eps, weight_decay: as ``torch.optim.Adam``.
        apt: replace :math:`\beta_1` by the APT coefficient :math:`\beta_t` (module doc) in the
            groups that do not set ``apt`` themselves; bias correction uses
            :math:`1-\prod_s\beta_s`. The cosine uses the gradient after the L2 term.
        beta_min, beta_max: range of :math:`\beta_t` (guesses: 0.5 and 0.9). With
            ``beta_min == beta_max == betas[0]`` the optimizer is ``torch.optim.Adam`` exactly.
        granularity: ``"tensor"`` (one cosine per parameter) or ``"global"`` (one per group).

    The last :math:`\beta_t` of each parameter is kept in ``state[p]["apt_beta"]``;
    :meth:`apt_betas` averages them for logging. ``amsgrad``, ``maximize`` and sparse gradients
    are not supported.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        apt: bool = False,
        beta_min: float = 0.5,
        beta_max: float = 0.9,
        granularity: str = "tensor",
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "apt": apt,
            "beta_min": beta_min,
            "beta_max": beta_max,
            "granularity": granularity,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not group["lr"] >= 0 or not group["eps"] >= 0 or not group["weight_decay"] >= 0:
            raise ValueError("Adam: lr, eps and weight_decay must be ≥ 0")
        if not all(0.0 <= b < 1.0 for b in group["betas"]):
            raise ValueError(f"Adam: betas must be in [0, 1), got {group['betas']}")
        check_apt_group("Adam", group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            adam_group_step(group, self.state, decoupled=False)
        return loss
