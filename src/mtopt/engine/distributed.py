r"""Data parallelism: the engine's own communication in a ``torch.distributed`` process group.

Every rank runs the same model on its own part of the batch; the optimizer makes every rank's
method see what one process would see on the whole batch, so that every rank computes the same
weights and applies the same update. The model is *not* wrapped in ``DistributedDataParallel``
(or its synchronisation is disabled): the reductions happen here, once per step, where the
method needs them.

**Losses.** With ``W`` ranks each holding ``n`` samples, the full-batch loss of a mean-reduced
task is the mean of the local ones, :math:`\ell_k=\frac1W\sum_r\ell_k^{(r)}` (one all-reduce of
K numbers). Every loss the engine hands out (to the method, and through a closure method's
context) carries that *global value* with the *local gradient*
(:func:`global_value`): any function :math:`f` of the losses is then back-propagated as
:math:`f'(\ell)\,\nabla\ell_k^{(r)}`, and averaging over ranks gives
:math:`f'(\ell)\,\nabla\ell_k`, the single-process gradient.

**Per-task gradients.**

* parameter level: :math:`J=\frac1W\sum_r J^{(r)}` (an all-reduce of ``K × D``); the method's
  update is then already global and the shared parameters' gradients are not reduced again;
* representation level: the rows are per sample, so the global rows are the local ones side by
  side, each divided by ``W``; for a method that reads only their Gramian,
  :math:`M=\frac1{W^2}\sum_r J^{(r)}J^{(r)\top}` (an all-reduce of ``K × K``), else the rows (and
  the features) are gathered; each rank back-propagates its own part of the direction;
* the Gramian engine (``engine="gramian"``) is not available: the full-batch Gramian has
  cross-rank terms :math:`J^{(r)}J^{(s)\top}` that only the rows carry.

**Everything else** (the heads, the loss level, a closure method's own updates, gradients a
method takes through ``StepContext.grad``) is averaged over ranks before the optimizer steps, as
DDP does: one all-reduce of the parameters' gradients, flattened.

**Randomness.** A method that draws random numbers must be given a ``seed`` (checked equal on
every rank at construction), so every rank draws the same numbers.

Each collective's payload is counted (:attr:`ProcessGroupSync.sent_bytes`); the table per method
family is in ``docs/scaling.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mtopt.core.method import Method

#: ``MultiTaskOptimizer(process_group=...)``: find the default group when one is initialised
AUTO = "auto"


class _GlobalValue(torch.autograd.Function):
    """Forward: the global value; backward: the gradient passed to the local loss unchanged."""

    generate_vmap_rule = True  # the batched Jacobian differentiates through it under vmap

    @staticmethod
    def forward(local: Tensor, value: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def global_value(local: Tensor, value: Tensor) -> Tensor:
    """A scalar worth ``value`` whose gradient is ``local``'s (module doc, *Losses*)."""
    return _GlobalValue.apply(local, value.to(local.dtype))


def resolve_group(process_group: Any) -> Any | None:
    """The process group to work in: ``"auto"`` → the default group when ``torch.distributed``
    is initialised with more than one rank, else none; ``None`` → none; a group → that group."""
    if isinstance(process_group, str):
        if process_group != AUTO:
            raise ValueError(
                f"process_group must be 'auto', None or a ProcessGroup, got {process_group!r}"
            )
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.group.WORLD if dist.get_world_size() > 1 else None
    if process_group is not None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("a process group was given but torch.distributed is not initialised")
    return process_group


class ProcessGroupSync:
    """The reductions of one optimizer in one process group (module doc)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        #: bytes this rank contributed to collectives so far (payloads, not protocol overhead)
        self.sent_bytes = 0

    # -- primitives ----------------------------------------------------------------------------
    def _count(self, t: Tensor) -> None:
        self.sent_bytes += t.numel() * t.element_size()

    def sum_(self, t: Tensor) -> Tensor:
        self._count(t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def mean(self, t: Tensor) -> Tensor:
        """The mean over ranks of ``t`` (a new tensor)."""
        out = t.detach().clone().contiguous()
        return self.sum_(out).div_(self.world)

    def gather_rows(self, rows: Tensor) -> tuple[Tensor, int, int]:
        """``rows`` (``K × n_r``) of every rank side by side (``K × Σ n_r``), and where this
        rank's columns start and end."""
        sizes = torch.zeros(self.world, dtype=torch.int64, device=rows.device)
        sizes[self.rank] = rows.shape[1]
        self.sum_(sizes)
        width = int(sizes.max())
        padded = torch.zeros(rows.shape[0], width, dtype=rows.dtype, device=rows.device)
        padded[:, : rows.shape[1]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self._count(padded)
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        out = torch.cat([p[:, : int(n)] for p, n in zip(parts, sizes.tolist(), strict=True)], 1)
        start = int(sizes[: self.rank].sum())
        return out, start, start + rows.shape[1]

    def gather_batch(self, features: Tensor) -> Tensor:
        """Every rank's ``features`` (``n_r × ...``) concatenated along the batch dimension."""
        flat = features.detach().reshape(1, -1)
        rows, _, _ = self.gather_rows(flat)
        return rows.reshape(-1, *features.shape[1:])

    # -- what the engine asks --------------------------------------------------------------
    def losses(self, losses: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """The global losses: values averaged over ranks, gradients local (module doc)."""
        stacked = torch.stack([loss.detach() for loss in losses])
        work = torch.promote_types(stacked.dtype, torch.float32)
        mean = self.mean(stacked.to(work)).to(stacked.dtype)
        return [global_value(loss, v) for loss, v in zip(losses, mean, strict=True)], mean

    def average_grads(self, params: Sequence[Tensor], skip: Sequence[Tensor] = ()) -> None:
        """Average ``.grad`` over ranks (one flattened all-reduce), except the parameters in
        ``skip`` (already global). A gradient that is ``None`` on every rank stays ``None``; one
        that is ``None`` on some ranks only counts as zero there."""
        skipped = {id(p) for p in skip}
        todo = [p for p in params if id(p) not in skipped]
        if not todo:
            return
        work = torch.float64 if any(p.dtype == torch.float64 for p in todo) else torch.float32
        device = todo[0].device
        sizes = [p.numel() for p in todo]
        flat = torch.zeros(sum(sizes) + len(todo), dtype=work, device=device)
        offset = 0
        for i, p in enumerate(todo):
            if p.grad is not None:
                flat[offset : offset + sizes[i]] = p.grad.reshape(-1).to(work)
                flat[sum(sizes) + i] = 1.0  # has a gradient on this rank
            offset += sizes[i]
        self.sum_(flat)
        present = flat[sum(sizes) :].tolist()
        offset = 0
        for i, p in enumerate(todo):
            part = flat[offset : offset + sizes[i]]
            offset += sizes[i]
            if present[i] == 0:
                continue
            value = (part / self.world).reshape(p.shape).to(p.dtype)
            if p.grad is None:
                p.grad = value
            else:
                p.grad.copy_(value)

    def grad(
        self, outputs: Tensor, inputs: Sequence[Tensor], **kwargs: Any
    ) -> tuple[Tensor | None, ...]:
        """``torch.autograd.grad`` averaged over ranks (``StepContext.grad``)."""
        kwargs.setdefault("allow_unused", True)
        grads = torch.autograd.grad(outputs, list(inputs), **kwargs)
        holders = [torch.zeros_like(x) for x in inputs]
        for h, g in zip(holders, grads, strict=True):
            h.grad = None if g is None else g.detach().clone()
        self.average_grads(holders)
        return tuple(h.grad for h in holders)

    def broadcast_parameters(self, params: Sequence[Tensor]) -> None:
        """Start every rank from rank 0's parameters (as DDP does when it wraps a model)."""
        source = dist.get_global_rank(self.group, 0)
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=source, group=self.group)

    def check_method(self, method: Method, device: torch.device) -> None:
        """A random method needs the same seed on every rank (module doc, *Randomness*).
        ``device``: the model's (an ``nccl`` group communicates CUDA tensors only)."""
        hps = method.hyperparameters()
        if "seed" not in hps:
            return
        seed = getattr(method, "seed", None)
        if seed is None:
            raise ValueError(
                f"method {method.name!r} draws random numbers: in a process group give it a seed "
                f"({method.name}:seed=N, the same on every rank) so every rank draws the same"
            )
        seeds = torch.zeros(self.world, dtype=torch.int64, device=device)
        seeds[self.rank] = int(seed)
        self.sum_(seeds)
        if len(set(seeds.tolist())) != 1:
            raise ValueError(
                f"method {method.name!r} has different seeds on the ranks: {seeds.tolist()}"
            )


def make_sync(process_group: Any) -> ProcessGroupSync | None:
    group = resolve_group(process_group)
    return None if group is None else ProcessGroupSync(group)
