"""Per-task gradients: the ``K × N`` matrix every gradient-based method starts from.

``jacobian(losses, inputs)`` (K ``autograd.grad`` calls) and ``batched_jacobian`` (one batched
backward pass) return one row per loss, the gradient with respect to ``inputs``
(shared parameters for ``Need.PARAM_GRADS``, the representation for ``Need.REP_GRADS``) flattened
and concatenated. Inputs that a loss does not reach get zeros in its row.
Given the features ``z`` through which alone the losses reach the inputs (``only_through``),
the batched pass runs through the encoder only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


class HeadGrads:
    """Each loss's own gradients of task-specific parameters (the heads), taken in the per-task
    backward passes that give its row of the Jacobian, so that the heads' gradient
    ``Σ_k c_k ∇_h ℓ_k`` needs no backward pass of its own once the coefficients ``c`` are
    known. Each pass already runs through its own loss and head; asking it for the head's
    parameters too adds their weight products only, where a separate backward of
    ``Σ_k c_k ℓ_k`` would run every loss and head once more.

    When (:func:`head_grads`): the closure gave the features ``z`` through which alone the
    losses reach the shared parameters, the losses reach every head before ``z``, and no head
    parameter has tensor or post-accumulate-grad hooks and no head module a backward hook.
    Otherwise all heads get a backward pass of ``Σ_k c_k ℓ_k``, as before: a stem upstream of
    the encoder that is not shared would take each pass through the encoder again (K times its
    gradient's memory, several times the step, found by review); a parameter no loss reaches,
    or one behind ``z``, needs that backward pass anyway (then taking the others in the passes
    saves nothing); and such hooks would run in each pass on ``∂ℓ_k`` instead of once on
    ``Σ_k c_k ∇ℓ_k`` (and ``.grad`` is written here, not accumulated by autograd). Hooks on a
    head's intermediate tensors cannot be seen from the graph: they run in each pass on
    ``∂ℓ_k`` (as they already did in the passes that give the shared rows), so a non-linear
    one (a clamp) acts before ``c_k`` is applied, not after.

    ``per_loss`` is filled by :func:`jacobian`, :func:`batched_grads` and the Gramian engine
    when they take the rows task by task, and stays ``None`` otherwise (a batched pass from
    the losses): then the heads get the backward pass. Kept: one gradient per loss and head
    parameter the loss reaches (``None`` elsewhere), released once written; for heads of one
    task each, the memory of one gradient of the heads. Under a grad scaler each ``∂ℓ_k/∂p``
    is taken at the full scale, as the shared rows are (the backward pass took ``c_k`` times
    it)."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.per_loss: list[tuple[Tensor | None, ...]] | None = None

    def write(self, coeffs: Tensor) -> None:
        """``p.grad += Σ_k c_k ∂ℓ_k/∂p`` for every head parameter ``p`` that some loss reaches
        (summed in float32 at least, then in ``p``'s dtype; a parameter no loss reaches keeps
        its ``.grad``, as a backward pass would leave it)."""
        assert self.per_loss is not None
        host = coeffs.device.type == "cpu"  # then plain numbers, read without a device wait
        numbers = coeffs.detach().to(torch.float64).tolist() if host else []
        copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # coeffs where the heads are
        totals: list[Tensor | None] = [None] * len(self.params)
        for k, grads in enumerate(self.per_loss):
            idx = [j for j, g in enumerate(grads) if g is not None]
            if not idx:
                continue
            # in float32 at least (a no-op copy for float32 and float64 gradients)
            work = [
                g.to(torch.promote_types(g.dtype, torch.float32)) for g in grads if g is not None
            ]
            scaled: Sequence[Tensor]
            if host:
                scaled = torch._foreach_mul(work, numbers[k])  # one op for the loss's heads
            else:  # copied once per device and dtype, on CUDA without waiting (weighted_sum)
                for g in work:
                    if (g.device, g.dtype) not in copies:
                        copies[g.device, g.dtype] = coeffs.detach().to(
                            g.device, g.dtype, non_blocking=True
                        )
                scaled = [g * copies[g.device, g.dtype][k] for g in work]
            for j, t in zip(idx, scaled, strict=True):
                prev = totals[j]
                totals[j] = t if prev is None else prev + t
        for p, total in zip(self.params, totals, strict=True):
            if total is None:
                continue
            g = total if total.dtype == p.dtype else total.to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
        self.per_loss = None  # not kept beside the written gradients through the step


def head_grads(
    losses: Sequence[Tensor],
    features: Tensor | None,
    shared: Sequence[Tensor],
    heads: Sequence[Tensor],
) -> HeadGrads | None:
    """The step's :class:`HeadGrads`, or ``None`` (the heads get the backward pass): without
    ``z``, when the losses reach ``shared`` other than through ``z``, when a head is not
    reached before ``z``, or when a head parameter or module has hooks."""
    if not heads or features is None:
        return None
    if hooked(heads):
        return None
    before = heads_before(losses, features, shared, heads)
    if before is None or len(before) != len(heads):
        return None
    return HeadGrads(heads)


def jacobian(
    losses: Sequence[Tensor], inputs: Sequence[Tensor], heads: HeadGrads | None = None
) -> Tensor:
    """Stack ``∇_{inputs} ℓ_k`` for each loss into a ``K × Σ numel`` matrix (graph retained);
    with ``heads``, each pass also takes its loss's gradient of the heads (:class:`HeadGrads`)."""
    if not inputs:
        raise ValueError("no inputs to differentiate with respect to")
    dtype, device = inputs[0].dtype, inputs[0].device
    sizes = [t.numel() for t in inputs]
    extra = [] if heads is None else heads.params
    out = torch.zeros(len(losses), sum(sizes), dtype=dtype, device=device)
    own: list[tuple[Tensor | None, ...]] = []
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, [*inputs, *extra], retain_graph=True, allow_unused=True)
        offset = 0
        for g, n in zip(grads[: len(sizes)], sizes, strict=True):
            if g is not None:
                out[k, offset : offset + n] = g.reshape(-1)
            offset += n
        own.append(tuple(grads[len(sizes) :]))
    if heads is not None:
        heads.per_loss = own
    return out


def batched_grads(
    losses: Sequence[Tensor],
    inputs: Sequence[Any],
    features: Tensor | None = None,
    params: Sequence[Tensor] | None = None,
    heads: HeadGrads | None = None,
) -> tuple[Tensor | None, ...]:
    """``∂ℓ_k/∂x`` for every input ``x`` (a tensor or an autograd ``GradientEdge``), stacked over
    the K losses: ``(K, *x.shape)``, ``None`` where no loss reaches ``x``. One backward pass with
    the K cotangents batched (``autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over
    the backward graph; graph retained).

    By default the pass starts at the losses with the K unit cotangents. Given the features
    ``z`` through which alone the losses reach ``params`` (the parameters behind ``inputs``;
    default: ``inputs`` themselves), checked by :func:`only_through`, it runs in two stages:
    the K rows ``∂ℓ_k/∂z`` by K ``autograd.grad`` calls, each through its own loss's part of
    the graph, then ``z``'s backward with those rows batched as cotangents. Starting at the
    losses sends K cotangents, K − 1 of them zero, through every head, and a loss whose
    backward has no batching rule (``mse_loss_backward``) then runs K times per head; from
    ``z`` the heads and losses are differentiated once per task, and those K calls also take
    each loss's gradient of ``heads`` (:class:`HeadGrads`; left unfilled from the losses)."""
    reached = inputs if params is None else params
    if features is not None and only_through(losses, features, reached):
        rows = jacobian(losses, [features], heads)
        root, cotangents = features, rows.view(len(losses), *features.shape)
    else:
        root = torch.stack([loss.reshape(()) for loss in losses])
        cotangents = torch.eye(len(losses), dtype=root.dtype, device=root.device)
    return torch.autograd.grad(
        root,
        list(inputs),
        grad_outputs=cotangents,
        is_grads_batched=True,
        retain_graph=True,
        allow_unused=True,
    )


def batched_jacobian(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    features: Tensor | None = None,
    heads: HeadGrads | None = None,
) -> Tensor:
    """The same ``K × Σ numel`` matrix as :func:`jacobian` from :func:`batched_grads` (ops
    without a batching rule fall back to a loop inside PyTorch; with ``features``, from ``z``
    when the losses reach ``inputs`` only through it, the heads' gradients taken on the way)."""
    if not inputs:
        raise ValueError("no inputs to differentiate with respect to")
    grads = batched_grads(losses, inputs, features, heads=heads)
    k = len(losses)
    rows = [
        torch.zeros(k, t.numel(), dtype=t.dtype, device=t.device)
        if g is None
        else g.reshape(k, -1).to(t.dtype)
        for g, t in zip(grads, inputs, strict=True)
    ]
    return torch.cat(rows, dim=1)


def only_through(losses: Sequence[Tensor], features: Tensor, inputs: Sequence[Tensor]) -> bool:
    """Whether every path of the autograd graph from the losses to ``inputs`` passes through
    ``features`` (the edge ``(features.grad_fn, features.output_nr)``): then, by the chain rule,
    ``∂ℓ_k/∂θ = (∂ℓ_k/∂z)(∂z/∂θ)`` for every input θ. Walks the graph from the losses without
    entering ``features``; any path that reaches an input otherwise (a loss that reads an
    encoder weight directly, another output of the node that made ``z``, a loss that is an
    input itself) says no. A ``z`` outside the graph (no ``grad_fn``) says no, and so does a
    ``z`` with tensor hooks or ``retain_grad``: they would run twice, when ``∂ℓ_k/∂z`` is
    captured and again when ``z``'s backward starts (hooks on ``z``'s node run once)."""
    return _walk(losses, features, inputs, ())[0]


def heads_before(
    losses: Sequence[Tensor], features: Tensor, shared: Sequence[Tensor], heads: Sequence[Tensor]
) -> list[Tensor] | None:
    """The parameters of ``heads`` that the losses reach before ``z`` (the walk of
    :func:`only_through`, which stops at ``z``), in their order; ``None`` when
    :func:`only_through` says no for ``shared``. A head reached before ``z`` by one loss may
    also lie behind ``z`` (an input embedding tied to an output layer): the per-task passes
    then take its whole gradient, through the encoder. ``None`` too when a module backward
    hook lies before ``z`` (it would see each ``∂ℓ_k`` alone)."""
    through, found, hook = _walk(losses, features, shared, heads)
    if not through or hook:
        return None
    return [p for p in heads if id(p) in found]


def reached_beside(losses: Sequence[Tensor], features: Tensor, inputs: Sequence[Tensor]) -> bool:
    """Whether some path from the losses reaches ``inputs`` other than through ``z`` (the walk
    of :func:`only_through` without its conditions on ``z``'s hooks); ``False`` for a ``z``
    outside the graph."""
    if features.grad_fn is None:
        return False
    return not _walk(losses, features, inputs, (), check_z=False)[0]


def graph_nodes(
    starts: Iterable[tuple[Any, int]], stop: tuple[Any, int] | None = None
) -> Iterator[Any]:
    """Each autograd node reachable from the edges ``starts`` (``(node, output_nr)``), once,
    depth first, without entering the edge ``stop`` (``z``'s ``(grad_fn, output_nr)``); a
    caller that stops at a node stops iterating."""
    seen: set[int] = set()
    todo = list(starts)
    while todo:
        node, nr = todo.pop()
        if node is None or id(node) in seen:
            continue
        if stop is not None and node is stop[0] and nr == stop[1]:
            continue
        seen.add(id(node))
        yield node
        todo.extend(node.next_functions)


def leaf_of(node: Any) -> Tensor | None:
    """The leaf whose gradient an ``AccumulateGrad`` node accumulates, else ``None``."""
    return getattr(node, "variable", None)


def module_hook(node: Any) -> bool:
    """Whether ``node`` runs a module's backward hook (``register_full_backward_hook``)."""
    return type(node).__name__ == "BackwardHookFunctionBackward"


def hooked(params: Sequence[Tensor]) -> bool:
    """Whether a parameter has tensor hooks or post-accumulate-grad hooks."""
    return any(p._backward_hooks or p._post_accumulate_grad_hooks for p in params)


def _walk(
    losses: Sequence[Tensor],
    features: Tensor,
    inputs: Sequence[Tensor],
    heads: Sequence[Tensor],
    check_z: bool = True,
) -> tuple[bool, set[int], bool]:
    """One walk from the losses that stops at ``z``: whether no input was reached (with the
    conditions of :func:`only_through` unless ``check_z`` is false), the ids of the ``heads``
    that were, and whether a module backward hook (``register_full_backward_hook``) was
    passed."""
    stop = features.grad_fn
    hook = False
    if stop is None or (check_z and (features._backward_hooks or features.retains_grad)):
        return False, set(), hook
    targets = {id(t) for t in inputs}
    wanted = {id(t) for t in heads}
    found: set[int] = set()
    if any(loss.grad_fn is None and id(loss) in targets for loss in losses):
        return False, found, hook
    found.update(id(loss) for loss in losses if loss.grad_fn is None and id(loss) in wanted)
    starts = [(loss.grad_fn, loss.output_nr) for loss in losses]
    for node in graph_nodes(starts, (stop, features.output_nr)):
        hook = hook or module_hook(node)
        variable = leaf_of(node)
        if variable is not None:
            if id(variable) in targets:
                return False, found, hook
            if id(variable) in wanted:
                found.add(id(variable))
    return True, found, hook


def write_flat_grad(params: Sequence[Tensor], flat: Tensor) -> None:
    """Set ``p.grad`` of each parameter from consecutive slices of ``flat`` (accumulating)."""
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p).to(p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad + g
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat gradient has {flat.numel()} entries, parameters need {offset}")


#: Smallest eigenvalue of the cosine matrix below which a Gramian formed in float32 is formed
#: again in float64 (see :func:`gram_matrix`).
RESOLVE_FLOAT32 = 1e-3


def gram_matrix(rows: Tensor) -> Tensor:
    r"""``M = R Rᵀ`` of ``K`` rows in any floating dtype, returned in float64, without overflow
    or underflow, and in float64 arithmetic where float32 cannot resolve it.

    The product runs in float32 for half-precision and float32 rows and in float64 for float64
    rows. It is accepted when every squared row norm ``M_ii`` lies in ``[2⁻⁶⁰, 2¹⁰⁰]`` (then no
    partial sum overflowed, by Cauchy–Schwarz, and no row lost its digits to underflow) or is
    exactly 0. Otherwise each row is first scaled by a power of two (exact),
    ``R̂ = E⁻¹R`` with entries in ``[½, 1)`` at most, and ``M = E (R̂R̂ᵀ) E`` is assembled in
    float64: a float16 model whose gradient norm exceeds 256 (the square overflows float16), or
    float32 gradients of 1e30, then give the same Gramian as float64 arithmetic would.

    A float32 product carries a relative error of about ``√D u₃₂`` per entry (``u₃₂ = 2⁻²⁴``):
    harmless while the gradients are far from linearly dependent, but once the cosine matrix
    ``C = N⁻¹MN⁻¹`` (``N = diag ‖r_i‖``) has an eigenvalue below ``RESOLVE_FLOAT32`` (1e-3:
    nearly dependent gradients, 0 in or near their hull) those errors are of the order of the
    geometry the solvers resolve, and can make ``M`` indefinite. Then ``M`` is formed again from
    the same rows in float64 (products of float32 numbers are exact in float64), and the
    solvers certify their answers on it. The check is one Cholesky factorisation of a ``K × K``
    matrix. The result is symmetrised (a matrix product need not round ``(i, j)`` and
    ``(j, i)`` alike). Non-finite rows give a non-finite Gramian (the caller reports it)."""
    gram = gram_product(rows)
    if rows.dtype != torch.float64 and needs_float64(gram):
        return float64_gram(rows)
    return gram


def needs_float64(gram: Tensor) -> bool:
    """Whether a Gramian formed in float32 must be formed again in float64: finite, and not
    :func:`well_resolved`. Both tests run on one host copy of the ``K × K`` matrix (one wait
    for the device on a GPU, not two)."""
    host = gram.detach().cpu()
    return bool(torch.isfinite(host).all()) and not well_resolved(host)


def gram_product(rows: Tensor) -> Tensor:
    """The product of :func:`gram_matrix` without the resolution check: float32 arithmetic for
    half-precision and float32 rows (float64 for float64 rows), power-of-two row scaling where
    squared norms leave ``[2⁻⁶⁰, 2¹⁰⁰]``, float64 result."""
    work = torch.float64 if rows.dtype == torch.float64 else torch.float32
    r = rows.reshape(rows.shape[0], -1).to(work)
    direct = (r @ r.T).to(torch.float64)
    # the K squared norms are read on the host once (on a GPU each test of a device tensor
    # would wait for the device): NaN fails both comparisons, as it did on the device
    diag = torch.diagonal(direct).tolist()
    fine = [2.0**-60 <= d <= 2.0**100 for d in diag]
    if 0.0 in diag:  # an exactly zero row, or one whose squares underflowed
        empty = (r.abs().amax(dim=1) == 0).tolist()
        fine = [f or (d == 0 and e) for f, d, e in zip(fine, diag, empty, strict=True)]
    if all(fine) or not bool(torch.isfinite(r.sum(dim=1)).all()):
        return _symmetric(direct)
    amax = r.abs().amax(dim=1)
    _, exponent = torch.frexp(amax)
    exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent))
    scaled = torch.ldexp(r, -exponent.to(work)[:, None])
    inner = (scaled @ scaled.T).to(torch.float64)
    e = exponent.to(torch.float64)
    return _symmetric(torch.ldexp(inner, e[:, None] + e[None, :]))


def well_resolved(gram: Tensor, threshold: float = RESOLVE_FLOAT32) -> bool:
    """Whether the cosine matrix of ``gram`` (zero rows left out) has every eigenvalue at or
    above ``threshold``: one Cholesky factorisation of ``C − threshold·I`` (in numpy: on a
    ``K × K`` matrix a torch call costs more than the arithmetic)."""
    m = gram.detach().cpu().numpy()
    d = np.diagonal(m)
    keep = d > 0
    if int(keep.sum()) < 2:
        return True
    sub = m[np.ix_(keep, keep)] if not keep.all() else m
    n = np.sqrt(np.diagonal(sub))
    cos = sub / np.outer(n, n)
    cos.flat[:: cos.shape[0] + 1] -= threshold
    try:
        np.linalg.cholesky(cos)
    except np.linalg.LinAlgError:
        return False
    return True


def float64_gram(rows: Tensor) -> Tensor:
    """``R Rᵀ`` in float64 arithmetic, each row scaled by a power of two first (exact) so that
    neither the squares nor their sums leave float64's range."""
    r = rows.reshape(rows.shape[0], -1).to(torch.float64)
    amax = r.abs().amax(dim=1)
    _, exponent = torch.frexp(amax)
    exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent))
    scaled = torch.ldexp(r, -exponent.to(torch.float64)[:, None])
    e = exponent.to(torch.float64)
    return _symmetric(torch.ldexp(scaled @ scaled.T, e[:, None] + e[None, :]))


def _symmetric(m: Tensor) -> Tensor:
    return 0.5 * (m + m.T)
