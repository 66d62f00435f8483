r"""Muon (Jordan et al. 2024): momentum orthogonalised by Newton–Schulz, with an AdamW auxiliary
group, in one optimizer (the authors' reference implementation is ``KellerJordan/Muon``).

Muon groups (``use_muon=True``: hidden weight matrices, conv kernels viewed as
:math:`(C_{out}, C_{in}k_hk_w)`), per matrix :math:`W` with gradient :math:`g`:

.. math::
   m \leftarrow \beta m + (1-\beta)\,g,\qquad
   u = (1-\beta)\,g + \beta m \ \ (\text{Nesterov; else } u = m),\qquad
   O = s\cdot\mathrm{NS}_5(u),\qquad W \leftarrow W(1-\eta\lambda) - \eta\,O,

with the shape scale :math:`s=\sqrt{\max(1,\text{rows}/\text{cols})}` (``scale_mode="keller"``)
or :math:`s=0.2\sqrt{\max(\text{rows},\text{cols})}` (``"rms_match"``, Moonlight: matches AdamW's
update RMS so AdamW learning rates and decay carry over). AdamW groups (``use_muon=False``:
embeddings, the first and output layers, biases, norm gains) take a bias-corrected AdamW step with
decoupled decay (:func:`mtopt.optim.adam.adam_group_step`, the arithmetic of ``torch.optim.AdamW``).

Parameters whose ``.grad`` is ``None`` are skipped (the reference fills missing gradients with
zeros so that every rank takes part in its distributed all-gather; this single-process version
has no such need, and skipping keeps untouched parameters and their state untouched, as
``torch.optim`` does). The gradient itself is not modified.

Experimental APT options (per group, see :mod:`mtopt.optim.apt`; a RECONSTRUCTION, not the APT
authors' code): ``apt=True`` replaces :math:`\beta` by the cosine-adaptive :math:`\beta_t` (also in
the Nesterov input); in Muon groups ``preserve`` (``None``, ``"reinject"``, ``"halfspace"``)
modifies :math:`\mathrm{NS}_5(u)` before the shape scaling, using ``u`` and the current gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from mtopt.core.checks import check_choice
from mtopt.optim.adam import adam_group_step
from mtopt.optim.apt import APTBetasMixin, check_apt_group, group_betas, preserve

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
SCALE_MODES = ("keller", "rms_match")


def newton_schulz(
    g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    r"""Approximate orthogonalisation :math:`UV^\top` of :math:`g = USV^\top` (the last two
    dimensions; leading dimensions are a batch) by the quintic Newton–Schulz iteration.

    In ``dtype`` (bf16 by default, as the reference): transpose to a wide matrix if rows > cols,
    :math:`X_0 = g/(\|g\|_F + \epsilon)` (so every singular value is ≤ 1), then ``steps`` times

    .. math::
       A = XX^\top,\qquad X \leftarrow aX + (bA + cA^2)X,\qquad (a,b,c) = (3.4445, -4.775, 2.0315).

    Each step maps every singular value by :math:`\sigma\mapsto a\sigma+b\sigma^3+c\sigma^5` and
    leaves the singular vectors alone, so the result is :math:`U\,\phi(S/\|g\|_F)\,V^\top`. The
    coefficients trade exactness for speed: :math:`\phi` pushes small values up fast but
    oscillates around 1 instead of converging: after five steps :math:`\phi` maps
    :math:`[0.01, 1]` into :math:`[0.68, 1.14]` (:math:`[0.003, 1]` into :math:`[0.68, 1.21]`;
    :math:`\phi(10^{-3})\approx 0.47`), so the output is only roughly orthogonal.
    The result has the dtype of ``g``; it is invariant to :math:`g\to cg`, :math:`c>0`, and
    equivariant under orthogonal maps: :math:`\mathrm{NS}(QgR) = Q\,\mathrm{NS}(g)\,R`.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix (ndim ≥ 2), got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


def shape_scale(rows: int, cols: int, mode: str) -> float:
    """The update multiplier of a ``rows × cols`` matrix (module doc)."""
    if mode == "keller":
        return max(1.0, rows / cols) ** 0.5
    return 0.2 * max(rows, cols) ** 0.5


class Muon(APTBetasMixin, torch.optim.Optimizer):
    r"""Muon for the groups with ``use_muon=True`` and AdamW for the others, in one optimizer.

    Args:
        params: parameter groups, typically :func:`muon_param_groups` ``(model, ...)``. A group
            that does not set ``use_muon`` is a Muon group iff all its parameters have
            ``ndim ≥ 2`` and it is not marked ``auxiliary`` (the parameters a multi-task method
            adds, :mod:`mtopt.engine.writeback`), so groups added later by code unaware of Muon
            stay valid; a Muon group with a vector parameter is an error.
        lr, momentum, nesterov, ns_steps, scale_mode: defaults of the Muon groups (0.02, 0.95,
            ``True``, 5, ``"keller"``).
        weight_decay: decoupled decay :math:`W\leftarrow W(1-\eta\lambda)`, default of both kinds.
        adamw_lr, adamw_betas, adamw_eps: defaults of the AdamW groups (3e-4, (0.9, 0.95), 1e-10);
            inside a group the keys are ``lr``, ``betas``, ``eps``.
        apt, beta_min, beta_max, granularity: EXPERIMENTAL APT adaptive momentum
            (:mod:`mtopt.optim.apt`), applied only in the groups where ``apt`` is true (the value
            given here is the default of the groups that do not set it). ``beta_max`` defaults to
            0.95 in Muon groups and to the group's ``betas[0]`` in AdamW groups.
        preserve, rho: EXPERIMENTAL direction preservation of Muon groups with ``apt`` true:
            ``None`` (off), ``"reinject"`` (weight ``rho``) or ``"halfspace"``.
        ns_dtype: compute dtype of the Newton–Schulz iteration (bf16 as the reference;
            ``torch.float32`` for exactness).

    ``step(closure)`` follows ``torch.optim``; ``state_dict``/``load_state_dict`` are
    ``torch.optim.Optimizer``'s. State: ``momentum_buffer`` (Muon), ``step``, ``exp_avg``,
    ``exp_avg_sq`` (AdamW), ``apt_beta`` (last :math:`\beta_t` under APT).

    Example::

        opt = Muon(muon_param_groups(model, output_modules=[model.head]), weight_decay=0.01)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        scale_mode: str = "keller",
        *,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        apt: bool = False,
        beta_min: float = 0.5,
        beta_max: float = 0.95,
        granularity: str = "tensor",
        preserve: str | None = None,
        rho: float = 0.1,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self._kind_defaults: dict[bool, dict[str, Any]] = {
            True: {
                "lr": lr,
                "momentum": momentum,
                "nesterov": nesterov,
                "ns_steps": ns_steps,
                "scale_mode": scale_mode,
                "beta_max": beta_max,
                "preserve": preserve,
                "rho": rho,
                "ns_dtype": ns_dtype,
            },
            False: {"lr": adamw_lr, "betas": tuple(adamw_betas), "eps": adamw_eps},
        }
        defaults = {
            "weight_decay": weight_decay,
            "apt": apt,
            "beta_min": beta_min,
            "granularity": granularity,
        }
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:  # torch's keeps only defaults, state, groups
        return {**super().__getstate__(), "_kind_defaults": self._kind_defaults}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        group["params"] = params
        if "use_muon" not in group:
            # parameters a method adds (``auxiliary``: RotoGrad's rotations) are not hidden
            # weight matrices: AdamW for them
            group["use_muon"] = (
                not group.get("auxiliary", False)
                and bool(params)
                and all(p.ndim >= 2 for p in params)
            )
        use_muon = bool(group["use_muon"])
        for key, value in self._kind_defaults[use_muon].items():
            group.setdefault(key, value)
        if not use_muon:
            group.setdefault("beta_max", group["betas"][0])
        super().add_param_group(group)
        group = self.param_groups[-1]
        if not group["lr"] >= 0 or not group["weight_decay"] >= 0:
            raise ValueError("Muon: lr and weight_decay must be ≥ 0")
        check_apt_group("Muon", group)
        if use_muon:
            check_choice("Muon", "scale_mode", group["scale_mode"], SCALE_MODES)
            if not 0.0 <= group["momentum"] < 1.0:
                raise ValueError(f"Muon: momentum must be in [0, 1), got {group['momentum']}")
            vectors = [tuple(p.shape) for p in params if p.ndim < 2]
            if vectors:
                raise ValueError(
                    f"Muon: parameters of shapes {vectors} are in a use_muon=True group; "
                    "Muon needs matrices (ndim ≥ 2): put them in a use_muon=False (AdamW) group"
                )
        elif not all(0.0 <= b < 1.0 for b in group["betas"]) or not group["eps"] >= 0:
            raise ValueError("Muon: AdamW betas must be in [0, 1) and eps ≥ 0")

    def auxiliary_lr(self) -> float:
        """The learning rate parameters added by a multi-task method are scaled from: the first
        AdamW group's (the AdamW default if there is none), not a hidden matrix's Muon rate."""
        for group in self.param_groups:
            if not group["use_muon"]:
                return float(group["lr"])
        return float(self._kind_defaults[False]["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group_step(group)
            else:
                adam_group_step(group, self.state, decoupled=True)
        return loss

    def _muon_group_step(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        if group["apt"]:
            betas = group_betas(group, [(p.grad, m) for p, m in zip(params, bufs, strict=True)])
        else:
            betas = [group["momentum"]] * len(params)
        lr, wd = group["lr"], group["weight_decay"]
        for p, buf, beta in zip(params, bufs, betas, strict=True):
            g = p.grad
            buf.lerp_(g, 1 - beta)
            u = g.lerp(buf, beta) if group["nesterov"] else buf
            u = u.reshape(len(u), -1)
            o = newton_schulz(u, group["ns_steps"], dtype=group["ns_dtype"])
            if group["apt"]:
                self.state[p]["apt_beta"] = beta
                o = preserve(group["preserve"], o, u, g.reshape(len(g), -1), group["rho"])
            rows, cols = o.shape  # u is a matrix, and so is its orthogonalization
            o = o * shape_scale(rows, cols, group["scale_mode"])
            if wd != 0:
                p.mul_(1 - lr * wd)
            p.add_(o.view_as(p), alpha=-lr)


def muon_param_groups(
    model: nn.Module | Iterable[tuple[str, Tensor]],
    *,
    output_modules: Iterable[nn.Module | Tensor | str] = (),
    first_layer: bool = True,
    muon_lr: float | None = None,
    adamw_lr: float | None = None,
    weight_decay: float | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a Muon group and an AdamW group for :class:`Muon`.

    AdamW gets: every parameter with ``ndim < 2`` (biases, norm gains, scalars); the weights of
    ``nn.Embedding``/``nn.EmbeddingBag`` modules; every parameter of ``output_modules`` (modules,
    parameters, or qualified-name prefixes such as ``"heads.0.2"``; pass the task heads' final
    layers here); and, with ``first_layer=True``, the input layer, taken to be the *first
    parameter with ndim ≥ 2 in* ``named_parameters()`` *order*, i.e. module registration order (a
    heuristic: it is right for encoders whose input layer is registered first, wrong otherwise;
    then pass that layer in ``output_modules`` and set ``first_layer=False``). Everything else
    with ``ndim ≥ 2`` (hidden linear weights, conv kernels) gets Muon.

    Args:
        model: an ``nn.Module`` or ``(name, parameter)`` pairs (then embeddings are not detected
            by type: list them in ``output_modules``).
        muon_lr, adamw_lr: the groups' learning rates; ``weight_decay``: both groups' decoupled
            decay. ``None`` (default) leaves the key out, so that the optimizer's arguments
            apply (``Muon(groups, lr=0.05, weight_decay=0.01)`` works; Muon's defaults are 0.02,
            3e-4 and 0). ``**options``: extra keys for both groups (e.g. ``apt=True``).

    Returns:
        ``[muon_group, adamw_group]`` (an empty one is left out), each with ``use_muon`` set.
        Parameters that do not require grad are left out.
    """
    named: list[tuple[str, Tensor]]
    if isinstance(model, nn.Module):
        named = list(model.named_parameters())
        embedding_kinds = (nn.Embedding, nn.EmbeddingBag)
        embeddings = [m for m in model.modules() if isinstance(m, embedding_kinds)]
        aux_ids = {id(p) for m in embeddings for p in m.parameters()}
    else:
        named = list(model)
        aux_ids = set()
    prefixes: list[str] = []
    for item in output_modules:
        if isinstance(item, str):
            prefixes.append(item)
        elif isinstance(item, nn.Module):
            aux_ids |= {id(p) for p in item.parameters()}
        elif isinstance(item, Tensor):
            aux_ids.add(id(item))
        else:
            raise TypeError(f"output_modules: expected modules, tensors or names, got {item!r}")
    named = [(n, p) for n, p in named if p.requires_grad]
    matrices = [p for _, p in named if p.ndim >= 2]
    if first_layer and matrices:
        aux_ids.add(id(matrices[0]))
    muon: list[Tensor] = []
    adamw: list[Tensor] = []
    for name, p in named:
        in_output = any(name == s or name.startswith(s + ".") for s in prefixes)
        (adamw if p.ndim < 2 or in_output or id(p) in aux_ids else muon).append(p)
    common = {} if weight_decay is None else {"weight_decay": weight_decay}
    groups = []
    for params, use_muon, lr in ((muon, True, muon_lr), (adamw, False, adamw_lr)):
        if params:
            group = {"params": params, "use_muon": use_muon, **common, **options}
            groups.append(group if lr is None else {**group, "lr": lr})
    return groups
