"""Per-task gradients: the ``K × N`` matrix every gradient-based method starts from.

``jacobian(losses, inputs)`` (K ``autograd.grad`` calls) and ``batched_jacobian`` (one batched
backward pass) return one row per loss, the gradient with respect to ``inputs``
(shared parameters for ``Need.PARAM_GRADS``, the representation for ``Need.REP_GRADS``) flattened
and concatenated. Inputs that a loss does not reach get zeros in its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def jacobian(losses: Sequence[Tensor], inputs: Sequence[Tensor]) -> Tensor:
    """Stack ``∇_{inputs} ℓ_k`` for each loss into a ``K × Σ numel`` matrix (graph retained)."""
    if not inputs:
        raise ValueError("no inputs to differentiate with respect to")
    dtype, device = inputs[0].dtype, inputs[0].device
    sizes = [t.numel() for t in inputs]
    out = torch.zeros(len(losses), sum(sizes), dtype=dtype, device=device)
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        offset = 0
        for g, n in zip(grads, sizes, strict=True):
            if g is not None:
                out[k, offset : offset + n] = g.reshape(-1)
            offset += n
    return out


def batched_grads(losses: Sequence[Tensor], inputs: Sequence[Any]) -> tuple[Tensor | None, ...]:
    """``∂ℓ_k/∂x`` for every input ``x`` (a tensor or an autograd ``GradientEdge``), stacked over
    the K losses: ``(K, *x.shape)``, ``None`` where no loss reaches ``x``. One backward pass with
    the K unit cotangents batched (``autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap``
    over the backward graph; graph retained)."""
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    return torch.autograd.grad(
        stacked,
        list(inputs),
        grad_outputs=eye,
        is_grads_batched=True,
        retain_graph=True,
        allow_unused=True,
    )


def batched_jacobian(losses: Sequence[Tensor], inputs: Sequence[Tensor]) -> Tensor:
    """The same ``K × Σ numel`` matrix as :func:`jacobian` from :func:`batched_grads` (ops
    without a batching rule fall back to a loop inside PyTorch)."""
    if not inputs:
        raise ValueError("no inputs to differentiate with respect to")
    grads = batched_grads(losses, inputs)
    k = len(losses)
    rows = [
        torch.zeros(k, t.numel(), dtype=t.dtype, device=t.device)
        if g is None
        else g.reshape(k, -1).to(t.dtype)
        for g, t in zip(grads, inputs, strict=True)
    ]
    return torch.cat(rows, dim=1)


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


def gram_matrix(rows: Tensor) -> Tensor:
    r"""``M = R Rᵀ`` of ``K`` rows in any floating dtype, returned in float64, without overflow
    or underflow.

    The product runs in float32 for half-precision and float32 rows and in float64 for float64
    rows. Rows whose largest entry lies outside ``[2⁻³⁰, 2³⁰]`` are first scaled by a power of
    two each (exact), ``R̂ = E⁻¹R``, and ``M = E (R̂R̂ᵀ) E`` is assembled in float64: a float16
    model whose gradient norm exceeds 256 (the square overflows float16), or float32 gradients
    of 1e30, then give the same Gramian as float64 arithmetic would, to the precision of the
    product. Otherwise the rows are used as they are (the common case costs nothing extra).
    The result is symmetrised (a matrix product need not round ``(i, j)`` and ``(j, i)``
    alike). Non-finite rows give a non-finite Gramian (the caller reports it)."""
    work = torch.float64 if rows.dtype == torch.float64 else torch.float32
    r = rows.reshape(rows.shape[0], -1).to(work)
    amax = r.abs().amax(dim=1) if r.shape[1] else torch.zeros(r.shape[0], dtype=work)
    _, exponent = torch.frexp(amax)
    safe = bool(((exponent >= -30) & (exponent <= 30)).all()) or not bool(
        torch.isfinite(amax).all()
    )
    if safe:
        return _symmetric((r @ r.T).to(torch.float64))
    exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent))
    scaled = torch.ldexp(r, -exponent.to(work)[:, None])
    inner = (scaled @ scaled.T).to(torch.float64)
    e = exponent.to(torch.float64)
    return _symmetric(torch.ldexp(inner, e[:, None] + e[None, :]))


def _symmetric(m: Tensor) -> Tensor:
    return 0.5 * (m + m.T)
