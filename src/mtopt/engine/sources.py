"""Where a method's per-task gradients come from, and how its answer reaches the shared
parameters: one *gradient source* per level, chosen once when the optimizer is built.

=============================  =============================================  =====================
source                         per-task input                                 shared update
=============================  =============================================  =====================
:class:`LossSource`            none (the losses)                              backward of Σ w_k ℓ_k
:class:`JacobianSource`        ``K × D`` Jacobian of the shared parameters,   ``Gᵀw`` (or the
                               by K backward passes or one batched pass       direction) written
:class:`GramianSource`         only ``M = JJᵀ``, module by module             ``Jᵀw`` from the kept
                               (:mod:`mtopt.core.gramian`)                    rows or cotangents
:class:`AutoSource`            the Jacobian, or the Gramian when ``K × D``    as the one it picked
                               would exceed the memory budget (decided at
                               the first step, when K is known)
:class:`RepresentationSource`  ``K × numel(z)`` gradients of the              backward of the
                               representation (one backward pass when the     direction through the
                               heads read ``z`` through ``task_input``)       encoder
=============================  =============================================  =====================

Every source checks that the per-task gradients are finite and names the tasks that are not.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from mtopt.core.gradients import (
    HeadGrads,
    batched_jacobian,
    gram_matrix,
    graph_nodes,
    head_grads,
    hooked,
    jacobian,
    leaf_of,
    module_hook,
    reached_beside,
    write_flat_grad,
)
from mtopt.core.gramian import GramianEngine
from mtopt.core.method import Aggregation
from mtopt.engine.closure import Unpacked
from mtopt.engine.distributed import ProcessGroupSync
from mtopt.engine.info import logger
from mtopt.engine.writeback import nonfinite_hint

#: how a representation-level step hands the heads their copies of z: (source z, task, copy)
SplitEntry = tuple[Tensor, "str | int", Tensor]


@dataclass
class PerTask:
    """A source's per-task input for the method: the gradients (rows), or their Gramian; in a
    process group also this rank's own rows (``local``), where they sit among the gathered ones
    (``span``), and the gathered features (:mod:`mtopt.engine.distributed`)."""

    grads: Tensor | None = None
    gramian: Tensor | None = None
    local: Tensor | None = None
    span: tuple[int, int] | None = None
    features: Tensor | None = None
    #: each loss's gradients of the task-specific parameters, when the source took them in its
    #: per-task passes (then the heads need no backward pass of their own)
    heads: HeadGrads | None = None


class GradientSource:
    """Base class: no per-task gradients (loss level)."""

    #: ``StepInfo.gradient_engine`` of the steps it serves
    label: str | None = None
    #: the process group's reductions (:mod:`mtopt.engine.distributed`), or ``None``
    sync: ProcessGroupSync | None = None
    #: whether the shared parameters' gradients it writes are already global (not averaged)
    writes_global: bool = False

    def recording(self, num_tasks: int | None) -> contextlib.AbstractContextManager[None]:
        """A context around the closure's forward pass (the Gramian engine records modules)."""
        return contextlib.nullcontext()

    def compute(self, step: Unpacked) -> PerTask:
        return PerTask()

    def write_shared(self, agg: Aggregation, step: Unpacked, per_task: PerTask) -> None:
        raise NotImplementedError

    def write(
        self,
        agg: Aggregation,
        step: Unpacked,
        per_task: PerTask,
        task_params: list[Tensor],
        head_coeffs: Tensor | None,
    ) -> None:
        """``.grad`` of the shared parameters (the method's update) and of the task-specific
        ones (``Σ_k c_k ∇ℓ_k``, ``c = head_coeffs``; ``None`` when there are none): from the
        per-task gradients the source took (``per_task.heads``), else by a backward pass of
        ``Σ_k c_k ℓ_k``."""
        self.write_shared(agg, step, per_task)
        if head_coeffs is None or not task_params:
            return
        if per_task.heads is not None and per_task.heads.per_loss is not None:
            per_task.heads.write(head_coeffs)
        else:
            torch.autograd.backward(weighted_sum(step.losses, head_coeffs), inputs=task_params)


class LossSource(GradientSource):
    """Loss level: the shared update is the backward pass of ``Σ_k w_k ℓ_k``."""

    def __init__(self, shared: list[Tensor]) -> None:
        self.shared = shared

    def write_shared(self, agg: Aggregation, step: Unpacked, per_task: PerTask) -> None:
        assert agg.weights is not None
        total = weighted_sum(step.losses, agg.weights)
        torch.autograd.backward(total, inputs=self.shared, retain_graph=True)

    def write(
        self,
        agg: Aggregation,
        step: Unpacked,
        per_task: PerTask,
        task_params: list[Tensor],
        head_coeffs: Tensor | None,
    ) -> None:
        # one backward pass for everything when the heads get the same coefficients
        if head_coeffs is None or head_coeffs is agg.weights:
            assert agg.weights is not None
            weighted_sum(step.losses, agg.weights).backward(inputs=self.shared + task_params)
            return
        super().write(agg, step, per_task, task_params, head_coeffs)


class JacobianSource(GradientSource):
    """The ``K × D`` Jacobian of the shared parameters, by K backward passes (``"jacobian"``)
    or one batched pass (``"batched"``); the update ``Gᵀw`` is summed in float32 at least.

    The batched pass, when the closure returns the features ``z`` and the losses reach the
    shared parameters only through them (checked on the graph at every step,
    :func:`~mtopt.core.gradients.only_through`), runs batched through the encoder alone: the
    rows ``∂ℓ_k/∂z`` first, one task's part of the graph at a time, then ``z``'s backward with
    the K rows as cotangents (:func:`~mtopt.core.gradients.batched_grads`).
    Otherwise it is batched through the whole graph.

    ``fallback`` (the batched pass chosen by ``engine="auto"``): a batched pass that fails (an
    op in the backward graph without a batching rule, such as a custom ``autograd.Function``
    that reads a value with ``.item()``) is replaced by K passes for that step and every later
    one, with one warning on the ``mtopt`` logger; the step's ``gradient_engine`` says
    ``"jacobian"`` from then on. Asked for by name (``engine="batched"``), the error is
    raised.

    ``heads`` (the task-specific parameters): when the closure returns ``z``, the per-task
    passes (the K passes, or the rows ``∂ℓ_k/∂z`` of the batched pass from ``z``) also take
    each loss's gradient of the heads, when the losses reach them all before ``z``
    (:class:`~mtopt.core.gradients.HeadGrads`), and their ``Σ_k c_k ∇ℓ_k`` is written from them
    without a backward pass of its own."""

    def __init__(
        self,
        shared: list[Tensor],
        batched: bool = False,
        sync: ProcessGroupSync | None = None,
        fallback: bool = False,
        heads: list[Tensor] | None = None,
    ) -> None:
        self.shared = shared
        self.heads = heads or []
        self.batched = batched
        self.fallback = fallback
        self.sync = sync
        self.writes_global = sync is not None

    @property
    def label(self) -> str:  # type: ignore[override]
        return "batched" if self.batched else "jacobian"

    def _jacobian(
        self, losses: list[Tensor], features: Tensor | None, heads: HeadGrads | None
    ) -> Tensor:
        if not self.batched:
            return jacobian(losses, self.shared, heads)
        try:
            return batched_jacobian(losses, self.shared, features, heads)
        except RuntimeError as err:
            if not self.fallback:
                raise
            text = str(err).strip()
            reason = text.splitlines()[0] if text else type(err).__name__
            logger.warning(
                "engine='auto': the batched Jacobian pass failed (%s); the Jacobian is taken by "
                "%d backward passes from now on (engine='jacobian' chooses them from the start)",
                reason,
                len(losses),
            )
            self.batched = False
            return jacobian(losses, self.shared, heads)

    def compute(self, step: Unpacked) -> PerTask:
        heads = head_grads(step.losses, step.features, self.shared, self.heads)
        grads = self._jacobian(step.losses, step.features, heads)
        if self.sync is not None:  # the full batch's Jacobian: the mean of the ranks'
            grads = self.sync.mean(grads)  # (reduced first: a non-finite row stops every rank)
        check_finite(step.names, grads=grads)
        return PerTask(grads=grads, heads=heads)

    def write_shared(self, agg: Aggregation, step: Unpacked, per_task: PerTask) -> None:
        assert per_task.grads is not None
        write_flat_grad(self.shared, combine(agg, per_task.grads).detach())


class GramianSource(GradientSource):
    """Only the Gramian, accumulated module by module
    (:class:`~mtopt.core.gramian.GramianEngine`), checked against autograd at the first step;
    the update ``Jᵀw`` is written from what the engine kept. Where the engine takes its
    cotangents task by task, it also takes the ``heads``' per-task gradients (as
    :class:`JacobianSource` does)."""

    label = "gramian"

    def __init__(self, engine: GramianEngine, heads: list[Tensor] | None = None) -> None:
        self.engine = engine
        self.heads = heads or []
        self._verified = False

    def recording(self, num_tasks: int | None) -> contextlib.AbstractContextManager[None]:
        return self.engine.record()

    def compute(self, step: Unpacked) -> PerTask:
        heads = head_grads(step.losses, step.features, self.engine.params, self.heads)
        gram = self.engine.gramian(step.losses, step.features, heads)
        if not self._verified:
            self.engine.verify(step.losses, gram)
            self._verified = True
        check_finite(step.names, gram=gram)
        return PerTask(gramian=gram, heads=heads)

    def write_shared(self, agg: Aggregation, step: Unpacked, per_task: PerTask) -> None:
        if agg.weights is None:
            raise RuntimeError(
                "under the Gramian engine a method must return weights, not a direction"
            )
        self.engine.write_grads(agg.weights.detach())


class AutoSource(GradientSource):
    """The Jacobian, unless ``K × D`` would exceed ``max_bytes``: then the Gramian. Decided at
    the first step (when K is known); the forward of that step is recorded just in case."""

    def __init__(self, jacobian: JacobianSource, gramian: GramianSource, row_bytes: int,
                 max_bytes: int) -> None:  # fmt: skip
        self.jacobian, self.gramian = jacobian, gramian
        self.row_bytes, self.max_bytes = row_bytes, max_bytes
        self.chosen: GradientSource | None = None
        self._last: GradientSource = jacobian

    def _pick(self, num_tasks: int) -> GradientSource:
        if self.chosen is None:
            big = num_tasks * self.row_bytes > self.max_bytes
            self.chosen = self.gramian if big else self.jacobian
        return self.chosen

    @property
    def label(self) -> str | None:  # type: ignore[override]
        return self._last.label

    def recording(self, num_tasks: int | None) -> contextlib.AbstractContextManager[None]:
        if num_tasks is None or self._pick(num_tasks) is self.gramian:
            return self.gramian.recording(num_tasks)
        return contextlib.nullcontext()

    def compute(self, step: Unpacked) -> PerTask:
        source = self._pick(len(step.losses))
        if source is self.jacobian:
            self.gramian.engine.clear()  # the first step's recording is not needed
        self._last = source
        return source.compute(step)

    def write_shared(self, agg: Aggregation, step: Unpacked, per_task: PerTask) -> None:
        self._last.write_shared(agg, step, per_task)


class RepresentationSource(GradientSource):
    """The per-task gradients of the shared representation ``z`` (``K × numel(z)``), and the
    update pushed through the encoder once (``backward(z, d)``).

    While a step runs, :meth:`task_input` hands each head a detached copy of ``z`` (through the
    method's transform, if it has one), so that one backward pass of ``Σ_k ℓ_k`` gives every row;
    when some loss also reads ``z`` directly, or the copies are not used, K backward passes do.
    In that one pass each head's graph ends at its copy, so a head parameter that one loss
    alone reaches gets ``∂ℓ_k/∂p`` from it: when every head is such, no loss reads ``z`` itself
    and no head has hooks (:func:`head_owners`), the pass also takes the heads' gradients, and
    the heads need no backward pass of their own. At the first step a task-specific parameter
    that feeds ``z`` is refused (:func:`check_upstream`)."""

    label = "representation"

    def __init__(
        self,
        shared: list[Tensor],
        split_heads: bool,
        sync: ProcessGroupSync | None = None,
        gramian_only: bool = False,
        heads: list[Tensor] | None = None,
    ) -> None:
        self.shared = shared
        self.heads = heads or []
        self._checked_upstream = False
        self.split_heads = split_heads
        self.sync = sync
        #: in a process group: reduce only the K × K Gramian (the method reads nothing else)
        self.gramian_only = gramian_only
        #: the copies handed out while the closure runs, and those of the last forward
        self.split: list[SplitEntry] | None = None
        self.taken: list[SplitEntry] = []

    @contextlib.contextmanager
    def _splitting(self) -> Iterator[None]:
        self.split = [] if self.split_heads else None
        try:
            yield
        finally:
            self.taken, self.split = self.split or [], None

    def recording(self, num_tasks: int | None) -> contextlib.AbstractContextManager[None]:
        return self._splitting()

    def head_copy(self, features: Tensor, task: str | int) -> Tensor | None:
        """A detached copy of ``features`` for one head, inside a step; ``None`` outside."""
        if self.split is None or not features.requires_grad:
            return None
        leaf = features.detach().requires_grad_(True)
        self.split.append((features, task, leaf))
        return leaf

    def compute(self, step: Unpacked) -> PerTask:
        features = step.features
        if features is None:
            raise ValueError(
                "this method needs the shared representation: return "
                "mtopt.Losses(losses, features=z) from the closure"
            )
        if not features.requires_grad:
            raise ValueError("features must be part of the autograd graph (requires_grad)")
        if not self._checked_upstream:
            check_upstream(features, self.heads)
            check_beside(step.losses, features, self.shared)
            self._checked_upstream = True
        heads = None
        if self.heads and not hooked(self.heads):
            heads = HeadGrads(self.heads)
        rows = representation_rows(self.taken, step.names, step.losses, features, heads)
        if heads is not None and heads.per_loss is None:
            heads = None
        if self.sync is None:
            check_finite(step.names, grads=rows)
            return PerTask(grads=rows, heads=heads)
        # reduced before the check, so that a non-finite row stops every rank alike
        world = self.sync.world
        if self.gramian_only:  # M = Σ_r J_r J_rᵀ / W²: a K × K all-reduce
            gram = self.sync.sum_(gram_matrix(rows).clone()) / world**2
            check_finite(step.names, gram=gram)
            return PerTask(gramian=gram, local=rows, heads=heads)
        gathered, start, end = self.sync.gather_rows(rows / world)
        check_finite(step.names, grads=gathered)
        return PerTask(
            grads=gathered,
            local=rows,
            span=(start, end),
            features=self.sync.gather_batch(features),
            heads=heads,
        )

    def write_shared(self, agg: Aggregation, step: Unpacked, per_task: PerTask) -> None:
        assert step.features is not None
        if per_task.local is None:
            assert per_task.grads is not None
            direction = combine(agg, per_task.grads).detach()
        elif agg.direction is None:  # this rank's rows, weighted (averaged over ranks after)
            direction = combine(agg, per_task.local).detach()
        else:  # this rank's columns of the global direction, at the local loss's scale
            assert per_task.span is not None and self.sync is not None
            start, end = per_task.span
            direction = agg.direction[start:end].detach() * self.sync.world
        torch.autograd.backward(
            step.features,
            grad_tensors=direction.to(step.features.dtype).view_as(step.features),
            inputs=self.shared,
            retain_graph=True,
        )


def representation_rows(
    split: list[SplitEntry],
    names: tuple[str, ...],
    losses: list[Tensor],
    features: Tensor,
    heads: HeadGrads | None = None,
) -> Tensor:
    """Rows ``∂ℓ_k/∂z`` (``K × numel(z)``): one backward pass into the heads' copies when every
    loss reads ``z`` only through its own copy, else K ``autograd.grad`` calls (through the
    copies, whose gradients add to ``z``'s; also when a loss reads another task's copy, which
    the one pass would credit to that task's row). With ``heads``, the one pass also takes the
    heads' gradients and fills ``heads`` when each head parameter is reached by one loss alone
    and no loss reads ``z`` itself (:func:`head_owners`, one walk before the pass)."""
    index_of = {name: i for i, name in enumerate(names)}
    usable = bool(split) and all(src is features for src, _, _ in split)
    tasks: list[int] = []
    for _, task, _ in split:
        index = task if isinstance(task, int) else index_of.get(task)
        if index is None or not 0 <= index < len(losses):
            usable = False
            break
        tasks.append(index)
    one_pass = usable and len(set(tasks)) == len(losses)
    if one_pass:
        leaves = [leaf for _, _, leaf in split]
        params = [] if heads is None else heads.params
        copies = {id(leaf): t for leaf, t in zip(leaves, tasks, strict=True)}
        owners, one_pass = head_owners(losses, params, features, copies)
    if one_pass:  # and each loss reads its own copies only
        extra = [] if owners is None else params
        total = torch.stack(losses).sum()
        direct, *rest = torch.autograd.grad(
            total, [features, *leaves, *extra], retain_graph=True, allow_unused=True
        )
        per_leaf = rest[: len(leaves)]
        if direct is None and heads is not None and owners is not None:
            heads.per_loss = [
                tuple(
                    g if owner == k else None
                    for g, owner in zip(rest[len(leaves) :], owners, strict=True)
                )
                for k in range(len(losses))
            ]
        if direct is None:  # no loss reads z except through its head's copy
            rows = torch.zeros(
                len(losses), features.numel(), dtype=features.dtype, device=features.device
            )
            for k, g in zip(tasks, per_leaf, strict=True):
                if g is not None:
                    rows[k] += g.reshape(-1)
            return rows
    if split:  # the copies cut z out of the heads' graphs: differentiate through them
        leaves = [leaf for _, _, leaf in split]
        if any(leaf.shape != features.shape for leaf in leaves):
            raise ValueError(
                "task_input was given a tensor other than the features the closure returned"
            )
        rows = jacobian(losses, [features, *leaves])
        n = features.numel()
        out = rows[:, :n].clone()
        for j in range(len(leaves)):
            out += rows[:, n * (j + 1) : n * (j + 2)]
        return out
    return jacobian(losses, [features])


def check_upstream(features: Tensor, heads: list[Tensor]) -> None:
    """Raise a one-line ``ValueError`` when a task-specific parameter feeds ``z`` (a stem
    before the encoder left out of ``shared``): at the representation level the method's update
    reaches what lies before ``z`` only through ``backward(z, d, inputs=shared)``, so such a
    parameter would miss it (with the heads reading copies of ``z`` it got no gradient at all;
    with heads reading ``z`` itself, only the heads' ``Σ_k c_k ∇ℓ_k``). Walks ``z``'s graph
    once, at the first step."""
    wanted = {id(p): p for p in heads}
    found: list[Tensor] = []
    for node in graph_nodes([(features.grad_fn, features.output_nr)]) if wanted else ():
        variable = leaf_of(node)
        if variable is not None and id(variable) in wanted:
            found.append(wanted.pop(id(variable)))
            if not wanted:
                break
    if found:
        shapes = ", ".join(str(tuple(p.shape)) for p in found)
        raise ValueError(
            f"{len(found)} parameter(s) not in shared feed the features z (shapes {shapes}): "
            "at the representation level the method's update reaches what lies before z only "
            "through shared, so they would miss it; pass them in shared= (the encoder and "
            "everything before z)"
        )


def check_beside(losses: list[Tensor], features: Tensor, shared: list[Tensor]) -> None:
    """Raise a one-line ``ValueError`` when a loss reaches a shared parameter other than
    through ``z`` (a head that reads an encoder weight, a penalty on one, a loss on another
    output of ``z``'s node): at the representation level the update reaches the shared
    parameters only through ``backward(z, d, inputs=shared)``, so that part of their gradient
    would be lost. Checked at the first step (a walk of the losses' graphs up to ``z``)."""
    if reached_beside(losses, features, shared):
        raise ValueError(
            "a loss reaches shared parameters other than through the features z (a head "
            "reading an encoder weight, a penalty on one): at the representation level that "
            "part of their gradient would be lost; keep such terms out of the closure's losses, "
            "or use a parameter-level method"
        )


def head_owners(
    losses: list[Tensor], heads: list[Tensor], features: Tensor, copies: dict[int, int]
) -> tuple[list[int] | None, bool]:
    """One walk of each loss's graph up to the copies of ``z``: for each head parameter the one
    loss that reaches it (``None`` unless every head parameter is reached by exactly one loss
    and no head module has a backward hook: a parameter two heads share or one no loss reaches
    leaves the heads to their backward pass), and whether every loss reaches only its own
    task's copies (``copies``: a copy's id → its task). Then the gradient of ``Σ_k ℓ_k`` is
    ``∂ℓ_k/∂p`` for the owner ``k``, and each copy's gradient is its own task's row. A loss that
    reaches ``z``'s node reads ``z`` itself: ``(None, True)`` (the pass sees it and K passes
    follow)."""
    index = {id(p): j for j, p in enumerate(heads)}
    owners: list[int | None] = [None] * len(heads)
    stop = features.grad_fn
    usable, own_copies = True, True
    for k, loss in enumerate(losses):
        if loss.grad_fn is None:
            usable = usable and id(loss) not in index  # a loss that is a head parameter
            continue
        for node in graph_nodes([(loss.grad_fn, loss.output_nr)]):
            if node is stop:
                return None, True  # a loss reads z itself
            if module_hook(node):
                usable = False  # a module hook would see ∂ℓ_k alone
            variable = leaf_of(node)
            if variable is not None:
                j = index.get(id(variable))
                if j is not None:
                    usable = usable and owners[j] in (None, k)  # not reached by two losses
                    owners[j] = k
                task = copies.get(id(variable))
                own_copies = own_copies and task in (None, k)
    if not usable or any(owner is None for owner in owners):
        return None, own_copies
    return [owner for owner in owners if owner is not None], own_copies


def combine(agg: Aggregation, grads: Tensor) -> Tensor:
    """The shared update: the method's direction, or ``Gᵀw`` summed in float32 at least (under
    a float16 model ``Σ w_k g_k`` in float16 would round, or overflow, where the weights are
    large and the gradients cancel)."""
    if agg.direction is not None:
        return agg.direction
    assert agg.weights is not None
    work = torch.promote_types(grads.dtype, torch.float32)
    return agg.weights.to(device=grads.device, dtype=work) @ grads.to(work)


def weighted_sum(losses: list[Tensor], coeffs: Tensor) -> Tensor:
    """``Σ_k c_k ℓ_k`` (the coefficients detached, in the losses' dtype; on CUDA copied from
    the host without waiting for the device, as :func:`~mtopt.core.method.as_weights` does)."""
    device = losses[0].device
    c = coeffs.detach().to(device=device, dtype=losses[0].dtype, non_blocking=device.type == "cuda")
    return (torch.stack(losses) * c).sum()


def check_finite(
    names: tuple[str, ...], grads: Tensor | None = None, gram: Tensor | None = None
) -> None:
    """Raise a ``FloatingPointError`` naming the tasks whose per-task gradient is not finite
    (one reduction over the rows, or the Gramian's diagonal)."""
    if grads is not None:
        # a row sum is non-finite iff an entry is (or the sum overflows: then look closer)
        peaks = grads.sum(dim=1).tolist()
        if not all(math.isfinite(v) for v in peaks):
            peaks = [
                v if math.isfinite(v) else float(grads[k].abs().amax()) for k, v in enumerate(peaks)
            ]
    elif gram is not None:
        peaks = torch.diagonal(gram).tolist()
    else:
        return
    bad = [n for n, v in zip(names, peaks, strict=True) if not math.isfinite(v)]
    if bad:
        dtype = f" in {grads.dtype}" if grads is not None else ""
        raise FloatingPointError(
            f"the gradient of task(s) {bad} is not finite (inf or NaN): {nonfinite_hint(dtype)}"
        )
