r"""The Gramian engine: ``M = J Jᵀ`` of the per-task gradients, accumulated module by module.

Most gradient-balancing methods (MGDA, CAGrad, IMTL-G, Nash-MTL, EDM, Aligned-MTL, UPGrad,
PCGrad, CDTT) combine the rows of the ``K × D`` Jacobian ``J`` (row ``k`` = ``∇_θ ℓ_k`` over the
shared parameters ``θ``) with weights ``w`` that depend only on the ``K × K`` Gramian
``M = J Jᵀ``. Their update ``d = Jᵀ w`` is then the gradient of ``Σ_k w_k ℓ_k``: one ordinary
backward pass. So ``J`` itself never has to exist; only ``M`` does, and ``M`` is a sum over the
parameter tensors,

.. math::  M = \sum_p J_p J_p^\top ,\qquad J_p \in \mathbb{R}^{K \times |p|},

which this engine accumulates one module at a time (the idea of TorchJD's ``autogram``, written
here for K scalar task losses):

1. While the user's closure runs, forward hooks on the modules that own shared parameters record
   every call: its inputs and the autograd edge of each output ``y``.
2. One backward pass with K batched cotangents (``autograd.grad(..., is_grads_batched=True)``,
   seeded with the identity) gives ``C = ∂ℓ/∂y ∈ ℝ^{K × shape(y)}`` at every recorded output. It
   computes activation gradients only; no parameter gradient is formed. Given the features
   ``z`` through which alone the losses reach the shared parameters, the pass starts at ``z``
   with the K rows ``∂ℓ_k/∂z`` (taken one task at a time), so that the heads and losses are not
   differentiated once per cotangent row (:func:`~mtopt.core.gradients.only_through`).
3. Per module, ``J_p`` of its own parameters follows from its inputs and ``C``:

   * ``nn.Linear``, ``y = x Wᵀ + b`` with the rows of every call stacked into ``X ∈ ℝ^{N×i}``
     and ``C_k ∈ ℝ^{N×o}``: ``J_k = [C_kᵀ X, C_kᵀ 1]``. Either formed explicitly
     (``K·N·o·i`` multiply-adds), or folded through the ``N × N`` kernel
     ``M_{kl} += ⟨C_k, (X Xᵀ + 1 1ᵀ) C_l⟩`` (``N²(i + K·o)``), whichever costs less;
   * ``nn.Conv1d/2d/3d`` (``groups=1``, numeric padding, zero padding mode): the weight rows
     of all K cotangents from one ``convolution_backward`` (the K cotangents folded into the
     output channels), the bias rows from a sum;
   * any other module: ``torch.func.vjp`` of its forward re-run functionally (its buffers
     cloned, so running statistics are not updated twice), vmapped over the K cotangents.
     Such a module must be deterministic (no dropout inside a module that owns parameters).

   Shared parameters that no recorded module owns (used outside any module call) get their rows
   straight from step 2.
4. The method turns ``M`` into weights ``w``; :meth:`GramianEngine.write_grads` then sets
   ``p.grad = Σ_k w_k ∂ℓ_k/∂p = (Jᵀ w)_p`` from the kept cotangents: per module one weighted
   parameter-gradient product with ``Σ_k w_k C_k`` (no second pass through the network).

Memory: the K cotangents of the recorded outputs (held from step 2 to step 4) and one module's
``J_p`` at a time, instead of the whole ``K × D`` Jacobian. Time: step 2 costs about K
activation-gradient passes (batched into one), step 3 about K parameter-gradient passes, step 4
about one. The K-call Jacobian costs K full backward passes, so neither dominates everywhere:
``docs/benchmarks.md`` has the measurements (on a 2-core CPU the Gramian engine is faster on an
MLP with K = 11 and slower on convolutional encoders, where batched pooling/convolution
backward passes are slow on the CPU).

Limitation (as for TorchJD's autogram): a shared parameter owned by a module must only be used
through that module's forward (no tied weights read as ``other.weight`` elsewhere).
:meth:`GramianEngine.verify` checks ``diag M`` against ``‖∇ℓ_k‖²`` from autograd and says which
task disagrees; the optimizer runs it on the first step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten

from mtopt.core.gradients import (
    HeadGrads,
    batched_grads,
    float64_gram,
    gram_product,
    needs_float64,
)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Given the weights ``w``, the ``(parameter, Σ_k w_k ∂ℓ_k/∂parameter)`` pairs of one module call.
_Pending = Callable[[Tensor], list[tuple[Tensor, Tensor]]]


@dataclass
class _Call:
    """One recorded forward call of a module that owns shared parameters."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    positions: list[int]  # which leaves of the output pytree are differentiable tensors
    edges: list[GradientEdge]
    shapes: list[torch.Size]


class GramianEngine:
    """Accumulate ``M = J Jᵀ`` of K losses with respect to the parameters of ``modules``.

    Args:
        modules: the shared part of the model (one module or several); every submodule that
            owns one of ``params`` is hooked.
        params: the shared parameters (those that define ``J``'s columns).
        keep_bytes: how many bytes of per-module Jacobian rows formed in step 3 may be kept for
            :meth:`write_grads` (a product with ``w`` instead of a weighted parameter-gradient
            pass); 0 keeps none, so only cotangents are held.

    Usage: ``with engine.record(): losses = closure()``, then ``engine.gramian(losses)``.
    """

    def __init__(
        self, modules: Sequence[nn.Module], params: Sequence[Tensor], keep_bytes: int = 0
    ) -> None:
        if not params:
            raise ValueError("the Gramian engine needs at least one shared parameter")
        self.params = list(params)
        wanted = {id(p) for p in self.params}
        self._owned: dict[nn.Module, list[tuple[str, Tensor]]] = {}
        owned_ids: set[int] = set()
        for root in modules:
            for module in root.modules():
                if module in self._owned:
                    continue
                direct: list[tuple[str, Tensor]] = [
                    (n, p)
                    for n, p in module.named_parameters(recurse=False)
                    if id(p) in wanted and id(p) not in owned_ids
                ]
                if direct:
                    self._owned[module] = direct
                    owned_ids.update(id(p) for _, p in direct)
        #: shared parameters that no hooked module owns: their rows come from the batched pass
        self.unowned = [p for p in self.params if id(p) not in owned_ids]
        self._calls: list[_Call] = []
        self._pending: list[_Pending] = []
        self._batched = True
        self.keep_bytes = int(keep_bytes)
        #: machine epsilon of the coarsest float of the last recorded forward and backward
        self.working_eps = 0.0
        self._kept_bytes = 0

    @property
    def modules(self) -> list[nn.Module]:
        """The hooked modules (those that directly own shared parameters)."""
        return list(self._owned)

    # -- recording ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        """Record the calls of the hooked modules made inside the block (clears older ones)."""
        self._calls.clear()
        handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self._owned]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def clear(self) -> None:
        """Drop the recorded calls and kept cotangents (and the references they hold)."""
        self._calls.clear()
        self._pending = []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        leaves, _ = tree_flatten(output)
        positions = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad]
        if not positions:
            return
        self._calls.append(
            _Call(
                module,
                args,
                kwargs,
                positions,
                [get_gradient_edge(leaves[i]) for i in positions],
                [leaves[i].shape for i in positions],
            )
        )

    # -- the Gramian -------------------------------------------------------------------------
    def gramian(
        self,
        losses: Sequence[Tensor],
        features: Tensor | None = None,
        heads: HeadGrads | None = None,
    ) -> Tensor:
        """``M = J Jᵀ`` (``K × K``, float64) for the losses of the recorded forward: each
        module's contribution is formed in float32 at least, with power-of-two scaling where
        its rows would overflow or underflow (:func:`~mtopt.core.gradients.gram_matrix`), and
        accumulated in float64. Keeps the cotangents until :meth:`write_grads` (or
        :meth:`clear`); the autograd graph is retained. With ``features`` (the shared
        representation ``z``) through which alone the losses reach the shared parameters
        (:func:`~mtopt.core.gradients.only_through`), the K cotangents start at ``z``
        (``∂ℓ_k/∂z``, one task at a time) rather than at the losses, so that the heads and the
        losses are not differentiated once per cotangent row. Where the cotangents are taken
        task by task (from ``z``, or by K passes), those passes also fill ``heads``
        (:class:`~mtopt.core.gradients.HeadGrads`)."""
        num_tasks = len(losses)
        ref = self.params[0]
        gram = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=ref.device)
        self._pending = []
        self._kept_bytes = 0
        calls = self._calls
        edges = [e for call in calls for e in call.edges]
        if not edges and not self.unowned:
            return gram
        cotangents = self._cotangents(losses, edges + self.unowned, features, heads)
        # the coarsest float the forward and backward ran in (bfloat16 under autocast, say)
        floats = [c.dtype for c in cotangents if c is not None] + [
            a.dtype for call in calls for a in call.args if isinstance(a, Tensor)
        ]
        self.working_eps = max(
            (torch.finfo(d).eps for d in floats if d.is_floating_point), default=0.0
        )
        per_call: list[list[Tensor | None]] = []
        offset = 0
        for call in calls:
            per_call.append(list(cotangents[offset : offset + len(call.edges)]))
            offset += len(call.edges)
        # each contribution in float32 at least; the thunks form it again in float64 when the
        # sum turns out unresolved in float32 (see gram_matrix). They recompute from the
        # cotangents and inputs kept for write_grads, so no module's rows outlive their product.
        precise: list[Callable[[], Tensor]] = []
        for p, rows in zip(self.unowned, cotangents[offset:], strict=True):
            if rows is not None:
                flat = rows.reshape(num_tasks, -1)
                gram += gram_product(flat)
                precise.append(functools.partial(float64_gram, flat))
                self._pending.append(_weighted_rows(p, rows))

        by_module: dict[nn.Module, list[tuple[_Call, list[Tensor | None]]]] = {}
        for call, cots in zip(calls, per_call, strict=True):
            if any(t is not None for t in cots):
                by_module.setdefault(call.module, []).append((call, cots))
        for module, entries in by_module.items():
            owned = self._owned[module]
            if type(module) is nn.Linear and _plain_calls(entries):
                contribution, rows, pending = _linear_rule(module, owned, entries, num_tasks)
                gram += contribution
                self._pending.append(self._keep(owned, rows, pending))
                precise.append(_precise_linear(module, owned, entries, num_tasks))
                continue

            def module_rows(
                module: nn.Module = module,
                owned: list[tuple[str, Tensor]] = owned,
                entries: list[tuple[_Call, list[Tensor | None]]] = entries,
            ) -> tuple[Tensor, list[_Pending]]:
                jac: Tensor | None = None
                pendings: list[_Pending] = []
                for call, cots in entries:
                    if isinstance(module, _CONVS) and _conv_supported(module) and not call.kwargs:
                        # a convolution has one output, whose cotangents are there (else the
                        # call would not be among the entries)
                        cot = cast(Tensor, cots[0])
                        rows, pending = _conv_rule(module, owned, call, cot, num_tasks)
                    else:
                        rows, pending = _functional_rule(module, owned, call, cots, num_tasks)
                    jac = rows if jac is None else jac + rows
                    pendings.append(pending)
                assert jac is not None
                return jac, pendings

            jac, pendings = module_rows()
            gram += gram_product(jac)
            self._pending.append(self._keep(owned, jac, _chain(pendings)))
            precise.append(_precise_rows(module_rows))
        self._calls = []
        if ref.dtype != torch.float64 and needs_float64(gram):
            gram = torch.zeros_like(gram)
            for thunk in precise:
                gram += thunk()
        return gram

    def _keep(
        self, owned: list[tuple[str, Tensor]], rows: Tensor | None, recompute: _Pending
    ) -> _Pending:
        """Keep a module's Jacobian rows for :meth:`write_grads` while they fit in
        ``keep_bytes`` (``Jᵀw`` is then a small product); otherwise recompute from the
        cotangents."""
        if rows is None or self._kept_bytes + rows.nbytes > self.keep_bytes:
            return recompute
        self._kept_bytes += rows.nbytes
        params = [p for _, p in owned]

        def pending(w: Tensor) -> list[tuple[Tensor, Tensor]]:
            work = torch.promote_types(rows.dtype, torch.float32)
            flat = torch.tensordot(w.to(device=rows.device, dtype=work), rows.to(work), dims=1)
            return list(zip(params, flat.split([p.numel() for p in params]), strict=True))

        return pending

    def write_grads(self, weights: Tensor) -> None:
        """Set ``p.grad = Σ_k w_k ∂ℓ_k/∂p`` for every shared parameter (``Jᵀ w``) from the
        cotangents kept by :meth:`gramian`: per module one weighted parameter-gradient product
        (no backward pass through the network); accumulates into an existing ``p.grad``."""
        totals: dict[int, tuple[Tensor, Tensor]] = {}
        for pending in self._pending:
            for p, g in pending(weights):
                key = id(p)
                totals[key] = (p, g if key not in totals else totals[key][1] + g)
        self._pending = []
        for p in self.params:
            entry = totals.get(id(p))
            g = torch.zeros_like(p) if entry is None else entry[1].reshape(p.shape).to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g

    def _cotangents(
        self,
        losses: Sequence[Tensor],
        inputs: list[Any],
        features: Tensor | None = None,
        heads: HeadGrads | None = None,
    ) -> list[Tensor | None]:
        if self._batched:
            try:
                return list(batched_grads(losses, inputs, features, self.params, heads))
            except RuntimeError:  # an op without a batching rule: K plain passes from now on
                self._batched = False
        extra = [] if heads is None else heads.params
        both = [
            torch.autograd.grad(loss, [*inputs, *extra], retain_graph=True, allow_unused=True)
            for loss in losses
        ]
        rows = [r[: len(inputs)] for r in both]
        if heads is not None:
            heads.per_loss = [tuple(r[len(inputs) :]) for r in both]
        out: list[Tensor | None] = []
        for j, template in enumerate(inputs):
            per_task = [r[j] for r in rows]
            if all(g is None for g in per_task):
                out.append(None)
                continue
            shape = _shape_of(template, per_task)
            ref = next(g for g in per_task if g is not None)
            out.append(
                torch.stack(
                    [
                        torch.zeros(shape, dtype=ref.dtype, device=ref.device) if g is None else g
                        for g in per_task
                    ]
                )
            )
        return out

    # -- checking --------------------------------------------------------------------------------
    def verify(self, losses: Sequence[Tensor], gram: Tensor, rtol: float = 1e-3) -> None:
        """Check ``diag M`` against ``‖∇_θ ℓ_k‖²`` computed by autograd (K backward passes, one
        gradient in memory at a time); raise a ``RuntimeError`` naming the first task that
        disagrees. Catches shared parameters used outside their module's forward and modules
        whose forward cannot be re-run identically (both give differences of order 1).

        The autograd reference carries the rounding of the dtype the forward and backward ran
        in, so the relative tolerance is at least 4 ε of the coarsest one (bfloat16 under
        autocast: ε = 2⁻⁷, tolerance 3 %; float16: 0.4 %), else ``rtol``."""
        rtol = max(rtol, 4 * self.working_eps)
        diag = gram.detach().diagonal().tolist()
        for k, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
            expected = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
            got = diag[k]
            if abs(got - expected) > rtol * max(expected, 1e-30) + 1e-12:
                raise RuntimeError(
                    f"Gramian engine: ‖∇ℓ_{k}‖² is {got:.6g} from the module-wise Gramian but "
                    f"{expected:.6g} from autograd. A shared parameter is probably used outside "
                    "its module's forward (tied weights, a functional use of module.weight), or "
                    "a module that owns parameters is not deterministic (dropout inside it). "
                    "Use engine='jacobian' for this model."
                )


# -- per-layer rules -----------------------------------------------------------------------------
def _plain_calls(entries: list[tuple[_Call, list[Tensor | None]]]) -> bool:
    return all(
        len(c.args) == 1 and not c.kwargs and isinstance(c.args[0], Tensor) and cots[0] is not None
        for c, cots in entries
    )


def _precise_linear(
    module: nn.Linear,
    owned: list[tuple[str, Tensor]],
    entries: list[tuple[_Call, list[Tensor | None]]],
    num_tasks: int,
) -> Callable[[], Tensor]:
    """The thunk that forms a Linear layer's contribution again in float64 arithmetic."""

    def contribution() -> Tensor:
        return _linear_rule(module, owned, entries, num_tasks, precise=True)[0]

    return contribution


def _precise_rows(rows_of: Callable[[], tuple[Tensor, list[_Pending]]]) -> Callable[[], Tensor]:
    """The thunk that forms a module's contribution again in float64 from its recomputed rows."""

    def contribution() -> Tensor:
        return float64_gram(rows_of()[0])

    return contribution


def _weighted_rows(p: Tensor, rows: Tensor) -> _Pending:
    def pending(w: Tensor) -> list[tuple[Tensor, Tensor]]:
        work = torch.promote_types(rows.dtype, torch.float32)
        return [(p, torch.tensordot(w.to(work), rows.to(work), dims=1))]

    return pending


def _chain(pendings: list[_Pending]) -> _Pending:
    def pending(w: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [pair for one in pendings for pair in one(w)]

    return pending


def _combine(w: Tensor, cot: Tensor) -> Tensor:
    """``Σ_k w_k C_k`` of K stacked cotangents (summed in float32 at least, returned in the
    cotangents' dtype)."""
    work = torch.promote_types(cot.dtype, torch.float32)
    return torch.tensordot(w.to(device=cot.device, dtype=work), cot.to(work), dims=1).to(cot.dtype)


def _linear_rule(
    module: nn.Linear,
    owned: list[tuple[str, Tensor]],
    entries: list[tuple[_Call, list[Tensor | None]]],
    num_tasks: int,
    precise: bool = False,
) -> tuple[Tensor, Tensor | None, _Pending]:
    """Gramian contribution of a Linear layer's weight and bias over all its calls (float64;
    formed in float64 arithmetic when ``precise``), its rows when they were formed (``None`` on
    the kernel route), and its weighted gradient ``(Σ_k w_k C_k)ᵀ [X, 1]``."""
    params = dict(owned)
    xs = [c.args[0].detach().reshape(-1, module.in_features) for c, _ in entries]
    cs = [cots[0].reshape(num_tasks, -1, module.out_features) for _, cots in entries]  # type: ignore[union-attr]
    x = torch.cat(xs) if len(xs) > 1 else xs[0]
    c = torch.cat(cs, dim=1) if len(cs) > 1 else cs[0]
    x, c = x.to(module.weight.dtype), c.to(module.weight.dtype)
    n, i, o, k = x.shape[0], module.in_features, module.out_features, num_tasks
    with_weight, with_bias = "weight" in params, "bias" in params

    def pending(w: Tensor) -> list[tuple[Tensor, Tensor]]:
        cw = _combine(w, c)
        out = []
        if with_weight:
            out.append((params["weight"], cw.T @ x))
        if with_bias:
            out.append((params["bias"], cw.sum(dim=0)))
        return out

    explicit = k * n * o * i + k * k * o * (i + 1)
    kernel_cost = n * n * (i + 1) + k * n * n * o + k * k * n * o
    if with_weight and kernel_cost < explicit:
        return _kernel_gram(x, c, with_bias, precise), None, pending
    parts = []
    for name, _ in owned:  # the owned order, which _keep splits the rows by
        if name == "weight":
            parts.append(torch.matmul(c.transpose(1, 2), x).reshape(k, -1))  # C_kᵀ X
        elif name == "bias":
            parts.append(c.sum(dim=1))
    rows = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return (float64_gram(rows) if precise else gram_product(rows)), rows, pending


def _kernel_gram(x: Tensor, c: Tensor, with_bias: bool, precise: bool = False) -> Tensor:
    """``⟨C_k, (XXᵀ + 11ᵀ) C_l⟩`` (float64) for inputs ``x`` ``(N, i)`` and cotangents ``c``
    ``(K, N, o)``, formed in float32 at least (float64 when ``precise``). When ``x`` or a task's
    cotangents lie outside ``[2⁻³⁰, 2³⁰]`` they are scaled by powers of two first (exact) and the
    scales restored in float64, as :func:`~mtopt.core.gradients.gram_matrix` does for rows."""
    work = torch.float64 if precise else torch.promote_types(c.dtype, torch.float32)
    x, c = x.to(work), c.to(work)
    k = c.shape[0]
    c_max = c.reshape(k, -1).abs().amax(dim=1)
    _, e_c = torch.frexp(c_max)
    _, e_x = torch.frexp(x.abs().amax().reshape(1))
    e_c = torch.where(c_max > 0, e_c, torch.zeros_like(e_c))
    e_x = torch.where(x.abs().amax().reshape(1) > 0, e_x, torch.zeros_like(e_x))
    exps = torch.cat([e_c, e_x])
    scaled = bool(((exps < -30) | (exps > 30)).any())  # one wait for the device, not two
    if scaled:
        c = torch.ldexp(c, -e_c.to(work)[:, None, None])
        x = torch.ldexp(x, -e_x.to(work))
    kernel = x @ x.T
    if with_bias:
        kernel += torch.ldexp(torch.ones((), dtype=work), -2 * e_x.to(work)) if scaled else 1.0
    mixed = torch.matmul(kernel, c)  # (K, N, o): (X Xᵀ + 1 1ᵀ) C_l
    inner = (c.reshape(k, -1) @ mixed.reshape(k, -1).T).to(torch.float64)
    if scaled:
        e = e_c.to(torch.float64)
        inner = torch.ldexp(inner, e[:, None] + e[None, :] + 2 * e_x.to(torch.float64))
    return 0.5 * (inner + inner.T)


def _conv_supported(module: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> bool:
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _conv_rule(
    module: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    owned: list[tuple[str, Tensor]],
    call: _Call,
    cot: Tensor,
    num_tasks: int,
) -> tuple[Tensor, _Pending]:
    """Rows ``[∂ℓ_k/∂W, ∂ℓ_k/∂b]`` of one convolution call (the K cotangents folded into the
    output channels of one weight-gradient convolution), and its weighted gradient."""
    x = call.args[0].detach()
    weight = module.weight
    if x.dim() != weight.dim():  # unbatched input
        x = x.unsqueeze(0)
        cot = cot.unsqueeze(1)
    x, cot = x.to(weight.dtype), cot.to(weight.dtype)
    k = num_tasks
    spatial = cot.shape[3:]
    bias_dims = [0, *range(2, cot.dim() - 1)]

    def weight_grad(grad_out: Tensor, out_channels: int) -> Tensor:
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out,
            x,
            weight.new_empty(out_channels, *weight.shape[1:]),
            None,
            module.stride,
            module.padding,
            module.dilation,
            False,
            [0] * (weight.dim() - 2),
            1,
            [False, True, False],
        )
        return grad_w

    parts: list[Tensor] = []
    for name, _ in owned:
        if name == "weight":
            out_channels = weight.shape[0]
            folded = cot.transpose(0, 1).reshape(cot.shape[1], k * out_channels, *spatial)
            parts.append(weight_grad(folded, k * out_channels).reshape(k, -1))
        elif name == "bias":
            parts.append(cot.sum(dim=[1, *range(3, cot.dim())]).reshape(k, -1))

    def pending(w: Tensor) -> list[tuple[Tensor, Tensor]]:
        cw = _combine(w, cot)
        out = []
        for name, p in owned:
            if name == "weight":
                out.append((p, weight_grad(cw, weight.shape[0])))
            elif name == "bias":
                out.append((p, cw.sum(dim=bias_dims)))
        return out

    rows = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return rows, pending


def _functional_rule(
    module: nn.Module,
    owned: list[tuple[str, Tensor]],
    call: _Call,
    cots: list[Tensor | None],
    num_tasks: int,
) -> tuple[Tensor, _Pending]:
    """Rows of the module's own shared parameters from ``vmap(vjp)`` of its forward re-run
    functionally (buffers copied, so e.g. batch-norm running statistics are left alone), and
    its weighted gradient from the same ``vjp``."""
    names = [n for n, _ in owned]
    values = tuple(p.detach() for _, p in owned)
    buffers = dict(module.named_buffers())
    args = tuple(a.detach() if isinstance(a, Tensor) else a for a in call.args)
    kwargs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in call.kwargs.items()}

    def forward(*params: Tensor) -> tuple[Tensor, ...]:
        # fresh copies made inside the transform: in-place buffer updates (running
        # statistics) land on them, not on the module's buffers
        state = dict(zip(names, params, strict=True)) | {n: b.clone() for n, b in buffers.items()}
        out = torch.func.functional_call(module, state, args, kwargs)
        leaves, _ = tree_flatten(out)
        return tuple(leaves[i] for i in call.positions)

    # without has_aux, vjp returns the pair (outputs, vjp_fn)
    outputs, vjp_fn = cast(
        tuple[tuple[Tensor, ...], Callable[..., tuple[Tensor, ...]]],
        torch.func.vjp(forward, *values),
    )
    for out, shape in zip(outputs, call.shapes, strict=True):
        if out.shape != shape:
            raise RuntimeError(
                f"Gramian engine: re-running {type(module).__name__} gave an output of shape "
                f"{tuple(out.shape)}, the recorded call {tuple(shape)}"
            )
    full = tuple(
        torch.zeros(num_tasks, *o.shape, dtype=o.dtype, device=o.device) if c is None else c
        for o, c in zip(outputs, cots, strict=True)
    )
    grads = torch.vmap(vjp_fn)(full)
    rows = torch.cat([g.reshape(num_tasks, -1) for g in grads], dim=1)

    def pending(w: Tensor) -> list[tuple[Tensor, Tensor]]:
        combined = vjp_fn(tuple(_combine(w, c) for c in full))
        return [(p, g) for (_, p), g in zip(owned, combined, strict=True)]

    return rows, pending


def _shape_of(template: Any, grads: Sequence[Tensor | None]) -> torch.Size:
    if isinstance(template, Tensor):
        return template.shape
    return next(g for g in grads if g is not None).shape
