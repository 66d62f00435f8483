"""Building an optimizer: which parameters are shared, and the gradient source for the method's
level (:mod:`mtopt.engine.sources`), chosen once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from mtopt.core.capabilities import ClosureMethod
from mtopt.core.gramian import GramianEngine
from mtopt.core.method import Method
from mtopt.engine.distributed import ProcessGroupSync
from mtopt.engine.sources import (
    AutoSource,
    GradientSource,
    GramianSource,
    JacobianSource,
    LossSource,
    RepresentationSource,
)

#: How per-task gradients of the shared parameters are obtained (``MultiTaskOptimizer(engine=)``).
ENGINES = ("auto", "jacobian", "batched", "gramian")

Shared = Iterable[Tensor] | nn.Module | Sequence[nn.Module] | None


def batched_pass(engine: str, devices: set[torch.device]) -> bool:
    """Whether the Jacobian of parameters on ``devices`` comes from one batched backward pass
    rather than K passes: asked for (``"batched"``), or under ``"auto"`` when they all lie on
    one CUDA device, where it was measured faster (``docs/benchmarks.md``, *Results on a GPU*).
    On the CPU it was not, so ``"auto"`` keeps the K passes there."""
    if engine == "batched":
        return True
    return engine == "auto" and len(devices) == 1 and next(iter(devices)).type == "cuda"


def split_parameters(
    optimizer: torch.optim.Optimizer, shared: Shared, method: Method
) -> tuple[list[Tensor], list[Tensor], list[nn.Module] | None]:
    """``(shared parameters, task-specific parameters, shared modules or None)``: the shared
    part as given (modules or parameters; ``None``: every optimized parameter), the rest of the
    optimizer's trainable parameters task-specific."""
    optimized = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if shared is None and method.level == "rep":
        raise ValueError(
            f"method {method.name!r} works on the shared representation: pass "
            "shared=<the encoder or its parameters> so the heads are told apart (with "
            "shared=None every parameter would count as shared and the heads would never "
            "train)"
        )
    modules: list[nn.Module] | None = None
    items: list[Tensor | nn.Module] = []  # the shared part as given, when not one module
    if isinstance(shared, nn.Module):
        modules = [shared]
    elif shared is not None:
        items = list(shared)
        if items and all(isinstance(m, nn.Module) for m in items):
            modules = cast(list[nn.Module], list(items))  # all modules: checked just above
    params: list[Tensor]
    if modules is not None:
        unique: dict[int, Tensor] = {}
        for m in modules:
            for p in m.parameters():
                unique.setdefault(id(p), p)
        params = list(unique.values())
    elif shared is None:
        params = optimized
    else:
        params = cast(list[Tensor], list(items))  # parameters (not all items are modules)
    if shared is not None:
        ids = {id(p) for p in optimized}
        params = [p for p in params if p.requires_grad]
        missing = [i for i, p in enumerate(params) if id(p) not in ids]
        if missing:
            raise ValueError(
                f"shared parameters at positions {missing} are not in the optimizer's "
                "param_groups; they would never be updated"
            )
    if not params:
        raise ValueError("no shared parameter requires grad")
    shared_ids = {id(p) for p in params}
    return params, [p for p in optimized if id(p) not in shared_ids], modules


def choose_source(
    method: Method,
    engine: str,
    shared: list[Tensor],
    modules: list[nn.Module] | None,
    max_jacobian_bytes: int,
    sync: ProcessGroupSync | None = None,
    heads: list[Tensor] | None = None,
) -> GradientSource:
    """The gradient source for the method's level and the requested engine; in a process group
    (``sync``) the source reduces what it computes (:mod:`mtopt.engine.distributed`).
    ``heads``: the task-specific parameters, whose per-task gradients the parameter- and
    representation-level sources take in their passes where they can
    (:class:`~mtopt.core.gradients.HeadGrads`)."""
    level = method.level
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if sync is not None:
        return _data_parallel_source(method, engine, shared, sync, heads)
    if engine == "gramian" and level != "param":
        raise ValueError(
            f"engine='gramian' is not possible: method {method.name!r} does not use parameter "
            f"gradients (it works at level {level!r})"
        )
    if level == "loss":
        return LossSource(shared)
    if level == "rep":
        # heads read per-task copies of z (one backward pass for all K rows), unless the
        # method re-runs the closure itself
        return RepresentationSource(shared, not isinstance(method, ClosureMethod), heads=heads)
    reasons = []
    if not method.gramian_only:
        reasons.append(f"method {method.name!r} needs the gradients, not only their Gramian")
    if modules is None:
        reasons.append("shared was given as parameters; pass the shared module(s) instead")
    if engine == "gramian" and reasons:
        raise ValueError("engine='gramian' is not possible: " + "; ".join(reasons))
    jac = _jacobian_source(engine, shared, heads=heads)
    if reasons or engine in ("jacobian", "batched"):
        return jac
    assert modules is not None
    # rows that fit the Jacobian budget are kept: Jᵀw is then a product, not a pass
    gram = GramianSource(GramianEngine(modules, shared, keep_bytes=max_jacobian_bytes), heads=heads)
    if engine == "gramian":
        return gram
    row_bytes = sum(p.numel() for p in shared) * shared[0].element_size()
    return AutoSource(jac, gram, row_bytes, max_jacobian_bytes)


def _data_parallel_source(
    method: Method,
    engine: str,
    shared: list[Tensor],
    sync: ProcessGroupSync,
    heads: list[Tensor] | None = None,
) -> GradientSource:
    """The source in a process group: the Jacobian at the parameter level ("auto" included),
    never the Gramian engine, whose full-batch Gramian needs every rank's rows."""
    if engine == "gramian":
        raise ValueError(
            "engine='gramian' is not possible in a process group: the full batch's Gramian "
            "has cross-rank terms J_r J_sᵀ that only the rows carry; use engine='jacobian' "
            "(or 'auto', which picks it there)"
        )
    if method.level == "loss":
        source: GradientSource = LossSource(shared)
        source.sync = sync
        return source
    if method.level == "rep":
        split = not isinstance(method, ClosureMethod)
        return RepresentationSource(
            shared, split, sync=sync, gramian_only=method.gramian_only, heads=heads
        )
    return _jacobian_source(engine, shared, sync, heads)


def _jacobian_source(
    engine: str,
    shared: list[Tensor],
    sync: ProcessGroupSync | None = None,
    heads: list[Tensor] | None = None,
) -> JacobianSource:
    """The Jacobian source for ``engine``; a batched pass chosen by ``"auto"`` may fall back to
    K passes (:class:`~mtopt.engine.sources.JacobianSource`)."""
    batched = batched_pass(engine, {p.device for p in shared})
    return JacobianSource(
        shared, batched=batched, sync=sync, fallback=engine == "auto", heads=heads
    )
